"""The decision thresholds of a fitted detector: read them, re-derive them for another false-alarm
rate, set the best-F1 one, or re-calibrate on new normal images (:mod:`anomalens.calibration`)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from ..calibration import Calibration
from ..data import normal_images
from ..errors import NotFittedError
from ..inference import Progress, no_progress
from ..io import ImageLike
from . import fitting

if TYPE_CHECKING:
    from .base import Detector


class Thresholds:
    """Mixed into :class:`~anomalens.detectors.base.Detector`: everything about its thresholds."""

    calibration: Calibration | None
    batch_thresholds: tuple[float, float] | None
    false_alarm_rate: float
    requested_false_alarm_rate: float | None

    def _check_fitted(self) -> None:
        """Raise :class:`~anomalens.errors.NotFittedError` before fit or load."""
        if self.calibration is None:
            raise NotFittedError(f"this {type(self).__name__} is not fitted: call fit() or load a model first")

    @property
    def threshold(self) -> float:
        """Image-level decision threshold (``pred_label = pred_score > threshold``); for a
        batch-relative (one-shot) model, that of the last predicted batch (NaN before any)."""
        self._check_fitted()
        if self.calibration.is_batch_relative and self.batch_thresholds:  # type: ignore[union-attr]
            return self.batch_thresholds[0]
        return self.calibration.threshold  # type: ignore[union-attr]

    @property
    def pixel_threshold(self) -> float:
        """Pixel-level threshold (``pred_mask = anomaly_map > pixel_threshold``); batch-relative models:
        as :attr:`threshold`."""
        self._check_fitted()
        if self.calibration.is_batch_relative and self.batch_thresholds:  # type: ignore[union-attr]
            return self.batch_thresholds[1]
        return self.calibration.pixel_threshold  # type: ignore[union-attr]

    def set_false_alarm_rate(self, alpha: float) -> None:
        """Re-derive both thresholds for a new target false-alarm rate ``alpha`` (no refit; strict).

        Raises:
            CalibrationError: the calibration scores are too few for ``alpha``.
        """
        self._check_fitted()
        cal = self.calibration
        self.calibration = Calibration.from_scores(cal.scores, cal.map_maxima, alpha, cal.source)  # type: ignore[union-attr]
        self.false_alarm_rate = self.requested_false_alarm_rate = float(alpha)

    def set_f1_threshold(self, labels: Sequence[int], scores: Sequence[float]) -> float:
        """Use the best-F1 image threshold on labelled images (1 = defective) instead of the conformal one.

        p-values and the pixel threshold stay conformal. :meth:`set_false_alarm_rate` goes back.

        Returns:
            The best F1.

        Raises:
            CalibrationError: the labels lack normal or defective images.
        """
        self._check_fitted()
        self.calibration, f1 = self.calibration.with_f1_threshold(np.asarray(labels), np.asarray(scores))  # type: ignore[union-attr]
        return f1

    def calibrate(
        self, images: Iterable[ImageLike] | str | os.PathLike, false_alarm_rate: float | None = None, progress: Progress | None = None
    ) -> "Detector":
        """Re-calibrate a fitted model on held-out normal images (split conformal; exact guarantee).

        Use it when new good images arrive from the line, or to replace the out-of-sample calibration
        of :meth:`fit` by a strict hold-out. The model itself is unchanged.

        Args:
            images: normal images the model was *not* fitted on (paths, arrays, a folder, or an MVTec
                category's ``train/good``).
            false_alarm_rate: new target ``alpha`` (strict); None keeps the model's request (the
                default rate is relaxed to what the images support, with a note).

        Raises:
            NotFittedError: not fitted.
            CalibrationError: fewer images than an explicit ``1/alpha - 1``, or images the model was fitted on.
            ImageReadError: an image cannot be read (calibration never silently drops an image).
        """
        self._check_fitted()
        return fitting.recalibrate(self, normal_images(images), false_alarm_rate, progress or no_progress)
