"""PatchCore: Roth, Pemula, Zepeda, Schölkopf, Brox, Gehler, "Towards Total Recall in Industrial
Anomaly Detection", CVPR 2022 (arXiv:2106.08265).

Fit: locally aware patch features of the normal images (:class:`~anomalens.common.PatchFeatureExtractor`)
form a memory bank, subsampled by greedy k-center coreset (:mod:`anomalens.sampler`).
Predict: every test patch's score is the L2 distance to its nearest memory-bank feature; the anomaly
map is the score grid upsampled to the image and Gaussian-smoothed (sigma 4); the image score is the
maximum patch score (the paper's; AnomalyDINO's subclass takes the mean of the highest 1%).

Multi-scale (our addition; ``image_size=(256, 320)``, the default): one bank per input size. Distances
at different sizes are not on one scale, so each scale's scores are standardised by the mean and
standard deviation of its leave-one-out image scores of the normal training images (no defective
image involved), then averaged: image score = mean over scales of the standardised image scores;
patch scores = mean of the standardised score grids, bilinearly resized to the largest scale's grid.
The fused score is in units of normal-image standard deviations. With fewer than 10 normal images
(few-shot), the mean and deviation of their leave-one-out *patch* scores standardise instead; with one
image (nothing to leave out) the raw distances are averaged.

The pieces: the memory bank and its leave-one-out scores in :mod:`~anomalens.detectors.bank`, the
scoring module (Python prediction and ONNX export alike) in :mod:`~anomalens.detectors.scoring`, the
evidence crops in :mod:`~anomalens.detectors.evidence`.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, ModelFileError
from ..explain import Evidence, Region
from .bank import MIN_IMAGES_FOR_IMAGE_STATS, ScaleBank, build_bank, leave_one_out
from .base import Detector, Progress
from .evidence import bank_evidence
from .scoring import IMAGE_SCORES, PatchCoreScorer

__all__ = ["PatchCore", "ScaleBank", "IMAGE_SCORES", "MIN_IMAGES_FOR_IMAGE_STATS"]


class PatchCore(Detector):
    """PatchCore anomaly detector (memory bank + coreset + nearest neighbour), on one or more scales.

    Args:
        coreset_ratio: fraction of all training patches kept in each memory bank, in (0, 1].
        projection_dim: random-projection dimension used only to *select* the coreset (paper: 128).
        **kwargs: see :class:`~anomalens.detectors.base.Detector` (backbone, layers, image_size, ...).

    Tensors: per scale ``k``, a :class:`~anomalens.detectors.bank.ScaleBank` (``memory_bank.k``
    ``float32`` ``(M_k, D)``, ``bank_index.k``, ``train_grids.k``); ``scale_stats`` ``float64``
    ``(K, 2)``, the mean and standard deviation of each scale's leave-one-out normal image scores
    (``(0, 1)`` for a single scale: raw distances). Test images of any shape are scored against the
    same banks by :class:`~anomalens.detectors.scoring.PatchCoreScorer`.

    The image score is the largest patch score (:attr:`image_score`, the paper's).

    Raises:
        ConfigError: invalid option values.
    """

    name = "patchcore"
    #: how a grid of patch scores becomes the image score (:data:`~anomalens.detectors.scoring.IMAGE_SCORES`)
    image_score = "max"
    supports_few_shot = True
    default_image_sizes = (256, 320)
    max_scales = 3
    #: EfficientNet-Lite2 (blocks 6 + 14): raised the worst category of the suite (magnetic_tile) on
    #: every training-set size, from all images to one
    default_backbone = "efficientnet_lite2"
    #: a few-shot bank also holds its shots turned by 90, 180 and 270 degrees: raised the worst
    #: category and the mean at every k
    default_augment = "rotations"
    #: patch scores are cosine distances of unit features (AnomalyDINO) instead of L2 distances
    cosine_scores = False

    def __init__(
        self,
        *,
        coreset_ratio: float = 0.01,
        projection_dim: int = 128,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 < coreset_ratio <= 1.0:
            raise ConfigError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        self.coreset_ratio = float(coreset_ratio)
        self.projection_dim = int(projection_dim)
        self.banks: list[ScaleBank] = []
        self.scale_stats = torch.tensor([[0.0, 1.0]] * len(self.image_sizes), dtype=torch.float64)
        self._loo: list[tuple[torch.Tensor, list[torch.Tensor]]] | None = None

    def get_params(self) -> dict:
        p = super().get_params()
        p.update(
            coreset_ratio=self.coreset_ratio,
            projection_dim=self.projection_dim,
        )
        return p

    @property
    def memory_bank(self) -> torch.Tensor | None:
        """The largest scale's memory bank, ``float32`` ``(M, D)`` (None before fitting)."""
        return self.banks[-1].bank if self.banks else None

    @property
    def bank_index(self) -> torch.Tensor | None:
        """The largest scale's :attr:`ScaleBank.index` (None before fitting)."""
        return self.banks[-1].index if self.banks else None

    # ------------------------------------------------------------------ fit
    def _fit_features(
        self, features: list[list[torch.Tensor]], progress: Progress, keep_all: bool = False, groups: torch.Tensor | None = None
    ) -> None:
        n_sources = len(features[0]) if groups is None else int(groups.unique().numel())
        ratio = 1.0 if keep_all else self.coreset_ratio
        self.banks = [build_bank(f, ratio, self.projection_dim, self._bank_candidates(f), lambda a, b: progress("coreset", a, b)) for f in features]
        self.scale_stats = torch.tensor([[0.0, 1.0]] * len(self.banks), dtype=torch.float64)
        self._model = None
        self._loo = None
        if len(self.banks) > 1 and n_sources > 1:
            # each scale's leave-one-out scores set its standardisation; kept for the calibration
            self._loo = [self._leave_one_out(k, f, groups, progress) for k, f in enumerate(features)]
            # image scores when there are enough of them; a few shots: all their patch scores instead
            pooled = [s if n_sources >= MIN_IMAGES_FOR_IMAGE_STATS else torch.cat([g.flatten() for g in grids]) for s, grids in self._loo]
            stats = [[float(v.double().mean()), max(float(v.double().std(unbiased=False)), 1e-6)] for v in pooled]
            self.scale_stats = torch.tensor(stats, dtype=torch.float64)
            self._model = None  # rebuilt with the standardisation

    def _bank_candidates(self, features: list[torch.Tensor]) -> torch.Tensor | None:
        """``int64`` rows (image by image, row-major) of the training patches the bank may hold; None: all."""
        return None

    def _build_scorer(self) -> PatchCoreScorer:
        return PatchCoreScorer([sb.bank for sb in self.banks], self.scale_stats, self.image_score, self.cosine_scores)

    def _leave_one_out(self, k: int, features: list[torch.Tensor], groups: torch.Tensor | None, progress: Progress):
        weights = self._patch_weights() if k == len(self.banks) - 1 else None
        return leave_one_out(self.banks[k], self.model.scorer, features, groups, lambda a, b: progress("calibration", a, b), weights)

    def _out_of_sample_scores(
        self, features: list[list[torch.Tensor]], progress: Progress, groups: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Leave-one-image-out on every scale (computed once in fit when there are several), fused."""
        loo = self._loo or [self._leave_one_out(k, f, groups, progress) for k, f in enumerate(features)]
        self._loo = None
        scorer = self.model.scorer
        scores, grids = [], []
        for i in range(loo[0][0].numel()):
            s, g = scorer.fuse([sc[i : i + 1] for sc, _ in loo], [gr[i][None] for _, gr in loo])
            scores.append(s)
            grids.append(g[0])
        return torch.cat(scores), grids

    # ------------------------------------------------------------------ explain
    def _residuals(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Each patch feature of the last scale minus its nearest memory-bank feature, ``(B, D, h, w)``."""
        b, d, h, w = features[-1].shape
        q = features[-1].permute(0, 2, 3, 1).reshape(-1, d)
        _, idx = self.model.scorer.nearest(len(self.banks) - 1, q)
        return (q - self.banks[-1].bank[idx]).view(b, h, w, d).permute(0, 3, 1, 2)

    def _evidence(self, hw: tuple[int, int], region: Region, patch_scores: torch.Tensor, patch_features: torch.Tensor | None) -> Evidence | None:
        """The closest (patch, bank patch) pair in ``region`` and matching crops
        (:func:`~anomalens.detectors.evidence.bank_evidence`); ``patch_features`` ``(h, w, D)``."""
        if patch_features is None or not self.banks:
            return None
        last = len(self.banks) - 1

        def nearest_row(gy: int, gx: int) -> int:
            return int(self.model.scorer.nearest(last, patch_features[gy, gx].view(1, -1))[1][0])

        return bank_evidence(self.banks[-1], self.train_images, self.train_views, hw, region, patch_scores, nearest_row)

    # ------------------------------------------------------------------ state
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {"scale_stats": self.scale_stats}
        for k, sb in enumerate(self.banks):
            t.update({f"memory_bank.{k}": sb.bank, f"bank_index.{k}": sb.index, f"train_grids.{k}": sb.grids})
        return t

    def _expected_shapes(self, config: dict) -> dict[str, list[int]]:
        shapes = {"scale_stats": [len(self.image_sizes), 2]}
        tensors = config["tensors"]
        for k in range(len(self.image_sizes)):
            m = tensors.get(f"memory_bank.{k}", {}).get("shape", [0, 0])[0]
            n = tensors.get(f"train_grids.{k}", {}).get("shape", [0, 0])[0]
            shapes.update({f"memory_bank.{k}": [m, self.extractor.feature_dim], f"bank_index.{k}": [m], f"train_grids.{k}": [n, 2]})
        return shapes

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        banks = []
        for k in range(len(self.image_sizes)):
            grids, index = tensors[f"train_grids.{k}"].long(), tensors[f"bank_index.{k}"].long()
            if grids.numel() == 0 or int(grids.min()) < 1 or int(index.min()) < 0 or int(index.max()) >= int(grids.prod(1).sum()):
                raise ModelFileError(f"PatchCore bank_index.{k} does not fit train_grids.{k} (a damaged or mixed-up model file)")
            banks.append(ScaleBank(tensors[f"memory_bank.{k}"].float(), index, grids))
        stats = tensors["scale_stats"].double()
        if not bool(torch.isfinite(stats).all()) or bool((stats[:, 1] <= 0).any()):
            raise ModelFileError("PatchCore scale_stats are not finite positive scales (a damaged model file)")
        self.banks, self.scale_stats = banks, stats
        self._model = None
