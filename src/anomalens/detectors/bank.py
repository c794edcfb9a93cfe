"""PatchCore's memory bank: building it from the normal images' patch features (greedy k-center
coreset, :mod:`anomalens.sampler`), where each bank feature came from, and the leave-one-image-out
scores that calibrate and standardise it."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..knn import pairwise_sq_dists
from ..sampler import greedy_coreset

#: fewest normal images whose leave-one-out image scores standardise a scale; with fewer (few-shot),
#: their leave-one-out patch scores do (thousands of values instead of a handful).
MIN_IMAGES_FOR_IMAGE_STATS = 10


class ScaleBank:
    """The memory bank of one scale.

    Attributes:
        bank: ``float32`` ``(M, D)`` patch features.
        index: ``int64`` ``(M,)`` each feature's row among all training patches, image (view) by image
            in row-major order (``offset_i + y * w_i + x``).
        grids: ``int64`` ``(N, 2)`` patch grid ``(h_i, w_i)`` of each training image (view); grids
            differ when the images' aspect ratios do.
    """

    def __init__(self, bank: torch.Tensor, index: torch.Tensor, grids: torch.Tensor):
        self.bank = bank.float().contiguous()
        self.index = index
        self.grids = grids

    def origin(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training image (view) index and position in its grid (``y * w_i + x``) of bank ``rows``."""
        offsets = torch.cumsum(self.grids.prod(1), 0)
        origin = self.index[rows]
        image = torch.searchsorted(offsets, origin, right=True)
        start = torch.cat([torch.zeros(1, dtype=torch.int64), offsets])[image]
        return image, origin - start


def build_bank(
    features: list[torch.Tensor], ratio: float, projection_dim: int, candidates: torch.Tensor | None,
    progress: Callable[[int, int], None],
) -> ScaleBank:
    """The memory bank of one scale.

    Args:
        features: each training image's (view's) ``float32`` ``(D, h_i, w_i)`` patch features.
        ratio: fraction of the candidate patches kept, by greedy k-center coreset (1: all).
        projection_dim: random-projection dimension used to select the coreset.
        candidates: ``int64`` rows (image by image, row-major) the bank may hold; None: all.
        progress: ``progress(done, total)`` of the coreset selection.
    """
    d = features[0].shape[0]
    flat = torch.cat([f.permute(1, 2, 0).reshape(-1, d) for f in features])
    pool = flat if candidates is None else flat[candidates]
    n_select = max(1, min(pool.shape[0], int(round(ratio * pool.shape[0]))))
    if n_select < pool.shape[0]:
        idx = greedy_coreset(pool, n_select, projection_dim=projection_dim, progress=progress)
    else:
        idx = torch.arange(pool.shape[0])
    idx, _ = torch.sort(idx)
    if candidates is not None:
        idx = candidates[idx]
    grids = torch.tensor([list(f.shape[-2:]) for f in features], dtype=torch.int64)
    return ScaleBank(flat[idx].clone(), idx.long(), grids)


def leave_one_out(
    sb: ScaleBank, scorer, features: list[torch.Tensor], groups: torch.Tensor | None, progress: Callable[[int, int], None],
    weights: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One scale, leave-one-image-out: raw scores ``(n,)`` and grids ``(h_i, w_i)`` of each source
    image against the bank minus its own patches (few-shot: minus the patches of all its views).

    ``scorer`` (a :class:`~anomalens.detectors.scoring.PatchCoreScorer` on these banks) turns
    distances into patch and image scores; ``groups`` ``int64`` ``(N,)``: the source image of each
    feature map (None: one each); ``weights``: optional ``(1, D, h, w)`` features -> ``(1, h * w)``
    factors of the patch scores (AnomalyDINO's masking).
    """
    n = len(features)
    groups = torch.arange(n) if groups is None else groups
    owner = groups[sb.origin(torch.arange(sb.index.numel()))[0]]
    sq = (sb.bank * sb.bank).sum(1)
    scores, grids = [], []
    firsts = [int(i) for i in range(n) if i == 0 or groups[i] != groups[i - 1]]
    # one distance buffer for every image: a fresh (Q, M) block per image (22 MB on transistor) let
    # glibc's heap grow by about that much per image in some runs (a fit peaked at 6.4 GB, not 1.1)
    buf = torch.empty(0)
    for done, i in enumerate(firsts):
        d, h, w = features[i].shape
        q = features[i].permute(1, 2, 0).reshape(-1, d)
        size = q.shape[0] * sb.bank.shape[0]
        if buf.numel() < size:
            buf = torch.empty(size)
        dd = pairwise_sq_dists(q, sb.bank, sq, out=buf[:size].view(q.shape[0], -1))
        own = owner == groups[i]
        if not bool(own.all()):  # a single training image has nothing else to compare with
            dd[:, own] = math.inf
        g = scorer.patch_scores(dd.amin(1).sqrt()[None])
        if weights is not None:
            g = g * weights(features[i][None]).to(g.dtype)
        scores.append(scorer.image_scores(g))
        grids.append(g.view(h, w))
        progress(done + 1, len(firsts))
    return torch.cat(scores), grids
