"""The video detectors and which one ``anomalens video fit`` makes by default.

* ``"objects"`` (:class:`~anomalens.video.objects_detector.ObjectVideoDetector`): objects found from
  the background and the optical flow, tracked, and scored per attribute (speed, size, appearance)
  by kNN density against the normal training objects; the cause names the attribute and the box.
* ``"cells"`` (:class:`~anomalens.video.cells.CellVideoDetector`): optical-flow histograms and CNN
  appearance per grid cell against memories of normal video.

``VideoDetector`` is the default method's class; ``VideoDetector.load`` loads a model of either.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import VideoModel
from .cells import CellVideoDetector
from .objects_detector import ObjectVideoDetector
from .results import FramePrediction, ObjectScore, VideoPrediction
from .sources import iter_labelled

#: the video detectors by method name
METHODS: dict[str, type[VideoModel]] = {"cells": CellVideoDetector, "objects": ObjectVideoDetector}
#: the method ``anomalens video fit`` uses unless told: the objects (AI-VAD's design; settings chosen
#: by leave-one-video-out on real events), not the cells (tuned on events nobody held out, they fell
#: on unseen videos of the same camera)
DEFAULT_METHOD = "objects"
#: the default method's class (its ``load`` loads either method)
VideoDetector = METHODS[DEFAULT_METHOD]


def make_video_detector(method: str = DEFAULT_METHOD, **params) -> VideoModel:
    """A new, unfitted video detector of ``method`` (``"objects"`` or ``"cells"``) with ``params``.

    Raises:
        ConfigError: unknown method, or invalid parameters for it.
    """
    cls = METHODS.get(method)
    if cls is None:
        raise ConfigError(f"unknown video method {method!r}; choose one of {', '.join(METHODS)}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(f"invalid option for the {method!r} video method: {exc}") from None


__all__ = ["CellVideoDetector", "DEFAULT_METHOD", "FramePrediction", "METHODS", "ObjectScore", "ObjectVideoDetector", "VideoDetector",
           "VideoModel", "VideoPrediction", "iter_labelled", "make_video_detector"]
