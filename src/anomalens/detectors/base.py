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

import math
import os
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterable, Sequence

import numpy as np
import torch

from ..backbones import Backbone, get_spec
from ..calibration import Calibration
from ..common import AnomalyMapHead, PatchFeatureExtractor, resize_map, to_tensor_batch
from ..data import Sample
from ..errors import AnomalensError, ConfigError, DatasetError, ImageReadError, ModelFileError, NotFittedError
from ..io import ImageLike, image_name, read_mask, to_rgb_array
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
            [64, 1024]). Larger finds smaller defects and costs time roughly quadratically.
        patch_size: local neighbourhood averaged into each patch feature (PatchCore's ``p``).
        border_pad: reflected border in pixels (at ``image_size``) added before the backbone and cropped
            from its features, so that border patches do not see zero padding (see
            :class:`~anomalens.common.PatchFeatureExtractor`).
        blur_sigma: Gaussian smoothing of the anomaly map, in pixels at ``image_size``.
        false_alarm_rate: target fraction of normal images flagged (the conformal ``alpha``).
        batch_size: images per backbone forward pass.
        pretrained: use the shipped ImageNet weights; False gives random weights (tests only).

    Raises:
        ConfigError: invalid option values, unknown backbone or layers.
    """

    name: ClassVar[str] = "detector"

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] | None = None,
        image_size: int = 320,
        patch_size: int = 3,
        border_pad: int = 32,
        blur_sigma: float = 4.0,
        false_alarm_rate: float = 0.01,
        batch_size: int = 8,
        pretrained: bool = True,
    ):
        get_spec(backbone)
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
                Backbone(self.backbone_name, self.layers, self.pretrained), self.patch_size, self.border_pad
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
        """Image-level decision threshold (``pred_label = pred_score > threshold``)."""
        self._check_fitted()
        return self.calibration.threshold  # type: ignore[union-attr]

    @property
    def pixel_threshold(self) -> float:
        """Pixel-level threshold (``pred_mask = anomaly_map > pixel_threshold``)."""
        self._check_fitted()
        return self.calibration.pixel_threshold  # type: ignore[union-attr]

    def set_false_alarm_rate(self, alpha: float) -> None:
        """Re-derive both thresholds for a new target false-alarm rate ``alpha`` (no refit)."""
        self._check_fitted()
        cal = self.calibration
        self.calibration = Calibration.from_scores(cal.scores, cal.map_maxima, alpha)  # type: ignore[union-attr]
        self.false_alarm_rate = float(alpha)

    def _check_fitted(self) -> None:
        if self.calibration is None:
            raise NotFittedError(f"this {type(self).__name__} is not fitted: call fit() or load a model first")

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def _fit_features(self, features: torch.Tensor, progress: Progress) -> None:
        """Learn from ``float32`` ``(N, D, h, w)`` patch features of the normal images."""

    @abstractmethod
    def _score_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, D, h, w)`` features -> ``(image_scores (B,), patch_scores (B, h, w))``, ``float32``."""

    @abstractmethod
    def _out_of_sample_scores(self, features: torch.Tensor, progress: Progress) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the training images by a model that did not learn from each of them (for calibration)."""

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
    def fit(self, images: Iterable[ImageLike] | str | os.PathLike, progress: Progress | None = None) -> "Detector":
        """Fit on normal images and calibrate the thresholds on them (out of sample).

        Args:
            images: normal images (paths, PIL images or arrays), or a folder / MVTec category path.
            progress: optional ``progress(stage, done, total)`` callback.

        Returns:
            ``self``.

        Raises:
            DatasetError: no images, or an empty folder.
            ImageReadError: a training image cannot be read (the message names it; training stops,
                since a model silently fitted on fewer images than given is worse than an error).
        """
        from ..data import training_paths

        progress = progress or _noop
        if isinstance(images, (str, os.PathLike)):
            images = training_paths(images)
        images = list(images)
        if not images:
            raise DatasetError("no training images given")
        t0 = time.perf_counter()
        feats = []
        n = len(images)
        for s in range(0, n, self.batch_size):
            batch = [to_rgb_array(img) for img in images[s : s + self.batch_size]]
            feats.append(self.extract(batch))
            progress("features", min(n, s + self.batch_size), n)
        features = torch.cat(feats)
        del feats
        t1 = time.perf_counter()
        with torch.inference_mode():
            self._fit_features(features, progress)
            t2 = time.perf_counter()
            scores, grids = self._out_of_sample_scores(features, progress)
            maxima = torch.stack([self.map_head(grids[i : i + 1])[0].max() for i in range(grids.shape[0])])
        self.calibration = Calibration.from_scores(scores.double().numpy(), maxima.double().numpy(), self.false_alarm_rate)
        t3 = time.perf_counter()
        self.fit_info = {
            "n_train_images": n,
            "feature_dim": int(features.shape[1]),
            "grid": list(features.shape[-2:]),
            "seconds_features": round(t1 - t0, 3),
            "seconds_fit": round(t2 - t1, 3),
            "seconds_calibration": round(t3 - t2, 3),
            "seconds_total": round(t3 - t0, 3),
        }
        return self

    # ------------------------------------------------------------------ predict
    @torch.inference_mode()
    def score_batch(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[np.ndarray]]:
        """Score ``uint8`` RGB images ``(H_i, W_i, 3)``.

        Returns:
            ``(scores, maps)``: ``float32`` ``(B,)`` image scores and one ``float32`` ``(H_i, W_i)``
            anomaly map per image at its own resolution.
        """
        self._check_fitted()
        feats = self.extract(images)
        scores, grids = self._score_features(feats)
        maps = self.map_head(grids)
        return scores, [resize_map(maps[i], img.shape[:2]) for i, img in enumerate(images)]

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
        progress = progress or _noop
        items = list(images)
        out: list[Prediction | None] = [None] * len(items)
        cal = self.calibration
        assert cal is not None
        pending: list[tuple[int, np.ndarray, dict]] = []

        def flush() -> None:
            if not pending:
                return
            scores, maps = self.score_batch([p[1] for p in pending])
            for (i, img, gt), score, amap in zip(pending, scores.tolist(), maps):
                out[i] = Prediction(
                    image_path=gt.pop("image_path"),
                    pred_score=float(score),
                    pred_label=int(score > cal.threshold),
                    anomaly_map=amap,
                    pred_mask=amap > cal.pixel_threshold,
                    p_value=cal.p_value(float(score)),
                    threshold=cal.threshold,
                    image=img if keep_images else None,
                    **gt,
                )
            pending.clear()

        done = 0
        for i, item in enumerate(items):
            gt: dict[str, Any] = {}
            src: Any = item
            if isinstance(item, Sample):
                src = item.path
                gt = {"gt_label": item.gt_label, "defect_type": item.defect_type}
            name = image_name(src, i)
            try:
                img = to_rgb_array(src)
                if isinstance(item, Sample):
                    gt["gt_mask"] = (
                        read_mask(item.mask_path, img.shape[:2]) if item.mask_path is not None else np.zeros(img.shape[:2], bool)
                    )
            except (ImageReadError, DatasetError) as exc:
                out[i] = Prediction.failed(name if isinstance(src, (str, os.PathLike)) else None, str(exc), **{k: v for k, v in gt.items() if k != "gt_mask"})
                done += 1
                progress("predict", done, len(items))
                continue
            gt["image_path"] = str(src) if isinstance(src, (str, os.PathLike)) else None
            pending.append((i, img, gt))
            if len(pending) >= self.batch_size:
                n_flush = len(pending)
                flush()
                done += n_flush
                progress("predict", done, len(items))
        n_flush = len(pending)
        flush()
        done += n_flush
        progress("predict", done, len(items))
        return out  # type: ignore[return-value]

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
            "threshold": cal.threshold,
            "pixel_threshold": cal.pixel_threshold,
            "calibration_note": cal.note,
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
        det.calibration = Calibration.from_scores(scores, maxima, det.false_alarm_rate)
        if not (math.isclose(det.calibration.threshold, config["threshold"]) and math.isclose(det.calibration.pixel_threshold, config["pixel_threshold"])):
            raise ModelFileError("stored thresholds do not match the stored calibration scores")
        det.fit_info = config.get("fit_info", {})
        return det


def load_detector(directory: str | os.PathLike) -> Detector:
    """Load any saved detector (PatchCore, PaDiM, ...) from a model directory.

    Raises:
        ModelFileError: missing, incompatible, corrupt or modified model files (see
            :func:`anomalens.serialization.load_model`), or an unknown detector type.
    """
    from . import DETECTORS

    config = read_config(directory)
    name = config.get("detector")
    if name not in DETECTORS:
        raise ModelFileError(f"model in {directory} is of unknown detector type {name!r}; known: {sorted(DETECTORS)}")
    config, tensors = load_model(directory)
    return DETECTORS[name]._from_loaded(config, tensors)


__all__ = ["Detector", "Progress", "load_detector", "AnomalensError"]
