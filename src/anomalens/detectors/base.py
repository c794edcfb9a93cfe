"""The base class of the image detectors and the machinery they share; every model kind follows
:class:`~anomalens.contract.AnomalyDetector`.

A detector is used like a scikit-learn / PyOD estimator::

    det = PatchCore().fit(normal_images)       # or PatchCore(backbone="mobilenet_v2", image_size=320)
    preds = det.predict(test_images)          # list[Prediction]
    scores = det.decision_function(images)     # float64 (N,) image scores
    det.save("model_dir"); det = anomalens.load_detector("model_dir")

``images`` may be file paths, PIL images or ``uint8`` numpy arrays of any size and mode. Each is
resized so that its short side is ``image_size`` and its aspect ratio is kept
(:func:`~anomalens.common.model_input_hw`); maps are returned at the image's own size.
Each detector scores with one ``torch.nn.Module`` (:class:`~anomalens.detectors.scoring.AnomalyModel`
with the method's scorer, :attr:`Detector.model`), run by Python prediction and traced by the ONNX
export alike. The fit modes live in :mod:`~anomalens.detectors.fitting`, the prediction loop in
:mod:`anomalens.inference`, saving and loading in :mod:`~anomalens.detectors.persistence`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import DEFAULT_IMAGE_SIZE, get_spec, make_backbone
from ..calibration import DEFAULT_FALSE_ALARM_RATE, Calibration
from ..common import AnomalyMapHead, PatchFeatureExtractor, group_by_shape, model_input_hw, to_model_inputs
from ..data import Sample, normal_images
from ..errors import AnomalensError
from ..explain import Evidence, Region
from ..inference import EvidenceFn, Progress, no_progress, run_predictions
from ..io import ImageLike
from ..prediction import Prediction
from . import engine, fitting
from .hooks import DetectorHooks
from .options import check_options
from .scoring import AnomalyModel
from .thresholds import Thresholds


class Detector(Thresholds, DetectorHooks):
    """Base class: backbone features, calibration, prediction, saving. Subclasses add the scoring.

    Args:
        backbone: backbone name (see :data:`anomalens.backbones.BACKBONES`); None = the detector's
            :attr:`default_backbone`.
        layers: backbone layers to take features from; None = the backbone's defaults.
        image_size: short side in pixels the images are resized to (multiple of 16 within [56, 1024];
            of 14 for the ViT), or several (up to 3) for multi-scale scoring (PatchCore: one bank per
            scale, scores fused on a common scale learned from the normal images). Default:
            :attr:`default_image_sizes` (448 for the ViT). Larger finds smaller defects and costs
            time roughly quadratically.
        keep_aspect: keep each image's aspect ratio (the long side follows the short one, see
            :func:`~anomalens.common.model_input_hw`); False squashes every image to a square.
        patch_size: local neighbourhood averaged into each patch feature (PatchCore's ``p``).
        border_pad: reflected border in pixels (at model input size; default 0) added before the
            backbone and cropped from its features (see :class:`~anomalens.common.PatchFeatureExtractor`).
        blur_sigma: Gaussian smoothing of the anomaly map, in pixels at model input size.
        false_alarm_rate: target fraction of normal images flagged (the conformal ``alpha``). None
            (default): 1%, or the smallest rate the calibration images support when they are fewer
            than 99, with a note (:func:`~anomalens.calibration.supported_false_alarm_rate`). A rate
            given explicitly is strict: too few images raise :class:`CalibrationError`.
        batch_size: images per backbone forward pass.
        pretrained: use the shipped ImageNet weights; False gives random weights (tests only).

    Raises:
        ConfigError: invalid option values, unknown backbone or layers.
    """

    name: ClassVar[str] = "detector"
    #: whether :meth:`fit` accepts ``shots`` (memory-bank detectors)
    supports_few_shot: ClassVar[bool] = False
    #: how :meth:`fit` gets out-of-sample calibration scores without a hold-out (see :mod:`anomalens.calibration`)
    calibration_source: ClassVar[str] = "leave-one-out"
    #: default short sides (pixels) for the CNN backbones; more than one only where :attr:`max_scales` allows
    default_image_sizes: ClassVar[tuple[int, ...]] = (DEFAULT_IMAGE_SIZE,)
    #: how many image sizes the detector can fuse
    max_scales: ClassVar[int] = 1
    #: backbone used when none is given (chosen per detector on the benchmark suite)
    default_backbone: ClassVar[str] = "efficientnet_lite0"
    #: support-set augmentation of a few-shot fit when none is given (chosen per detector on the
    #: few-shot benchmark)
    default_augment: ClassVar[str] = "none"
    #: patch features are scaled to unit length before fitting and scoring (AnomalyDINO's tokens)
    unit_features: ClassVar[bool] = False

    def __init__(
        self,
        backbone: str | None = None,
        layers: Sequence[str] | None = None,
        image_size: int | Sequence[int] | None = None,
        keep_aspect: bool = True,
        patch_size: int = 3,
        border_pad: int = 0,
        blur_sigma: float = 4.0,
        false_alarm_rate: float | None = None,
        batch_size: int = 8,
        pretrained: bool = True,
    ):
        backbone = backbone or self.default_backbone
        spec = get_spec(backbone)
        sizes = check_options(
            spec, self, image_size=image_size, patch_size=patch_size, border_pad=border_pad, blur_sigma=blur_sigma,
            false_alarm_rate=false_alarm_rate, batch_size=batch_size,
        )
        self.backbone_name = backbone
        self.layers = tuple(layers) if layers else spec.default_layers
        #: short sides of the model input, one per scale, ascending (pixels)
        self.image_sizes = tuple(sorted(int(x) for x in sizes))
        self.keep_aspect = bool(keep_aspect)
        #: model-input sides are multiples of this (pixels; 14 for the ViT)
        self.size_multiple = spec.size_multiple
        self.patch_size = int(patch_size)
        self.border_pad = int(border_pad)
        self.blur_sigma = float(blur_sigma)
        #: the rate asked for (None: the default, relaxed to what the calibration images support)
        self.requested_false_alarm_rate = None if false_alarm_rate is None else float(false_alarm_rate)
        #: the rate the thresholds are set for (after fit: possibly relaxed, see ``calibration.note``)
        self.false_alarm_rate = DEFAULT_FALSE_ALARM_RATE if false_alarm_rate is None else float(false_alarm_rate)
        self.batch_size = int(batch_size)
        self.pretrained = bool(pretrained)
        self.calibration: Calibration | None = None
        self.fit_info: dict[str, Any] = {}
        #: paths of the fitted training images, in order (None for in-memory images); evidence crops use them
        self.train_images: list[str | None] = []
        #: views of each training image in the bank, in order (few-shot augmentation; ``["id"]`` otherwise)
        self.train_views: list[str] = ["id"]
        #: thresholds set by the last batch-relative :meth:`predict` (one-shot models), else None
        self.batch_thresholds: tuple[float, float] | None = None
        self._extractor: PatchFeatureExtractor | None = None
        self._map_head: AnomalyMapHead | None = None
        self._model: AnomalyModel | None = None
        #: the engine asked for: ``"auto"`` (default), ``"torch"`` or ``"onnxruntime"`` (:meth:`use_engine`)
        self.engine_preference = "auto"
        #: the model folder this detector was loaded from or saved to (its exported graph is cached there)
        self.model_dir: Path | None = None
        self._model_key: bytes | None = None
        self._graph = None
        self._graph_failed = False
        #: ONNX Runtime intra-op threads of the graph's session (None: torch's thread count)
        self.graph_threads: int | None = None

    # ------------------------------------------------------------------ configuration
    def get_params(self) -> dict[str, Any]:
        """Constructor arguments, JSON-ready (what :meth:`save` stores and :meth:`load` passes back)."""
        return {
            "backbone": self.backbone_name,
            "layers": list(self.layers),
            "image_size": self.image_sizes[0] if len(self.image_sizes) == 1 else list(self.image_sizes),
            "keep_aspect": self.keep_aspect,
            "patch_size": self.patch_size,
            "border_pad": self.border_pad,
            "blur_sigma": self.blur_sigma,
            "false_alarm_rate": self.requested_false_alarm_rate,
            "batch_size": self.batch_size,
            "pretrained": self.pretrained,
        }

    @property
    def extractor(self) -> PatchFeatureExtractor:
        """The feature extractor (built on first use)."""
        if self._extractor is None:
            self._extractor = PatchFeatureExtractor(
                make_backbone(self.backbone_name, self.layers, self.pretrained), self.patch_size, self.border_pad
            )
        return self._extractor

    @property
    def map_head(self) -> AnomalyMapHead:
        """Patch-score grid -> smoothed map at model input size (:class:`~anomalens.common.AnomalyMapHead`)."""
        if self._map_head is None:
            self._map_head = AnomalyMapHead(self.extractor.stride, self.blur_sigma)
        return self._map_head

    @property
    def model(self) -> AnomalyModel:
        """The fitted inference graph (:class:`~anomalens.detectors.scoring.AnomalyModel`): model input
        per scale -> ``(pred_score, anomaly_map, patch_scores, patch_features)``; built on first use after
        a fit or load (fitted state only). Python prediction runs it and the ONNX export traces it."""
        if self._model is None:
            self._model = AnomalyModel(self.extractor, self._build_scorer(), self.map_head, self.unit_features, self._patch_weights())
            self._model.eval()
        return self._model

    @property
    def engine(self) -> str:
        """``"onnxruntime"`` or ``"torch"``: what :meth:`predict` runs :attr:`model` on (before the
        first prediction: what it will run on). See :mod:`~anomalens.detectors.engine`."""
        return engine.wanted_engine(self)

    def use_engine(self, name: str) -> "Detector":
        """Choose the engine: ``"auto"`` (ONNX Runtime on the graph cached in :attr:`model_dir` when
        it can, else torch), ``"torch"``, or ``"onnxruntime"`` (as auto). Returns ``self``.

        Raises:
            ConfigError: an unknown name (:func:`~anomalens.contract.check_engine`).
        """
        from ..contract import check_engine

        self.engine_preference = check_engine(name)
        if name == "torch":
            self._graph = None
        return self

    def _forget_graph(self, model_dir: Path | None = None, key: bytes | None = None) -> None:
        """Drop the fitted graph and its session (a new fit, or a new folder)."""
        self._model, self._graph, self._graph_failed = None, None, False
        self.model_dir, self._model_key = model_dir, key

    @property
    def image_size(self) -> int:
        """The largest short side (pixels): the scale the anomaly maps and evidence are computed at."""
        return self.image_sizes[-1]

    @property
    def size_label(self) -> str:
        """The image sizes for people, e.g. ``"256+320 px"``."""
        return "+".join(str(x) for x in self.image_sizes) + " px"

    @property
    def fixed_input_hw(self) -> tuple[int, int] | None:
        """The one model-input ``(height, width)`` every image is resized to, for detectors that model
        each grid position (PaDiM, once fitted); None when each image keeps its own shape."""
        return None

    def input_hw(self, hw: tuple[int, int], scale: int = 0) -> tuple[int, int]:
        """Model-input ``(height, width)`` in pixels for an image of ``hw`` pixels at scale ``scale``."""
        return model_input_hw(hw, self.image_sizes[scale], self.keep_aspect, self.size_multiple)

    def input_shapes(self, hw: tuple[int, int]) -> tuple[tuple[int, int], ...]:
        """Model-input shapes of an image of ``hw`` pixels, one per scale."""
        return tuple(self.input_hw(hw, k) for k in range(len(self.image_sizes)))

    @property
    def is_fitted(self) -> bool:
        return self.calibration is not None

    # ------------------------------------------------------------------ features
    @torch.inference_mode()
    def extract(self, images: Sequence[np.ndarray]) -> list[list[torch.Tensor]]:
        """Patch features of ``uint8`` RGB images: ``out[k][i]`` is image ``i``'s ``float32``
        ``(D, h, w)`` at scale ``k``, ``(h, w)`` its model-input size divided by the patch stride."""
        out: list[list[torch.Tensor]] = [[None] * len(images) for _ in self.image_sizes]  # type: ignore[misc]
        for shapes, idx in group_by_shape([self.input_shapes(img.shape[:2]) for img in images]).items():
            for k, feats in enumerate(self._group_features([images[i] for i in idx], shapes)):
                for j, i in enumerate(idx):
                    out[k][i] = feats[j]
        return out

    def _group_features(self, images: Sequence[np.ndarray], shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Per scale ``(B, D, h_k, w_k)`` features of images that share the model-input ``shapes``."""
        feats = [self.extractor(x) for x in to_model_inputs(images, shapes)]
        return [F.normalize(f, dim=1) for f in feats] if self.unit_features else feats

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        images: Iterable[ImageLike] | str | os.PathLike,
        progress: Progress | None = None,
        *,
        holdout: float = 0.0,
        seed: int = 0,
        shots: int | None = None,
        augment: str | None = None,
    ) -> "Detector":
        """Fit on normal images and calibrate the thresholds on normal images the model did not learn from.

        The fit modes (:mod:`~anomalens.detectors.fitting`): all images, calibrated out of sample
        (default); a hold-out (``holdout``); few-shot (``shots``); one image (decisions relative to
        each predicted batch).

        Args:
            images: normal images (paths, PIL images or arrays), a folder, or an MVTec category (path
                or :class:`~anomalens.data.MVTecCategory`: its ``train/good``). One image is enough.
            progress: optional ``progress(stage, done, total)`` callback.
            holdout: fraction of ``images`` kept out of fitting for split-conformal calibration
                (exact guarantee). 0 = calibrate on all of them out of sample (``calibration_source``).
            seed: seed of the hold-out draw, or of the draw of the ``shots`` images.
            shots: few-shot: fit on ``shots`` images drawn at random (``seed``) from ``images``
                (pass exactly ``shots`` images to choose them). Memory-bank detectors only; every
                patch of every view is kept (no coreset); threshold: the largest leave-one-shot-out
                score (rate ``max(false_alarm_rate, 1 / (shots + 1))``), batch-relative for one shot.
            augment: few-shot views of each shot added to the bank (:data:`~anomalens.augment.AUGMENTATIONS`:
                ``"none"``, ``"flips"``, ``"rotations"``, ``"dihedral"``, ``"rotations45"``). None: the
                detector's :attr:`default_augment` with ``shots`` (PatchCore: ``"rotations"``, the
                shots turned by 90, 180 and 270 degrees; AnomalyDINO: ``"none"``), ``"none"`` without.

        Returns:
            ``self``.

        Raises:
            DatasetError: no images, or an empty folder.
            ConfigError: ``shots`` larger than the images given, ``shots`` with ``holdout``, ``augment``
                without ``shots``, or ``shots`` on a detector without a memory bank.
            CalibrationError: an explicit ``false_alarm_rate`` the (held-out) normal images cannot
                support; raised before any work, saying how many are needed.
            ImageReadError: a training image cannot be read (the message names it; training stops,
                since a model silently fitted on fewer images than given is worse than an error).
        """
        self._forget_graph()
        return fitting.fit_detector(
            self, normal_images(images), progress or no_progress, holdout=holdout, seed=seed, shots=shots, augment=augment
        )

    # ------------------------------------------------------------------ predict
    def _score_batch(self, images: Sequence[np.ndarray]) -> tuple[list[float], list[np.ndarray], list[torch.Tensor], list[torch.Tensor | None]]:
        """Scores, maps at each image's size, patch-score grids and last-scale patch features, per image
        (:func:`~anomalens.detectors.engine.score_images`, on :attr:`engine`)."""
        return engine.score_images(self, images)

    def score_batch(self, images: Sequence[np.ndarray]) -> tuple[list[float], list[np.ndarray]]:
        """Score ``uint8`` RGB images ``(H_i, W_i, 3)``.

        Returns:
            ``(scores, maps)``: one image score per image and one ``float32`` ``(H_i, W_i)`` anomaly
            map per image at its own resolution.

        Raises:
            NotFittedError: not fitted.
        """
        self._check_fitted()
        scores, maps, _, _ = self._score_batch(images)
        return scores, maps

    def predict(
        self,
        images: Iterable[ImageLike | Sample] | ImageLike | Sample,
        *,
        keep_images: bool = False,
        progress: Progress | None = None,
    ) -> list[Prediction]:
        """Score images; one :class:`~anomalens.prediction.Prediction` per input, in order.

        An input that cannot be read (or a ground-truth mask that does not fit its image) gives a
        prediction with ``error`` set and NaN score; the other images are still scored.

        Args:
            images: paths, PIL images, arrays, or :class:`~anomalens.data.Sample` (ground truth
                attached); or one of them alone. One numpy array ``(H, W)`` or ``(H, W, C)`` is one
                image; a 4-D array ``(N, H, W, C)`` is ``N`` images (:func:`~anomalens.inference.as_inputs`).
            keep_images: also return the RGB input in ``Prediction.image``.
            progress: optional ``progress("predict", done, total)`` callback.

        Raises:
            NotFittedError: the detector has not been fitted or loaded.
            ImageReadError: a numpy array that is neither one image nor a stack of images.
        """
        self._check_fitted()
        assert self.calibration is not None
        return run_predictions(
            images, self._scorer, self.calibration, self.batch_size, keep_images=keep_images, progress=progress,
            on_batch_thresholds=self._set_batch_thresholds,
        )

    def _set_batch_thresholds(self, threshold: float, pixel_threshold: float) -> None:
        self.batch_thresholds = (threshold, pixel_threshold)

    def _scorer(self, images: list[np.ndarray]) -> tuple[list[float], list[np.ndarray], EvidenceFn]:
        scores, maps, grids, features = self._score_batch(images)

        def evidence(j: int, hw: tuple[int, int], region: Region) -> Evidence | None:
            return self._evidence(hw, region, grids[j], features[j])

        return scores, maps, evidence

    def decision_function(self, images: Iterable[ImageLike]) -> np.ndarray:
        """Image anomaly scores, ``float64`` ``(N,)``; NaN for unreadable images (PyOD's convention)."""
        return np.array([p.pred_score for p in self.predict(images)], dtype=np.float64)

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | os.PathLike, key: bytes | None = None) -> None:
        """Write the fitted model to ``directory`` (:func:`~anomalens.detectors.persistence.save_detector`).

        Args:
            key: signing key of the manifest; None = ``ANOMALENS_MODEL_KEY`` when set.

        Raises:
            NotFittedError: not fitted.
            ModelFileError: ``directory`` holds files that are not model files.
        """
        from .persistence import save_detector

        self._check_fitted()
        save_detector(self, directory, key=key)


__all__ = ["Detector", "Progress", "AnomalensError"]
