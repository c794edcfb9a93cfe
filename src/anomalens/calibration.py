"""Decision thresholds from normal images only (no defective image needed).

We use split-conformal anomaly detection (Vovk et al., "Algorithmic Learning in a Random World", 2005;
Bates et al., "Testing for outliers with conformal p-values", Annals of Statistics 2023). Given the
scores ``s_1..s_n`` of ``n`` normal calibration images that the model did not learn from, a new
normal image's score is exchangeable with them, so its p-value
``p = (1 + #{i: s_i >= s}) / (n + 1)`` is super-uniform, and flagging ``p <= alpha`` raises a false
alarm on at most a fraction ``alpha`` of normal images (in expectation over the calibration draw).
Flagging ``p <= alpha`` is the same as ``s > t`` with ``t`` the ``ceil((n + 1)(1 - alpha))``-th
smallest calibration score. With ``n < 1/alpha - 1`` no finite threshold achieves ``alpha``; we then
use the largest calibration score and say so (``Calibration.note``).

The calibration scores come from the training images themselves, out of sample: PatchCore scores
each training image against the memory bank without that image's own patches (leave-one-image-out,
the jackknife; Barber et al., "Predictive inference with the jackknife+", Annals of Statistics
2021), PaDiM by K-fold cross-fitting. So every normal image serves both the model and calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError


def conformal_threshold(scores: np.ndarray, alpha: float) -> tuple[float, str]:
    """Threshold ``t`` so that a normal score exceeds it with probability at most ``alpha``.

    Args:
        scores: ``(n,)`` calibration scores of normal images, ``n >= 1``.
        alpha: target false-alarm rate in (0, 1).

    Returns:
        ``(t, note)``: ``note`` is empty, or explains that ``n`` was too small for ``alpha``.

    Raises:
        ConfigError: empty ``scores`` or ``alpha`` outside (0, 1).
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = s.size
    if n == 0:
        raise ConfigError("calibration needs at least one normal image score; got none")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"false-alarm rate must be in (0, 1), got {alpha}")
    rank = math.ceil((n + 1) * (1.0 - alpha))
    if rank > n:
        need = math.ceil(1.0 / alpha) - 1
        return float(s[-1]), (
            f"only {n} normal calibration images: a false-alarm rate of {alpha} needs at least {need}; "
            f"using the largest calibration score as threshold"
        )
    return float(s[rank - 1]), ""


@dataclass
class Calibration:
    """Calibration scores and the thresholds derived from them.

    Attributes:
        scores: ``float64`` ``(n,)`` out-of-sample image scores of the normal training images.
        map_maxima: ``float64`` ``(n,)`` the maximum of each of their anomaly maps.
        false_alarm_rate: the target ``alpha``.
        threshold: image threshold (``pred_label = pred_score > threshold``).
        pixel_threshold: pixel threshold (``pred_mask = anomaly_map > pixel_threshold``), chosen so that
            at most ``alpha`` of normal images show any anomalous pixel.
        note: non-empty when ``n`` was too small for ``alpha``.
    """

    scores: np.ndarray
    map_maxima: np.ndarray
    false_alarm_rate: float
    threshold: float
    pixel_threshold: float
    note: str = ""

    @classmethod
    def from_scores(cls, scores: np.ndarray, map_maxima: np.ndarray, false_alarm_rate: float) -> "Calibration":
        """Build thresholds from calibration scores (see :func:`conformal_threshold`)."""
        scores = np.asarray(scores, dtype=np.float64)
        map_maxima = np.asarray(map_maxima, dtype=np.float64)
        t, note = conformal_threshold(scores, false_alarm_rate)
        tp, _ = conformal_threshold(map_maxima, false_alarm_rate)
        return cls(scores, map_maxima, float(false_alarm_rate), t, tp, note)

    def p_value(self, score: float) -> float:
        """Conformal p-value of ``score``: ``(1 + #{s_i >= score}) / (n + 1)``, in ``(0, 1]``."""
        if math.isnan(score):
            return math.nan
        return float((1 + np.count_nonzero(self.scores >= score)) / (self.scores.size + 1))
