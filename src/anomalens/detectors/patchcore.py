"""PatchCore: Roth, Pemula, Zepeda, Schölkopf, Brox, Gehler, "Towards Total Recall in Industrial
Anomaly Detection", CVPR 2022 (arXiv:2106.08265).

Fit: locally aware patch features of the normal images (:class:`~anomalens.common.PatchFeatureExtractor`)
form a memory bank, subsampled by greedy k-center coreset (:mod:`anomalens.sampler`).
Predict: every test patch's score is the L2 distance to its nearest memory-bank feature; the anomaly
map is the score grid upsampled to the image and Gaussian-smoothed (sigma 4); the image score is the
mean of its highest 1% patch scores (AnomalyDINO's image score, Damm et al., WACV 2025) when the bank
holds 10 or more normal images, else the maximum patch score (the paper's; ``image_score=None``
chooses so at fit time), or optionally the paper's re-weighted maximum (Eq. 7), which discounts a
patch whose nearest bank feature lies in a dense region of the bank. The choice by the number of
images was measured on the benchmark suite (README, "Choosing the defaults"): with all normal images
the top-1% mean lifted the worst category on every CNN, with 1-8 images it lowered it.

Multi-scale (our addition; ``image_size=(256, 320)``, the default): one bank per input size. Distances
at different sizes are not on one scale, so each scale's scores are standardised by the mean and
standard deviation of its leave-one-out image scores of the normal training images (no defective
image involved), then averaged: image score = mean over scales of the standardised image scores;
patch scores = mean of the standardised score grids, bilinearly resized to the largest scale's grid.
The fused score is in units of normal-image standard deviations. With fewer than 10 normal images
(few-shot), the mean and deviation of their leave-one-out *patch* scores standardise instead; with one
image (nothing to leave out) the raw distances are averaged. On the benchmark suite this kept
the best single size's accuracy on every category (README, "Choosing the defaults").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..augment import view_to_source_normalised
from ..errors import ConfigError, ModelFileError
from ..explain import Evidence, Region, crop_box
from ..knn import BACKENDS, NearestNeighbours, pairwise_sq_dists
from ..sampler import greedy_coreset
from .base import Detector, Progress

IMAGE_SCORES = ("max", "reweighted", "mean_top1")
#: percentage of a grid's highest patch scores averaged by ``image_score="mean_top1"`` (AnomalyDINO: 1%)
TOP_PERCENT = 1
#: fewest normal images whose leave-one-out image scores standardise a scale; with fewer (few-shot),
#: their leave-one-out patch scores do (thousands of values instead of a handful). Also the fewest
#: for which ``image_score=None`` takes the top-1% mean instead of the maximum.
MIN_IMAGES_FOR_IMAGE_STATS = 10


def top_mean(scores: torch.Tensor) -> torch.Tensor:
    """Mean of the highest ``ceil(TOP_PERCENT / 100 * P)`` values of each row of ``scores`` ``(B, P)``:
    ``(B,)``, same dtype. Integer arithmetic, so the count is the same in the ONNX graph (symbolic
    ``P``) as here."""
    n_top = (scores.shape[1] * TOP_PERCENT + 99) // 100
    return scores.topk(n_top, dim=1).values.mean(1)


def default_image_score(n_images: int) -> str:
    """PatchCore's image score for a bank of ``n_images`` normal images (``image_score=None``):
    ``"mean_top1"`` from :data:`MIN_IMAGES_FOR_IMAGE_STATS` images on, ``"max"`` below.

    Measured on every category of the benchmark suite (README, "Choosing the defaults"): fitted on
    all normal images, the top-1% mean raised the worst category (magnetic_tile) by 0.8-1.1 image
    AUROC points on each of the three CNNs and lowered no category; fitted on 1-8 images
    (``shots``), it lowered the worst category by 1.1-1.6 points at every k."""
    return "mean_top1" if n_images >= MIN_IMAGES_FOR_IMAGE_STATS else "max"


class ScaleBank:
    """The memory bank of one scale.

    Attributes:
        bank: ``float32`` ``(M, D)`` patch features.
        index: ``int64`` ``(M,)`` each feature's row among all training patches, image (view) by image
            in row-major order (``offset_i + y * w_i + x``).
        grids: ``int64`` ``(N, 2)`` patch grid ``(h_i, w_i)`` of each training image (view); grids
            differ when the images' aspect ratios do.
        support: ``int64`` ``(M, b)`` each feature's ``b`` nearest bank features (re-weighted image score), or None.
    """

    def __init__(self, bank: torch.Tensor, index: torch.Tensor, grids: torch.Tensor, backend: str, support: torch.Tensor | None = None):
        self.bank = bank.contiguous()
        self.index = index
        self.grids = grids
        self.support = support
        self.nn = NearestNeighbours(self.bank, backend)
        self.sq = (self.bank * self.bank).sum(1)

    def origin(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training image (view) index and position in its grid (``y * w_i + x``) of bank ``rows``."""
        offsets = torch.cumsum(self.grids.prod(1), 0)
        origin = self.index[rows]
        image = torch.searchsorted(offsets, origin, right=True)
        start = torch.cat([torch.zeros(1, dtype=torch.int64), offsets])[image]
        return image, origin - start


