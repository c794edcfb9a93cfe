"""Evaluation metrics for anomaly detection (image level) and localisation (pixel level).

* image AUROC, average precision (AP): scikit-learn.
* F1-max: the best F1 over all thresholds of the precision-recall curve (scikit-learn's curve).
* pixel AUROC: scikit-learn over all pixels of all images.
* AUPRO: area under the per-region-overlap curve up to a false-positive rate of 0.3, divided by 0.3
  (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021, Sec. 4.2). Each connected
  ground-truth region (8-connectivity, scikit-image) counts equally whatever its size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from skimage.measure import label as cc_label
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


def _check_labels(labels: np.ndarray) -> None:
    if labels.min() == labels.max():
        raise ValueError("metric needs both normal (0) and anomalous (1) samples")


def image_auroc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve of image scores; labels 0/1. Raises ValueError if one class is absent."""
    y = np.asarray(labels)
    _check_labels(y)
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def average_precision(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Average precision (area under the precision-recall curve) with the anomalous class positive."""
    y = np.asarray(labels)
    _check_labels(y)
    return float(average_precision_score(y, np.asarray(scores, dtype=np.float64)))


def f1_max(labels: Sequence[int], scores: Sequence[float]) -> tuple[float, float]:
    """Best F1 over all thresholds, and the threshold that reaches it (``score >= threshold`` = anomalous)."""
    y = np.asarray(labels)
    _check_labels(y)
    p, r, t = precision_recall_curve(y, np.asarray(scores, dtype=np.float64))
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)[:-1]
    i = int(np.argmax(f1))
    return float(f1[i]), float(t[i])


def pixel_auroc(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> float:
    """ROC AUC over every pixel of every image; ``masks`` bool ``(H, W)``, ``maps`` float ``(H, W)``."""
    y = np.concatenate([np.asarray(m, dtype=bool).ravel() for m in masks])
    s = np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in maps])
    _check_labels(y.astype(np.int8))
    return float(roc_auc_score(y, s))


def pro_curve(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-region-overlap curve at every distinct score threshold.

    Returns:
        ``(fpr, pro)``, ``float64`` arrays, ascending in ``fpr``, starting at ``(0, 0)``: at threshold
        ``t``, ``fpr`` is the fraction of normal pixels with score ``>= t`` and ``pro`` the mean over
        ground-truth regions of the fraction of the region's pixels with score ``>= t``.

    Raises:
        ValueError: no anomalous region, or no normal pixel.
    """
    scores, weights_fp, weights_pro = [], [], []
    n_regions = 0
    n_normal = 0
    region_sizes = []
    labelled = []
    for m in masks:
        lab = cc_label(np.asarray(m, dtype=bool), connectivity=2)
        labelled.append(lab)
        k = int(lab.max())
        region_sizes.append(np.bincount(lab.ravel(), minlength=k + 1)[1:])
        n_regions += k
        n_normal += int((lab == 0).sum())
    if n_regions == 0:
        raise ValueError("AUPRO needs at least one anomalous region")
    if n_normal == 0:
        raise ValueError("AUPRO needs normal pixels")
    for lab, sizes, a in zip(labelled, region_sizes, maps):
        flat = lab.ravel()
        s = np.asarray(a, dtype=np.float64).ravel()
        scores.append(s)
        weights_fp.append((flat == 0) / n_normal)
        w = np.zeros(flat.shape, dtype=np.float64)
        fg = flat > 0
        w[fg] = 1.0 / (sizes[flat[fg] - 1] * n_regions)
        weights_pro.append(w)
    s = np.concatenate(scores)
    order = np.argsort(-s, kind="stable")
    s = s[order]
    fp = np.cumsum(np.concatenate(weights_fp)[order])
    pro = np.cumsum(np.concatenate(weights_pro)[order])
    # keep the last index of each run of equal scores (thresholds lie between distinct values)
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    fpr = np.r_[0.0, fp[last]]
    pr = np.r_[0.0, pro[last]]
    return np.minimum(fpr, 1.0), np.minimum(pr, 1.0)


def aupro(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve for ``fpr`` in ``[0, fpr_limit]`` (1.0 = perfect).

    The curve is integrated with the trapezoidal rule and interpolated linearly at ``fpr_limit``.
    """
    fpr, pro = pro_curve(masks, maps)
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit:
        j = int(np.searchsorted(fpr, fpr_limit))
        if j < fpr.size:
            x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
            yi = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0) if x1 > x0 else y1
            x, y = np.r_[x, fpr_limit], np.r_[y, yi]
    return float(np.trapezoid(y, x) / fpr_limit)
