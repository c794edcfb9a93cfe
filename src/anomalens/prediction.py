"""The result type of every detector, with anomalib's field names."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .explain import Evidence, Region


@dataclass
class Prediction:
    """What a detector says about one image.

    Attributes:
        image_path: the input file, or None for in-memory images.
        pred_score: image anomaly score (``float``, higher = more anomalous; in the detector's own
            units, e.g. a patch-feature L2 distance for PatchCore). NaN when ``error`` is set.
        pred_label: 1 = anomalous (NG), 0 = normal (OK): ``pred_score > threshold``. None on error.
        anomaly_map: ``float32`` ``(H, W)`` per-pixel score at the input image's resolution, same units
            as ``pred_score``. None on error.
        pred_mask: ``bool`` ``(H, W)``: ``anomaly_map > pixel_threshold``. None on error.
        p_value: conformal p-value of ``pred_score`` against the normal calibration scores,
            ``(1 + #{calibration scores >= pred_score}) / (n + 1)``: small means unlike normal images.
            Its floor is ``1 / (n + 1)`` (every calibration score below ``pred_score``): every image
            beyond all normal ones gets it, so it does not rank severity there (``p_value_at_floor``).
        threshold: the image threshold used for ``pred_label``.
        regions: connected regions of ``pred_mask``, strongest first (:class:`~anomalens.explain.Region`).
        evidence: for a flagged image, the nearest normal training patch to its strongest region
            (:class:`~anomalens.explain.Evidence`; memory-bank detectors only), else None.
        gt_label: ground truth, 0 normal / 1 anomalous, when known.
        gt_mask: ground-truth ``bool`` ``(H, W)`` mask, when known.
        defect_type: ground-truth defect folder name (``"good"`` for normal), when known.
        image: the ``uint8`` RGB ``(H, W, 3)`` input, only when asked for (``keep_images=True``).
        error: why this image could not be scored (unreadable file, ...); None when it was scored.
        normalized_score: ``pred_score`` on a [0, 1] scale, exactly 0.5 at ``threshold``, monotone in
            ``pred_score`` (:func:`anomalens.inference.normalized_score`: linear from 0 at the lowest
            calibration score to 0.5 at ``threshold``, then rising towards 1). None on error or when
            the engine does not compute it.
        p_value_at_floor: True when ``p_value`` is its floor ``1 / (n + 1)``: the image scores above
            every calibration image, and the p-value says only "below 1 / (n + 1)". None without a p-value.
    """

    image_path: str | None
    pred_score: float
    pred_label: int | None
    anomaly_map: np.ndarray | None
    pred_mask: np.ndarray | None
    p_value: float | None = None
    threshold: float | None = None
    regions: list[Region] = field(default_factory=list)
    evidence: Evidence | None = None
    gt_label: int | None = None
    gt_mask: np.ndarray | None = field(default=None, repr=False)
    defect_type: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)
    error: str | None = None
    normalized_score: float | None = None
    p_value_at_floor: bool | None = None

    @property
    def ok(self) -> bool:
        """True when the image was scored (no error)."""
        return self.error is None

    @classmethod
    def failed(cls, image_path: str | None, error: str, **gt) -> "Prediction":
        """A prediction for an image that could not be scored."""
        return cls(image_path=image_path, pred_score=math.nan, pred_label=None, anomaly_map=None, pred_mask=None, error=error, **gt)

    @property
    def p_value_text(self) -> str | None:
        """The p-value for people: ``"0.137"``, or ``"<= 1/51"`` at its floor (``n = 50`` calibration
        images: the image is beyond every one of them); None without a p-value."""
        return p_value_text(self.p_value, self.p_value_at_floor)

    def summary(self, detail: bool = False) -> dict:
        """JSON-ready row: path, ``pred_score``, ``normalized_score``, label and decision, p-value (with
        ``p_value_at_floor`` and ``p_value_text``), threshold, anomalous area (% of pixels), region
        count, ground truth, error; with ``detail`` also the region list and the evidence."""
        area = None
        if self.pred_mask is not None:
            area = round(100.0 * float(self.pred_mask.mean()), 4)
        row = {
            "path": self.image_path,
            "pred_score": None if math.isnan(self.pred_score) else float(self.pred_score),
            "normalized_score": _finite(self.normalized_score),
            "pred_label": self.pred_label,
            "decision": None if self.pred_label is None else ("NG" if self.pred_label else "OK"),
            "p_value": self.p_value,
            "p_value_at_floor": self.p_value_at_floor,
            "p_value_text": self.p_value_text,
            "threshold": self.threshold,
            "anomalous_area_pct": area,
            "n_regions": None if self.pred_mask is None else len(self.regions),
            "gt_label": self.gt_label,
            "defect_type": self.defect_type,
            "error": self.error,
        }
        if detail:
            row["regions"] = [r.to_dict() for r in self.regions]
            row["evidence"] = None if self.evidence is None else self.evidence.to_dict()
        return row


def _finite(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


def p_value_text(p: float | None, at_floor: bool | None) -> str | None:
    """``"0.137"``, or ``"<= 1/51"`` when ``p`` is at its floor ``1 / (n + 1)``; None when ``p`` is None or NaN."""
    if p is None or math.isnan(p):
        return None
    if at_floor:
        return f"<= 1/{round(1.0 / p)}"
    return f"{p:.3f}"