class PatchCore(Detector):
    """PatchCore anomaly detector (memory bank + coreset + nearest neighbour), on one or more scales.

    Args:
        coreset_ratio: fraction of all training patches kept in each memory bank, in (0, 1].
        projection_dim: random-projection dimension used only to *select* the coreset (paper: 128).
        knn_backend: ``"faiss"`` (``IndexFlatL2``, faster here) or ``"torch"`` (chunked matmul): same results.
        image_score: ``"max"`` (max patch distance), ``"reweighted"`` (paper Eq. 7; one scale only),
            ``"mean_top1"`` (mean of the highest 1% of the patch scores, as AnomalyDINO), or None
            (default): chosen at fit time by the number of normal images (:func:`default_image_score`;
            the choice is saved with the model, and :attr:`image_score` holds it after fit).
        num_neighbours: support-set size ``b`` of the re-weighting (paper: 9).
        **kwargs: see :class:`~anomalens.detectors.base.Detector` (backbone, layers, image_size, ...).

    Tensors: per scale ``k``, a :class:`ScaleBank` (``memory_bank.k`` ``float32`` ``(M_k, D)``,
    ``bank_index.k``, ``train_grids.k``); ``scale_stats`` ``float64`` ``(K, 2)``, the mean and standard
    deviation of each scale's leave-one-out normal image scores (``(0, 1)`` for a single scale: raw
    distances). Test images of any shape are scored against the same banks.

    Raises:
        ConfigError: invalid option values.
    """

    name = "patchcore"
    supports_few_shot = True
    default_image_sizes = (256, 320)
    max_scales = 3
    #: EfficientNet-Lite2 (blocks 6 + 14): raised the worst category of the suite (magnetic_tile) on
    #: every training-set size, from all images to one (README, "Choosing the defaults")
    default_backbone = "efficientnet_lite2"
    #: a few-shot bank also holds its shots turned by 90, 180 and 270 degrees: raised the worst
    #: category and the mean at every k (README, "Few-shot: a handful of good images")
    default_augment = "rotations"

    def __init__(
        self,
        *,
        coreset_ratio: float = 0.01,
        projection_dim: int = 128,
        knn_backend: str = "faiss",
        image_score: str | None = None,
        num_neighbours: int = 9,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 < coreset_ratio <= 1.0:
            raise ConfigError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if knn_backend not in BACKENDS:
            raise ConfigError(f"knn_backend must be one of {BACKENDS}, got {knn_backend!r}")
        if image_score is not None and image_score not in IMAGE_SCORES:
            raise ConfigError(f"image_score must be one of {IMAGE_SCORES} or None, got {image_score!r}")
        if image_score == "reweighted" and len(self.image_sizes) > 1:
            raise ConfigError("image_score='reweighted' takes one image size")
        if num_neighbours < 1:
            raise ConfigError(f"num_neighbours must be >= 1, got {num_neighbours}")
        self.coreset_ratio = float(coreset_ratio)
        self.projection_dim = int(projection_dim)
        self.knn_backend = knn_backend
        #: the image score asked for (None: by the number of images, at fit time)
        self.image_score_option = image_score
        #: the image score in use: the option, or after a fit with None, :func:`default_image_score`
        self.image_score = image_score
        self.num_neighbours = int(num_neighbours)
        self.banks: list[ScaleBank] = []
        self.scale_stats = torch.tensor([[0.0, 1.0]] * len(self.image_sizes), dtype=torch.float64)
        self._loo: list[tuple[torch.Tensor, list[torch.Tensor]]] | None = None

    def get_params(self) -> dict:
        p = super().get_params()
        p.update(
            coreset_ratio=self.coreset_ratio,
            projection_dim=self.projection_dim,
            knn_backend=self.knn_backend,
            image_score=self.image_score,
            num_neighbours=self.num_neighbours,
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
        self.image_score = self.image_score_option or default_image_score(n_sources)
        self.banks = [self._fit_scale(f, progress, keep_all) for f in features]
        self._loo = None
        stats = [[0.0, 1.0]] * len(self.banks)
        if len(self.banks) > 1 and n_sources > 1:
            # each scale's leave-one-out scores set its standardisation; kept for the calibration
            self._loo = [self._loo_scale(k, f, groups, progress) for k, f in enumerate(features)]
            # image scores when there are enough of them; a few shots: all their patch scores instead
            pooled = [s if n_sources >= MIN_IMAGES_FOR_IMAGE_STATS else torch.cat([g.flatten() for g in grids]) for s, grids in self._loo]
            stats = [[float(v.double().mean()), max(float(v.double().std(unbiased=False)), 1e-6)] for v in pooled]
        self.scale_stats = torch.tensor(stats, dtype=torch.float64)

    def _fit_scale(self, features: list[torch.Tensor], progress: Progress, keep_all: bool) -> ScaleBank:
        d = features[0].shape[0]
        flat = torch.cat([f.permute(1, 2, 0).reshape(-1, d) for f in features])
        rows = self._bank_candidates(features)  # rows of ``flat`` the bank may hold (None: all)
        pool = flat if rows is None else flat[rows]
        ratio = 1.0 if keep_all else self.coreset_ratio
        n_select = max(1, min(pool.shape[0], int(round(ratio * pool.shape[0]))))
        if n_select < pool.shape[0]:
            idx = greedy_coreset(
                pool, n_select, projection_dim=self.projection_dim, progress=lambda a, b: progress("coreset", a, b)
            )
        else:
            idx = torch.arange(pool.shape[0])
        idx, _ = torch.sort(idx)
        if rows is not None:
            idx = rows[idx]
        grids = torch.tensor([list(f.shape[-2:]) for f in features], dtype=torch.int64)
        return self._make_bank(flat[idx].clone(), idx.long(), grids)

    def _bank_candidates(self, features: list[torch.Tensor]) -> torch.Tensor | None:
        """``int64`` rows (image by image, row-major) of the training patches the bank may hold; None: all."""
        return None

    def _patch_scores(self, dist: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Patch scores ``(b, h * w)`` from the L2 distances ``(b, h * w)`` of the patches of
        ``features`` ``(b, D, h, w)`` to their nearest bank features. PatchCore: the distances."""
        return dist

    def _make_bank(self, bank: torch.Tensor, index: torch.Tensor, grids: torch.Tensor, support: torch.Tensor | None = None) -> ScaleBank:
        sb = ScaleBank(bank, index, grids, self.knn_backend, support)
        if self.image_score == "reweighted" and (sb.support is None or sb.support.shape[0] != sb.bank.shape[0]):
            k = min(self.num_neighbours, sb.bank.shape[0])
            sb.support = NearestNeighbours(sb.bank, "torch").search(sb.bank, k)[1]
        return sb

    # ------------------------------------------------------------------ score
    def _image_scores(self, k: int, q: torch.Tensor, dist: torch.Tensor, nn_idx: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale ``k``'s raw image scores ``(b,)`` and flat score grids ``(b, h * w)``."""
        grid_scores = dist.view(b, -1)
        if self.image_score == "mean_top1":
            return top_mean(grid_scores), grid_scores
        top, arg = grid_scores.max(1)
        if self.image_score == "max":
            return top, grid_scores
        sb = self.banks[k]
        assert sb.support is not None
        rows = arg + torch.arange(b) * grid_scores.shape[1]
        q_star = q[rows]  # (b, D)
        support = sb.support[nn_idx.view(-1)[rows]]  # (b, k), first column is m* itself
        d = torch.linalg.vector_norm(sb.bank[support] - q_star[:, None, :], dim=2)
        weight = 1.0 - torch.softmax(d, dim=1)[:, 0]
        return weight * top, grid_scores

    def _fuse(self, scores: list[torch.Tensor], grids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per scale raw image scores ``(B,)`` and grids ``(B, h_k, w_k)`` -> fused ``(B,)`` and ``(B, h, w)``
        on the last scale's grid (module docstring). One scale: unchanged."""
        if len(scores) == 1:
            return scores[0], grids[0]
        stats = self.scale_stats.float()
        h, w = grids[-1].shape[-2:]
        fused_s, fused_g = 0.0, 0.0
        for k, (s, g) in enumerate(zip(scores, grids)):
            mu, sd = stats[k, 0], stats[k, 1]
            z = (g - mu) / sd
            if k < len(grids) - 1:
                z = F.interpolate(z[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            fused_s = fused_s + (s - mu) / sd
            fused_g = fused_g + z
        return fused_s / len(scores), fused_g / len(scores)

    def _score_features(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores, grids, nearest = [], [], None
        for k, f in enumerate(features):
            b, d, h, w = f.shape
            q = f.permute(0, 2, 3, 1).reshape(-1, d)
            dist, idx = self.banks[k].nn.search(q, 1)
            s, g = self._image_scores(k, q, self._patch_scores(dist[:, 0].view(b, -1), f), idx[:, 0], b)
            scores.append(s)
            grids.append(g.view(b, h, w))
            nearest = idx[:, 0].view(b, h, w)
        fs, fg = self._fuse(scores, grids)
        return fs, fg, nearest  # type: ignore[return-value]

    def _export_scores(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores in plain tensor ops for ONNX export: exact nearest distance by matrix product."""
        scores, grids = [], []
        for k, f in enumerate(features):
            b, d, h, w = f.shape
            q = f.permute(0, 2, 3, 1).reshape(-1, d)
            dist = pairwise_sq_dists(q, self.banks[k].bank).min(1).values.sqrt()
            s, g = self._image_scores(k, q, dist, None, b)  # type: ignore[arg-type]  # no nn_idx: "reweighted" is not exported
            scores.append(s)
            grids.append(g.view(b, h, w))
        return self._fuse(scores, grids)

    def _residuals(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Each patch feature of the last scale minus its nearest memory-bank feature, ``(B, D, h, w)``."""
        sb = self.banks[-1]
        b, d, h, w = features[-1].shape
        q = features[-1].permute(0, 2, 3, 1).reshape(-1, d)
        _, idx = sb.nn.search(q, 1)
        return (q - sb.bank[idx[:, 0]]).view(b, h, w, d).permute(0, 3, 1, 2)

    def _evidence(self, hw: tuple[int, int], region: Region, patch_scores: torch.Tensor, nearest: torch.Tensor | None) -> Evidence | None:
        """The closest (patch, bank patch) pair in the core of ``region``, and matching crops.

        The core is the middle half of the region's box (at least 3 x 3 patches). Of its patches, the
        one whose nearest bank feature is closest anchors the evidence: for a compact defect that is
        the defect's surroundings-aware match; for a region outlined by its edges (a foreign object,
        a pasted part) it is the inside of the object. Both crops cover the same number of patches
        (1.5 times the region's box, clamped to 6-16 patches); the flagged crop is centred on the
        region, the training crop on the matched bank patch shifted by the same offset, so the two
        show the same place.
        """
        if nearest is None or not self.banks:
            return None
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
        bank = self.banks[-1]
        vi, pos = (int(v) for v in bank.origin(nearest[gy, gx].view(1)))
        th, tw = (int(v) for v in bank.grids[vi])
        ti, view = divmod(vi, len(self.train_views))
        ty, tx = divmod(pos, tw)
        side = min(max(1.5 * max((x1 - x0) * gw / W, (y1 - y0) * gh / H), 6.0), 16.0)  # in patches
        # both crops centred on the region's centre, the training one shifted by the same offset from its anchor
        dx, dy = cx - (gx + 0.5), cy - (gy + 0.5)

        def box(u: float, v: float, grid_cells: int, size_hw: tuple[int, int]) -> tuple[int, int, int, int]:
            """Crop of ``side`` patches around the normalised position ``(u, v)`` of an image of
            ``size_hw`` pixels whose grid has ``grid_cells`` square patches."""
            px = math.sqrt(size_hw[0] * size_hw[1] / grid_cells)  # pixels per patch (aspect kept: square patches)
            return crop_box((u * size_hw[1], v * size_hw[0]), (side * px, side * px), size_hw)

        path = self.train_images[ti] if ti < len(self.train_images) else None
        train_box = None
        if path is not None:
            try:
                from PIL import Image

                with Image.open(path) as im:
                    # position in the view (grid units) -> normalised position in the original image
                    u, v = view_to_source_normalised(self.train_views[view], (tx + 0.5 + dx) / tw, (ty + 0.5 + dy) / th, im.width, im.height)
                    train_box = box(u, v, th * tw, (im.height, im.width))
            except OSError:
                train_box = None
        return Evidence(
            test_box=box(cx / gw, cy / gh, gh * gw, (H, W)),
            train_index=ti,
            train_image=path,
            train_box=train_box,
            train_grid_xy=(tx, ty),
            train_view=self.train_views[view],
            distance=float(patch_scores[gy, gx]),
        )

    def _loo_scale(
        self, k: int, features: list[torch.Tensor], groups: torch.Tensor | None, progress: Progress
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Scale ``k``, leave-one-image-out: raw scores ``(n,)`` and grids ``(h_i, w_i)`` of each source
        image against the bank minus its own patches (few-shot: minus the patches of all its views)."""
        sb = self.banks[k]
        n = len(features)
        groups = torch.arange(n) if groups is None else groups
        owner = groups[sb.origin(torch.arange(sb.index.numel()))[0]]
        scores, grids = [], []
        firsts = [int(i) for i in range(n) if i == 0 or groups[i] != groups[i - 1]]
        for done, i in enumerate(firsts):
            d, h, w = features[i].shape
            q = features[i].permute(1, 2, 0).reshape(-1, d)
            dd = pairwise_sq_dists(q, sb.bank, sb.sq)
            own = owner == groups[i]
            if bool(own.all()):  # a single training image: nothing else to compare with
                dd = dd.clone()
            else:
                dd[:, own] = math.inf
            v, idx = dd.min(1)
            s, g = self._image_scores(k, q, self._patch_scores(v.sqrt()[None], features[i][None]), idx, 1)
            scores.append(s)
            grids.append(g.view(h, w))
            progress("calibration", done + 1, len(firsts))
        return torch.cat(scores), grids

    def _out_of_sample_scores(
        self, features: list[list[torch.Tensor]], progress: Progress, groups: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Leave-one-image-out on every scale (computed once in fit when there are several), fused."""
        loo = self._loo or [self._loo_scale(k, f, groups, progress) for k, f in enumerate(features)]
        self._loo = None
        scores, grids = [], []
        for i in range(loo[0][0].numel()):
            s, g = self._fuse([sc[i : i + 1] for sc, _ in loo], [gr[i][None] for _, gr in loo])
            scores.append(s)
            grids.append(g[0])
        return torch.cat(scores), grids

    # ------------------------------------------------------------------ state
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {"scale_stats": self.scale_stats}
        for k, sb in enumerate(self.banks):
            t.update({f"memory_bank.{k}": sb.bank, f"bank_index.{k}": sb.index, f"train_grids.{k}": sb.grids})
            if sb.support is not None:
                t[f"bank_support.{k}"] = sb.support
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
            banks.append(self._make_bank(tensors[f"memory_bank.{k}"].float(), index, grids, tensors.get(f"bank_support.{k}")))
        stats = tensors["scale_stats"].double()
        if not bool(torch.isfinite(stats).all()) or bool((stats[:, 1] <= 0).any()):
            raise ModelFileError("PatchCore scale_stats are not finite positive scales (a damaged model file)")
        self.banks, self.scale_stats = banks, stats
