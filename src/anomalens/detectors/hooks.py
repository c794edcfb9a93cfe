"""What each detector class provides to :class:`~anomalens.detectors.base.Detector`: its fitting,
its scoring module, its out-of-sample calibration scores, explanations and state tensors."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from ..explain import Evidence, Region
from ..inference import Progress


class DetectorHooks(ABC):
    """The methods a detector class implements (called by :mod:`~anomalens.detectors.fitting`,
    :mod:`~anomalens.detectors.persistence`, :mod:`~anomalens.detectors.engine` and
    :mod:`anomalens.discovery`)."""

    def _start_fit(self, first_hw: tuple[int, int]) -> None:
        """Called with the first training image's ``(H, W)`` before any feature is extracted."""

    @abstractmethod
    def _fit_features(
        self, features: list[list[torch.Tensor]], progress: Progress, keep_all: bool = False, groups: torch.Tensor | None = None
    ) -> None:
        """Learn from the normal images' patch features: ``features[k][i]`` is image ``i``'s ``float32``
        ``(D, h_ik, w_ik)`` at scale ``k`` (``keep_all``: few images, keep every patch; ``groups``: as
        in :meth:`_out_of_sample_scores`)."""

    @abstractmethod
    def _build_scorer(self) -> nn.Module:
        """The scoring module on the fitted state (:mod:`~anomalens.detectors.scoring`): per scale
        ``(B, D, h_k, w_k)`` features -> ``pred_score`` ``(B,)``, patch scores ``(B, h, w)`` on the
        last scale's grid, and the last scale's patch features ``float32`` ``(B, h, w, D)`` (memory banks,
        for evidence; else None)."""

    def _patch_weights(self):
        """Optional Python function, the last scale's ``(B, D, h, w)`` features -> ``(B, h * w)``
        factors of the patch scores (AnomalyDINO's masking); None: none."""
        return None

    def _residuals(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Per scale ``(B, D, h_k, w_k)`` features -> the last scale's features minus the normal features
        they are compared with, ``(B, D, h, w)``.

        Used to describe what is abnormal in a region (:mod:`anomalens.discovery`). Default: the
        features themselves (no normal reference).
        """
        return features[-1]

    def _evidence(self, hw: tuple[int, int], region: Region, patch_scores: torch.Tensor, patch_features: torch.Tensor | None) -> Evidence | None:
        """Nearest normal patch for ``region`` of an image of shape ``hw`` (memory-bank detectors only)."""
        return None

    @abstractmethod
    def _out_of_sample_scores(
        self, features: list[list[torch.Tensor]], progress: Progress, groups: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Scores ``(n,)`` and patch-score grids ``(h_i, w_i)`` of the training images by a model that
        did not learn from each of them (for calibration). ``groups`` (few-shot): ``int64`` ``(N,)``
        source image of each feature map (its augmented views share it, the original view first);
        then one score per source image, from its original view, with all its views left out."""

    @abstractmethod
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """Learned tensors to save."""

    @abstractmethod
    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore learned tensors (shapes already checked against the config)."""

    def _expected_shapes(self, config: dict) -> dict[str, list[int]] | None:
        """Shapes the loaded tensors must have given ``config`` (None: no extra check)."""
        return None

