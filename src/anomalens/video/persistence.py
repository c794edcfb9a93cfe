"""Saving and loading video models: one folder (safetensors + JSON + manifest, written as a whole and
swapped in; :mod:`anomalens.serialization`), whichever the method.

``config.json`` holds ``detector: "video"``, the ``method`` (``"objects"`` or ``"cells"``), the
video format version :data:`VIDEO_FORMAT`, the parameters, the thresholds and the fit's record; the
tensors hold the method's memories and the calibration scores. A video model of another video format
is refused with a message to re-fit it: no old layout is read through shims.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..calibration import Calibration
from ..errors import ConfigError, ModelFileError
from ..serialization import load_model, save_model

if TYPE_CHECKING:
    from .base import VideoModel

#: version of the video models' layout (2: the object detector, one config for both methods; 3: the
#: objects' velocity histogram and min-max scales, both methods' episode threshold; 4: the objects'
#: velocity is the box's histogram beside its fastest strip's, without the probes' options; 5: AI-VAD's
#: frame score without ``combine``, border boxes keep their track's appearance; 6: frames resized by
#: :mod:`anomalens.resampling`)
VIDEO_FORMAT = 6


def _classes() -> dict:
    from .cells import CellVideoDetector
    from .objects_detector import ObjectVideoDetector

    return {"objects": ObjectVideoDetector, "cells": CellVideoDetector}


def save_video_model(det: "VideoModel", directory: str | os.PathLike, key: bytes | None = None) -> Path:
    """Write a fitted video model to ``directory`` (see the module docstring).

    Raises:
        ModelFileError: ``directory`` holds files that are not model files.
    """
    cal = det.calibration
    assert cal is not None
    tensors, extra = det._state()  # type: ignore[attr-defined]
    tensors = {**tensors, "calibration.scores": torch.from_numpy(cal.scores), "calibration.map_maxima": torch.from_numpy(cal.map_maxima)}
    config = {
        "detector": det.name, "method": det.method, "video_format": VIDEO_FORMAT, "params": det.get_params(),
        **cal.config_fields(), "fit_info": det.fit_info, "state": extra,
    }
    return save_model(directory, config, tensors, key=key)


def load_video_model(directory: str | os.PathLike, key: bytes | None = None) -> "VideoModel":
    """Load a video model saved by :func:`save_video_model`.

    Raises:
        ModelFileError: not a video model, another video format (re-fit), an invalid config, or
            tensors missing or of the wrong shape (and every check of :func:`~anomalens.serialization.load_model`).
    """
    config, tensors = load_model(directory, key)
    if config.get("detector") != "video":
        raise ModelFileError(f"{directory} holds a {config.get('detector')!r} model, not a video model (use anomalens predict)")
    if config.get("video_format") != VIDEO_FORMAT:
        raise ModelFileError(
            f"{directory} is a video model of an older format (video format {config.get('video_format', 1)}, this version reads "
            f"{VIDEO_FORMAT}): re-fit it with `anomalens video fit` on the same normal footage"
        )
    cls = _classes().get(config.get("method"))
    if cls is None:
        raise ModelFileError(f"{directory}: unknown video method {config.get('method')!r}")
    try:
        det = cls(**config["params"])
        det._restore(config.get("state") or {}, tensors, str(directory))
    except (TypeError, KeyError, ValueError, ConfigError) as exc:
        raise ModelFileError(f"{directory}: invalid video model config ({exc})") from None
    det.calibration = Calibration.restore(
        config, tensors["calibration.scores"].numpy(), tensors["calibration.map_maxima"].numpy(), where=str(directory)
    )
    det.false_alarm_rate = det.calibration.false_alarm_rate  # the per-frame rate the threshold implies, stored once
    det.fit_info = config.get("fit_info", {})
    return det


def check_tensor(tensors: dict, name: str, shape: tuple, where: str) -> torch.Tensor:
    """``tensors[name]``, checked against ``shape`` (None = any size on that axis).

    Raises:
        ModelFileError: missing, or another number of axes or size.
    """
    t = tensors.get(name)
    if t is None or t.ndim != len(shape) or any(s is not None and s != v for s, v in zip(shape, t.shape)):
        raise ModelFileError(f"{where}: tensor {name!r} is missing or has shape {None if t is None else list(t.shape)}")
    return t
