"""The decision thresholds of a fitted detector: read them, re-derive them for another false-alarm
rate, set the best-F1 one, or re-calibrate on new normal images (:mod:`anomalens.calibration`)."""

from __future__ import annotations

import hashlib
import math
import os
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from ..calibration import Calibration
from ..data import normal_images
from ..errors import CalibrationError, ImageReadError, NotFittedError
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
        self, images: Iterable[ImageLike] | str | os.PathLike, false_alarm_rate: float | None = None,
        progress: Progress | None = None, replace: bool = False,
    ) -> "Detector":
        """Add new normal images to the model's calibration (split conformal; the model is unchanged).

        The images are scored by the fitted model (held-out scores) and *added* to the calibration
        scores it holds (leave-one-out, cross-fit, held-out or few-shot scores: all out of sample, so
        the pool keeps the false-alarm promise with more scores; :mod:`anomalens.calibration`, "Adding
        normal images"); the thresholds are re-derived from the pool. An image already added before,
        or one the model was fitted on, is refused.

        Args:
            images: normal images the model was *not* fitted on (paths, arrays, a folder, or an MVTec
                category's ``train/good``).
            false_alarm_rate: new target ``alpha`` (strict). None: the model's requested rate (strict
                when it was given at fit), or the default rate relaxed to what the pool supports, but
                never above the model's current rate.
            replace: discard the model's calibration scores and use the new images alone.

        Raises:
            NotFittedError: not fitted.
            CalibrationError: the pool cannot support the rate (the message says how many images are
                needed; nothing is changed), an image the model was fitted on, or an image given twice
                or already added.
            ImageReadError: an image cannot be read (calibration never silently drops an image).
        """
        from ..calibration import pooled_false_alarm_rate

        self._check_fitted()
        cal = self.calibration
        assert cal is not None
        imgs = normal_images(images)
        if not imgs:
            raise CalibrationError("no calibration images given")
        fitted = {os.path.realpath(p) for p in (self.train_images or []) if p}
        reused = [x for x in imgs if isinstance(x, (str, os.PathLike)) and os.path.realpath(x) in fitted]
        if reused:
            raise CalibrationError(
                f"{len(reused)} of the {len(imgs)} calibration images were used to fit the model (e.g. {reused[0]}); "
                "calibrate on normal images the model has not seen, or the threshold will be too low"
            )
        digests = [image_digest(x) for x in imgs]
        if len(set(digests)) < len(digests):
            raise CalibrationError(f"the {len(imgs)} calibration images hold the same image more than once; each image counts once")
        keep = not replace and not cal.is_batch_relative
        again = set(digests) & set(cal.added) if keep else set()
        if again:
            raise CalibrationError(f"{len(again)} of the {len(imgs)} new images are already in the model's calibration; each image counts once")
        n = len(imgs) + (cal.scores.size if keep else 0)
        requested = self.requested_false_alarm_rate if false_alarm_rate is None else float(false_alarm_rate)
        alpha, note = pooled_false_alarm_rate(n, requested, math.nan if cal.is_batch_relative else cal.false_alarm_rate)
        scores, maxima = fitting.calibration_scores(self, imgs, progress or no_progress)
        self.calibration = cal.pooled(scores, maxima, digests, alpha, note, keep=keep)
        self.false_alarm_rate, self.requested_false_alarm_rate = alpha, requested
        return self


def image_digest(image: ImageLike) -> str:
    """SHA-256 identifying an image: of the file's bytes for a path, else of its pixels and shape."""
    if isinstance(image, (str, os.PathLike)):
        h = hashlib.sha256()
        try:
            with open(image, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as exc:
            raise ImageReadError(image, exc.strerror or str(exc)) from None
        return h.hexdigest()
    arr = np.ascontiguousarray(np.asarray(image))
    return hashlib.sha256(repr((arr.shape, str(arr.dtype))).encode() + arr.tobytes()).hexdigest()
