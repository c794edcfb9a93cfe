"""PaDiM: Defard, Setkov, Loesch, Audigier, "PaDiM: a Patch Distribution Modeling Framework for
Anomaly Detection and Localization", ICPR 2021 (arXiv:2011.08785).

Fit: at every position ``(y, x)`` of the patch grid, a multivariate Gaussian ``N(mu_yx, Sigma_yx)``
of the normal images' features, on a random subset of ``n_features`` channels (the paper's random
dimensionality reduction), with ``Sigma + eps I`` regularisation (eps = 0.01).
Every position has its own Gaussian, so all images share one input geometry: the first training
image's (short side ``image_size``, its aspect ratio kept); images of another shape are resized to it.
Predict: the patch score is the Mahalanobis distance ``sqrt((f - mu)^T Sigma^-1 (f - mu))``; the map
is upsampled and smoothed (sigma 4); the image score is the map's maximum patch score.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import Detector, Progress
from .scoring import PadimScorer


def _precision(s1: torch.Tensor, s2: torch.Tensor, n: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(P, d)`` and inverse covariance ``(P, d, d)`` from per-position sums ``s1 (P, d)``, ``s2 (P, d, d)``."""
    mean = s1 / n
    cov = (s2 - n * mean[:, :, None] * mean[:, None, :]) / max(1, n - 1)
    cov = cov + eps * torch.eye(cov.shape[-1], dtype=cov.dtype)
    return mean, torch.linalg.inv(cov)


