"""Evidence of a memory-bank detector's finding: the closest (patch, bank patch) pair in a flagged
region, and crops of the test image and of the training image that bank patch came from."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..augment import view_to_source_normalised
from ..explain import Evidence, Region, crop_box
from .bank import ScaleBank


def bank_evidence(
    bank: ScaleBank, train_images: list[str | None], train_views: list[str], hw: tuple[int, int], region: Region,
    patch_scores: torch.Tensor, nearest_row: Callable[[int, int], int],
) -> Evidence:
    """The closest (patch, bank patch) pair in the core of ``region``, and matching crops.

    The core is the middle half of the region's box (at least 3 x 3 patches). Of its patches, the
    one whose nearest bank feature is closest anchors the evidence: for a compact defect that is
    the defect's surroundings-aware match; for a region outlined by its edges (a foreign object,
    a pasted part) it is the inside of the object. Both crops cover the same number of patches
    (1.5 times the region's box, clamped to 6-16 patches); the flagged crop is centred on the
    region, the training crop on the matched bank patch shifted by the same offset, so the two
    show the same place.

    Args:
        bank: the bank the patches were matched against (the largest scale's).
        train_images: paths of the training images (None: in memory, no training crop).
        train_views: the views of each training image in the bank, in order.
        hw: ``(H, W)`` of the test image in pixels.
        region: the flagged region (its box in image pixels).
        patch_scores: ``float32`` ``(h, w)`` patch scores of the test image.
        nearest_row: ``(gy, gx)`` -> the bank row nearest to the patch at grid row ``gy``, column ``gx``.
    """
    gh, gw = patch_scores.shape
    H, W = hw
    x0, y0, x1, y1 = region.box
    cx, cy = (x0 + x1) / 2 * gw / W, (y0 + y1) / 2 * gh / H
    rx, ry = max(1.5, (x1 - x0) / 4 * gw / W), max(1.5, (y1 - y0) / 4 * gh / H)
    gx0, gx1 = max(0, int(cx - rx)), min(gw, int(math.ceil(cx + rx)))
    gy0, gy1 = max(0, int(cy - ry)), min(gh, int(math.ceil(cy + ry)))
    core = patch_scores[gy0:gy1, gx0:gx1]
    k = int(torch.argmin(core))
    gy, gx = gy0 + k // core.shape[1], gx0 + k % core.shape[1]
    vi, pos = (int(v) for v in bank.origin(torch.tensor([nearest_row(gy, gx)])))
    th, tw = (int(v) for v in bank.grids[vi])
    ti, view = divmod(vi, len(train_views))
    ty, tx = divmod(pos, tw)
    side = min(max(1.5 * max((x1 - x0) * gw / W, (y1 - y0) * gh / H), 6.0), 16.0)  # in patches
    # both crops centred on the region's centre, the training one shifted by the same offset from its anchor
    dx, dy = cx - (gx + 0.5), cy - (gy + 0.5)

    def box(u: float, v: float, grid_cells: int, size_hw: tuple[int, int]) -> tuple[int, int, int, int]:
        """Crop of ``side`` patches around the normalised position ``(u, v)`` of an image of
        ``size_hw`` pixels whose grid has ``grid_cells`` square patches."""
        px = math.sqrt(size_hw[0] * size_hw[1] / grid_cells)  # pixels per patch (aspect kept: square patches)
        return crop_box((u * size_hw[1], v * size_hw[0]), (side * px, side * px), size_hw)

    path = train_images[ti] if ti < len(train_images) else None
    train_box = None
    if path is not None:
        try:
            from PIL import Image

            with Image.open(path) as im:
                # position in the view (grid units) -> normalised position in the original image
                u, v = view_to_source_normalised(train_views[view], (tx + 0.5 + dx) / tw, (ty + 0.5 + dy) / th, im.width, im.height)
                train_box = box(u, v, th * tw, (im.height, im.width))
        except OSError:
            train_box = None
    return Evidence(
        test_box=box(cx / gw, cy / gh, gh * gw, (H, W)),
        train_index=ti,
        train_image=path,
        train_box=train_box,
        train_grid_xy=(tx, ty),
        train_view=train_views[view],
        distance=float(patch_scores[gy, gx]),
    )
