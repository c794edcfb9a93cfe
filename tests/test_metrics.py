"""Metrics against independent, slow reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from anomalens import metrics
from anomalens.inference import normalized_score


def slow_aupro(masks, maps, fpr_limit=0.3, n_thresholds=4000):
    """The MVTec AD evaluation recipe written plainly: sweep thresholds, loop over regions (scipy labels)."""
    all_scores = np.concatenate([m.ravel() for m in maps])
    thresholds = np.unique(all_scores)[::-1]
    if thresholds.size > n_thresholds:
        thresholds = thresholds[np.linspace(0, thresholds.size - 1, n_thresholds).astype(int)]
    regions = []
    for mask in masks:
        lab, k = ndimage.label(mask, structure=np.ones((3, 3)))
        regions.append([lab == r for r in range(1, k + 1)])
    normal = np.concatenate([~m.ravel() for m in masks])
    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        preds = [a >= t for a in maps]
        fp = np.concatenate([p.ravel() for p in preds])[normal].sum() / normal.sum()
        overlaps = [(p & r).sum() / r.sum() for p, rs in zip(preds, regions) for r in rs]
        fprs.append(fp)
        pros.append(np.mean(overlaps))
    fprs, pros = np.array(fprs), np.array(pros)
    # integrate to fpr_limit with linear interpolation at the limit
    keep = fprs <= fpr_limit
    x, y = list(fprs[keep]), list(pros[keep])
    j = np.searchsorted(fprs, fpr_limit)
    if x[-1] < fpr_limit and j < fprs.size:
        x.append(fpr_limit)
        y.append(pros[j - 1] + (pros[j] - pros[j - 1]) * (fpr_limit - fprs[j - 1]) / (fprs[j] - fprs[j - 1]))
    return np.trapezoid(y, x) / fpr_limit


def random_case(seed):
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for _ in range(4):
        m = np.zeros((24, 24), bool)
        for _ in range(rng.integers(0, 3)):
            y, x = rng.integers(0, 20, 2)
            m[y : y + rng.integers(1, 6), x : x + rng.integers(1, 6)] = True
        score = rng.random((24, 24)) + 0.8 * m * rng.random()
        masks.append(m)
        maps.append(np.round(score, 2))  # ties on purpose
    if not any(m.any() for m in masks):
        masks[0][3:6, 3:6] = True
    return masks, maps


@pytest.mark.parametrize("seed", range(6))
def test_aupro_matches_slow_reference(seed):
    masks, maps = random_case(seed)
    assert metrics.aupro(masks, maps) == pytest.approx(slow_aupro(masks, maps), abs=1e-9)


def test_aupro_extremes():
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    assert metrics.aupro([mask], [mask.astype(float)]) == pytest.approx(1.0)
    assert metrics.aupro([mask], [(~mask).astype(float)]) == pytest.approx(0.0)
    # small and large regions count equally: detect only the small one -> PRO 0.5 at low FPR
    m2 = np.zeros((32, 32), bool)
    m2[0:2, 0:2] = True
    m2[10:30, 10:30] = True
    score = np.zeros((32, 32))
    score[0:2, 0:2] = 1.0
    fpr, pro = metrics.pro_curve([m2], [score])
    assert pro[1] == pytest.approx(0.5) and fpr[1] == 0.0


def test_image_metrics():
    labels = [0, 0, 0, 1, 1]
    assert metrics.image_auroc(labels, [0.1, 0.2, 0.3, 0.4, 0.5]) == 1.0
    assert metrics.image_auroc(labels, [0.5, 0.4, 0.3, 0.2, 0.1]) == 0.0
    f1, t = metrics.f1_max(labels, [0.1, 0.2, 0.45, 0.4, 0.5])
    assert f1 == pytest.approx(0.8) and t == pytest.approx(0.4)
    assert metrics.average_precision(labels, [0.1, 0.2, 0.3, 0.4, 0.5]) == 1.0
    with pytest.raises(ValueError, match="both"):
        metrics.image_auroc([0, 0], [0.1, 0.2])
    mask = np.array([[0, 1], [0, 0]], bool)
    assert metrics.pixel_auroc([mask], [np.array([[0.1, 0.9], [0.2, 0.3]])]) == 1.0


def test_pixel_scores_subsets_match_scikit_learn_with_ties():
    """One sort serves every subset: pixel AUROC per subset equals scikit-learn's, ties included."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    masks, maps = [], []
    for i in range(6):
        m = np.zeros((20, 24), bool)
        if i % 2:
            m[3 + i : 9 + i, 5:12] = True
        masks.append(m)
        maps.append(np.round(rng.random((20, 24)) + 0.6 * m, 1))  # rounding makes many ties
    ps = metrics.PixelScores(masks, maps)
    for subset in ([0, 1], [1, 2, 3], [0, 1, 2, 3, 4, 5], [5, 0]):
        y = np.concatenate([masks[i].ravel() for i in subset])
        s = np.concatenate([maps[i].ravel() for i in subset])
        assert ps.auroc(subset) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert ps.aupro(subset) == pytest.approx(slow_aupro([masks[i] for i in subset], [maps[i] for i in subset]), abs=1e-9)
    with pytest.raises(ValueError, match="both normal"):
        ps.auroc([0, 2])  # no anomalous pixel


@settings(max_examples=300, deadline=None)
@given(
    low=st.floats(-1e3, 1e3),
    unit=st.floats(-10.0, 1e3),
    a=st.floats(-5e3, 5e3),
    b=st.floats(-5e3, 5e3),
)
def test_normalized_score_is_monotone_bounded_and_half_at_the_threshold(low, unit, a, b):
    """anomalib's convention: 0.5 exactly at the threshold, in [0, 1], ranking as the raw score does;
    also when the calibration gives no spread below the threshold (unit <= 0)."""
    t = low + unit
    assert normalized_score(t, t, low) == 0.5
    na, nb = normalized_score(a, t, low), normalized_score(b, t, low)
    assert 0.0 <= na <= 1.0 and 0.0 <= nb <= 1.0
    if a <= b:
        assert na <= nb
    if na > 0.5:
        assert a > t  # flagged exactly when above the threshold (ties only by rounding right at it)
    if a <= t:
        assert na <= 0.5
    if unit > 1e-6:
        assert normalized_score(low, t, low) == 0.0
        assert normalized_score(t + 10 * unit, t, low) < 1.0  # defects far beyond keep their order
    assert math.isnan(normalized_score(math.nan, t, low))