class PaDiM(Detector):
    """PaDiM anomaly detector (per-position Gaussian, Mahalanobis distance).

    Args:
        n_features: channels kept by random selection (paper: 100 for ResNet-18); capped at the
            feature dimension.
        eps: covariance regularisation added to the diagonal.
        cv_folds: folds of the cross-fitting that yields out-of-sample calibration scores.
        seed: seeds the channel selection.
        **kwargs: see :class:`~anomalens.detectors.base.Detector`.

    Tensors: ``mean`` ``float32`` ``(h*w, d)``, ``precision`` ``float32`` ``(h*w, d, d)`` (64 MB at a
    40 x 40 grid and d = 100), ``channels`` ``int64`` ``(d,)``.

    Raises:
        ConfigError: invalid option values.
    """

    name = "padim"
    calibration_source = "cross-fit"
    #: EfficientNet-Lite0, not PatchCore's default Lite2 (measured reason: docs/design/decisions.md)
    default_backbone = "efficientnet_lite0"

    def __init__(self, *, n_features: int = 100, eps: float = 0.01, cv_folds: int = 5, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if n_features < 1:
            raise ConfigError(f"n_features must be >= 1, got {n_features}")
        if cv_folds < 2:
            raise ConfigError(f"cv_folds must be >= 2, got {cv_folds}")
        self.n_features = int(n_features)
        self.eps = float(eps)
        self.cv_folds = int(cv_folds)
        self.seed = int(seed)
        self.channels: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None
        self.grid: tuple[int, int] | None = None
        self._fit_hw: tuple[int, int] | None = None
        self._chol: torch.Tensor | None = None  # Cholesky factors of the precisions, for _residuals

    def get_params(self) -> dict:
        p = super().get_params()
        p.update(n_features=self.n_features, eps=self.eps, cv_folds=self.cv_folds, seed=self.seed)
        return p

    @property
    def fixed_input_hw(self) -> tuple[int, int] | None:
        """The fitted grid times the patch stride (None before fitting)."""
        if self.grid is None:
            return None
        return self.grid[0] * self.extractor.stride, self.grid[1] * self.extractor.stride

    def input_hw(self, hw: tuple[int, int], scale: int = 0) -> tuple[int, int]:
        """The one model-input ``(height, width)`` of this model (that of its first training image)."""
        return self.fixed_input_hw or self._fit_hw or super().input_hw(hw)

    def _start_fit(self, first_hw: tuple[int, int]) -> None:
        self.grid = None
        self._fit_hw = super().input_hw(first_hw)

    def _select(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, D, h, w)`` -> ``(N, h*w, d)`` float64 on the selected channels."""
        assert self.channels is not None
        f = features.index_select(1, self.channels)
        return f.flatten(2).transpose(1, 2).double()

    def _fit_features(
        self, features: list[list[torch.Tensor]], progress: Progress, keep_all: bool = False, groups: torch.Tensor | None = None
    ) -> None:
        features = torch.stack(features[0])  # one scale, one geometry for all (input_hw)
        n, dim, h, w = features.shape
        d = min(self.n_features, dim)
        g = torch.Generator().manual_seed(self.seed)
        self.channels = torch.sort(torch.randperm(dim, generator=g)[:d]).values
        self.grid = (h, w)
        x = self._select(features)
        s1, s2 = x.sum(0), torch.einsum("npi,npj->pij", x, x)
        mean, prec = _precision(s1, s2, n, self.eps)
        # contiguous like a loaded model (linalg.inv returns column-major), so both sum in the same order
        self.mean, self.precision = mean.float().contiguous(), prec.float().contiguous()
        self._chol = None
        self._model = None
        self._sums = (s1, s2, n)

    _mahalanobis = staticmethod(PadimScorer.mahalanobis)

    def _build_scorer(self) -> PadimScorer:
        assert self.mean is not None and self.precision is not None and self.channels is not None and self.grid is not None
        return PadimScorer(self.channels, self.mean, self.precision, self.grid)

    def _residuals(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Whitened residuals ``L^T (x - mean)`` with ``precision = L L^T`` per position, ``(B, d, h, w)``.

        Their norm is the Mahalanobis distance PaDiM scores with, just as PatchCore's residual's norm
        is its score. Defect types are grouped on these whitened residuals, not on the plain
        ``x - mean``.
        """
        assert self.mean is not None and self.precision is not None
        if self._chol is None:
            self._chol = torch.linalg.cholesky(self.precision.double()).float()  # (P, d, d)
        features = features[0]
        b, _, h, w = features.shape
        z = torch.einsum("bpi,pij->bpj", self._select(features).float() - self.mean[None], self._chol)
        return z.transpose(1, 2).reshape(b, -1, h, w)

    def _out_of_sample_scores(
        self, features: list[list[torch.Tensor]], progress: Progress, groups: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """K-fold cross-fitting: each image scored by the Gaussians fitted without its fold."""
        features = torch.stack(features[0])
        n, _, h, w = features.shape
        x = self._select(features)
        s1, s2, _ = self.__dict__.pop("_sums")  # the fit's sums (128 MB at a 40x40 grid) are not kept
        if n < 3:  # too few images to leave any out: score in-sample (optimistic; noted in calibration)
            dist = self._mahalanobis(x.float(), self.mean, self.precision).view(n, h, w)
            return dist.flatten(1).max(1).values, list(dist)
        folds = torch.tensor_split(torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)), min(self.cv_folds, n))
        scores = torch.empty(n)
        grids = torch.empty(n, h, w)
        for k, fold in enumerate(folds):
            xf = x[fold]
            m, p = _precision(s1 - xf.sum(0), s2 - torch.einsum("npi,npj->pij", xf, xf), n - len(fold), self.eps)
            dist = self._mahalanobis(xf.float(), m.float(), p.float()).view(len(fold), h, w)
            grids[fold] = dist
            scores[fold] = dist.flatten(1).max(1).values
            progress("calibration", k + 1, len(folds))
        return scores, list(grids)

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        assert self.mean is not None and self.precision is not None and self.channels is not None and self.grid is not None
        return {"mean": self.mean, "precision": self.precision, "channels": self.channels, "grid": torch.tensor(self.grid)}

    def _expected_shapes(self, config: dict) -> dict[str, list[int]]:
        p = config["tensors"].get("mean", {}).get("shape", [0, 0])[0]
        d = min(self.n_features, self.extractor.feature_dim)
        return {"mean": [p, d], "precision": [p, d, d], "channels": [d], "grid": [2]}

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mean = tensors["mean"].float()
        self.precision = tensors["precision"].float()
        self._chol = None
        self._model = None
        self.channels = tensors["channels"].long()
        self.grid = tuple(int(v) for v in tensors["grid"].tolist())  # type: ignore[assignment]
        if self.grid[0] * self.grid[1] != self.mean.shape[0] or min(self.grid) < 1:
            from ..errors import ModelFileError

            raise ModelFileError(f"PaDiM grid {self.grid} does not match its {self.mean.shape[0]} Gaussians")
        if int(self.channels.max()) >= self.extractor.feature_dim or int(self.channels.min()) < 0:
            from ..errors import ModelFileError

            raise ModelFileError("PaDiM channel indices are out of range for the backbone")
