"""Motion at patch level: optical flow, per-cell flow histograms, and a per-cell memory of normal motion.

A fixed camera sees the same place in the same cell of every frame, so normal motion is learned per
cell: pedestrians walk at a few pixels per frame along the walkway, nobody moves across the lawn.
The descriptor of a cell is its histogram of flow *directions* weighted by flow *magnitude* (pixels
per frame, at the model's working resolution): a histogram of oriented optical flow (HOF; Laptev et
al., "Learning realistic human actions from movies", CVPR 2008), averaged over the cell and its 3 x 3
neighbourhood. Its length is the speed, its shape the direction. Beside it (``peak``) goes the
histogram of the busiest cell of the neighbourhood, so that a small object is not averaged away.
Velocity alone is a strong cue for abnormal events in surveillance video (Reiss & Hoshen,
"Attribute-based Representations for Accurate and Interpretable Video Anomaly Detection", 2022), and
it explains itself: "too fast here".

Flow is DIS (Kroeger et al., "Fast Optical Flow using Dense Inverse Search", ECCV 2016) from OpenCV,
estimated down to the working resolution (its MEDIUM preset stops at half of it: small far objects
lose their speed there; :class:`FlowComputer`), on four times the pixels of half resolution and
correspondingly slower. The far part of the scene (the top rows, where people are a few pixels
tall) can be enlarged before the flow is estimated (``upscale``, ``upscale_rows``), so that a far
person's speed is measured below the frame's pixel.

The memory of a cell is a greedy k-center coreset (as PatchCore's, Roth et al. CVPR 2022) of the
training descriptors of that cell and its 8 neighbours (a little spatial slack); a test cell scores
its distance to the nearest of them.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError


class FlowComputer:
    """Dense optical flow between consecutive grayscale frames (DIS, OpenCV's MEDIUM preset).

    Args:
        finest_scale: the finest level of DIS's image pyramid the flow is estimated at: 0 = the
            frame's own resolution, 1 = half of it (the MEDIUM preset's own value, upsampled after).
            At half resolution the speed of a small fast object is mostly lost (measured well below
            its true speed, and closer to it at 0); large objects are measured alike at either level.
            0 costs several times 1 (measured reason: docs/design/decisions.md, "Video").
        patch_size, patch_stride: DIS's patch side and stride in pixels (None: the preset's 8, and
            3/8 of the side, the preset's 3 for 8).
        upscale: the frames are enlarged this many times (bilinear) before the flow is estimated,
            and the flow is brought back to the frame's size (area average, divided by ``upscale``):
            finer than the frame's own pixels, at about ``upscale ** 2`` times the cost. 1 = off.
        upscale_rows: the fraction of the frame's height, from the top, that is enlarged (the far
            part of the scene, where a camera looking down on it sees people small); the rows below
            keep the frame's resolution. Both parts are estimated with ``SEAM`` rows of overlap and
            joined at the boundary. 1 = the whole frame.

    Raises:
        ConfigError: a negative ``finest_scale``, a patch smaller than 4 px or its stride not below
        it, ``upscale`` below 1, or ``upscale_rows`` outside (0, 1].
    """

    #: rows of overlap between the enlarged band and the rest (DIS is less sure near an image's edge)
    SEAM = 16

    def __init__(
        self, finest_scale: int = 1, patch_size: int | None = None, patch_stride: int | None = None, upscale: float = 1.0, upscale_rows: float = 1.0
    ) -> None:
        if finest_scale < 0:
            raise ConfigError(f"finest_scale must be >= 0, got {finest_scale}")
        if not float(upscale) >= 1.0 or not math.isfinite(float(upscale)):
            raise ConfigError(f"flow upscale must be >= 1, got {upscale}")
        if not 0.0 < float(upscale_rows) <= 1.0:
            raise ConfigError(f"flow upscale_rows must be in (0, 1], got {upscale_rows}")
        self.upscale = float(upscale)
        self.upscale_rows = float(upscale_rows)
        self._dis = self._make_dis(int(finest_scale), patch_size, patch_stride)
        # the rows below an enlarged band: a second instance, for a second image size
        self._dis_rest = self._make_dis(int(finest_scale), patch_size, patch_stride) if self.upscale > 1 and self.upscale_rows < 1 else None

    @staticmethod
    def _make_dis(finest_scale: int, patch_size: int | None, patch_stride: int | None) -> "cv2.DISOpticalFlow":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        dis.setFinestScale(finest_scale)
        size = int(patch_size) if patch_size is not None else dis.getPatchSize()
        stride = int(patch_stride) if patch_stride is not None else max(1, round(3 * size / 8))
        if size < 4 or not 1 <= stride < size:
            raise ConfigError(f"flow patch size must be >= 4 px and its stride in [1, size), got {size} and {stride}")
        dis.setPatchSize(size)
        dis.setPatchStride(stride)
        return dis

    def __call__(self, prev_gray: np.ndarray, gray: np.ndarray) -> np.ndarray:
        """``uint8`` ``(H, W)`` x 2 -> flow ``float32`` ``(H, W, 2)`` in pixels per frame (dx, dy)."""
        if self.upscale == 1:
            return self._dis.calc(prev_gray, gray, None)
        h, w = gray.shape
        rows = h if self.upscale_rows >= 1 else min(h, max(1, round(self.upscale_rows * h)))
        top = min(h, rows + self.SEAM)
        u = self.upscale
        big = [cv2.resize(g[:top], None, fx=u, fy=u, interpolation=cv2.INTER_LINEAR) for g in (prev_gray, gray)]
        band = cv2.resize(self._dis.calc(big[0], big[1], None), (w, top), interpolation=cv2.INTER_AREA) / u
        if rows >= h:
            return band
        lo = max(0, rows - self.SEAM)
        rest = self._dis_rest.calc(np.ascontiguousarray(prev_gray[lo:]), np.ascontiguousarray(gray[lo:]), None)
        out = np.empty((h, w, 2), np.float32)
        out[:rows] = band[:rows]
        out[rows:] = rest[rows - lo :]
        return out


def flow_descriptors(flow: np.ndarray, cell: int, bins: int, peak: bool = False) -> torch.Tensor:
    """Per-cell magnitude-weighted direction histograms of a flow field.

    Args:
        flow: ``float32`` ``(H, W, 2)``, ``H`` and ``W`` multiples of ``cell``.
        cell: cell side in pixels.
        bins: number of direction bins over 360 degrees.
        peak: also the histogram of the *busiest* cell of the 3 x 3 neighbourhood, per direction
            (the maximum over the 9 cells instead of their mean). The mean over 24 x 24 pixels
            dilutes a small object: a far cyclist covering part of one cell moves that cell's
            histogram nine times more than the neighbourhood's mean (the reason, and the fastest
            single pixel it was chosen over: docs/design/decisions.md, "Video").

    Returns:
        ``float32`` ``(H / cell, W / cell, bins)`` (``2 bins`` with ``peak``: the neighbourhood
        means, then the maxima): magnitude-weighted direction histogram of each cell, in pixels per
        frame.
    """
    f = torch.from_numpy(np.ascontiguousarray(flow, dtype=np.float32))
    mag = torch.linalg.vector_norm(f, dim=-1)
    ang = torch.atan2(f[..., 1], f[..., 0])
    idx = ((ang + math.pi) * (bins / (2 * math.pi))).long().clamp_(0, bins - 1)
    hist = torch.zeros(bins, *mag.shape)
    hist.scatter_(0, idx[None], mag[None])
    cells = F.avg_pool2d(hist[None], cell, cell)
    out = F.avg_pool2d(cells, 3, 1, 1, count_include_pad=False)
    if peak:
        out = torch.cat([out, F.max_pool2d(cells, 3, 1, 1)], 1)
    return out[0].permute(1, 2, 0).contiguous()


def per_cell_memory(desc: torch.Tensor, k: int, chunk: int = 128) -> torch.Tensor:
    """Greedy k-center coreset of the normal descriptors of every cell and its 8 neighbours.

    Args:
        desc: ``float32`` ``(T, gh, gw, d)``: descriptors of ``T`` training frames.
        k: descriptors kept per cell (all ``9 T`` when ``k >= 9 T``).
        chunk: cells processed together; memory is ``chunk x 9 T x d`` floats at a time.

    Returns:
        ``float32`` ``(gh * gw, min(k, 9 T), d)``. Per cell, the first point kept is the cell's own
        descriptor of the first frame; each next one is the point farthest from those kept.
    """
    t, gh, gw, d = desc.shape
    flat = desc.reshape(t, gh * gw, d)
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    # neighbour cell indices (edge cells repeat their border), own cell first: (cells, 9)
    offsets = [(0, 0)] + [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    nb = torch.stack([((ys + dy).clamp(0, gh - 1) * gw + (xs + dx).clamp(0, gw - 1)).flatten() for dy, dx in offsets], 1)
    n = 9 * t
    k = min(k, n)
    out = torch.empty(gh * gw, k, d)
    for s in range(0, gh * gw, chunk):
        cells = nb[s : s + chunk]  # (m, 9)
        m = cells.shape[0]
        x = flat[:, cells].permute(1, 2, 0, 3).reshape(m, n, d)  # (m, 9 T, d)
        xx = (x * x).sum(-1, keepdim=True)  # (m, 9 T, 1)
        rows = torch.arange(m)
        cur = x[:, 0]
        min_d = torch.full((m, n), math.inf)
        for j in range(k):
            out[s : s + m, j] = cur
            # squared distances as |x|^2 - 2 x.c + |c|^2: one batched product, no (m, 9 T, d) temporary
            d2 = torch.baddbmm(xx, x, cur[:, :, None], alpha=-2.0).squeeze(-1) + (cur * cur).sum(-1, keepdim=True)
            torch.minimum(min_d, d2, out=min_d)
            cur = x[rows, min_d.argmax(1)]
    return out


def cell_distances(desc: torch.Tensor, memory: torch.Tensor, memory_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Distance of each cell's descriptor to the nearest normal descriptor of that cell.

    Computed as ``|m|^2 - 2 m.q + |q|^2`` with one batched product, faster than forming the
    differences ``m - q``; the two agree to ~1e-6 px per frame.

    Args:
        desc: ``float32`` ``(gh, gw, d)`` (one frame).
        memory: ``float32`` ``(gh * gw, k, d)`` (:func:`per_cell_memory`).
        memory_sq: ``(memory * memory).sum(-1)``, ``(gh * gw, k)``, if the caller keeps it.

    Returns:
        ``float32`` ``(gh, gw)``, pixels per frame.
    """
    gh, gw, d = desc.shape
    q = desc.reshape(gh * gw, d, 1)
    if memory_sq is None:
        memory_sq = (memory * memory).sum(-1)
    d2 = torch.baddbmm(memory_sq[:, :, None], memory, q, alpha=-2.0).squeeze(-1).min(1).values + (q * q).sum((1, 2))
    return d2.clamp_(min=0).sqrt_().view(gh, gw)
