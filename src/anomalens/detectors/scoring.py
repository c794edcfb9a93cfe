"""The scoring modules: from patch features (or the model input) to patch scores, anomaly map and
image score, as pure ``torch.nn.Module`` with the fitted state as buffers.

One module per method, run by the Python prediction and traced by the ONNX export alike (there is
no second scoring path):

* :class:`PatchCoreScorer`: exact L2 nearest-neighbour distance of every patch to the memory bank
  (``||q||^2 - 2 q.m + ||m||^2`` by one matrix product, minimum over the bank), the image score,
  and the fusion of several scales (Roth et al., CVPR 2022; the fusion is ours, see
  :mod:`~anomalens.detectors.patchcore`). Also AnomalyDINO's cosine distance of unit tokens.
* :class:`PadimScorer`: Mahalanobis distance per grid position (Defard et al., ICPR 2021).
* :class:`AnomalyModel`: model input -> backbone patch features -> a scorer -> smoothed map: the
  whole inference graph (what ``anomalens export`` writes and :meth:`Detector.predict` runs).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..common import AnomalyMapHead, PatchFeatureExtractor
from ..errors import ConfigError

IMAGE_SCORES = ("max", "mean_top1")
#: percentage of a grid's highest patch scores averaged by ``image_score="mean_top1"`` (AnomalyDINO: 1%)
TOP_PERCENT = 1


def top_mean(scores: torch.Tensor) -> torch.Tensor:
    """Mean of the highest ``ceil(TOP_PERCENT / 100 * P)`` values of each row of ``scores`` ``(B, P)``:
    ``(B,)``, same dtype. Integer arithmetic, so the count is the same in the ONNX graph (symbolic
    ``P``) as in Python."""
    n_top = (scores.shape[1] * TOP_PERCENT + 99) // 100
    return scores.topk(n_top, dim=1).values.mean(1)


class PatchCoreScorer(nn.Module):
    """PatchCore's scoring on one or more scales (memory banks as buffers).

    Args:
        banks: per scale ``k``, ``float32`` ``(M_k, D)`` memory-bank features.
        scale_stats: ``(K, 2)`` mean and standard deviation standardising each scale's scores before
            they are averaged (``(0, 1)`` rows for one scale: raw distances).
        image_score: ``"max"`` (PatchCore's largest patch score) or ``"mean_top1"`` (AnomalyDINO's
            mean of the highest 1%).
        cosine: the features are unit vectors and a patch score is the cosine distance
            ``L2^2 / 2`` (AnomalyDINO) instead of the L2 distance.

    Buffers: ``bank_k``, ``bank_sq_k`` (squared norms, ``(M_k,)``) and ``scale_stats`` ``float32`` ``(K, 2)``.

    Raises:
        ConfigError: an unknown image score.
    """

    def __init__(self, banks: list[torch.Tensor], scale_stats: torch.Tensor, image_score: str, cosine: bool = False):
        super().__init__()
        if image_score not in IMAGE_SCORES:
            raise ConfigError(f"image_score must be one of {IMAGE_SCORES}, got {image_score!r}")
        self.n_scales = len(banks)
        self.image_score = image_score
        self.cosine = bool(cosine)
        for k, bank in enumerate(banks):
            bank = bank.float().contiguous()
            self.register_buffer(f"bank_{k}", bank)
            self.register_buffer(f"bank_sq_{k}", (bank * bank).sum(1))
        self.register_buffer("scale_stats", scale_stats.float().clone())

    @property
    def bank_rows(self) -> int:
        """Rows of the largest bank: each scored patch takes one ``float32`` distance per row."""
        return max(self.bank(k).shape[0] for k in range(self.n_scales))

    def bank(self, k: int) -> torch.Tensor:
        """Scale ``k``'s memory bank, ``float32`` ``(M_k, D)``."""
        return getattr(self, f"bank_{k}")

    def distances(self, k: int, q: torch.Tensor) -> torch.Tensor:
        """L2 distance ``float32`` ``(Q,)`` of each query ``q`` ``(Q, D)`` to its nearest scale-``k``
        bank feature (exact).

        The minimum is taken over ``||m||^2 - 2 q.m`` and ``||q||^2`` added after it: rounding is
        monotone, so the distances equal those of the full ``||q - m||^2`` matrix
        (:func:`~anomalens.knn.pairwise_sq_dists`) bit for bit, one ``(Q, M)`` pass fewer. Only the
        minimum, not its row, is taken here (an arg-min costs ten times the minimum on ONNX Runtime):
        :meth:`nearest` gives the row where evidence needs it."""
        return self._finish(self._partial(k, q).amin(1), q)

    def nearest(self, k: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2 distance ``float32`` ``(Q,)`` and row ``int64`` ``(Q,)`` of the nearest scale-``k``
        bank feature of each query ``q`` ``(Q, D)`` (exact; ties: the lowest row); distances as
        :meth:`distances`."""
        v, idx = self._partial(k, q).min(1)
        return self._finish(v, q), idx

    def _partial(self, k: int, q: torch.Tensor) -> torch.Tensor:
        """``||m||^2 - 2 q.m`` ``(Q, M_k)`` for every query ``q`` ``(Q, D)`` and scale-``k`` bank feature ``m``."""
        return torch.addmm(getattr(self, f"bank_sq_{k}")[None, :], q, self.bank(k).T, alpha=-2.0)

    @staticmethod
    def _finish(partial_min: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """L2 distances ``(Q,)`` from the minima of :meth:`_partial` ``(Q,)``: ``||q||^2`` added, then the root."""
        return (partial_min + (q * q).sum(1)).clamp(min=0.0).sqrt()

    def patch_scores(self, dist: torch.Tensor) -> torch.Tensor:
        """Patch scores from nearest-bank L2 distances (any shape): the distances, or for unit
        features the cosine distance ``dist^2 / 2``."""
        return dist * dist / 2.0 if self.cosine else dist

    def image_scores(self, grid_scores: torch.Tensor) -> torch.Tensor:
        """Raw image scores ``(b,)`` of flat score grids ``(b, P)``: the largest patch score, or the
        mean of the highest 1% (:attr:`image_score`)."""
        if self.image_score == "mean_top1":
            return top_mean(grid_scores)
        return grid_scores.amax(1)

    def fuse(self, scores: list[torch.Tensor], grids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per scale raw image scores ``(B,)`` and grids ``(B, h_k, w_k)`` -> fused ``(B,)`` and
        ``(B, h, w)`` on the last scale's grid: the mean over scales of ``(x - mean_k) / sd_k``, the
        grids bilinearly resized. One scale: unchanged."""
        if len(scores) == 1:
            return scores[0], grids[0]
        h, w = grids[-1].shape[-2:]
        fused_s, fused_g = 0.0, 0.0
        for k, (s, g) in enumerate(zip(scores, grids)):
            mu, sd = self.scale_stats[k, 0], self.scale_stats[k, 1]
            z = (g - mu) / sd
            if k < len(grids) - 1:
                z = F.interpolate(z[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            fused_s = fused_s + (s - mu) / sd
            fused_g = fused_g + z
        return fused_s / len(scores), fused_g / len(scores)  # type: ignore[return-value]

    def forward(self, features: list[torch.Tensor], weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score patch features.

        Args:
            features: per scale ``float32`` ``(B, D, h_k, w_k)``, the scales in the banks' order.
            weights: optional ``(B, h * w)`` factors of the last scale's patch scores (AnomalyDINO's
                background masking).

        Returns:
            ``pred_score`` ``float32`` ``(B,)``, patch scores ``float32`` ``(B, h, w)`` on the last
            scale's grid, and the last scale's patch features ``float32`` ``(B, h, w, D)`` (evidence
            finds a patch's nearest bank row from them: :meth:`nearest`).
        """
        scores, grids = [], []
        q = features[-1].new_zeros(0)
        for k, f in enumerate(features):
            b, d, h, w = f.shape
            q = f.permute(0, 2, 3, 1).reshape(-1, d)
            grid = self.patch_scores(self.distances(k, q)).view(b, -1)
            if weights is not None and k == len(features) - 1:
                grid = grid * weights.to(grid.dtype)
            scores.append(self.image_scores(grid))
            grids.append(grid.view(b, h, w))
        b, d, h, w = features[-1].shape
        score, grid = self.fuse(scores, grids)
        return score, grid, q.view(b, h, w, d)


class PadimScorer(nn.Module):
    """PaDiM's scoring: Mahalanobis distance of each grid position's features to its Gaussian.

    Args:
        channels: ``int64`` ``(d,)`` feature channels kept (the random selection).
        mean: ``float32`` ``(h * w, d)`` per-position means.
        precision: ``float32`` ``(h * w, d, d)`` per-position inverse covariances.
        grid: the fitted patch grid ``(h, w)``.

    Raises:
        ConfigError: (forward) features on another grid than the fitted one.
    """

    def __init__(self, channels: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor, grid: tuple[int, int]):
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.register_buffer("channels", channels.long())
        self.register_buffer("mean", mean.float())
        self.register_buffer("precision", precision.float())

    @staticmethod
    def mahalanobis(x: torch.Tensor, mean: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, P, d)`` -> distances ``(B, P)`` to the Gaussians ``mean`` ``(P, d)``, ``prec`` ``(P, d, d)``."""
        diff = x - mean[None]
        m = torch.einsum("bpi,pij,bpj->bp", diff, prec, diff)
        return m.clamp(min=0).sqrt()

    def forward(self, features: list[torch.Tensor], weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, None]:
        """``[float32 (B, D, h, w)]`` -> ``pred_score`` ``(B,)`` (the maximum patch score), patch
        scores ``(B, h, w)`` and None (no bank)."""
        f = features[0]
        b, _, h, w = f.shape
        if (h, w) != self.grid:
            raise ConfigError(f"feature grid {h}x{w} differs from the fitted {self.grid}")
        x = f.index_select(1, self.channels).flatten(2).transpose(1, 2)
        dist = self.mahalanobis(x, self.mean, self.precision).view(b, h, w)
        return dist.flatten(1).max(1).values, dist, None


class AnomalyModel(nn.Module):
    """The whole inference graph: model input -> ``(pred_score, anomaly_map, patch_scores, patch_features)``.

    Args:
        extractor: backbone + patch features (:class:`~anomalens.common.PatchFeatureExtractor`).
        scorer: :class:`PatchCoreScorer` or :class:`PadimScorer`.
        head: patch-score grid -> smoothed map at model input size (:class:`~anomalens.common.AnomalyMapHead`).
        unit_features: scale each patch feature to unit length (AnomalyDINO).
        patch_weights: optional Python function, the last scale's features ``(B, D, h, w)`` ->
            ``(B, h * w)`` factors of its patch scores (AnomalyDINO's masking; not in an exported graph).

    Forward inputs: one ``float32`` ``(B, 3, h_k, w_k)`` tensor in [0, 1] per scale. Outputs:
    ``pred_score`` ``float32`` ``(B,)``, ``anomaly_map`` ``float32`` ``(B, h, w)`` at the last scale's
    model-input size, patch scores ``float32`` ``(B, h / stride, w / stride)`` and the last scale's
    patch features ``float32`` ``(B, h / stride, w / stride, D)`` (memory banks, for evidence; None
    for PaDiM).
    """

    def __init__(self, extractor: PatchFeatureExtractor, scorer: nn.Module, head: AnomalyMapHead, unit_features: bool = False,
                 patch_weights: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.extractor = extractor
        self.scorer = scorer
        self.head = head
        self.unit_features = bool(unit_features)
        self.patch_weights = patch_weights

    def features(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per scale patch features ``float32`` ``(B, D, h_k, w_k)`` of the model inputs."""
        feats = [self.extractor(x) for x in inputs]
        return [F.normalize(f, dim=1) for f in feats] if self.unit_features else feats

    def forward(self, image: torch.Tensor, image_1: torch.Tensor | None = None, image_2: torch.Tensor | None = None):
        feats = self.features([x for x in (image, image_1, image_2) if x is not None])
        weights = self.patch_weights(feats[-1]) if self.patch_weights is not None else None
        score, grid, patch_features = self.scorer(feats, weights)
        return score, self.head(grid), grid, patch_features
