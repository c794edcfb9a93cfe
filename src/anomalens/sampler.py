"""Greedy k-center coreset selection (PatchCore's memory-bank subsampling).

PatchCore (Roth et al., CVPR 2022, Sec. 3.2, Alg. 1) keeps a subset of the patch features chosen by
the greedy k-center rule of Sener & Savarese ("Active Learning for Convolutional Neural Networks: A
Core-Set Approach", ICLR 2018): start from one point, then repeatedly add the point farthest from the
points chosen so far. Before that, features are mapped to fewer dimensions with a Gaussian random
projection (Johnson-Lindenstrauss), as the paper does for speed.

The plain loop reads the whole ``(N, d)`` matrix at every step, so on a CPU it is bound by memory
bandwidth (each step reads ``N x d`` floats). For large N we use a *composable
coreset* (Indyk et al., "Composable core-sets for diversity and coverage maximization", PODS 2014;
Malkomes et al., "Fast distributed k-center clustering", NeurIPS 2015): the points are split into
cache-sized groups, each group gets its own greedy coreset (``oversample`` times its share), and the
final greedy selection runs on the union of those. The k-center objective stays within a factor 2 of
the plain greedy result in theory and is close to it in practice, at a fraction of the time
(measured reason: docs/design/decisions.md).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

#: Groups of this many points (at d <= 128) fit in the CPU cache; the two-stage path is used above it.
GROUP_SIZE = 16384


def random_projection(features: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """Gaussian random projection ``(N, D) -> (N, dim)``, ``float32``; identity when ``dim <= 0`` or ``dim >= D``."""
    n, d = features.shape
    if dim <= 0 or dim >= d:
        return features.float()
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(d, dim, generator=g) / math.sqrt(dim)
    return features.float() @ proj


def _greedy(
    x: torch.Tensor, n_select: int, first: int, progress: Callable[[int, int], None] | None = None
) -> torch.Tensor:
    """Plain greedy k-center on ``x`` ``(N, d)`` starting at row ``first``; returns ``(n_select,)`` int64."""
    n = x.shape[0]
    if n_select >= n:
        return torch.arange(n)
    sq = (x * x).sum(1)
    min_d = torch.addmv(sq, x, x[first], alpha=-2.0).add_(sq[first])
    out = torch.empty(n_select, dtype=torch.long)
    out[0] = first
    min_d[first] = 0.0
    buf = torch.empty_like(min_d)
    step = max(1, n_select // 50)
    for k in range(1, n_select):
        idx = int(torch.argmax(min_d))
        out[k] = idx
        torch.addmv(sq, x, x[idx], alpha=-2.0, out=buf).add_(sq[idx])
        torch.minimum(min_d, buf, out=min_d)
        min_d[idx] = 0.0
        if progress is not None and k % step == 0:
            progress(k, n_select)
    if progress is not None:
        progress(n_select, n_select)
    return out


def greedy_coreset(
    features: torch.Tensor,
    n_select: int,
    *,
    projection_dim: int = 128,
    seed: int = 0,
    oversample: float = 4.0,
    two_stage: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Indices of a greedy k-center coreset of ``features``.

    Args:
        features: ``float32`` ``(N, D)``.
        n_select: number of points to keep, ``1 <= n_select <= N``.
        projection_dim: random-projection dimension for the distance computations (0 = none).
        seed: seeds the projection, the grouping and the first point.
        oversample: in the two-stage path, each group keeps ``oversample * n_select * |group| / N``
            points before the final greedy pass.
        two_stage: force (True) or forbid (False) the composable two-stage path; ``None`` uses it when
            ``N > 2 * GROUP_SIZE`` and the first stage actually reduces the data.
        progress: called as ``progress(done, total)`` during the final greedy pass.

    Returns:
        ``int64`` tensor ``(n_select,)`` of distinct row indices into ``features``.

    Raises:
        ValueError: ``n_select`` outside ``[1, N]`` or ``features`` not 2-D.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {tuple(features.shape)}")
    n = features.shape[0]
    if not 1 <= n_select <= n:
        raise ValueError(f"n_select must be in [1, {n}], got {n_select}")
    if n_select == n:
        return torch.arange(n)
    x = random_projection(features, projection_dim, seed).contiguous()
    g = torch.Generator().manual_seed(seed)
    if two_stage is None:
        two_stage = n > 2 * GROUP_SIZE and oversample * n_select < 0.5 * n
    if not two_stage:
        first = int(torch.randint(n, (1,), generator=g))
        return _greedy(x, n_select, first, progress)

    perm = torch.randperm(n, generator=g)
    n_groups = math.ceil(n / GROUP_SIZE)
    keep_frac = min(1.0, oversample * n_select / n)
    candidates = []
    for chunk in torch.tensor_split(perm, n_groups):
        m = max(1, min(len(chunk), math.ceil(keep_frac * len(chunk))))
        sub = _greedy(x.index_select(0, chunk), m, 0)
        candidates.append(chunk[sub])
    cand = torch.cat(candidates)
    xc = x.index_select(0, cand)
    # start the final pass from the candidate farthest from the mean, a deterministic, spread-out seed
    first = int(((xc - xc.mean(0)) ** 2).sum(1).argmax())
    return cand[_greedy(xc, n_select, first, progress)]
