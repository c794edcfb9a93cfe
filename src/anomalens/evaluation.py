"""Evaluate a fitted detector on a labelled test set (MVTec AD layout)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from . import metrics
from .data import MVTecCategory, Sample
from .detectors.base import Detector, Progress
from .prediction import Prediction


@dataclass
class EvaluationResult:
    """Metrics of one evaluation, as fractions in [0, 1] (NaN where undefined).

    Attributes:
        metrics: overall ``image_auroc``, ``image_ap``, ``image_f1_max``, ``pixel_auroc``, ``aupro``,
            plus the observed ``false_alarm_rate`` (normal images flagged) and ``detection_rate``
            (defective images flagged) at the model's threshold.
        per_defect: the same metrics restricted to ``good`` + one defect type.
        predictions: every prediction (maps included).
        seconds: wall time of prediction, and per image in ms.
    """

    metrics: dict[str, float]
    per_defect: dict[str, dict[str, float]]
    predictions: list[Prediction] = field(repr=False)
    n_images: int = 0
    n_errors: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """JSON-ready dict (without maps)."""
        return {
            "metrics": self.metrics,
            "per_defect": self.per_defect,
            "n_images": self.n_images,
            "n_errors": self.n_errors,
            "seconds_predict": round(self.seconds, 3),
            "ms_per_image": round(1000.0 * self.seconds / max(1, self.n_images), 2),
        }


def _safe(fn, *args) -> float:
    try:
        return fn(*args)
    except ValueError:
        return math.nan


def compute_metrics(preds: Sequence[Prediction], pixel: bool = True) -> dict[str, float]:
    """Image and pixel metrics of predictions that carry ground truth (errors are skipped)."""
    ok = [p for p in preds if p.ok and p.gt_label is not None]
    labels = [p.gt_label for p in ok]
    scores = [p.pred_score for p in ok]
    out = {
        "image_auroc": _safe(metrics.image_auroc, labels, scores),
        "image_ap": _safe(metrics.average_precision, labels, scores),
        "image_f1_max": _safe(lambda a, b: metrics.f1_max(a, b)[0], labels, scores),
    }
    if pixel:
        masks = [p.gt_mask for p in ok if p.gt_mask is not None]
        maps = [p.anomaly_map for p in ok if p.gt_mask is not None]
        out["pixel_auroc"] = _safe(metrics.pixel_auroc, masks, maps) if masks else math.nan
        out["aupro"] = _safe(metrics.aupro, masks, maps) if masks else math.nan
    normal = [p for p in ok if p.gt_label == 0]
    bad = [p for p in ok if p.gt_label == 1]
    out["false_alarm_rate"] = float(np.mean([p.pred_label for p in normal])) if normal else math.nan
    out["detection_rate"] = float(np.mean([p.pred_label for p in bad])) if bad else math.nan
    return out


def evaluate(
    detector: Detector,
    samples: Sequence[Sample] | MVTecCategory | str,
    *,
    per_defect: bool = True,
    progress: Progress | None = None,
) -> EvaluationResult:
    """Predict every test sample and compute the metrics (overall and per defect type).

    Args:
        detector: a fitted detector.
        samples: test samples, an :class:`~anomalens.data.MVTecCategory`, or its folder path.
        per_defect: also compute metrics for ``good`` + each defect type.
    """
    if isinstance(samples, str) or hasattr(samples, "__fspath__"):
        samples = MVTecCategory(samples)  # type: ignore[arg-type]
    if isinstance(samples, MVTecCategory):
        samples = samples.test_samples()
    t0 = time.perf_counter()
    preds = detector.predict(samples, progress=progress)
    seconds = time.perf_counter() - t0
    overall = compute_metrics(preds)
    by_defect: dict[str, dict[str, float]] = {}
    if per_defect:
        types = sorted({p.defect_type for p in preds if p.defect_type and p.defect_type != "good"})
        for t in types:
            sub = [p for p in preds if p.defect_type in ("good", t)]
            by_defect[t] = compute_metrics(sub)
    return EvaluationResult(overall, by_defect, preds, len(preds), sum(not p.ok for p in preds), seconds)
