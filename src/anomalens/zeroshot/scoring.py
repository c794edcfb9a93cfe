"""Mutual scoring of unlabeled images, as plain functions on tensors (after MuSc: Li et al., "Zero-Shot
Industrial Anomaly Classification and Segmentation with Mutual Scoring of the Unlabeled Images",
ICLR 2024).

* :func:`aggregate_patches`: local neighbourhood aggregation of a feature map over ``r x r`` patches
  (the paper's LNAMD), as unit-length patch tokens.
* :func:`closest_patch_distances`: each query patch's distance to the closest patch of each of
  several images, in blocks of bounded memory.
* :func:`mutual_scores`: the paper's mutual scoring (MSM): a patch's score is the mean of its lowest
  distances to the other images of the batch, averaged over layers and aggregation degrees.
* :func:`rescore_images`: image scores averaged with those of the most similar images (the paper's
  RsCIN, simplified).
* :func:`robust_z` and :func:`z_sum`: several scorers put on one scale (robust z-scores over the
  batch) and added, one vote each.

All tensors are ``float32`` on the CPU; ``N`` is the number of images in the batch, ``D`` the feature
dimension, ``h x w`` the patch grid and ``P = h * w``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..calibration import robust_center_scale

#: largest number of cosine similarities held at once by :func:`closest_patch_distances` (256 MB)
SIMILARITY_BUDGET = 1 << 26


def aggregate_patches(f: torch.Tensor, r: int) -> torch.Tensor:
    """Unit-length patch tokens of the ``r x r`` average of feature maps (LNAMD for degree ``r``).

    Args:
        f: ``float32`` ``(N, D, h, w)`` feature maps.
        r: aggregation degree, odd; 1 leaves the features as they are (only normalised). The average
            at the border counts only the patches inside the map.

    Returns:
        ``float32`` ``(N, h * w, D)`` tokens of L2 norm 1, row-major over the grid.
    """
    g = F.avg_pool2d(f, r, stride=1, padding=r // 2, count_include_pad=False) if r > 1 else f
    return F.normalize(g.flatten(2).transpose(1, 2), dim=2)


def closest_patch_distances(
    q: torch.Tensor, tok: torch.Tensor, others: torch.Tensor, budget: int = SIMILARITY_BUDGET
) -> torch.Tensor:
    """Euclidean distance of each query patch to the closest patch of each image ``others``.

    The most similar patch is found on cosine similarities, in blocks of images with at most
    ``budget`` similarities each, and only those maxima become distances (``sqrt(2 - 2 cos)``, exact
    for unit vectors): peak memory stays bounded whatever the batch.

    Args:
        q: ``float32`` ``(Q, D)`` unit-length query patches.
        tok: ``float32`` ``(N, P, D)`` unit-length patches of the ``N`` images.
        others: ``int64`` ``(R,)`` indices into ``tok`` of the images to compare with.
        budget: most similarities computed at once (at least one image per block).

    Returns:
        ``float32`` ``(Q, R)`` distances, in ``[0, 2]``.
    """
    p, d = tok.shape[1], tok.shape[2]
    step = max(1, budget // max(1, q.shape[0] * p))
    best = torch.empty(q.shape[0], others.numel())
    for b in range(0, others.numel(), step):
        ids = others[b : b + step]
        sim = q @ tok[ids].reshape(-1, d).T  # (Q, b*P)
        best[:, b : b + ids.numel()] = sim.view(q.shape[0], ids.numel(), p).amax(2)
    return (2.0 - 2.0 * best).clamp_(min=0).sqrt_()


def draw_references(n: int, start: int, chunk: int, count: int, rng: torch.Generator) -> torch.Tensor:
    """``count`` image indices drawn at random from ``0..n-1`` outside the chunk ``start .. start +
    chunk - 1``: ``int64`` ``(count,)``, ascending (fewer if fewer images lie outside)."""
    outside = torch.cat([torch.arange(0, start), torch.arange(min(n, start + chunk), n)])
    return outside[torch.randperm(outside.numel(), generator=rng)[:count]].sort().values


@torch.inference_mode()
def mutual_scores(
    feats: Sequence[torch.Tensor],
    degrees: Sequence[int] = (1, 3, 5),
    lower: float = 0.3,
    chunk: int = 8,
    max_references: int | None = None,
    views: Sequence[Sequence[torch.Tensor]] = (),
) -> torch.Tensor:
    """Mutual patch scores of a batch (MSM).

    For image ``i`` and patch ``p``, the distance to the closest patch of each other image ``j``
    (:func:`closest_patch_distances` on :func:`aggregate_patches` tokens); the patch score is the
    mean of the lowest ``ceil(lower x R)`` of these ``R`` distances (an abnormal patch may find a
    look-alike in one other defective image, not in most), averaged over layers and degrees. Work
    grows as ``N^2 P^2``; it runs over blocks of ``chunk`` query images, so memory is
    ``O(chunk x P x N x P)`` floats, not ``O((N x P)^2)``.

    Args:
        feats: per layer, ``float32`` ``(N, D, h, w)`` feature maps (``D`` may differ by layer; the
            same ``h x w`` for every layer).
        degrees: aggregation degrees ``r`` (odd).
        lower: fraction of the other images whose distances are averaged, in ``(0, 1]``.
        chunk: query images per block (bounds memory).
        max_references: with more than ``max_references + 1`` images, each block of query images is
            compared with ``max_references`` other images drawn at random (seed 0, the same draw for
            every layer and degree) instead of all; None compares every pair.
        views: further views of the images (for instance their 90-degree turns), each a sequence of
            per-layer maps shaped as ``feats``; a patch's distance to image ``j`` is then to its
            closest patch in any view of ``j``.

    Returns:
        ``float32`` ``(N, h, w)`` patch scores (distances of unit vectors: 0 to 2, higher is more
        anomalous).
    """
    n, _, h, w = feats[0].shape
    sampled = max_references is not None and n - 1 > max_references
    n_others = max_references if sampled else n - 1
    keep = max(1, int(math.ceil(lower * n_others)))
    # the images each chunk of query images is compared with: all (own image masked), or a random
    # draw of ``max_references`` from outside the chunk (same draw for every layer and degree)
    starts = range(0, n, chunk)
    rng = torch.Generator().manual_seed(0)
    refs = [draw_references(n, s, chunk, max_references, rng) for s in starts] if sampled else None
    total = torch.zeros(n, h * w)
    count = 0
    for layer, f in enumerate(feats):
        for r in degrees:
            tok = aggregate_patches(f, r)  # (N, P, D), unit length
            # the patches a query patch may match in image j: j's own, then those of its views
            ref = torch.cat([tok] + [aggregate_patches(v[layer], r) for v in views], 1) if views else tok
            for j, s in enumerate(starts):
                q = tok[s : s + chunk].reshape(-1, tok.shape[2])  # (c*P, D)
                others = torch.arange(n) if refs is None else refs[j]
                per_image = closest_patch_distances(q, ref, others)  # (c*P, R)
                c = q.shape[0] // (h * w)
                if refs is None:
                    own = torch.arange(s, s + c).repeat_interleave(h * w)
                    per_image[torch.arange(q.shape[0]), own] = math.inf  # not against itself
                low = per_image.topk(keep, dim=1, largest=False).values.mean(1)
                total[s : s + c] += low.view(c, h * w)
            count += 1
    return (total / count).view(n, h, w)


def rescore_images(scores: torch.Tensor, feats: Sequence[torch.Tensor], neighbours: Sequence[int] = (1, 3)) -> torch.Tensor:
    """Image scores re-scored on the image-level similarity graph (the paper's RsCIN, simplified).

    Each image's score is averaged with those of its ``k`` most similar images (cosine similarity of
    the images' mean feature over the grid, layers concatenated), and the results for the several
    ``k`` are averaged.

    Args:
        scores: ``float32`` ``(N,)`` image scores.
        feats: per layer, ``float32`` ``(N, D, h, w)`` feature maps of the same images.
        neighbours: values of ``k``; those <= 0 are ignored, and none left returns ``scores`` as they are.

    Returns:
        ``float32`` ``(N,)`` scores, in the units of ``scores``.
    """
    ks = [k for k in neighbours if k > 0]
    if not ks:
        return scores
    emb = F.normalize(torch.cat([f.mean((2, 3)) for f in feats], 1), dim=1)
    sim = emb @ emb.T
    out = torch.zeros_like(scores)
    for k in ks:
        k = min(k, scores.numel() - 1)
        idx = sim.topk(k + 1, dim=1).indices  # itself and its k nearest images
        out += scores[idx].mean(1)
    return out / len(ks)


def robust_z(values: torch.Tensor) -> torch.Tensor:
    """Robust z-scores ``(values - median) / (1.4826 x MAD)`` over all elements
    (:func:`~anomalens.calibration.robust_center_scale`).

    Puts scores of different detectors on one scale without assuming any is normal-distributed.

    Args:
        values: a tensor of any shape and float dtype.

    Returns:
        ``float32`` tensor of the same shape (unitless).
    """
    med, sd = robust_center_scale(values)
    return (values.float() - med) / sd


def z_sum(parts: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the robust z-scores (:func:`robust_z`) of several scorers: every scorer gets one vote,
    whatever its units.

    Args:
        parts: per scorer, ``(scores, maps)``: ``float32`` ``(N,)`` image scores and ``(N, S, S)``
            anomaly maps, or None for a scorer that votes on the image score only (at least one map).

    Returns:
        ``float32`` ``(N,)`` summed image z-scores and ``(N, S, S)`` summed map z-scores (each map
        z-scored over all its pixels of the batch).
    """
    return sum(robust_z(sc) for sc, _ in parts), sum(robust_z(mp) for _, mp in parts if mp is not None)  # type: ignore[return-value]
