"""Decision thresholds from normal images only (no defective image needed), and the F1 alternative.

Conformal thresholds (Vovk et al., "Algorithmic Learning in a Random World", 2005; Bates et al.,
"Testing for outliers with conformal p-values", Annals of Statistics 2023). Given the scores
``s_1..s_n`` of ``n`` normal calibration images the model did not learn from, a new normal image's
score is exchangeable with them, so its p-value ``p = (1 + #{i: s_i >= s}) / (n + 1)`` is
super-uniform, and flagging ``p <= alpha`` raises a false alarm on at most a fraction ``alpha`` of
normal images (on average over the draw of the calibration set). Flagging ``p <= alpha`` is the same
as ``s > t`` with ``t`` the ``ceil((n + 1)(1 - alpha))``-th smallest calibration score; this needs
``n >= 1/alpha - 1`` images (99 for 1%, 19 for 5%, 9 for 10%); with fewer, no threshold can promise
``alpha`` and :func:`conformal_threshold` raises :class:`~anomalens.errors.CalibrationError`.

Where the calibration scores come from (``Calibration.source``):

* ``"held-out"``: normal images kept out of fitting (``Detector.fit(..., holdout=0.2)`` or
  ``Detector.calibrate(images)``): split conformal, the guarantee above holds exactly.
* ``"leave-one-out"`` (PatchCore's default): each training image scored against the memory bank
  without its own patches (the jackknife; Barber et al., "Predictive inference with the jackknife+",
  Annals of Statistics 2021). No image is held out. The jackknife's worst-case guarantee is weaker
  (``2 alpha``), but its scores are those of a model fitted on ``n - 1`` images, a hair more
  pessimistic than the full model's (observed rates: docs/guides/thresholds.md).
* ``"cross-fit"`` (PaDiM's default): K-fold cross-fitting, the same idea with K folds.
* ``"few-shot"``: a model fitted on ``k`` normal images (``fit(..., shots=k)``), each scored against
  the memory bank of the *other* ``k - 1`` (and their augmented views). ``k`` scores support no rate
  below ``1 / (k + 1)``, so the threshold is the largest of them, the conformal rule at
  ``alpha = 1 / (k + 1)`` (33% at k = 2, 11% at k = 8); the leave-one-out models see one image fewer
  than the real one, so their scores run high and the observed rate is lower. The note says so,
  and :meth:`Detector.calibrate` replaces it once enough normal images exist.
* ``"held-out"`` added by :meth:`Detector.calibrate` to any of the above (the source then names both,
  e.g. ``"leave-one-out+held-out"``): see "Adding normal images" below.
* ``"batch"``: one normal image leaves nothing to leave out. Decisions are then relative to each
  predicted batch (mode ``"batch"``, :func:`batch_thresholds`): an image is NG when its score is
  more than 3 robust standard deviations above the batch median, as for zero-shot.

Adding normal images (:meth:`Detector.calibrate`, ``anomalens calibrate``). New normal images from the
line are scored by the fitted model, which never saw them: held-out scores. They are *added* to the
calibration scores the model already holds, not put in their place: every score in the pool is an
out-of-sample score of a normal image (held-out; leave-one-out or cross-fit, from a model that saw
fewer images than the deployed one, so a hair high; few-shot, from one or more shots fewer, higher
still), so none is lower in distribution than a new normal image's score under the deployed model,
and the pooled threshold keeps the promise (conservatively where the old scores run high) with more
scores, which support lower rates and vary less. Replacing them instead by a few new scores threw
that away: 2 images cannot set a 5% threshold. The SHA-256 of each added image is kept, so the same
image is never counted twice. ``replace=True`` discards the old scores (a model re-fitted, a line
that changed).

Pixel threshold: the same rule applied to the maximum of each normal image's anomaly map, so at
most a fraction ``alpha`` of normal images shows any pixel in ``pred_mask``.

Where labelled defective images exist, :func:`f1_threshold` gives the threshold of best F1 instead;
it then depends on those images and carries no false-alarm guarantee.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from .errors import AnomalensError, CalibrationError, ConfigError, ModelFileError

SOURCES = ("held-out", "leave-one-out", "cross-fit", "few-shot", "batch")
MODES = ("conformal", "f1", "batch")
#: robust z of the batch-relative rule (:func:`batch_thresholds`)
BATCH_Z = 3.0
#: fewest readable images a batch-relative decision accepts
MIN_BATCH = 5
#: the target false-alarm rate when none is asked for (relaxed when the normal images cannot support it)
DEFAULT_FALSE_ALARM_RATE = 0.01


def check_source(source: str) -> None:
    """Raise :class:`~anomalens.errors.ConfigError` unless ``source`` is one of :data:`SOURCES`, or
    several joined by ``+`` (a pooled calibration)."""
    if not (isinstance(source, str) and source and all(part in SOURCES for part in source.split("+"))):
        raise ConfigError(f"calibration source must be one of {SOURCES} (or several joined by '+'), got {source!r}")


def min_calibration_images(alpha: float) -> int:
    """Fewest normal calibration images that support a false-alarm rate ``alpha``: ``ceil(1/alpha - 1)``."""
    return max(1, math.ceil(1.0 / alpha - 1.0 - 1e-9))


def check_calibration_size(n: int, alpha: float) -> None:
    """Raise :class:`~anomalens.errors.CalibrationError` when ``n`` normal images cannot calibrate ``alpha``."""
    need = min_calibration_images(alpha)
    if n < need:
        hint = f"; {n} images support false-alarm rates of {1.0 / (n + 1):.4f} or more" if n else ""
        raise CalibrationError(
            f"a false-alarm rate of {alpha:g} needs at least {need} normal calibration images, got {n}{hint}"
        )


def supported_false_alarm_rate(n: int, requested: float | None, strict: bool | None = None) -> tuple[float, str]:
    """The false-alarm rate ``n`` normal calibration scores support, and a note when it is not the one asked for.

    ``requested`` None means :data:`DEFAULT_FALSE_ALARM_RATE`, not strict: when ``n`` images are too few
    for it, the smallest rate they support, ``1 / (n + 1)`` (the threshold is then the largest of their
    scores), is used instead and the note says so in one line. A rate the user asked for explicitly is
    strict (``strict`` None: strict exactly when ``requested`` is given); few-shot fitting passes
    ``strict=False``, as ``k`` shots support nothing below ``1 / (k + 1)``.

    Returns:
        ``(alpha, note)``; ``note`` is empty when ``alpha`` is the rate asked for.

    Raises:
        CalibrationError: strict and ``n < 1/alpha - 1``, or ``n == 0``.
    """
    target = DEFAULT_FALSE_ALARM_RATE if requested is None else float(requested)
    strict = requested is not None if strict is None else strict
    need = min_calibration_images(target)
    if n >= need:
        return target, ""
    if strict or n < 1:
        check_calibration_size(n, target)
    alpha = 1.0 / (n + 1)
    note = (
        f"false-alarm rate {alpha:.3g}, not {target:g}: {n} normal calibration images support no lower rate "
        f"({target:g} needs {need}; add normal images with `anomalens calibrate`)"
    )
    return alpha, note


def conformal_threshold(scores: np.ndarray, alpha: float) -> float:
    """Threshold ``t`` so that a normal score exceeds it with probability at most ``alpha``.

    Args:
        scores: ``(n,)`` calibration scores of normal images.
        alpha: target false-alarm rate in (0, 1).

    Returns:
        ``t``, the ``ceil((n + 1)(1 - alpha))``-th smallest score (``pred_label = score > t``).

    Raises:
        ConfigError: ``alpha`` outside (0, 1).
        CalibrationError: no scores, or fewer than ``1/alpha - 1`` (the message gives the number needed).
    """
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"false-alarm rate must be in (0, 1), got {alpha}")
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = s.size
    check_calibration_size(n, alpha)
    rank = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)
    return float(s[rank - 1])


def f1_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Threshold of best F1 on labelled images (1 = defective): ``(t, f1)`` with ``pred_label = score > t``.

    Raises:
        CalibrationError: the labels lack normal or defective images.
    """
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if y.size == 0 or y.min() == y.max():
        raise CalibrationError("an F1 threshold needs both normal and defective labelled images")
    from .metrics import f1_max

    f1, t = f1_max(y, s)
    # f1_max flags score >= t; we flag score > t, so step just below t
    below = s[s < t]
    return (float(below.max()) if below.size else float(np.nextafter(t, -np.inf))), f1


