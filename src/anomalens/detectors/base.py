"""The contract every detector follows, and the machinery they share.

A detector is used like a scikit-learn / PyOD estimator::

    det = PatchCore(backbone="efficientnet_lite0").fit(normal_images)
    preds = det.predict(test_images)          # list[Prediction]
    scores = det.decision_function(images)     # float64 (N,) image scores
    det.save("model_dir"); det = load_detector("model_dir")

``images`` may be file paths, PIL images or ``uint8`` numpy arrays of any size and mode; each is
resized to ``image_size x image_size`` for the backbone, and maps are returned at its own size.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterable, Sequence

import numpy as np
import torch

from ..backbones import get_spec, make_backbone
from ..augment import AUGMENTATIONS, apply_view, check_augment
from ..calibration import BATCH_Z, MIN_BATCH, Calibration, batch_thresholds, check_calibration_size, min_calibration_images
from ..common import AnomalyMapHead, PatchFeatureExtractor, resize_map, to_tensor_batch
from ..data import Sample
from ..errors import AnomalensError, CalibrationError, ConfigError, DatasetError, ImageReadError, ModelFileError, NotFittedError
from ..io import ImageLike, image_name, read_mask, to_rgb_array
from ..explain import Evidence, Region, find_regions
from ..prediction import Prediction
from ..serialization import load_model, read_config, save_model

#: ``progress(stage, done, total)``: called during long steps (stage names: "features", "coreset",
#: "calibration", "predict").
Progress = Callable[[str, int, int], None]


def _noop(stage: str, done: int, total: int) -> None:
    return None


class Detector(ABC):
    """Base class: backbone features, calibration, prediction, saving. Subclasses add the scoring.

    Args:
        backbone: backbone name (see :data:`anomalens.backbones.BACKBONES`).
        layers: backbone layers to take features from; None = the backbone's defaults.
        image_size: side in pixels of the square the images are resized to (multiple of 16 within
            [64, 1024]; default 320, and 224 for the ViT, which accepts nothing else). Larger finds
            smaller defects and costs time roughly quadratically.
        patch_size: local neighbourhood averaged into each patch feature (PatchCore's ``p``).
        border_pad: reflected border in pixels (at ``image_size``; default 32, 0 for the ViT) added
            before the backbone and cropped from its features, so that border patches do not see zero padding (see
            :class:`~anomalens.common.PatchFeatureExtractor`).
        blur_sigma: Gaussian smoothing of the anomaly map, in pixels at ``image_size``.
        false_alarm_rate: target fraction of normal images flagged (the conformal ``alpha``).
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

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] | None = None,
        image_size: int | None = None,
        patch_size: int = 3,
        border_pad: int | None = None,
        blur_sigma: float = 4.0,
        false_alarm_rate: float = 0.01,
        batch_size: int = 8,
        pretrained: bool = True,
    ):
        spec = get_spec(backbone)
        image_size = spec.default_image_size if image_size is None else image_size
        border_pad = spec.default_border_pad if border_pad is None else border_pad
        if spec.fixed_size and (image_size != spec.fixed_size or border_pad):
            raise ConfigError(f"backbone {backbone} takes {spec.fixed_size} px inputs without border padding "
                              f"(image_size={spec.fixed_size}, border_pad=0), got {image_size} and {border_pad}")
        if not isinstance(image_size, int) or image_size % 16 or not 64 <= image_size <= 1024:
            raise ConfigError(f"image_size must be a multiple of 16 in [64, 1024] pixels, got {image_size!r}")
        if patch_size < 1 or patch_size % 2 == 0:
            raise ConfigError(f"patch_size must be an odd number >= 1, got {patch_size}")
        if not 0.0 < false_alarm_rate < 1.0:
            raise ConfigError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if border_pad < 0 or border_pad % 16 or border_pad >= image_size:
            raise ConfigError(f"border_pad must be a multiple of 16 in [0, image_size) pixels, got {border_pad}")
        if blur_sigma < 0:
            raise ConfigError(f"blur_sigma must be >= 0 pixels, got {blur_sigma}")
        self.backbone_name = backbone
        self.layers = tuple(layers) if layers else get_spec(backbone).default_layers
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.border_pad = int(border_pad)
        self.blur_sigma = float(blur_sigma)
        self.false_alarm_rate = float(false_alarm_rate)
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

    # ------------------------------------------------------------------ configuration
    def get_params(self) -> dict[str, Any]:
        """Constructor arguments, JSON-ready (what :meth:`save` stores and :meth:`load` passes back)."""
        return {
            "backbone": self.backbone_name,
            "layers": list(self.layers),
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "border_pad": self.border_pad,
            "blur_sigma": self.blur_sigma,
            "false_alarm_rate": self.false_alarm_rate,
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
        if self._map_head is None:
            self._map_head = AnomalyMapHead(self.image_size, self.blur_sigma)
        return self._map_head

    @property
    def is_fitted(self) -> bool:
        return self.calibration is not None

    @property
    def threshold(self) -> float:
        """Image-level decision threshold (``pred_label = pred_score > threshold``); for a
        batch-relative (one-shot) model, that of the last predicted batch (NaN before any)."""
        self._check_fitted()
        if self.calibration.is_batch_relative and self.batch_thresholds:  # type: ignore[union-attr]
            return self.batch_thresholds[0]
        return self.calibration.threshold  # type: ignore[union-attr]

    @property
    def pixel_threshold(self) -> float:
        """Pixel-level threshold (``pred_mask = anomaly_map > pixel_threshold``); batch-relative models:
        as :attr:`threshold`."""
        self._check_fitted()
        if self.calibration.is_batch_relative and self.batch_thresholds:  # type: ignore[union-attr]
            return self.batch_thresholds[1]
        return self.calibration.pixel_threshold  # type: ignore[union-attr]

    def set_false_alarm_rate(self, alpha: float) -> None:
        """Re-derive both thresholds for a new target false-alarm rate ``alpha`` (no refit)."""
        self._check_fitted()
        cal = self.calibration
        self.calibration = Calibration.from_scores(cal.scores, cal.map_maxima, alpha, cal.source)  # type: ignore[union-attr]
        self.false_alarm_rate = float(alpha)

    def set_f1_threshold(self, labels: Sequence[int], scores: Sequence[float]) -> float:
        """Use the best-F1 image threshold on labelled images (1 = defective) instead of the conformal one.

        p-values and the pixel threshold stay conformal. :meth:`set_false_alarm_rate` goes back.

        Returns:
            The best F1.

        Raises:
            CalibrationError: the labels lack normal or defective images.
        """
        self._check_fitted()
        self.calibration, f1 = self.calibration.with_f1_threshold(np.asarray(labels), np.asarray(scores))  # type: ignore[union-attr]
        return f1

    def _check_fitted(self) -> None:
        if self.calibration is None:
            raise NotFittedError(f"this {type(self).__name__} is not fitted: call fit() or load a model first")

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def _fit_features(self, features: torch.Tensor, progress: Progress, keep_all: bool = False) -> None:
        """Learn from ``float32`` ``(N, D, h, w)`` patch features of the normal images (``keep_all``:
        few-shot, keep every patch)."""

    @abstractmethod
    def _score_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(B, D, h, w)`` features -> ``(image_scores (B,), patch_scores (B, h, w))`` ``float32``, and
        for memory-bank detectors the ``int64`` ``(B, h, w)`` bank row nearest to each patch (else None)."""

    def _export_scores(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image scores, patch scores)`` in plain tensor ops that ``torch.onnx.export`` can trace."""
        raise ConfigError(f"{type(self).__name__} cannot be exported to ONNX")

    def _residuals(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, D, h, w)`` features minus the normal features they are compared with (same shape).

        Used to describe what is abnormal in a region (:mod:`anomalens.discovery`). Default: the
        features themselves (no normal reference).
        """
        return features

    def _evidence(self, hw: tuple[int, int], region: Region, patch_scores: torch.Tensor, nearest: torch.Tensor | None) -> Evidence | None:
        """Nearest normal patch for ``region`` of an image of shape ``hw`` (memory-bank detectors only)."""
        return None

    @abstractmethod
    def _out_of_sample_scores(
        self, features: torch.Tensor, progress: Progress, groups: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``(n,)`` and patch-score grids ``(n, h, w)`` of the training images by a model that did
        not learn from each of them (for calibration). ``groups`` (few-shot): ``int64`` ``(N,)`` source
        image of each feature row (its augmented views share it, the original view first); then one
        score per source image, from its original view, with all its views left out."""

    @abstractmethod
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """Learned tensors to save."""

    @abstractmethod
    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore learned tensors (shapes already checked against the config)."""

    def _expected_shapes(self, config: dict) -> dict[str, list[int]] | None:
        """Shapes the loaded tensors must have given ``config`` (None: no extra check)."""
        return None

    # ------------------------------------------------------------------ features
    @torch.inference_mode()
    def extract(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Patch features of ``uint8`` RGB images: ``float32`` ``(B, D, h, w)``."""
        return self.extractor(to_tensor_batch(images, self.image_size))

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        images: Iterable[ImageLike] | str | os.PathLike,
        progress: Progress | None = None,
        *,
        holdout: float = 0.0,
        seed: int = 0,
        shots: int | None = None,
        augment: str = "none",
    ) -> "Detector":
        """Fit on normal images and calibrate the thresholds on normal images the model did not learn from.

        Args:
            images: normal images (paths, PIL images or arrays), a folder, or an MVTec category (path
                or :class:`~anomalens.data.MVTecCategory`: its ``train/good``).
            progress: optional ``progress(stage, done, total)`` callback.
            holdout: fraction of ``images`` kept out of fitting for split-conformal calibration
                (exact guarantee). 0 = calibrate on all of them out of sample (``calibration_source``).
            seed: seed of the hold-out draw, or of the draw of the ``shots`` images.
            shots: few-shot: fit on ``shots`` images drawn at random (``seed``) from ``images``
                (pass exactly ``shots`` images to choose them). Memory-bank detectors only; every
                patch of every view is kept (no coreset). The threshold follows the few-shot rule of
                :mod:`anomalens.calibration`: the largest leave-one-shot-out score (false-alarm rate
                ``max(false_alarm_rate, 1 / (shots + 1))``), or batch-relative decisions for one shot.
            augment: few-shot views of each shot added to the bank (:data:`~anomalens.augment.AUGMENTATIONS`:
                ``"none"``, ``"flips"``, ``"rotations"``, ``"dihedral"``); only for orientation-free products.

        Returns:
            ``self``.

        Raises:
            DatasetError: no images, or an empty folder.
            ConfigError: ``shots`` larger than the images given, ``shots`` with ``holdout``, ``augment``
                without ``shots``, or ``shots`` on a detector without a memory bank.
            CalibrationError: too few (held-out) normal images for ``false_alarm_rate``; raised before
                any work, saying how many are needed.
            ImageReadError: a training image cannot be read (the message names it; training stops,
                since a model silently fitted on fewer images than given is worse than an error).
        """
        progress = progress or _noop
        images = _normal_images(images)
        if not images:
            raise DatasetError("no training images given")
        if not 0.0 <= holdout < 1.0:
            raise ConfigError(f"holdout must be in [0, 1), got {holdout}")
        views = check_augment(augment)
        held: list = []
        groups: torch.Tensor | None = None
        if shots is not None:
            if not self.supports_few_shot:
                raise ConfigError(f"{type(self).__name__} has no memory bank to fit from a few shots; use PatchCore")
            if holdout:
                raise ConfigError("few-shot fitting (shots) and holdout exclude each other: calibrate later with new normal images")
            if not 1 <= shots <= len(images):
                raise ConfigError(f"shots must be in [1, {len(images)}] (the images given), got {shots}")
            pick = np.random.default_rng(seed).choice(len(images), size=shots, replace=False) if shots < len(images) else np.arange(shots)
            images = [images[i] for i in sorted(pick)]
            groups = torch.arange(shots).repeat_interleave(len(views))
        elif augment != "none":
            raise ConfigError("augment applies to few-shot fitting: give shots as well")
        elif holdout > 0:
            n_held = int(round(holdout * len(images)))
            check_calibration_size(n_held, self.false_alarm_rate)
            if n_held >= len(images):
                raise CalibrationError(f"holdout {holdout} of {len(images)} images leaves none to fit on")
            perm = np.random.default_rng(seed).permutation(len(images))
            held = [images[i] for i in sorted(perm[:n_held])]
            images = [images[i] for i in sorted(perm[n_held:])]
        else:
            check_calibration_size(len(images), self.false_alarm_rate)
        self.train_images = [os.path.abspath(x) if isinstance(x, (str, os.PathLike)) else None for x in images]
        self.train_views = list(views) if shots is not None else ["id"]
        t0 = time.perf_counter()
        feats = []
        n = len(images)
        for s in range(0, n, self.batch_size):
            batch = [to_rgb_array(img) for img in images[s : s + self.batch_size]]
            if len(views) > 1:
                batch = [apply_view(img, v) for img in batch for v in views]
            feats.append(self.extract(batch))
            progress("features", min(n, s + self.batch_size), n)
        features = torch.cat(feats)
        del feats
        t1 = time.perf_counter()
        alpha = self.false_alarm_rate
        with torch.inference_mode():
            self._fit_features(features, progress, keep_all=shots is not None)
            t2 = time.perf_counter()
            if held:
                scores, maxima = self._calibration_scores(held, progress)
                source = "held-out"
            elif shots == 1:
                scores = maxima = np.zeros(0)
                source = "batch"
            else:
                oos, grids = self._out_of_sample_scores(features, progress, groups)
                scores = oos.double().numpy()
                maxima = torch.stack([self.map_head(grids[i : i + 1])[0].max() for i in range(grids.shape[0])]).double().numpy()
                source = self.calibration_source if shots is None else "few-shot"
        if source == "batch":
            self.calibration = Calibration.batch_relative(
                "one normal image gives no out-of-sample score: each predicted batch of at least "
                f"{MIN_BATCH} images sets its own thresholds (median + {BATCH_Z:g} robust SD); no false-alarm guarantee"
            )
        elif source == "few-shot":
            alpha = max(alpha, 1.0 / (len(scores) + 1))
            self.calibration = Calibration.from_scores(scores, maxima, alpha, source)
            self.calibration.note = (
                f"few-shot: the largest of {len(scores)} leave-one-shot-out scores, a false-alarm rate of {alpha:.3g} at most "
                f"(requested {self.false_alarm_rate:g}, which needs {min_calibration_images(self.false_alarm_rate)} normal images: "
                "add them with anomalens calibrate)"
            )
        else:
            self.calibration = Calibration.from_scores(scores, maxima, alpha, source)
        t3 = time.perf_counter()
        self.fit_info = {
            "n_train_images": n,
            "n_calibration_images": int(len(scores)),
            "calibration_source": source,
            "feature_dim": int(features.shape[1]),
            "grid": list(features.shape[-2:]),
            "seconds_features": round(t1 - t0, 3),
            "seconds_fit": round(t2 - t1, 3),
            "seconds_calibration": round(t3 - t2, 3),
            "seconds_total": round(t3 - t0, 3),
        }
        if shots is not None:
            self.fit_info.update(shots=int(shots), augment=augment, requested_false_alarm_rate=self.false_alarm_rate, seed=int(seed))
            self.false_alarm_rate = alpha
        return self

    def _calibration_scores(self, images: Sequence[ImageLike], progress: Progress) -> tuple[np.ndarray, np.ndarray]:
        """Image scores and anomaly-map maxima (``float64`` ``(n,)`` each) of held-out normal images."""
        scores, maxima = [], []
        for s in range(0, len(images), self.batch_size):
            batch = [to_rgb_array(img) for img in images[s : s + self.batch_size]]
            sc, maps, _, _ = self._score_batch(batch)
            scores.extend(sc.tolist())
            maxima.extend(float(m.max()) for m in maps)
            progress("calibration", min(len(images), s + self.batch_size), len(images))
        return np.asarray(scores, dtype=np.float64), np.asarray(maxima, dtype=np.float64)

    def calibrate(
        self, images: Iterable[ImageLike] | str | os.PathLike, false_alarm_rate: float | None = None, progress: Progress | None = None
    ) -> "Detector":
        """Re-calibrate a fitted model on held-out normal images (split conformal; exact guarantee).

        Use it when new good images arrive from the line, or to replace the out-of-sample calibration
        of :meth:`fit` by a strict hold-out. The model itself is unchanged.

        Args:
            images: normal images the model was *not* fitted on (paths, arrays, a folder, or an MVTec
                category's ``train/good``).
            false_alarm_rate: new target ``alpha``; None keeps the model's.

        Raises:
            NotFittedError: not fitted.
            CalibrationError: fewer images than ``1/alpha - 1``, or images the model was fitted on.
            ImageReadError: an image cannot be read (calibration never silently drops an image).
        """
        self._check_fitted()
        alpha = self.false_alarm_rate if false_alarm_rate is None else float(false_alarm_rate)
        images = _normal_images(images)
        check_calibration_size(len(images), alpha)
        fitted = {os.path.realpath(p) for p in self.train_images if p}
        reused = [x for x in images if isinstance(x, (str, os.PathLike)) and os.path.realpath(x) in fitted]
        if reused:
            raise CalibrationError(
                f"{len(reused)} of the {len(images)} calibration images were used to fit the model (e.g. {reused[0]}); "
                "calibrate on normal images the model has not seen, or the threshold will be too low"
            )
        scores, maxima = self._calibration_scores(images, progress or _noop)
        self.calibration = Calibration.from_scores(scores, maxima, alpha, "held-out")
        self.false_alarm_rate = alpha
        return self

    # ------------------------------------------------------------------ predict
    @torch.inference_mode()
    def _score_batch(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[np.ndarray], torch.Tensor, torch.Tensor | None]:
        feats = self.extract(images)
        scores, grids, nearest = self._score_features(feats)
        maps = self.map_head(grids)
        return scores, [resize_map(maps[i], img.shape[:2]) for i, img in enumerate(images)], grids, nearest

    def score_batch(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[np.ndarray]]:
        """Score ``uint8`` RGB images ``(H_i, W_i, 3)``.

        Returns:
            ``(scores, maps)``: ``float32`` ``(B,)`` image scores and one ``float32`` ``(H_i, W_i)``
            anomaly map per image at its own resolution.

        Raises:
            NotFittedError: not fitted.
        """
        self._check_fitted()
        scores, maps, _, _ = self._score_batch(images)
        return scores, maps

    def predict(
        self,
        images: Iterable[ImageLike | Sample],
        *,
        keep_images: bool = False,
        progress: Progress | None = None,
    ) -> list[Prediction]:
        """Score images; one :class:`~anomalens.prediction.Prediction` per input, in order.

        An input that cannot be read (or a ground-truth mask that does not fit its image) gives a
        prediction with ``error`` set and NaN score; the other images are still scored.

        Args:
            images: paths, PIL images, arrays, or :class:`~anomalens.data.Sample` (ground truth attached).
            keep_images: also return the RGB input in ``Prediction.image``.
            progress: optional ``progress("predict", done, total)`` callback.

        Raises:
            NotFittedError: the detector has not been fitted or loaded.
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
        scores, maps, grids, nearest = self._score_batch(images)

        def evidence(j: int, hw: tuple[int, int], region: Region) -> Evidence | None:
            return self._evidence(hw, region, grids[j], None if nearest is None else nearest[j])

        return scores.tolist(), maps, evidence

    def decision_function(self, images: Iterable[ImageLike]) -> np.ndarray:
        """Image anomaly scores, ``float64`` ``(N,)``; NaN for unreadable images (PyOD's convention)."""
        return np.array([p.pred_score for p in self.predict(images)], dtype=np.float64)

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | os.PathLike) -> None:
        """Write the fitted model to ``directory`` (see :mod:`anomalens.serialization`).

        Raises:
            NotFittedError: not fitted.
        """
        self._check_fitted()
        cal = self.calibration
        assert cal is not None
        tensors = dict(self._state_tensors())
        tensors["calibration.scores"] = torch.from_numpy(np.asarray(cal.scores, dtype=np.float64))
        tensors["calibration.map_maxima"] = torch.from_numpy(np.asarray(cal.map_maxima, dtype=np.float64))
        config = {
            "detector": self.name,
            "params": self.get_params(),
            "threshold": None if cal.is_batch_relative else cal.threshold,
            "pixel_threshold": None if cal.is_batch_relative else cal.pixel_threshold,
            "calibration": {"source": cal.source, "mode": cal.mode, "note": cal.note, "n": int(cal.scores.size)},
            "train_images": self.train_images,
            "train_views": self.train_views,
            "fit_info": self.fit_info,
        }
        save_model(directory, config, tensors)

    @classmethod
    def _from_loaded(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "Detector":
        try:
            det = cls(**config["params"])
        except (TypeError, KeyError) as exc:
            raise ModelFileError(f"model config has invalid parameters ({exc})") from None
        expected = det._expected_shapes(config)
        if expected:
            for key, shape in expected.items():
                if key not in tensors or list(tensors[key].shape) != list(shape):
                    got = list(tensors[key].shape) if key in tensors else None
                    raise ModelFileError(f"tensor {key!r} has shape {got}, but the model's parameters require {shape}")
        scores = tensors.pop("calibration.scores").numpy()
        maxima = tensors.pop("calibration.map_maxima").numpy()
        det._load_state_tensors(tensors)
        cal_cfg = config.get("calibration") or {}
        det.calibration = Calibration.restore(
            scores, maxima, det.false_alarm_rate, source=cal_cfg.get("source", det.calibration_source),
            mode=cal_cfg.get("mode", "conformal"), threshold=config["threshold"], pixel_threshold=config["pixel_threshold"],
            note=str(cal_cfg.get("note", "")),
        )
        det.fit_info = config.get("fit_info", {})
        views = config.get("train_views") or ["id"]
        if not (isinstance(views, list) and all(v in AUGMENTATIONS["dihedral"] for v in views)):
            raise ModelFileError(f"model config has invalid train_views {views!r}")
        det.train_views = views
        train = config.get("train_images") or []
        det.train_images = [str(x) if isinstance(x, str) else None for x in train] if isinstance(train, list) else []
        return det


def _normal_images(images) -> list:
    """Normal images as a list: an :class:`~anomalens.data.MVTecCategory` or its path gives its
    ``train/good``, a folder its images; a list of paths, PIL images or arrays is kept as it is."""
    from ..data import MVTecCategory, training_paths

    if isinstance(images, MVTecCategory):
        return images.train_paths()
    if isinstance(images, (str, os.PathLike)):
        return training_paths(images)
    return list(images)


#: ``evidence(index in batch, (H, W), region) -> Evidence | None``
EvidenceFn = Callable[[int, tuple[int, int], Region], Evidence | None]
#: ``scorer(uint8 RGB images) -> (image scores, anomaly maps at each image's size, evidence function)``
Scorer = Callable[[list[np.ndarray]], tuple[list[float], list[np.ndarray], EvidenceFn | None]]


def read_input(item: ImageLike | Sample, i: int) -> tuple[np.ndarray, dict[str, Any]] | Prediction:
    """Read one input of :meth:`Detector.predict`: ``(uint8 RGB image, ground-truth fields)``, or a
    failed :class:`Prediction` naming it when it (or its mask) cannot be read.

    The fields are ``image_path`` and, for a :class:`~anomalens.data.Sample`, ``gt_label``,
    ``defect_type`` and ``gt_mask`` (``bool`` ``(H, W)``; all False for a good image).
    """
    gt: dict[str, Any] = {}
    src: Any = item
    if isinstance(item, Sample):
        src = item.path
        gt = {"gt_label": item.gt_label, "defect_type": item.defect_type}
    name = image_name(src, i)
    try:
        img = to_rgb_array(src)
        if isinstance(item, Sample):
            gt["gt_mask"] = read_mask(item.mask_path, img.shape[:2]) if item.mask_path is not None else np.zeros(img.shape[:2], bool)
    except (ImageReadError, DatasetError) as exc:
        return Prediction.failed(name if isinstance(src, (str, os.PathLike)) else None, str(exc), **{k: v for k, v in gt.items() if k != "gt_mask"})
    gt["image_path"] = str(src) if isinstance(src, (str, os.PathLike)) else None
    return img, gt


def run_predictions(
    images: Iterable[ImageLike | Sample],
    scorer: Scorer,
    cal: Calibration,
    batch_size: int,
    *,
    keep_images: bool = False,
    progress: Progress | None = None,
    on_batch_thresholds: Callable[[float, float], None] | None = None,
) -> list[Prediction]:
    """The prediction loop shared by every inference engine (torch detectors, ONNX Runtime).

    Reads each input (an unreadable one becomes a failed :class:`Prediction`, the rest go on), scores
    batches with ``scorer``, and turns scores and maps into decisions, masks, p-values, regions and,
    for flagged images, evidence, all from the calibration ``cal``. A batch-relative calibration
    (one-shot models) decides once every image is scored, from :func:`~anomalens.calibration.batch_thresholds`
    of all of them, and reports the thresholds to ``on_batch_thresholds(image, pixel)``.

    Raises:
        CalibrationError: batch-relative calibration and fewer than
            :data:`~anomalens.calibration.MIN_BATCH` readable images.
    """
    progress = progress or _noop
    items = list(images)
    out: list[Prediction | None] = [None] * len(items)
    pending: list[tuple[int, np.ndarray, dict]] = []
    #: scored, not yet decided: (index, image, ground truth, score, map, evidence function, index in its batch)
    scored: list[tuple[int, np.ndarray, dict, float, np.ndarray, EvidenceFn | None, int]] = []

    def decide(threshold: float, pixel_threshold: float) -> None:
        for i, img, gt, score, amap, evidence_fn, j in scored:
            mask = amap > pixel_threshold
            label = int(score > threshold)
            regions = find_regions(amap, mask)
            evidence = evidence_fn(j, img.shape[:2], regions[0]) if (label and regions and evidence_fn) else None
            out[i] = Prediction(
                image_path=gt.pop("image_path"),
                pred_score=float(score),
                pred_label=label,
                anomaly_map=amap,
                pred_mask=mask,
                p_value=None if cal.is_batch_relative else cal.p_value(float(score)),
                threshold=threshold,
                regions=regions,
                evidence=evidence,
                image=img if keep_images else None,
                **gt,
            )
        scored.clear()

    def flush() -> None:
        if not pending:
            return
        scores, maps, evidence_fn = scorer([p[1] for p in pending])
        for j, ((i, img, gt), score, amap) in enumerate(zip(pending, scores, maps)):
            scored.append((i, img, gt, float(score), amap, evidence_fn, j))
        pending.clear()
        if not cal.is_batch_relative:
            decide(cal.threshold, cal.pixel_threshold)

    done = 0
    for i, item in enumerate(items):
        read = read_input(item, i)
        if isinstance(read, Prediction):
            out[i] = read
            done += 1
            progress("predict", done, len(items))
            continue
        img, gt = read
        pending.append((i, img, gt))
        if len(pending) >= batch_size:
            n_flush = len(pending)
            flush()
            done += n_flush
            progress("predict", done, len(items))
    n_flush = len(pending)
    flush()
    done += n_flush
    progress("predict", done, len(items))
    if cal.is_batch_relative:
        t, tp = batch_thresholds(np.array([x[3] for x in scored]), [x[4] for x in scored])
        if on_batch_thresholds is not None:
            on_batch_thresholds(t, tp)
        decide(t, tp)
    return out  # type: ignore[return-value]


def load_detector(directory: str | os.PathLike) -> Detector:
    """Load any saved detector (PatchCore, PaDiM, ...) from a model directory.

    Raises:
        ModelFileError: missing, incompatible, corrupt or modified model files (see
            :func:`anomalens.serialization.load_model`), or an unknown detector type.
    """
    from . import DETECTORS

    config = read_config(directory)
    name = config.get("detector")
    if name == "video":
        raise ModelFileError(f"{directory} is a video model: use anomalens video predict / VideoDetector.load")
    if name not in DETECTORS:
        raise ModelFileError(f"model in {directory} is of unknown detector type {name!r}; known: {sorted(DETECTORS)}")
    config, tensors = load_model(directory)
    return DETECTORS[name]._from_loaded(config, tensors)


__all__ = ["Detector", "Progress", "load_detector", "AnomalensError"]
