"""The prediction loop shared by every inference engine (torch detectors, ONNX Runtime, MuSc).

An engine supplies a *scorer*: ``uint8`` RGB images -> image scores, anomaly maps at each image's own
size and, for memory-bank detectors, an evidence function. The loop reads the inputs (an unreadable
image becomes a failed :class:`~anomalens.prediction.Prediction` and the others go on), batches them,
and turns scores and maps into decisions, masks, conformal p-values, regions and evidence, all from
one :class:`~anomalens.calibration.Calibration`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterable

import numpy as np

from .calibration import Calibration, batch_thresholds
from .data import Sample
from .errors import DatasetError, ImageReadError
from .explain import Evidence, Region, find_regions
from .io import ImageLike, image_name, read_mask, to_rgb_array
from .prediction import Prediction

#: ``progress(stage, done, total)``: called during long steps (stage names: "features", "coreset",
#: "calibration", "predict").
Progress = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    """A :data:`Progress` callback that does nothing."""
    return None


#: ``evidence(index in batch, (H, W), region) -> Evidence | None``
EvidenceFn = Callable[[int, tuple[int, int], Region], Evidence | None]
#: ``scorer(uint8 RGB images) -> (image scores, anomaly maps at each image's size, evidence function)``
Scorer = Callable[[list[np.ndarray]], tuple[list[float], list[np.ndarray], EvidenceFn | None]]


def read_input(item: ImageLike | Sample, i: int) -> tuple[np.ndarray, dict[str, Any]] | Prediction:
    """Read one input of :meth:`Detector.predict`: ``(uint8 RGB image, ground-truth fields)``, or a
    failed :class:`Prediction` naming it when it (or its mask) cannot be read.

    The fields are ``image_path`` and, for a :class:`~anomalens.data.Sample`, ``gt_label``,
    ``defect_type`` and ``gt_mask`` (``bool`` ``(H, W)``; all False for a good image, None for a
    defective image without a mask).
    """
    gt: dict[str, Any] = {}
    src: Any = item
    if isinstance(item, Sample):
        src = item.path
        gt = {"gt_label": item.gt_label, "defect_type": item.defect_type}
    name = image_name(src, i)
    try:
        img = to_rgb_array(src)
        if isinstance(item, Sample):
            if item.mask_path is not None:
                gt["gt_mask"] = read_mask(item.mask_path, img.shape[:2])
            elif item.gt_label == 0:
                gt["gt_mask"] = np.zeros(img.shape[:2], bool)
    except (ImageReadError, DatasetError) as exc:
        return Prediction.failed(name if isinstance(src, (str, os.PathLike)) else None, str(exc), **{k: v for k, v in gt.items() if k != "gt_mask"})
    gt["image_path"] = str(src) if isinstance(src, (str, os.PathLike)) else None
    return img, gt


def as_inputs(images: Any) -> list:
    """The inputs of one ``predict`` call as a list: one image (a path, a PIL image, a
    :class:`~anomalens.data.Sample`, or a numpy array ``(H, W)`` / ``(H, W, C)``) becomes a list of
    one; a 4-D array ``(N, H, W, C)`` becomes ``N`` images; any other iterable is listed as it is.

    Raises:
        ImageReadError: a numpy array that is neither one image nor a stack of images (1-D, 5-D, ...).
    """
    if isinstance(images, np.ndarray):
        if images.ndim in (2, 3):
            return [images]
        if images.ndim == 4:
            return list(images)
        raise ImageReadError("<array>", f"expected one image (H, W) or (H, W, C), or a stack (N, H, W, C), got shape {images.shape}")
    if isinstance(images, (str, os.PathLike, Sample)) or hasattr(images, "getpixel"):  # PIL images are not iterable
        return [images]
    return list(images)


def normalized_score(score: float, threshold: float, low: float) -> float:
    """``score`` on a [0, 1] scale with exactly 0.5 at ``threshold`` (anomalib's convention).

    With the unit ``u = threshold - low`` (``low``: the lowest normal calibration score, so ``u`` is
    the spread of normal scores below the threshold)::

        score <= threshold:  max(0, 0.5 * (1 - (threshold - score) / u))     0 at low, linear
        score >  threshold:  1 - 0.5 * exp(-(score - threshold) / u)         0.82 at threshold + u

    Monotone in ``score`` (it ranks images as ``pred_score`` does; only scores below every
    calibration score tie, at 0), finite, continuous with the same slope on both sides of the
    threshold, and above 0.5 for flagged images (up to rounding right at the threshold). Above it approaches 1
    without reaching it, so defects keep their order by severity instead of piling up at 1 (which
    a clipped line does as soon as defects score beyond ``threshold + u``). When ``u`` is not positive
    (one calibration score, or a best-F1 threshold under every normal score) it is ``max(|threshold|, 1)``.

    Returns:
        A float in [0, 1]; NaN when ``score`` or ``threshold`` is NaN.
    """
    if math.isnan(score) or math.isnan(threshold):
        return math.nan
    unit = threshold - low
    if not (unit > 0.0 and math.isfinite(unit)):
        unit = max(abs(threshold), 1.0)
    z = (score - threshold) / unit
    if z <= 0.0:
        return float(max(0.0, 0.5 * (1.0 + z)))
    return float(1.0 - 0.5 * math.exp(-z))


def run_predictions(
    images: Iterable[ImageLike | Sample],
    scorer: Scorer,
    cal: Calibration,
    batch_size: int,
    *,
    keep_images: bool = False,
    progress: Progress | None = None,
    on_batch_thresholds: Callable[[float, float], None] | None = None,
) -> list[Prediction]:
    """The prediction loop shared by every inference engine (torch detectors, ONNX Runtime).

    Reads each input (:func:`as_inputs`: one array is one image; an unreadable one becomes a failed
    :class:`Prediction`, the rest go on), scores batches with ``scorer``, and turns scores and maps
    into decisions, masks, p-values (and whether they are at their floor ``1 / (n + 1)``),
    :func:`normalized_score`, regions and, for flagged images, evidence, all from the calibration
    ``cal`` (its threshold and lowest score; batch-relative: the batch's threshold and lowest score). A batch-relative calibration
    (one-shot models) decides once every image is scored, from :func:`~anomalens.calibration.batch_thresholds`
    of all of them, and reports the thresholds to ``on_batch_thresholds(image, pixel)``.

    Raises:
        CalibrationError: batch-relative calibration and fewer than
            :data:`~anomalens.calibration.MIN_BATCH` readable images.
    """
    progress = progress or no_progress
    items = as_inputs(images)
    out: list[Prediction | None] = [None] * len(items)
    pending: list[tuple[int, np.ndarray, dict]] = []
    #: scored, not yet decided: (index, image, ground truth, score, map, evidence function, index in its batch)
    scored: list[tuple[int, np.ndarray, dict, float, np.ndarray, EvidenceFn | None, int]] = []

    n_cal = int(cal.scores.size)
    cal_low = float(cal.scores.min()) if n_cal else math.nan

    def decide(threshold: float, pixel_threshold: float) -> None:
        low = float(min(x[3] for x in scored)) if cal.is_batch_relative and scored else cal_low
        for i, img, gt, score, amap, evidence_fn, j in scored:
            mask = amap > pixel_threshold
            label = int(score > threshold)
            regions = find_regions(amap, mask)
            evidence = evidence_fn(j, img.shape[:2], regions[0]) if (label and regions and evidence_fn) else None
            p = None if cal.is_batch_relative else cal.p_value(float(score))
            out[i] = Prediction(
                image_path=gt.pop("image_path"),
                pred_score=float(score),
                pred_label=label,
                anomaly_map=amap,
                pred_mask=mask,
                p_value=p,
                threshold=threshold,
                normalized_score=normalized_score(float(score), threshold, low),
                p_value_at_floor=None if p is None or math.isnan(p) else bool(p * (n_cal + 1) <= 1.0 + 1e-9),
                regions=regions,
                evidence=evidence,
                image=img if keep_images else None,
                **gt,
            )
        scored.clear()

    def flush() -> None:
        if not pending:
            return
        scores, maps, evidence_fn = scorer([p[1] for p in pending])
        for j, ((i, img, gt), score, amap) in enumerate(zip(pending, scores, maps)):
            scored.append((i, img, gt, float(score), amap, evidence_fn, j))
        pending.clear()
        if not cal.is_batch_relative:
            decide(cal.threshold, cal.pixel_threshold)

    done = 0
    for i, item in enumerate(items):
        read = read_input(item, i)
        if isinstance(read, Prediction):
            out[i] = read
            done += 1
            progress("predict", done, len(items))
            continue
        img, gt = read
        pending.append((i, img, gt))
        if len(pending) >= batch_size:
            n_flush = len(pending)
            flush()
            done += n_flush
            progress("predict", done, len(items))
    n_flush = len(pending)
    flush()
    done += n_flush
    progress("predict", done, len(items))
    if cal.is_batch_relative:
        t, tp = batch_thresholds(np.array([x[3] for x in scored]), [x[4] for x in scored])
        if on_batch_thresholds is not None:
            on_batch_thresholds(t, tp)
        decide(t, tp)
    return out  # type: ignore[return-value]
