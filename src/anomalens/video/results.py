"""What a video detector returns: per frame (:class:`FramePrediction`, with its objects when the
detector sees objects: :class:`ObjectScore`) and per video (:class:`VideoPrediction`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..explain import Region


@dataclass
class ObjectScore:
    """One object of a frame and how abnormal it is.

    Attributes:
        track: track id (the same object in consecutive frames keeps it; unique within a video).
        box: ``(x0, y0, x1, y1)`` in the frame's pixels (exclusive ends).
        scores: attribute -> score in units of normal objects (0 and 1: the least and the most unusual
            normal training object for that attribute, scored by cross-fit), e.g. ``{"speed": 2.4, "appearance": 0.8}``.
        score: the sum of ``scores`` (AI-VAD's object score).
        cause: the attribute with the largest score.
    """

    track: int
    box: tuple[int, int, int, int]
    scores: dict[str, float]
    score: float
    cause: str


@dataclass
class FramePrediction:
    """The result for one frame of a video.

    Attributes:
        index: frame number in the video (0-based).
        pred_score: temporally smoothed frame score (the decision uses it).
        raw_score: the frame's own score before smoothing.
        pred_label: 1 = abnormal (``pred_score > threshold``).
        anomaly_map: ``float32`` ``(H, W)`` at the frame's size.
        pred_mask: ``bool`` ``(H, W)``: ``anomaly_map > pixel_threshold``.
        motion_score, appearance_score: the frame's largest motion and appearance scores (NaN when off;
            object detector: the largest speed and appearance scores of its objects, whose sum over
            the scored attributes is ``raw_score``).
        cause: what made the frame's score: ``"motion"`` or ``"appearance"`` (cell detector), an
            attribute (``"speed"``, ``"size"``, ``"appearance"``; object detector), ``""`` without objects.
        regions: connected regions of ``pred_mask``, strongest first.
        objects: the frame's objects, most abnormal first (object detector; empty for the cell detector).
        image: the frame (``uint8`` RGB), when asked for.
        gt_label: ground truth when known.
    """

    index: int
    pred_score: float
    raw_score: float
    pred_label: int
    anomaly_map: np.ndarray
    pred_mask: np.ndarray
    motion_score: float
    appearance_score: float
    cause: str
    regions: list[Region] = field(default_factory=list)
    objects: list[ObjectScore] = field(default_factory=list)
    image: np.ndarray | None = None
    gt_label: int | None = None


@dataclass
class VideoPrediction:
    """Frame scores and decisions of one video (no maps: those are streamed, see ``predict_stream``).

    Attributes:
        video: the video's path.
        pred_scores, raw_scores, motion_scores, appearance_scores: ``float64`` ``(T,)``.
        pred_labels: ``int64`` ``(T,)``.
        anomalous_area_pct: ``float64`` ``(T,)``: percent of the frame in ``pred_mask``.
        causes: ``T`` strings.
        threshold: the frame threshold used.
        seconds: wall time of the prediction; ``fps``: frames per second.
        error: why the video stopped early (the frames before it are kept), else None.
    """

    video: str
    pred_scores: np.ndarray
    raw_scores: np.ndarray
    pred_labels: np.ndarray
    motion_scores: np.ndarray
    appearance_scores: np.ndarray
    anomalous_area_pct: np.ndarray
    causes: list[str]
    threshold: float
    seconds: float
    error: str | None = None

    @property
    def n_frames(self) -> int:
        return int(self.pred_scores.size)

    @property
    def fps(self) -> float:
        return self.n_frames / self.seconds if self.seconds > 0 else math.nan
