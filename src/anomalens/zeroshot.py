"""Zero-shot anomaly detection by mutual scoring of unlabeled images, after MuSc (Li et al., "Zero-Shot
Industrial Anomaly Classification and Segmentation with Mutual Scoring of the Unlabeled Images",
ICLR 2024).

No normal image is needed: in a batch of unlabeled test images of one product, most patches are
normal and find close matches in the *other* images, while a defect's patches do not.

1. Patch tokens of the ViT-S/14 (``vit_small_focus``) at several layers, on the image resized to
   ``image_size`` (224 px: 16 x 16 tokens; 448 px gives 32 x 32 at 4 times the ViT time and 16 times
   the pairwise work; the paper feeds CLIP ViT-L/14 518 px). 224 stays the default: 448 px is not
   better at ranking images (hazelnut_reduced 96.9 against 100.0 image AUROC, transistor 88.3 against
   87.5) and takes about 18 times as long (transistor, 100 images: 20 min against 67 s on 2
   cores); it localises better by AUPRO (91.4 -> 96.8 and 78.5 -> 83.7); README, "Few-shot on ViT tokens".
2. Local neighbourhood aggregation with several degrees ``r`` (r x r average of the token map; the
   paper's LNAMD), so that both small and larger defects stand out.
3. Mutual scoring (MSM): for image ``i`` and patch ``p``, the distance to the closest patch of each
   other image ``j``; the patch score is the mean of the lowest ``lower`` fraction of these distances
   (an abnormal patch may find a look-alike in one other defective image, not in most). Averaged over
   layers and degrees. The pairwise work is chunked over query images: memory is
   ``O(chunk x P x N x P)`` floats (``P`` tokens per image), not ``O((N x P)^2)``. The work grows as
   ``N^2 P^2``: at 448 px a batch of 100 images would take minutes per layer on a CPU, so with more
   than ``max_references + 1`` images each chunk of query images is compared with
   ``max_references`` other images drawn at random (our addition; the paper compares with all).
4. Image score: the maximum patch score, re-scored on the image-level similarity graph (the paper's
   RsCIN, simplified): averaged with the scores of the ``k`` most similar images (mean patch token
   as image feature), for several ``k``.
5. The same mutual scoring on CNN patch features (``cnn_backbone``: by default two ImageNet CNNs,
   EfficientNet-Lite0 blocks 4 + 10 and MobileNetV2 features 6 + 13, each with PatchCore's 3 x 3
   aggregated patches at ``cnn_size`` = 256 px, 32 x 32 patches; our addition). Each CNN's image
   score is its maximum patch score (re-scoring it lost points on hazelnut_reduced and
   magnetic_tile). The ViT's and every CNN's scores are each turned into robust z-scores over the
   batch and added, one vote each; so are the maps of the ViT and of the first ``cnn_maps`` CNNs
   (Lite0: MobileNetV2's map cost transistor 1.6 AUPRO points). Zero-shot image AUROC, ViT alone -> ViT + Lite0 -> ViT +
   Lite0 + MobileNetV2: transistor 87.5 -> 95.8 -> 96.8, magnetic_tile 73.7 -> 77.6 -> 78.1,
   hazelnut_reduced 100 at each; MobileNetV2 adds about 40% to the time of ViT + Lite0 (README, "Zero-shot").
6. In the CNNs' mutual scoring, a patch may also match the other images' 90, 180 and 270-degree turns
   (``cnn_augment``, our addition, after the rotated references of AnomalyDINO and RegAD): a part or
   texture at another angle still finds its match. transistor 96.8 -> 96.9, magnetic_tile 78.1 ->
   79.4, hazelnut_reduced 100; the ViT's vote is left without turns (with them, transistor 96.3).

With a few known-good images (``references``, the few-shot setting), each image's PatchCore
distance to the patches of those images (on the CNN, every patch kept) is one more scorer: the
mutual scores (the ViT's and each CNN's) and the reference distance each become a robust z-score over
the batch (median, 1.4826 x MAD) and are added, one vote each; likewise for the maps of the
ViT, of the first ``cnn_maps`` CNNs and of the reference. They disagree
in useful ways: the mutual scores know what the batch looks like, the reference score what a good
part looks like (numbers in the README, "Few-shot with the batch").

Decisions without any normal reference use the batch itself: an image is NG when its score lies
more than ``z`` robust standard deviations (1.4826 x MAD) above the batch median, which assumes most
images of the batch are good; likewise for pixels. These are not calibrated false-alarm rates.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .augment import apply_view, check_augment
from .calibration import robust_center_scale, robust_threshold
from .common import AnomalyMapHead, resize_map, to_tensor_batch
from .errors import AnomalensError, ConfigError
from .explain import find_regions
from .data import Sample
from .io import ImageLike
from .prediction import Prediction


class MuSc:
    """Zero-shot detector: scores a batch of unlabeled images against each other (see module docstring).

    Args:
        layers: ViT layers (``layer.0`` .. ``layer.11``).
        image_size: side in pixels the images are resized to (square, multiple of 14).
        max_references: other images each image is compared with at most (drawn at random, seed 0);
            None compares every pair (the paper; cost grows with the square of the batch).
        degrees: aggregation degrees ``r`` (odd).
        lower: fraction of the other images whose closest-patch distances are averaged (paper: 0.3).
        neighbours: ``k`` values of the image-level re-scoring (0 = off).
        chunk: query images per block of the pairwise computation (bounds memory).
        z: robust z-score above the batch median that flags an image (and a pixel) NG.
        blur_sigma: Gaussian smoothing of the map, pixels at ``image_size``.
        cnn_backbone: CNN(s) whose patch features (PatchCore's, at ``cnn_size`` px, square) are
            scored mutually as well, each CNN's image score being its maximum patch score, not
            re-scored; every scorer's scores (and maps) become robust z-scores over the batch and are
            added, one vote each. A name, a sequence of names, or None (the ViT alone). Default
            Lite0 and MobileNetV2: the second CNN raised zero-shot transistor 95.8 -> 96.8 and
            magnetic_tile 77.6 -> 78.1 (hazelnut_reduced 100 either way); MobileNetV2 *in place of*
            Lite0 was a tie (95.2, 77.7) and Lite2 lowered magnetic_tile (README).
        cnn_size: side in pixels of the CNN input (multiple of 16).
        cnn_maps: how many of ``cnn_backbone``, from the first, add their maps into the anomaly map;
            the others vote on the image score only. Default 1 (Lite0): MobileNetV2's map cost
            transistor 1.6 AUPRO points (85.8 -> 84.2) and 1.0 of pixel AUROC (README).
        reference_backbone: backbone of the PatchCore bank built from ``references`` in :meth:`predict`
            (EfficientNet-Lite2, PatchCore's default: against Lite0 it raised magnetic_tile from 79.0 / 79.7
            to 79.8 / 80.2 at k = 1 / 4 and cost no category more than 0.1; README). The mutual CNN
            (``cnn_backbone``) has no Lite2: with it the zero-shot magnetic_tile fell 77.6 -> 76.0.
        reference_augment: augmentation of the reference images (see :mod:`anomalens.augment`).
        cnn_augment: in the CNNs' mutual scoring, views of the *other* images a patch may also match
            (see :mod:`anomalens.augment`): with ``"rotations"`` (default), a patch's distance to image
            ``j`` is to its closest patch in ``j`` or in ``j`` turned by 90, 180 or 270 degrees, so a
            part or texture lying at another angle still finds its match. Measured (image AUROC
            hazelnut_reduced / transistor / magnetic_tile): ``"none"`` 100.0 / 96.8 / 78.1, rotations
            100.0 / 96.9 / 79.4; the ViT's vote with the turns as well 100.0 / 96.3 / 79.4, so it
            has none. Each view costs one more CNN pass per image and one more round of the CNNs'
            pairwise work (the whole batch took 2.6 times as long as with ``"none"``: transistor,
            100 images, 3.25 against 1.25 s per image on 2 cores).

    Raises:
        ConfigError: invalid layers, backbone or augmentation; a CNN named twice; cnn_maps < 0.
        AnomalensError: fewer than 3 images in the batch.
    """

    def __init__(
        self,
        layers: Sequence[str] = ("layer.2", "layer.5", "layer.8"),
        degrees: Sequence[int] = (1, 3, 5),
        image_size: int = 224,
        max_references: int | None = 100,
        lower: float = 0.3,
        neighbours: Sequence[int] = (1, 3),
        chunk: int = 8,
        z: float = 3.0,
        blur_sigma: float = 4.0,
        cnn_backbone: str | Sequence[str] | None = ("efficientnet_lite0", "mobilenet_v2"),
        cnn_size: int = 256,
        cnn_maps: int = 1,
        reference_backbone: str = "efficientnet_lite2",
        reference_augment: str = "none",
        cnn_augment: str = "rotations",
    ):
        from .backbones import OnnxViTBackbone, get_spec
        from .detectors.options import check_image_size

        check_augment(reference_augment)
        #: views of the other images a CNN patch may match beyond the images themselves (``cnn_augment``)
        self.cnn_views: tuple[str, ...] = check_augment(cnn_augment)[1:]
        check_image_size(image_size, OnnxViTBackbone.patch)
        cnns = () if cnn_backbone is None else (cnn_backbone,) if isinstance(cnn_backbone, str) else tuple(cnn_backbone)
        for name in cnns:
            get_spec(name)
            if name == "vit_small_focus":
                raise ConfigError("cnn_backbone must be CNNs (the ViT is already scored); None = the ViT alone")
        if len(set(cnns)) != len(cnns):
            raise ConfigError(f"cnn_backbone names a CNN twice: {list(cnns)}")
        if cnns:
            check_image_size(cnn_size, 16)
        if cnn_maps < 0:
            raise ConfigError(f"cnn_maps must be >= 0, got {cnn_maps}")
        if max_references is not None and max_references < 2:
            raise ConfigError(f"max_references must be >= 2 (or None for all), got {max_references}")

        self.backbone = OnnxViTBackbone(layers)
        self.image_size = int(image_size)
        self.max_references = None if max_references is None else int(max_references)
        self.degrees = tuple(int(r) for r in degrees)
        self.lower = float(lower)
        self.neighbours = tuple(int(k) for k in neighbours)
        self.chunk = max(1, int(chunk))
        self.z = float(z)
        self.head = AnomalyMapHead(self.backbone.patch, blur_sigma)
        self.reference_backbone = reference_backbone
        self.reference_augment = reference_augment
        #: the mutual CNNs, in vote order (empty: the ViT alone)
        self.cnn_backbones: tuple[str, ...] = cnns
        #: the mutual CNNs whose maps are added into the anomaly map (the others vote on the image score only)
        self.cnn_map_backbones: tuple[str, ...] = cnns[: int(cnn_maps)]
        self.cnn_size = int(cnn_size)
        self._cnn: dict = {}

    @torch.inference_mode()
    def features(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Per layer, ``float32`` ``(N, 384, S / 14, S / 14)`` patch-token maps of ``uint8`` RGB images
        (``S = image_size``)."""
        maps: list[list[torch.Tensor]] = []
        for s in range(0, len(images), 8):
            x = to_tensor_batch(images[s : s + 8], self.image_size)
            maps.append(self.backbone(self.backbone.normalize(x)))
        return [torch.cat(level) for level in zip(*maps)]

    @torch.inference_mode()
    def cnn_features(self, images: Sequence[np.ndarray], name: str, view: str = "id") -> torch.Tensor:
        """``float32`` ``(N, D, s / 8, s / 8)`` PatchCore patch features of the CNN ``name`` (3 x 3
        aggregated, its default layers) on the images turned or flipped to ``view``
        (:func:`~anomalens.augment.apply_view`) and resized to ``s = cnn_size``."""
        if name not in self._cnn:
            from .detectors import create_detector

            self._cnn[name] = create_detector("patchcore", backbone=name).extractor
        ex = self._cnn[name]
        return torch.cat(
            [ex(to_tensor_batch([apply_view(a, view) for a in images[s : s + 8]], self.cnn_size)) for s in range(0, len(images), 8)]
        )

    @torch.inference_mode()
    def mutual_scores(
        self, feats: Sequence[torch.Tensor], degrees: Sequence[int] | None = None, views: Sequence[Sequence[torch.Tensor]] = ()
    ) -> torch.Tensor:
        """``(N, h, w)`` patch scores from per-layer feature maps ``(N, D, h, w)`` (MSM over layers and
        ``degrees``, default :attr:`degrees`). ``views``: the same per-layer maps of further views of
        the images (``cnn_augment``); a patch's distance to image ``j`` is then to its closest patch
        in any view of ``j``."""
        n, _, h, w = feats[0].shape
        sampled = self.max_references is not None and n - 1 > self.max_references
        n_others = self.max_references if sampled else n - 1
        keep = max(1, int(math.ceil(self.lower * n_others)))
        # the images each chunk of query images is compared with: all (own image masked), or a random
        # draw of ``max_references`` from outside the chunk (same draw for every layer and degree)
        starts = range(0, n, self.chunk)
        rng = torch.Generator().manual_seed(0)
        refs = [self._draw_references(n, s, rng) for s in starts] if sampled else None
        total = torch.zeros(n, h * w)
        count = 0
        for layer, f in enumerate(feats):
            for r in degrees or self.degrees:
                tok = self._tokens(f, r)  # (N, P, D), unit length
                # the patches a query patch may match in image j: j's own, then those of its views
                ref = torch.cat([tok] + [self._tokens(v[layer], r) for v in views], 1) if views else tok
                for j, s in enumerate(starts):
                    q = tok[s : s + self.chunk].reshape(-1, tok.shape[2])  # (c*P, D)
                    others = torch.arange(n) if refs is None else refs[j]
                    per_image = self._closest(q, ref, others)  # (c*P, R): distance to the closest patch of each
                    c = q.shape[0] // (h * w)
                    if refs is None:
                        own = torch.arange(s, s + c).repeat_interleave(h * w)
                        per_image[torch.arange(q.shape[0]), own] = math.inf  # not against itself
                    low = per_image.topk(keep, dim=1, largest=False).values.mean(1)
                    total[s : s + c] += low.view(c, h * w)
                count += 1
        return (total / count).view(n, h, w)

    @staticmethod
    def _tokens(f: torch.Tensor, r: int) -> torch.Tensor:
        """Unit-length ``(N, h * w, D)`` tokens of the ``r x r`` average of feature maps ``f`` ``(N, D, h, w)``."""
        g = F.avg_pool2d(f, r, stride=1, padding=r // 2, count_include_pad=False) if r > 1 else f
        return F.normalize(g.flatten(2).transpose(1, 2), dim=2)

    @staticmethod
    def _closest(q: torch.Tensor, tok: torch.Tensor, others: torch.Tensor, budget: int = 1 << 26) -> torch.Tensor:
        """Euclidean distance of unit-length query rows ``q`` ``(Q, D)`` to the closest patch of each
        image ``others`` of ``tok`` ``(N, P, D)``: ``float32`` ``(Q, len(others))``.

        The most similar patch is found on cosine similarities, in blocks of images with at most
        ``budget`` similarities each (256 MB), and only those maxima become distances
        (``sqrt(2 - 2 cos)``): peak memory stays bounded whatever the batch, and the square root
        runs over ``Q x R`` values instead of ``Q x R x P``.
        """
        p, d = tok.shape[1], tok.shape[2]
        step = max(1, budget // max(1, q.shape[0] * p))
        best = torch.empty(q.shape[0], others.numel())
        for b in range(0, others.numel(), step):
            ids = others[b : b + step]
            sim = q @ tok[ids].reshape(-1, d).T  # (Q, b*P)
            best[:, b : b + ids.numel()] = sim.view(q.shape[0], ids.numel(), p).amax(2)
        return (2.0 - 2.0 * best).clamp_(min=0).sqrt_()

    def _draw_references(self, n: int, start: int, rng: torch.Generator) -> torch.Tensor:
        """``max_references`` image indices drawn from outside the chunk starting at ``start``, ascending."""
        outside = torch.cat([torch.arange(0, start), torch.arange(min(n, start + self.chunk), n)])
        return outside[torch.randperm(outside.numel(), generator=rng)[: self.max_references]].sort().values

    def rescore(self, scores: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Image scores averaged over their ``k`` most similar images (image feature: mean token)."""
        ks = [k for k in self.neighbours if k > 0]
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

    def mutual_parts(self, arrays: Sequence[np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The mutual scores of a batch of ``uint8`` RGB images, one ``(scores, maps)`` pair per
        feature family: ``float32`` ``(N,)`` image scores and ``(N, S, S)`` anomaly maps
        (``S = image_size``; None for a CNN beyond the first ``cnn_maps``). First the ViT (re-scored
        maximum patch score), then each of ``cnn_backbones`` (maximum patch score)."""
        feats = self.features(arrays)
        grids = self.mutual_scores(feats)
        parts = [(self.rescore(grids.flatten(1).amax(1), feats), self.head(grids))]
        for name in self.cnn_backbones:
            views = [[self.cnn_features(arrays, name, v)] for v in self.cnn_views]
            cnn = self.mutual_scores([self.cnn_features(arrays, name)], degrees=(1,), views=views)  # already 3 x 3 aggregated
            if name not in self.cnn_map_backbones:
                parts.append((cnn.flatten(1).amax(1), None))  # a vote on the image score only
                continue
            cnn_maps = AnomalyMapHead(self._cnn[name].stride, self.head.sigma)(cnn)
            size = parts[0][1].shape[-2:]
            cnn_maps = F.interpolate(cnn_maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            parts.append((cnn.flatten(1).amax(1), cnn_maps))
        return parts

    def score_batch(self, arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """MuSc scores of a batch of ``uint8`` RGB images: ``float32`` ``(N,)`` image scores and
        ``(N, S, S)`` anomaly maps (``S = image_size``). ViT alone: its re-scored maximum patch score
        and its map; with ``cnn_backbones``: the sum of the ViT's and each CNN's robust z-scores."""
        parts = self.mutual_parts(arrays)
        return parts[0] if len(parts) == 1 else z_sum(parts)

    def reference_scores(self, arrays: Sequence[np.ndarray], references) -> tuple[torch.Tensor, torch.Tensor]:
        """PatchCore scores of ``arrays`` against every patch of the ``references`` (few-shot bank):
        ``float32`` ``(N,)`` image scores and ``(N, S, S)`` maps (``S = image_size``; the image resized
        whole, as for the ViT).

        Raises:
            ImageReadError: a reference image cannot be read. DatasetError: no reference image
            (an empty folder). ConfigError: unknown backbone.
        """
        from .detectors import create_detector
        from .data import normal_images

        refs = normal_images(references)
        det = create_detector("patchcore", backbone=self.reference_backbone)
        det.fit(refs, shots=len(refs), augment=self.reference_augment)
        scores, maps = [], []
        size = (self.image_size, self.image_size)
        for s in range(0, len(arrays), det.batch_size):
            sc, mp = det.score_batch(list(arrays[s : s + det.batch_size]))
            scores.extend(sc)
            maps.extend(torch.from_numpy(resize_map(torch.from_numpy(m), size)) for m in mp)
        return torch.tensor(scores, dtype=torch.float32), torch.stack(maps)

    def predict(self, images: Iterable[ImageLike | Sample], references=None, progress=None) -> list[Prediction]:
        """Score a batch of unlabeled images against each other (and, if given, against known-good
        ``references``).

        Unreadable inputs give failed predictions and are left out of the mutual scoring.
        :class:`~anomalens.data.Sample` inputs carry their ground truth into the predictions (to
        evaluate; it is not used for scoring).

        Args:
            images: the batch: paths, PIL images, arrays or samples.
            references: optional few-shot good images (list of paths/arrays, a folder, or an MVTec
                category's ``train/good``); all are used. Scores then are sums of robust z-scores
                (see the module docstring), not distances.

        Raises:
            AnomalensError: fewer than 3 readable images (mutual scoring needs others to compare
            with); ImageReadError / DatasetError: an unreadable or missing reference image.
        """
        from .inference import as_inputs, normalized_score, read_input

        items = as_inputs(images)
        out: list[Prediction | None] = [None] * len(items)
        ok_idx, arrays, truths = [], [], []
        for i, item in enumerate(items):
            read = read_input(item, i)
            if isinstance(read, Prediction):
                out[i] = read
                continue
            arrays.append(read[0])
            truths.append(read[1])
            ok_idx.append(i)
        if len(arrays) < 3:
            raise AnomalensError(f"zero-shot scoring needs at least 3 readable images of one product, got {len(arrays)}")
        if references is None:
            scores, maps = self.score_batch(arrays)
        else:  # one vote per scorer: the ViT's and each CNN's mutual scores, the reference distance
            scores, maps = z_sum(self.mutual_parts(arrays) + [self.reference_scores(arrays, references)])
        s = scores.double().numpy()
        threshold = robust_threshold(s, self.z)
        pixel_threshold = robust_threshold(maps.flatten().double().numpy(), self.z)
        self.threshold, self.pixel_threshold = threshold, pixel_threshold
        for j, i in enumerate(ok_idx):
            amap = resize_map(maps[j], arrays[j].shape[:2])
            mask = amap > pixel_threshold
            out[i] = Prediction(
                pred_score=float(s[j]),
                normalized_score=normalized_score(float(s[j]), threshold, float(s.min())),
                pred_label=int(s[j] > threshold),
                anomaly_map=amap,
                pred_mask=mask,
                p_value=None,
                threshold=threshold,
                regions=find_regions(amap, mask),
                **truths[j],
            )
        return out  # type: ignore[return-value]


def z_sum(parts: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the robust z-scores (:func:`robust_z`) of several scorers' ``(scores, maps)`` pairs
    (``float32`` ``(N,)`` and ``(N, S, S)``; a map of None votes on the image score only): every
    scorer gets one vote, whatever its units."""
    return sum(robust_z(sc) for sc, _ in parts), sum(robust_z(mp) for _, mp in parts if mp is not None)  # type: ignore[return-value]


def robust_z(values: torch.Tensor) -> torch.Tensor:
    """``(values - median) / (1.4826 * MAD)`` over all elements (:func:`~anomalens.calibration.robust_center_scale`),
    same shape, ``float32``: puts scores of different detectors on one scale without assuming any
    is normal-distributed."""
    med, sd = robust_center_scale(values)
    return (values.float() - med) / sd
