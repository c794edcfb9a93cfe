"""What every video detector shares: the fitted threshold, the decision delay, whole-video
prediction from the frame stream, and saving / loading (:mod:`anomalens.video.persistence`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..calibration import Calibration
from ..errors import ModelFileError, NotFittedError, VideoReadError
from .results import FramePrediction, VideoPrediction
from .smoothing import TemporalSmoother


class VideoModel:
    """Base of the video detectors (:class:`~anomalens.video.objects_detector.ObjectVideoDetector`,
    :class:`~anomalens.video.cells.CellVideoDetector`). Subclasses set ``method`` and implement
    ``fit``, ``predict_stream``, ``get_params``, ``_state`` and ``_restore``."""

    is_video = True  # a model of frames in time (the image commands refuse it)
    name = "video"
    method = ""
    #: what scores the frames (:class:`~anomalens.contract.AnomalyDetector`): video models run on torch
    engine = "torch"

    calibration: Calibration | None
    temporal_sigma: float
    false_alarm_rate: float
    fit_info: dict

    @property
    def threshold(self) -> float:
        """Frame threshold (``pred_label = pred_score > threshold``).

        Raises:
            NotFittedError: not fitted."""
        self._check_fitted()
        return self.calibration.threshold  # type: ignore[union-attr]

    @property
    def pixel_threshold(self) -> float:
        """Threshold of ``anomaly_map`` for ``pred_mask``.

        Raises:
            NotFittedError: not fitted."""
        self._check_fitted()
        return self.calibration.pixel_threshold  # type: ignore[union-attr]

    @property
    def delay(self) -> int:
        """Frames between reading a frame and knowing its smoothed score."""
        return TemporalSmoother(self.temporal_sigma).radius

    def _check_fitted(self) -> None:
        if self.calibration is None:
            raise NotFittedError(f"this {type(self).__name__} is not fitted: call fit() or load a model first")

    def get_params(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict_stream(self, video: str | os.PathLike, *, keep_frames: bool = False) -> Iterator[FramePrediction]:  # pragma: no cover
        raise NotImplementedError

    def predict(
        self, video: str | os.PathLike, on_frame: Callable[[FramePrediction], None] | None = None, *, keep_frames: bool = False
    ) -> VideoPrediction:
        """Score a whole video; the per-frame results go to ``on_frame`` (e.g. a video writer) and are
        not kept. A video that stops early gives its frames so far and ``error`` (no exception).

        Raises:
            NotFittedError: not fitted.
        """
        cols: dict[str, list] = {k: [] for k in ("s", "r", "l", "m", "a", "area", "c")}
        error = None
        t0 = time.perf_counter()
        try:
            for fp in self.predict_stream(video, keep_frames=keep_frames):
                for k, v in zip(cols, (fp.pred_score, fp.raw_score, fp.pred_label, fp.motion_score, fp.appearance_score,
                                       100.0 * float(fp.pred_mask.mean()), fp.cause)):
                    cols[k].append(v)
                if on_frame is not None:
                    on_frame(fp)
        except VideoReadError as exc:
            error = str(exc)
        f = lambda k: np.asarray(cols[k], dtype=np.float64)  # noqa: E731
        return VideoPrediction(
            video=str(video), pred_scores=f("s"), raw_scores=f("r"), pred_labels=np.asarray(cols["l"], dtype=np.int64),
            motion_scores=f("m"), appearance_scores=f("a"), anomalous_area_pct=f("area"), causes=cols["c"],
            threshold=self.threshold, seconds=time.perf_counter() - t0, error=error,
        )

    def decision_function(self, video: str | os.PathLike) -> np.ndarray:
        """Per-frame anomaly scores of a whole video: the smoothed ``pred_score`` of each frame,
        ``float64`` ``(T,)``, in the units of :attr:`threshold`. A video that stops early gives the
        scores of its frames so far.

        Raises:
            NotFittedError: not fitted.
        """
        self._check_fitted()
        return self.predict(video).pred_scores

    def save(self, directory: str | os.PathLike, key: bytes | None = None) -> Path:
        """Write the model (safetensors + JSON + manifest, no pickle) as a whole new folder swapped in
        for ``directory``: a kill leaves the old model or the new one.

        Args:
            key: signing key; None = ``ANOMALENS_MODEL_KEY`` when set (:mod:`anomalens.manifest`).

        Raises:
            NotFittedError: not fitted.
            ModelFileError: ``directory`` holds files that are not model files.
        """
        from .persistence import save_video_model

        self._check_fitted()
        return save_video_model(self, directory, key)

    @classmethod
    def load(cls, directory: str | os.PathLike, key: bytes | None = None) -> "VideoModel":
        """Load a saved video model of either method (objects or cells), every file checked against
        its manifest first; as :func:`anomalens.load_detector`, which loads every kind of model.

        Args:
            key: signing key; None = ``ANOMALENS_MODEL_KEY`` when set: unsigned or badly signed
                models are then refused.

        Raises:
            ModelFileError: missing, corrupt, modified, unsigned (with a key), of an older video
                format (re-fit) or mismatched files, or not a video model.
        """
        from ..loading import load_detector

        model = load_detector(directory, key=key)
        if not isinstance(model, VideoModel):
            raise ModelFileError(f"{directory} holds a {model.name!r} model, not a video model (use anomalens predict)")
        return model