def robust_center_scale(values) -> tuple[float, float]:
    """``(median, 1.4826 * MAD)`` of all elements of ``values`` (array or tensor): a centre and a
    standard deviation that a minority of outliers does not move (Leys et al., "Detecting outliers:
    Do not use standard deviation around the mean, use absolute deviation around the median",
    J. Exp. Soc. Psychology 2013). The scale is at least 1e-12 (constant values)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    med = float(np.median(v))
    return med, max(1.4826 * float(np.median(np.abs(v - med))), 1e-12)


def robust_threshold(values: np.ndarray, z: float = BATCH_Z) -> float:
    """``median + z * 1.4826 * MAD`` of ``values``: ``z`` robust standard deviations above the median.

    Flags values far above most of the others without any normal reference (Hampel's outlier rule).
    Assumes most values are normal.
    """
    med, sd = robust_center_scale(values)
    return med + z * sd


def batch_thresholds(scores: np.ndarray, maps: Sequence[np.ndarray], z: float = BATCH_Z) -> tuple[float, float]:
    """Batch-relative ``(image threshold, pixel threshold)``: :func:`robust_threshold` of the image
    scores and of all anomaly-map pixels of one batch of one product. Not a calibrated false-alarm rate.

    Args:
        scores: ``(N,)`` image scores; maps: ``N`` ``float32`` anomaly maps of any sizes.

    Raises:
        CalibrationError: fewer than :data:`MIN_BATCH` images.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size < MIN_BATCH:
        raise CalibrationError(
            f"batch-relative decisions need at least {MIN_BATCH} images scored together, got {scores.size}; "
            "predict more images at once, or calibrate the model on normal images (anomalens calibrate)"
        )
    pix = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
    return robust_threshold(scores, z), robust_threshold(pix, z)


def false_alarm_band(n: int, alpha: float, confidence: float = 0.95) -> tuple[float, float]:
    """Central ``confidence`` band of the false-alarm *fraction* among ``n`` normal images flagged
    independently with probability ``alpha`` (binomial quantiles / n)."""
    from scipy.stats import binom

    lo = binom.ppf((1 - confidence) / 2, n, alpha)
    hi = binom.ppf(1 - (1 - confidence) / 2, n, alpha)
    return float(lo / n), float(hi / n)


@dataclass
class Calibration:
    """Calibration scores and the thresholds derived from them.

    Attributes:
        scores: ``float64`` ``(n,)`` out-of-sample image scores of normal images (see ``source``).
        map_maxima: ``float64`` ``(n,)`` the maximum of each of their anomaly maps.
        false_alarm_rate: the target ``alpha``.
        threshold: image threshold (``pred_label = pred_score > threshold``).
        pixel_threshold: pixel threshold (``pred_mask = anomaly_map > pixel_threshold``), chosen so that
            at most ``alpha`` of normal images show any anomalous pixel.
        source: ``"held-out"``, ``"leave-one-out"``, ``"cross-fit"``, ``"few-shot"`` or ``"batch"``
            (module docstring).
        mode: ``"conformal"``; ``"f1"`` when ``threshold`` was set from labelled images; ``"batch"`` when
            there are no calibration scores and each predicted batch sets its own thresholds
            (``threshold`` and ``pixel_threshold`` are NaN here).
        note: how the threshold was set, for people.
        added: SHA-256 of each normal image :meth:`Detector.calibrate` added (their scores are the
            last ``len(added)`` of ``scores``), so that no image is counted twice.
    """

    scores: np.ndarray
    map_maxima: np.ndarray
    false_alarm_rate: float
    threshold: float
    pixel_threshold: float
    source: str = "leave-one-out"
    mode: str = "conformal"
    note: str = ""
    added: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_scores(
        cls, scores: np.ndarray, map_maxima: np.ndarray, false_alarm_rate: float, source: str = "leave-one-out"
    ) -> "Calibration":
        """Conformal thresholds from calibration scores (see :func:`conformal_threshold`).

        Raises:
            CalibrationError: fewer scores than ``false_alarm_rate`` needs.
        """
        check_source(source)
        scores = np.asarray(scores, dtype=np.float64)
        map_maxima = np.asarray(map_maxima, dtype=np.float64)
        t = conformal_threshold(scores, false_alarm_rate)
        tp = conformal_threshold(map_maxima, false_alarm_rate)
        note = f"conformal at false-alarm rate {false_alarm_rate:g} from {scores.size} {source} normal scores"
        return cls(scores, map_maxima, float(false_alarm_rate), t, tp, source, "conformal", note)

    @classmethod
    def batch_relative(cls, note: str) -> "Calibration":
        """No calibration scores: thresholds are set per predicted batch (:func:`batch_thresholds`)."""
        empty = np.zeros(0, dtype=np.float64)
        return cls(empty, empty, math.nan, math.nan, math.nan, "batch", "batch", note)

    @property
    def is_batch_relative(self) -> bool:
        return self.mode == "batch"

    def config_fields(self) -> dict:
        """What a model folder's ``config.json`` (or an exported graph's metadata) says of this
        calibration: ``threshold``, ``pixel_threshold`` and ``calibration`` (source, mode, note, number
        of scores, false-alarm rate, hashes of added images); thresholds and rate None when
        batch-relative. :meth:`restore` reads it back beside the scores."""
        batch = self.is_batch_relative
        return {
            "threshold": None if batch else self.threshold, "pixel_threshold": None if batch else self.pixel_threshold,
            "calibration": {"source": self.source, "mode": self.mode, "note": self.note, "n": int(self.scores.size),
                            "false_alarm_rate": None if batch else self.false_alarm_rate, "added_sha256": list(self.added)},
        }

    @classmethod
    def restore(
        cls, fields: dict, scores: np.ndarray, map_maxima: np.ndarray, *, where: str = "model"
    ) -> "Calibration":
        """Rebuild a saved calibration from what :meth:`config_fields` wrote and the saved scores,
        and check it against the thresholds stored beside them.

        Args:
            fields: ``{"threshold", "pixel_threshold", "calibration": {...}}`` as :meth:`config_fields` gives.
            scores: ``float64`` ``(N,)`` calibration image scores; map_maxima: ``float64`` ``(N,)``.
            where: names the file in errors.

        Raises:
            ModelFileError: no calibration block as :meth:`config_fields` writes it, scores that cannot
                calibrate the false-alarm rate, or stored thresholds that do not follow from the stored
                scores (an edited or mixed-up file). ``where`` names it.
        """
        c = fields.get("calibration")
        if not isinstance(c, dict) or not {"mode", "source", "note", "false_alarm_rate"} <= set(c):
            raise ModelFileError(f"{where}: no calibration block of this anomalens version: re-fit the model")
        mode, note, source, added = str(c["mode"]), str(c["note"]), str(c["source"]), tuple(c.get("added_sha256") or ())
        threshold, pixel_threshold = fields.get("threshold"), fields.get("pixel_threshold")
        false_alarm_rate = float("nan") if c["false_alarm_rate"] is None else float(c["false_alarm_rate"])
        if mode == "batch":
            if np.asarray(scores).size:
                raise ModelFileError(f"{where}: a batch-relative calibration must have no calibration scores")
            return cls.batch_relative(note)
        try:
            cal = cls.from_scores(scores, map_maxima, false_alarm_rate, source)
        except AnomalensError as exc:
            raise ModelFileError(f"{where}: calibration is unusable: {exc}") from None
        if note:
            cal = replace(cal, note=note)
        if len(added) > cal.scores.size or not all(isinstance(h, str) and len(h) == 64 for h in added):
            raise ModelFileError(f"{where}: malformed list of added calibration images")
        cal = replace(cal, added=added)
        if threshold is None or pixel_threshold is None:
            raise ModelFileError(f"{where}: stored thresholds are missing")
        if mode == "f1":
            cal = replace(cal, threshold=float(threshold), mode="f1")
        if not (
            math.isclose(cal.threshold, threshold) and math.isclose(cal.pixel_threshold, pixel_threshold)
        ):
            raise ModelFileError(f"{where}: stored thresholds do not match the stored calibration scores")
        return cal

    def with_f1_threshold(self, labels: np.ndarray, scores: np.ndarray) -> tuple["Calibration", float]:
        """A copy whose image threshold is the best-F1 one on labelled images, and that F1.

        p-values and the pixel threshold stay conformal.

        Raises:
            CalibrationError: the labels lack normal or defective images.
        """
        t, f1 = f1_threshold(labels, scores)
        n_bad = int(np.sum(np.asarray(labels) == 1))
        note = f"best-F1 threshold (F1 {f1:.3f}) on {len(labels)} labelled images ({n_bad} defective); no false-alarm guarantee"
        cal = replace(self, threshold=t, mode="f1", note=note)
        return cal, f1

    def p_value(self, score: float) -> float:
        """Conformal p-value of ``score``: ``(1 + #{s_i >= score}) / (n + 1)``, in ``(0, 1]``; NaN when
        batch-relative."""
        if math.isnan(score) or self.is_batch_relative:
            return math.nan
        return float((1 + np.count_nonzero(self.scores >= score)) / (self.scores.size + 1))

    def pooled(self, scores: np.ndarray, map_maxima: np.ndarray, digests: Sequence[str], alpha: float, note: str = "",
               keep: bool = True) -> "Calibration":
        """A conformal calibration at ``alpha`` from this one's scores (``keep``; none when batch-relative)
        and the held-out ``scores`` / ``map_maxima`` (``float64`` ``(m,)``) of new normal images whose
        SHA-256 are ``digests`` (module docstring, "Adding normal images"). ``note``: a relaxed rate.

        Raises:
            CalibrationError: an image already in this calibration, or too few scores for ``alpha``.
        """
        keep = keep and not self.is_batch_relative and self.scores.size > 0
        if keep and set(digests) & set(self.added):
            k = len(set(digests) & set(self.added))
            raise CalibrationError(f"{k} of the {len(digests)} new images are already in the model's calibration; each image counts once")
        old_n = self.scores.size if keep else 0
        parts = (self.source.split("+") if keep else []) + ["held-out"]
        source = "+".join(dict.fromkeys(parts))
        cal = Calibration.from_scores(
            np.concatenate([self.scores[:old_n], np.asarray(scores, dtype=np.float64)]),
            np.concatenate([self.map_maxima[:old_n], np.asarray(map_maxima, dtype=np.float64)]), alpha, source,
        )
        what = f"{old_n} {self.source} + {len(digests)} held-out" if keep else f"{len(digests)} held-out"
        cal.note = f"{note} ({cal.scores.size} normal scores: {what})" if note else (
            f"conformal at false-alarm rate {alpha:g} from {cal.scores.size} normal scores ({what})")
        cal.added = (tuple(self.added) if keep else ()) + tuple(digests)
        return cal


def pooled_false_alarm_rate(n: int, requested: float | None, current: float) -> tuple[float, str]:
    """The false-alarm rate of a calibration of ``n`` scores (:meth:`Calibration.pooled`), and a note
    when relaxed. ``requested`` (asked for, or the model's own request) is strict. None: the default
    rate, relaxed to what ``n`` scores support, but never above ``current`` (the model's rate now;
    NaN for a batch-relative model): a calibration never raises the rate unasked.

    Raises:
        CalibrationError: ``n`` too small for ``requested``, or (None) for ``current``; the message
            says how many images are needed and which rate they would support.
    """
    if requested is not None:
        return supported_false_alarm_rate(n, requested)
    alpha, note = supported_false_alarm_rate(n, None)
    if not math.isnan(current) and alpha > current * (1 + 1e-9):
        raise CalibrationError(
            f"{n} calibration scores support false-alarm rates of {alpha:.4g} or more, above the model's "
            f"{current:.4g} ({min_calibration_images(current)} are needed): add normal images, or pass a "
            f"false-alarm rate of {math.ceil(alpha * 1e4) / 1e4:g} or more explicitly (--false-alarm-rate) to accept it"
        )
    return alpha, note
