"""Defect-type discovery: group the anomalous regions of many images into defect types, without labels.

After the idea of AnomalyNCD (Huang et al., "AnomalyNCD: Towards Novel Anomaly Class Discovery in
Industrial Scenarios", CVPR 2025): describe each anomalous region by what is *abnormal* in it, then
cluster. We do it training-free on the detector's own patch features:

1. Regions: connected components of ``pred_mask`` (:func:`anomalens.explain.find_regions`).
   By default only each image's strongest region (one defect per part is the common case; small
   secondary fragments otherwise form clusters of their own); an image without any region above the
   pixel threshold contributes the region around its map's maximum (:func:`~anomalens.explain.peak_region`).
2. Descriptor: the anomaly-weighted mean, over the region's patches, of the patch feature minus the
   normal feature it is compared with (PatchCore: its nearest memory-bank feature; PaDiM: the mean
   of its position's Gaussian), L2-normalised. This "residual" describes what is wrong rather than
   which part of the product the defect sits on (why the residual and not the plain feature:
   docs/design/decisions.md).
3. Clustering: PCA (at most 16 dimensions), then agglomerative clustering (Ward linkage,
   scikit-learn) for every ``k`` in ``k_range``; the ``k`` with the best silhouette score wins.

Quality is measured against known defect folders with normalised mutual information (NMI) and the
adjusted Rand index (ARI), scikit-learn's implementations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .errors import AnomalensError
from .explain import peak_region
from .io import read_image
from .prediction import Prediction


@dataclass
class DefectClusters:
    """Defect types found in a set of predictions.

    Attributes:
        refs: ``(prediction index, region index)`` of every clustered region, in order.
        labels: ``int64`` ``(n_regions,)`` cluster id of each region (0..n_clusters-1, largest first).
        n_clusters: the chosen number of defect types.
        silhouette: silhouette score of the chosen clustering (-1..1; NaN with one cluster).
        silhouettes: silhouette per candidate ``k``.
        descriptors: ``float32`` ``(n_regions, d)`` region descriptors (after PCA).
    """

    refs: list[tuple[int, int]]
    labels: np.ndarray
    n_clusters: int
    silhouette: float
    silhouettes: dict[int, float] = field(default_factory=dict)
    descriptors: np.ndarray | None = field(default=None, repr=False)

    def members(self, cluster: int) -> list[tuple[int, int]]:
        """``(prediction index, region index)`` of the regions in ``cluster``."""
        return [r for r, lab in zip(self.refs, self.labels) if lab == cluster]

    def to_dict(self) -> dict:
        return {
            "n_clusters": self.n_clusters,
            "silhouette": self.silhouette,
            "silhouettes": {str(k): v for k, v in self.silhouettes.items()},
            "regions": [{"prediction": i, "region": j, "cluster": int(c)} for (i, j), c in zip(self.refs, self.labels)],
        }


def cluster_region(pred: Prediction, region_index: int):
    """The :class:`~anomalens.explain.Region` a ``(prediction, region index)`` reference points to
    (index -1: the peak region of an image without regions)."""
    return pred.regions[region_index] if region_index >= 0 else peak_region(pred.anomaly_map)  # type: ignore[arg-type]


def region_descriptors(
    detector, predictions: Sequence[Prediction], min_area_pct: float = 0.05, strongest_only: bool = True
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Descriptors of the regions of ``predictions`` (see the module docstring).

    Args:
        detector: the fitted detector that made the predictions.
        predictions: predictions with ``regions``; the image is re-read from ``image_path`` unless
            ``Prediction.image`` is set.
        min_area_pct: regions smaller than this % of the image are left out (specks).
        strongest_only: one region per image, the strongest (default); False: every region.

    Returns:
        ``(refs, X)``: ``(prediction index, region index)`` per region (region index -1: the peak
        region of an image without regions) and ``float32`` ``(n, D)``.
    """
    refs: list[tuple[int, int]] = []
    rows: list[np.ndarray] = []
    for i, p in enumerate(predictions):
        if not p.ok:
            continue
        regs = [(j, r) for j, r in enumerate(p.regions) if r.area_pct >= min_area_pct]
        if not regs:
            regs = [(-1, peak_region(p.anomaly_map))]  # type: ignore[arg-type]
        if strongest_only:
            regs = regs[:1]
        img = p.image if p.image is not None else read_image(p.image_path)  # type: ignore[arg-type]
        with torch.inference_mode():
            feats = [f[0][None] for f in detector.extract([img])]  # per scale (1, D, h, w)
            resid = detector._residuals(feats)[0]  # (D, h, w) at the last scale
        d, h, w = resid.shape
        amap = torch.from_numpy(np.ascontiguousarray(p.anomaly_map, dtype=np.float32))[None, None]
        small = torch.nn.functional.interpolate(amap, size=(h, w), mode="area")[0, 0]
        for j, r in regs:
            m = np.zeros(p.anomaly_map.shape, np.float32)  # type: ignore[union-attr]
            x0, y0, x1, y1 = r.box
            if j >= 0:
                m[y0:y1, x0:x1] = p.pred_mask[y0:y1, x0:x1]  # type: ignore[index]
            else:
                m[y0:y1, x0:x1] = 1.0
            ms = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(h, w), mode="area")[0, 0]
            wgt = ms * small.clamp(min=0)
            if float(wgt.sum()) <= 0:  # region smaller than one patch: take the patch at its peak
                wgt = torch.zeros(h, w)
                wgt[min(h - 1, r.peak_xy[1] * h // m.shape[0]), min(w - 1, r.peak_xy[0] * w // m.shape[1])] = 1.0
            wgt = wgt / wgt.sum()
            a = (resid * wgt).sum((1, 2))
            rows.append((a / a.norm().clamp(min=1e-12)).numpy())
            refs.append((i, j))
    x = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
    return refs, x


def cluster_descriptors(x: np.ndarray, k_range: tuple[int, int] = (2, 8), max_dim: int = 16) -> tuple[np.ndarray, int, float, dict[int, float], np.ndarray]:
    """PCA + Ward clustering of ``x`` (``(n, d)``), ``k`` chosen by silhouette within ``k_range``.

    Returns:
        ``(labels, k, silhouette, silhouette per k, reduced x)``; labels renumbered largest cluster first.

    Raises:
        AnomalensError: fewer than 2 regions.
    """
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    n = x.shape[0]
    if n < 2:
        raise AnomalensError(f"defect-type discovery needs at least 2 anomalous regions, got {n}")
    z = PCA(n_components=min(max_dim, n - 1, x.shape[1]), random_state=0).fit_transform(x)
    k_lo, k_hi = k_range
    scores: dict[int, float] = {}
    best: tuple[float, int, np.ndarray] | None = None
    for k in range(max(2, k_lo), min(k_hi, n - 1) + 1):
        lab = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(z)
        sc = float(silhouette_score(z, lab))
        scores[k] = sc
        if best is None or sc > best[0]:
            best = (sc, k, lab)
    if best is None:  # 2 regions: one cluster each would be arbitrary; call it one type
        return np.zeros(n, np.int64), 1, float("nan"), scores, z
    sc, k, lab = best
    order = np.argsort(-np.bincount(lab, minlength=k), kind="stable")
    remap = np.empty(k, np.int64)
    remap[order] = np.arange(k)
    return remap[lab], k, sc, scores, z.astype(np.float32)


def discover_defect_types(
    detector,
    predictions: Sequence[Prediction],
    *,
    k_range: tuple[int, int] = (2, 8),
    min_area_pct: float = 0.05,
    strongest_only: bool = True,
) -> DefectClusters:
    """Group the anomalous regions of ``predictions`` into defect types (module docstring).

    Args:
        detector: the fitted detector that made ``predictions``.
        predictions: typically the flagged images of a batch; regions come from their ``pred_mask``.
        k_range: smallest and largest number of defect types tried; ``(k, k)`` when ``k`` is known.
        min_area_pct: regions below this % of the image are ignored.
        strongest_only: cluster each image's strongest region only (default) or all of its regions.

    Raises:
        AnomalensError: fewer than 2 regions to group.
    """
    refs, x = region_descriptors(detector, predictions, min_area_pct, strongest_only)
    labels, k, sil, sils, z = cluster_descriptors(x, k_range)
    return DefectClusters(refs, labels, k, sil, sils, z)


def agreement(true_labels: Sequence[str], cluster_labels: Sequence[int]) -> dict[str, float]:
    """NMI and ARI between known defect types and found clusters (scikit-learn)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {
        "nmi": float(normalized_mutual_info_score(true_labels, cluster_labels)),
        "ari": float(adjusted_rand_score(true_labels, cluster_labels)),
    }
