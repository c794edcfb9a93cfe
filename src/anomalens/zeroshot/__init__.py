"""Zero-shot anomaly detection by mutual scoring of unlabeled images, after MuSc (Li et al., "Zero-Shot
Industrial Anomaly Classification and Segmentation with Mutual Scoring of the Unlabeled Images",
ICLR 2024).

No normal image is needed: in a batch of unlabeled test images of one product, most patches are
normal and find close matches in the *other* images, while a defect's patches do not.

1. Patch tokens of the ViT-S/14 (``vit_small_focus``) at several layers, on the image resized to
   ``image_size`` px (224 px: 16 x 16 tokens; the paper feeds CLIP ViT-L/14 at 518 px).
2. Local neighbourhood aggregation with several degrees ``r`` (the paper's LNAMD,
   :func:`~anomalens.zeroshot.scoring.aggregate_patches`), so that both small and larger defects
   stand out.
3. Mutual scoring (the paper's MSM, :func:`~anomalens.zeroshot.scoring.mutual_scores`): a patch's
   score is the mean of its lowest distances to the closest patch of each other image, averaged over
   layers and degrees; computed in blocks of bounded memory, and against at most
   ``max_references`` other images drawn at random (our addition; the paper compares with all).
4. Image score: the maximum patch score, re-scored on the image-level similarity graph (the paper's
   RsCIN, simplified: :func:`~anomalens.zeroshot.scoring.rescore_images`).
5. The same mutual scoring on the patch features of ImageNet CNNs (``cnn_backbone``, PatchCore's
   3 x 3 aggregated patches; our addition), where a patch may also match the other images' 90, 180
   and 270-degree turns (``cnn_augment``; after the rotated references of AnomalyDINO and RegAD).
   Each CNN's image score is its maximum patch score.
6. The ViT's and every CNN's scores each become robust z-scores over the batch (median,
   1.4826 x MAD) and are added, one vote each (:func:`~anomalens.zeroshot.scoring.z_sum`); the map
   is the sum of the ViT's and the first CNN's z-scored maps.

With a few known-good images (``references``, the few-shot setting), each image's PatchCore distance
to every patch of those images is one more vote: the mutual scores know what the batch looks like,
the reference score what a good part looks like.

Decisions use the batch itself: an image (pixel) is NG when its score lies more than ``z`` robust
standard deviations above the batch median, which assumes most images of the batch are good; these
are not calibrated false-alarm rates.

Modules: :mod:`anomalens.zeroshot.scoring` (the mutual scoring as plain functions on tensors) and
:mod:`anomalens.zeroshot.musc` (the :class:`MuSc` detector). Usage: docs/guides/few-shot-zero-shot.md;
the reasons for the defaults: docs/design/decisions.md.
"""

from .musc import REFERENCE_BACKBONE, MuSc
from .scoring import (
    aggregate_patches,
    closest_patch_distances,
    mutual_scores,
    rescore_images,
    robust_z,
    z_sum,
)

__all__ = [
    "MuSc",
    "REFERENCE_BACKBONE",
    "aggregate_patches",
    "closest_patch_distances",
    "mutual_scores",
    "rescore_images",
    "robust_z",
    "z_sum",
]
