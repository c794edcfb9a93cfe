"""Explanations a line operator can read: where the anomalous regions are, and what the part should
look like there.

* Regions: connected components (8-connectivity, OpenCV) of ``pred_mask``, each with its bounding
  box and area in pixels, its area in % of the image, and its peak and mean anomaly score.
* Evidence (PatchCore): for the strongest region, the memory-bank patch nearest to the patch at the
  centre of the region's box, shown as a crop of the training image it was taken from, beside the same-size crop of the
  flagged image: "this is what it should look like here". Example-based explanation as surveyed by
  Wang et al., "Explainable Anomaly Detection in Images and Videos: A Survey" (2023, arXiv:2302.06670).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass
class Region:
    """One connected anomalous region of a prediction, in pixels of the input image.

    Attributes:
        box: ``(x0, y0, x1, y1)`` bounding box, ``x1``/``y1`` exclusive.
        area_px: pixels in the region.
        area_pct: ``area_px`` as % of the image.
        peak_score, mean_score: maximum and mean of ``anomaly_map`` over the region (score units).
        peak_xy: ``(x, y)`` of the peak pixel.
        centroid_xy: ``(x, y)`` mean position of the region's pixels (rounded).
    """

    box: tuple[int, int, int, int]
    area_px: int
    area_pct: float
    peak_score: float
    mean_score: float
    peak_xy: tuple[int, int]
    centroid_xy: tuple[int, int]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Evidence:
    """The nearest normal patch for the strongest region of a flagged image.

    The query is the patch at the centre of the region's bounding box: for a compact defect that is the defect; for a
    region outlined by its edges (a foreign object, a pasted part) it is the inside of the object,
    which is what an operator wants compared with a normal part.

    Attributes:
        test_box: ``(x0, y0, x1, y1)`` crop of the flagged image (its pixels).
        train_index: index of the training image in the order it was fitted.
        train_image: that training image's path, or None when it was fitted from memory.
        train_box: the matching crop of the training image (its pixels), or None when its size is
            unknown (image not found); then ``train_grid_xy`` still says where.
        train_grid_xy: ``(x, y)`` patch position of the bank feature on the feature grid (of its view).
        train_view: the augmented view the bank feature came from (few-shot; ``"id"`` = the image as is,
            see :mod:`anomalens.augment`); ``train_box`` is already mapped back to the original image.
        distance: feature distance between the two patches (that patch's anomaly score, before smoothing).
    """

    test_box: tuple[int, int, int, int]
    train_index: int
    train_image: str | None
    train_box: tuple[int, int, int, int] | None
    train_grid_xy: tuple[int, int]
    distance: float
    train_view: str = "id"

    def to_dict(self) -> dict:
        return asdict(self)


def find_regions(anomaly_map: np.ndarray, mask: np.ndarray, min_area_px: int = 1) -> list[Region]:
    """Connected regions of ``mask`` (``bool`` ``(H, W)``) scored by ``anomaly_map`` (``float32`` ``(H, W)``).

    Returns:
        Regions sorted by peak score, strongest first; empty when the mask is empty.

    Raises:
        ValueError: ``mask`` and ``anomaly_map`` differ in shape.
    """
    if mask.shape != anomaly_map.shape:
        raise ValueError(f"mask {mask.shape} and anomaly map {anomaly_map.shape} differ in shape")
    if not mask.any():
        return []
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    total = float(mask.size)
    flat_map = anomaly_map.ravel()
    flat_lab = labels.ravel()
    order = np.argsort(flat_lab, kind="stable")
    bounds = np.searchsorted(flat_lab[order], np.arange(n + 1))
    regions = []
    for k in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[k])
        if area < min_area_px:
            continue
        idx = order[bounds[k] : bounds[k + 1]]
        vals = flat_map[idx]
        j = int(np.argmax(vals))
        py, px = divmod(int(idx[j]), anomaly_map.shape[1])
        regions.append(
            Region(
                box=(x, y, x + w, y + h),
                area_px=area,
                area_pct=round(100.0 * area / total, 4),
                peak_score=float(vals[j]),
                mean_score=float(vals.mean()),
                peak_xy=(px, py),
                centroid_xy=(int(round(centroids[k][0])), int(round(centroids[k][1]))),
            )
        )
    regions.sort(key=lambda r: -r.peak_score)
    return regions


def crop_box(center_xy: tuple[float, float], size_wh: tuple[float, float], hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """A ``size_wh`` box centred on ``center_xy`` (pixels), shifted to lie inside an image of shape ``hw``."""
    h, w = hw
    bw, bh = min(max(1, int(round(size_wh[0]))), w), min(max(1, int(round(size_wh[1]))), h)
    x0 = min(max(0, int(round(center_xy[0] - bw / 2))), w - bw)
    y0 = min(max(0, int(round(center_xy[1] - bh / 2))), h - bh)
    return (x0, y0, x0 + bw, y0 + bh)


def peak_region(anomaly_map: np.ndarray, level: float = 0.75) -> Region:
    """The region around the maximum of ``anomaly_map`` when ``pred_mask`` is empty: the connected
    component of ``anomaly_map >= median + level * (max - median)`` that holds the maximum."""
    med, top = float(np.median(anomaly_map)), float(anomaly_map.max())
    mask = anomaly_map >= med + level * (top - med)
    py, px = np.unravel_index(int(np.argmax(anomaly_map)), anomaly_map.shape)
    _, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    for r in find_regions(anomaly_map, labels == labels[py, px]):
        return r
    raise AssertionError("the maximum is always in its own component")  # pragma: no cover
