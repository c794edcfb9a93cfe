"""Evaluate a fitted detector on a labelled test set: an MVTec AD category, ``good/`` beside folders
of defective images, or anomalib's Folder layout (:mod:`anomalens.folders`), masks optional.

Image metrics (image AUROC, AP, F1-max, and the false-alarm and detection rates at the model's
threshold) need good and defective images; pixel metrics (pixel AUROC, AUPRO) need a ground-truth
mask for every defective image. What the data does not allow is left out of the metrics and named,
with the reason, in :attr:`EvaluationResult.absent`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from . import metrics
from .calibration import conformal_threshold, f1_threshold, false_alarm_band
from .data import MVTecCategory, Sample
from .folders import labelled_samples, layout_of
from .errors import CalibrationError
from .detectors.base import Detector, Progress
from .prediction import Prediction


@dataclass
class EvaluationResult:
    """Metrics of one evaluation, as fractions in [0, 1]: only those the data allows.

    Attributes:
        metrics: overall ``image_auroc``, ``image_ap``, ``image_f1_max``, ``pixel_auroc``, ``aupro``,
            plus the observed ``false_alarm_rate`` (normal images flagged) and ``detection_rate``
            (defective images flagged) at the model's threshold; a metric the data does not allow
            is absent (see ``absent``).
        per_defect: the same metrics restricted to ``good`` + one defect type (those they allow).
        absent: metric name -> why the data does not allow it (e.g. defective images without masks:
            no ``pixel_auroc`` or ``aupro``).
        layout: ``"mvtec"``, ``"good+defective"``, ``"folder"``, or None for samples passed as a list.
        predictions: every prediction (maps included).
        seconds: wall time of prediction, and per image in ms.
        pro_curve: ``(fpr, pro)`` of all images up to ``fpr`` 0.3, thinned to about 2000 points (for plots).
    """

    metrics: dict[str, float]
    per_defect: dict[str, dict[str, float]]
    predictions: list[Prediction] = field(repr=False)
    n_images: int = 0
    n_errors: int = 0
    seconds: float = 0.0
    pro_curve: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    absent: dict[str, str] = field(default_factory=dict)
    layout: str | None = None

    def ground_truth(self) -> dict[str, int]:
        """Counts of the scored images: ``n_good``, ``n_defective``, ``n_defective_with_mask``."""
        ok = [p for p in self.predictions if p.ok and p.gt_label is not None]
        bad = [p for p in ok if p.gt_label == 1]
        return {"n_good": sum(p.gt_label == 0 for p in ok), "n_defective": len(bad),
                "n_defective_with_mask": sum(p.gt_mask is not None for p in bad)}

    def to_dict(self) -> dict:
        """JSON-ready dict (without maps): ``metrics``, ``metrics_absent`` (name -> reason),
        ``per_defect``, ``layout``, ``ground_truth`` counts, image counts and timings."""
        return {
            "metrics": self.metrics,
            "metrics_absent": self.absent,
            "per_defect": self.per_defect,
            "layout": self.layout,
            "ground_truth": self.ground_truth(),
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


def compute_metrics(preds: Sequence[Prediction], pixel: bool = True, pixels: metrics.PixelScores | None = None) -> dict[str, float]:
    """Image and pixel metrics of predictions that carry ground truth (errors are skipped).

    Args:
        preds: predictions with ``gt_label`` (and ``gt_mask`` for pixel metrics).
        pixel: also compute pixel AUROC and AUPRO (NaN unless every defective image has ``gt_mask``).
        pixels: :class:`~anomalens.metrics.PixelScores` built over a superset of ``preds`` (indexed by
            ``id`` of the prediction in ``pixels_index``), to avoid sorting the pixels again.
    """
    ok = [p for p in preds if p.ok and p.gt_label is not None]
    labels = [p.gt_label for p in ok]
    scores = [p.pred_score for p in ok]
    out = {
        "image_auroc": _safe(metrics.image_auroc, labels, scores),
        "image_ap": _safe(metrics.average_precision, labels, scores),
        "image_f1_max": _safe(lambda a, b: metrics.f1_max(a, b)[0], labels, scores),
    }
    if pixel and any(p.gt_label == 1 and p.gt_mask is None for p in ok):
        out["pixel_auroc"] = out["aupro"] = math.nan  # pixel metrics of only the masked defects would mislead
    elif pixel:
        with_mask = [p for p in ok if p.gt_mask is not None]
        if pixels is None and with_mask:
            pixels = metrics.PixelScores([p.gt_mask for p in with_mask], [p.anomaly_map for p in with_mask])
            idx = list(range(len(with_mask)))
        else:
            where = getattr(pixels, "index_of", {})
            idx = [where[id(p)] for p in with_mask if id(p) in where]
        out["pixel_auroc"] = _safe(pixels.auroc, idx) if with_mask else math.nan
        out["aupro"] = _safe(pixels.aupro, idx) if with_mask else math.nan
    normal = [p for p in ok if p.gt_label == 0]
    bad = [p for p in ok if p.gt_label == 1]
    out["false_alarm_rate"] = float(np.mean([p.pred_label for p in normal])) if normal else math.nan
    out["detection_rate"] = float(np.mean([p.pred_label for p in bad])) if bad else math.nan
    return out


IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "aupro")
METRIC_NAMES = {"image_auroc": "image AUROC", "image_ap": "AP", "image_f1_max": "F1-max", "pixel_auroc": "pixel AUROC",
                "aupro": "AUPRO", "false_alarm_rate": "false-alarm rate", "detection_rate": "detection rate"}


def absent_metrics(preds: Sequence[Prediction]) -> dict[str, str]:
    """The metrics labelled predictions do not allow, each with the reason (for people).

    No defective image: no image AUROC, AP, F1-max, detection rate or pixel metric. No good image: no
    image AUROC, AP, F1-max or false-alarm rate. A defective image without ``gt_mask``: no pixel AUROC
    or AUPRO (they need every defective image's mask; the masked ones alone would mislead).
    """
    ok = [p for p in preds if p.ok and p.gt_label is not None]
    good = [p for p in ok if p.gt_label == 0]
    bad = [p for p in ok if p.gt_label == 1]
    out: dict[str, str] = {}
    if not bad:
        why = "no defective image in the test data (image AUROC, AP and F1-max compare good with defective images)"
        out.update(dict.fromkeys(IMAGE_METRICS + ("detection_rate",) + PIXEL_METRICS, why))
    if not good:
        why = "no good image in the test data (image AUROC, AP and F1-max compare good with defective images)"
        for k in IMAGE_METRICS + ("false_alarm_rate",):
            out.setdefault(k, why)
    unmasked = [p for p in bad if p.gt_mask is None]
    if unmasked:
        example = os.path.basename(unmasked[0].image_path or "") or "an image"
        head = ("the defective images have no ground-truth masks" if len(unmasked) == len(bad)
                else f"{len(unmasked)} of {len(bad)} defective images have no ground-truth mask (e.g. {example})")
        why = (f"{head}: pixel AUROC and AUPRO need a mask for every defective image "
               "(ground_truth/<defect folder>/<stem>_mask.png, or --mask-dir with masks named by image stem)")
        out.update(dict.fromkeys(PIXEL_METRICS, why))
    return out


def _allowed(m: dict[str, float], absent: dict[str, str]) -> dict[str, float]:
    """``m`` without the absent metrics and without NaN (undefined) values."""
    return {k: v for k, v in m.items() if k not in absent and not (isinstance(v, float) and math.isnan(v))}


def evaluate(
    detector: Detector,
    samples: Sequence[Sample] | MVTecCategory | str | os.PathLike | None = None,
    *,
    normal_dir: str | os.PathLike | None = None,
    abnormal_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    mask_dir: str | os.PathLike | None = None,
    per_defect: bool = True,
    progress: Progress | None = None,
) -> EvaluationResult:
    """Predict every test sample and compute the metrics the data allows (overall and per defect type).

    Args:
        detector: a fitted detector.
        samples: test samples (a list of :class:`~anomalens.data.Sample`), an
            :class:`~anomalens.data.MVTecCategory`, or a folder in any layout of
            :func:`anomalens.folders.labelled_samples` (MVTec AD category; ``good/`` beside defect
            folders; the root of ``normal_dir`` / ``abnormal_dir`` / ``mask_dir``). Masks optional.
        normal_dir, abnormal_dir, mask_dir: anomalib's Folder layout (relative to ``samples`` when
            that is a folder).
        per_defect: also compute metrics for ``good`` + each defect type.

    Returns:
        An :class:`EvaluationResult`; metrics the data does not allow are in ``absent`` with the reason.

    Raises:
        DatasetError: the folder is in no known layout, or a folder is missing or empty.
        ConfigError: ``mask_dir`` without ``abnormal_dir``.
        NotFittedError: the detector is not fitted.
    """
    layout = None
    if isinstance(samples, MVTecCategory):
        samples = samples.root
    if samples is None or isinstance(samples, (str, os.PathLike)):
        layout = layout_of(samples, normal_dir=normal_dir, abnormal_dir=abnormal_dir)
        samples = labelled_samples(samples, normal_dir=normal_dir, abnormal_dir=abnormal_dir, mask_dir=mask_dir)
    t0 = time.perf_counter()
    preds = detector.predict(samples, progress=progress)
    seconds = time.perf_counter() - t0
    absent = absent_metrics(preds)
    pixel_ok = not (set(PIXEL_METRICS) & set(absent))
    with_mask = [p for p in preds if p.ok and p.gt_label is not None and p.gt_mask is not None]
    pixels = None
    if with_mask and any(p.gt_label == 1 for p in with_mask):
        # one sort of all pixels serves every subset (see metrics.PixelScores)
        pixels = metrics.PixelScores([p.gt_mask for p in with_mask], [p.anomaly_map for p in with_mask])
        pixels.index_of = {id(p): i for i, p in enumerate(with_mask)}  # type: ignore[attr-defined]
    overall = compute_metrics(preds, pixel=pixel_ok, pixels=pixels)
    for k, v in overall.items():
        if k not in absent and isinstance(v, float) and math.isnan(v):
            absent[k] = "undefined on these images"
    by_defect: dict[str, dict[str, float]] = {}
    if per_defect:
        types = sorted({p.defect_type for p in preds if p.defect_type and p.defect_type != "good"})
        for t in types:
            sub = [p for p in preds if p.defect_type in ("good", t)]
            sub_absent = absent_metrics(sub)
            by_defect[t] = _allowed(compute_metrics(sub, pixel=not (set(PIXEL_METRICS) & set(sub_absent)), pixels=pixels), sub_absent)
    pro = None
    if pixels is not None and pixel_ok:
        try:
            fpr, pr = pixels.pro_curve()
            keep = fpr <= 0.3
            step = max(1, int(keep.sum()) // 2000)  # enough points to draw, not millions
            pro = (fpr[keep][::step], pr[keep][::step])
        except ValueError:
            pro = None
    return EvaluationResult(_allowed(overall, absent), by_defect, preds, len(preds), sum(not p.ok for p in preds), seconds, pro,
                            absent, layout)


def threshold_table(detector: Detector, preds: Sequence[Prediction], alphas: Sequence[float] = (0.01, 0.05, 0.1)) -> list[dict]:
    """How the conformal threshold keeps its promise on labelled test images, for several ``alpha``.

    For each target false-alarm rate ``alpha``, the threshold is re-derived from the detector's
    calibration scores (no refit, no test image involved) and applied to the test scores.

    Returns:
        One dict per ``alpha``: ``alpha``, ``threshold``, ``n_calibration``, ``n_good``, ``false_alarms``,
        ``observed_far``, ``band`` (central 95% binomial band of the false-alarm fraction among
        ``n_good`` images at rate ``alpha``), ``within_band``, ``detection_rate``; or ``error`` when the
        calibration set is too small for that ``alpha``.
    """
    detector._check_fitted()
    cal = detector.calibration
    ok = [p for p in preds if p.ok and p.gt_label is not None]
    good = np.array([p.pred_score for p in ok if p.gt_label == 0])
    bad = np.array([p.pred_score for p in ok if p.gt_label == 1])
    rows = []
    for a in alphas:
        row: dict = {"alpha": a, "n_calibration": int(cal.scores.size), "n_good": int(good.size)}  # type: ignore[union-attr]
        try:
            t = conformal_threshold(cal.scores, a)  # type: ignore[union-attr]
        except CalibrationError as exc:
            row["error"] = str(exc)
            rows.append(row)
            continue
        fa = int(np.sum(good > t))
        lo, hi = false_alarm_band(good.size, a) if good.size else (math.nan, math.nan)
        far = fa / good.size if good.size else math.nan
        row.update(
            threshold=t,
            false_alarms=fa,
            observed_far=far,
            band=[lo, hi],
            within_band=bool(lo <= far <= hi) if good.size else None,
            detection_rate=float(np.mean(bad > t)) if bad.size else math.nan,
        )
        rows.append(row)
    return rows


def f1_comparison(preds: Sequence[Prediction]) -> dict:
    """The best-F1 threshold on these labelled predictions (an oracle: chosen on the test set itself)
    against the model's own threshold: ``{"threshold", "f1", "model_threshold", "model_f1"}``."""
    ok = [p for p in preds if p.ok and p.gt_label is not None]
    y = np.array([p.gt_label for p in ok])
    s = np.array([p.pred_score for p in ok])
    try:
        t, f1 = f1_threshold(y, s)
    except CalibrationError:
        return {}
    yhat = np.array([p.pred_label for p in ok])
    tp = int(np.sum((yhat == 1) & (y == 1)))
    model_f1 = 2 * tp / max(1, int(np.sum(yhat == 1)) + int(np.sum(y == 1)))
    return {"threshold": t, "f1": f1, "model_threshold": ok[0].threshold if ok else None, "model_f1": model_f1}
