"""PatchCore: Roth, Pemula, Zepeda, Schölkopf, Brox, Gehler, "Towards Total Recall in Industrial
Anomaly Detection", CVPR 2022 (arXiv:2106.08265).

Fit: locally aware patch features of the normal images (:class:`~anomalens.common.PatchFeatureExtractor`)
form a memory bank, subsampled by greedy k-center coreset (:mod:`anomalens.sampler`).
Predict: every test patch's score is the L2 distance to its nearest memory-bank feature; the anomaly
map is the score grid upsampled to the image and Gaussian-smoothed (sigma 4); the image score is the
maximum patch score, or optionally the paper's re-weighted maximum (Eq. 7), which discounts a patch
whose nearest bank feature lies in a dense region of the bank.
"""

from __future__ import annotations

import math

import torch

from ..augment import view_to_source
from ..errors import ConfigError
from ..explain import Evidence, Region, crop_box
from ..knn import BACKENDS, NearestNeighbours, pairwise_sq_dists
from ..sampler import greedy_coreset
from .base import Detector, Progress

IMAGE_SCORES = ("max", "reweighted")


class PatchCore(Detector):
    """PatchCore anomaly detector (memory bank + coreset + nearest neighbour).

    Args:
        coreset_ratio: fraction of all training patches kept in the memory bank, in (0, 1].
        projection_dim: random-projection dimension used only to *select* the coreset (paper: 128).
        knn_backend: ``"faiss"`` (``IndexFlatL2``, faster here) or ``"torch"`` (chunked matmul): same results.
        image_score: ``"max"`` (max patch distance) or ``"reweighted"`` (paper Eq. 7).
        num_neighbours: support-set size ``b`` of the re-weighting (paper: 9).
        **kwargs: see :class:`~anomalens.detectors.base.Detector` (backbone, layers, image_size, ...).

    Tensors: the memory bank is ``float32`` ``(M, D)``; ``bank_index`` ``int64`` ``(M,)`` gives each
    bank feature's origin as ``image * h * w + y * w + x`` in the training set.

    Raises:
        ConfigError: invalid option values.
    """

    name = "patchcore"
    supports_few_shot = True

    def __init__(
        self,
        *,
        coreset_ratio: float = 0.01,
        projection_dim: int = 128,
        knn_backend: str = "faiss",
        image_score: str = "max",
        num_neighbours: int = 9,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 < coreset_ratio <= 1.0:
            raise ConfigError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if knn_backend not in BACKENDS:
            raise ConfigError(f"knn_backend must be one of {BACKENDS}, got {knn_backend!r}")
        if image_score not in IMAGE_SCORES:
            raise ConfigError(f"image_score must be one of {IMAGE_SCORES}, got {image_score!r}")
        if num_neighbours < 1:
            raise ConfigError(f"num_neighbours must be >= 1, got {num_neighbours}")
        self.coreset_ratio = float(coreset_ratio)
        self.projection_dim = int(projection_dim)
        self.knn_backend = knn_backend
        self.image_score = image_score
        self.num_neighbours = int(num_neighbours)
        self.memory_bank: torch.Tensor | None = None
        self.bank_index: torch.Tensor | None = None
        self.bank_support: torch.Tensor | None = None
        self.grid: tuple[int, int] | None = None
        self._nn: NearestNeighbours | None = None

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

    # ------------------------------------------------------------------ fit
    def _fit_features(self, features: torch.Tensor, progress: Progress, keep_all: bool = False) -> None:
        n, d, h, w = features.shape
        flat = features.permute(0, 2, 3, 1).reshape(-1, d)
        ratio = 1.0 if keep_all else self.coreset_ratio
        n_select = max(1, min(flat.shape[0], int(round(ratio * flat.shape[0]))))
        if n_select < flat.shape[0]:
            idx = greedy_coreset(
                flat, n_select, projection_dim=self.projection_dim, progress=lambda a, b: progress("coreset", a, b)
            )
        else:
            idx = torch.arange(flat.shape[0])
        idx, _ = torch.sort(idx)
        self.grid = (h, w)
        self._set_bank(flat[idx].clone(), idx.long())

    def _set_bank(self, bank: torch.Tensor, bank_index: torch.Tensor) -> None:
        self.memory_bank = bank.contiguous()
        self.bank_index = bank_index
        self._nn = NearestNeighbours(self.memory_bank, self.knn_backend)
        if self.image_score == "reweighted" and (self.bank_support is None or self.bank_support.shape[0] != bank.shape[0]):
            k = min(self.num_neighbours, bank.shape[0])
            self.bank_support = NearestNeighbours(self.memory_bank, "torch").search(self.memory_bank, k)[1]

    # ------------------------------------------------------------------ score
    def _image_scores(self, q: torch.Tensor, dist: torch.Tensor, nn_idx: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        grid_scores = dist.view(b, -1)
        top, arg = grid_scores.max(1)
        if self.image_score == "max":
            return top, grid_scores
        assert self.bank_support is not None and self.memory_bank is not None
        rows = arg + torch.arange(b) * grid_scores.shape[1]
        q_star = q[rows]  # (b, D)
        support = self.bank_support[nn_idx.view(-1)[rows]]  # (b, k), first column is m* itself
        sup_feats = self.memory_bank[support]  # (b, k, D)
        d = torch.linalg.vector_norm(sup_feats - q_star[:, None, :], dim=2)
        weight = 1.0 - torch.softmax(d, dim=1)[:, 0]
        return weight * top, grid_scores

    def _score_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self._nn is not None and self.grid is not None
        b, d, h, w = features.shape
        if (h, w) != self.grid:
            raise ConfigError(f"feature grid {h}x{w} differs from the fitted {self.grid}")
        q = features.permute(0, 2, 3, 1).reshape(-1, d)
        dist, idx = self._nn.search(q, 1)
        scores, grid_scores = self._image_scores(q, dist[:, 0], idx[:, 0], b)
        return scores, grid_scores.view(b, h, w), idx[:, 0].view(b, h, w)

    def _export_scores(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores in plain tensor ops for ONNX export: exact nearest distance by matrix product."""
        assert self.memory_bank is not None
        b, d, h, w = features.shape
        q = features.permute(0, 2, 3, 1).reshape(-1, d)
        dist = pairwise_sq_dists(q, self.memory_bank).min(1).values.sqrt().view(b, h, w)
        return dist.flatten(1).max(1).values, dist

    def _residuals(self, features: torch.Tensor) -> torch.Tensor:
        """Each patch feature minus its nearest memory-bank feature, ``(B, D, h, w)``."""
        assert self._nn is not None and self.memory_bank is not None
        b, d, h, w = features.shape
        q = features.permute(0, 2, 3, 1).reshape(-1, d)
        _, idx = self._nn.search(q, 1)
        return (q - self.memory_bank[idx[:, 0]]).view(b, h, w, d).permute(0, 3, 1, 2)

    def _evidence(self, hw: tuple[int, int], region: Region, patch_scores: torch.Tensor, nearest: torch.Tensor | None) -> Evidence | None:
        """The closest (patch, bank patch) pair in the core of ``region``, and matching crops.

        The core is the middle half of the region's box (at least 3 x 3 patches). Of its patches, the
        one whose nearest bank feature is closest anchors the evidence: for a compact defect that is
        the defect's surroundings-aware match; for a region outlined by its edges (a foreign object,
        a pasted part) it is the inside of the object. Both crops have the same size on the model's
        ``image_size`` grid (1.5 times the region's box, clamped to 6-16 patches of stride
        ``image_size / grid``); the flagged crop is centred on the region, the training crop on the
        matched bank patch shifted by the same offset, so the two show the same place.
        """
        if nearest is None or self.bank_index is None or self.grid is None:
            return None
        gh, gw = self.grid
        H, W = hw
        x0, y0, x1, y1 = region.box
        cx, cy = (x0 + x1) / 2 * gw / W, (y0 + y1) / 2 * gh / H
        rx, ry = max(1.5, (x1 - x0) / 4 * gw / W), max(1.5, (y1 - y0) / 4 * gh / H)
        gx0, gx1 = max(0, int(cx - rx)), min(gw, int(math.ceil(cx + rx)))
        gy0, gy1 = max(0, int(cy - ry)), min(gh, int(math.ceil(cy + ry)))
        core = patch_scores[gy0:gy1, gx0:gx1]
        k = int(torch.argmin(core))
        gy, gx = gy0 + k // core.shape[1], gx0 + k % core.shape[1]
        row = int(nearest[gy, gx])
        origin = int(self.bank_index[row])
        vi, pos = divmod(origin, gh * gw)
        ti, view = divmod(vi, len(self.train_views))
        ty, tx = divmod(pos, gw)
        stride = self.image_size / gw
        side = min(max(1.5 * max((x1 - x0) * self.image_size / W, (y1 - y0) * self.image_size / H), 6 * stride), 16 * stride)
        # both crops centred on the region's centre, the training one shifted by the same offset from its anchor
        dx, dy = cx - (gx + 0.5), cy - (gy + 0.5)

        def box(ax: float, ay: float, size_hw: tuple[int, int]) -> tuple[int, int, int, int]:
            sh, sw = size_hw[0] / self.image_size, size_hw[1] / self.image_size
            return crop_box((ax * stride * sw, ay * stride * sh), (side * sw, side * sh), size_hw)

        path = self.train_images[ti] if ti < len(self.train_images) else None
        train_box = None
        if path is not None:
            try:
                from PIL import Image

                with Image.open(path) as im:
                    # position in the view (grid units) -> normalised position in the original image
                    u, v = view_to_source(self.train_views[view], (tx + 0.5 + dx) / gw, (ty + 0.5 + dy) / gh, 1.0, 1.0)
                    train_box = box(u * gw, v * gh, (im.height, im.width))
            except OSError:
                train_box = None
        return Evidence(
            test_box=box(cx, cy, (H, W)),
            train_index=ti,
            train_image=path,
            train_box=train_box,
            train_grid_xy=(tx, ty),
            train_view=self.train_views[view],
            distance=float(patch_scores[gy, gx]),
        )

    def _out_of_sample_scores(
        self, features: torch.Tensor, progress: Progress, groups: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Leave-one-image-out: each training image scored against the bank minus its own patches
        (few-shot: minus the patches of all its views)."""
        assert self.memory_bank is not None and self.bank_index is not None
        n, d, h, w = features.shape
        groups = torch.arange(n) if groups is None else groups
        owner = groups[self.bank_index // (h * w)]
        bank_sq = (self.memory_bank * self.memory_bank).sum(1)
        scores, grids = [], []
        firsts = [int(i) for i in range(n) if i == 0 or groups[i] != groups[i - 1]]
        for done, i in enumerate(firsts):
            q = features[i].permute(1, 2, 0).reshape(-1, d)
            dd = pairwise_sq_dists(q, self.memory_bank, bank_sq)
            own = owner == groups[i]
            if bool(own.all()):  # a single training image: nothing else to compare with
                dd = dd.clone()
            else:
                dd[:, own] = math.inf
            v, idx = dd.min(1)
            s, g = self._image_scores(q, v.sqrt(), idx, 1)
            scores.append(s)
            grids.append(g.view(1, h, w))
            progress("calibration", done + 1, len(firsts))
        return torch.cat(scores), torch.cat(grids)

    # ------------------------------------------------------------------ state
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        assert self.memory_bank is not None and self.bank_index is not None and self.grid is not None
        t = {"memory_bank": self.memory_bank, "bank_index": self.bank_index, "grid": torch.tensor(self.grid)}
        if self.bank_support is not None:
            t["bank_support"] = self.bank_support
        return t

    def _expected_shapes(self, config: dict) -> dict[str, list[int]]:
        bank = config["tensors"].get("memory_bank", {}).get("shape", [0, 0])
        return {"memory_bank": [bank[0], self.extractor.feature_dim], "bank_index": [bank[0]], "grid": [2]}

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.grid = tuple(int(v) for v in tensors["grid"].tolist())  # type: ignore[assignment]
        self.bank_support = tensors.get("bank_support")
        self._set_bank(tensors["memory_bank"].float(), tensors["bank_index"].long())
