"""Scoring an exported model on ONNX Runtime, without torch: the deployment path.

An exported graph (:func:`anomalens.export.export_onnx`) takes the model input, ``float32``
``(B, 3, h, w)`` in [0, 1], and returns ``pred_score`` ``(B,)`` and ``anomaly_map`` ``(B, h, w)``.
This module prepares that input and post-processes the outputs with numpy, Pillow and OpenCV only,
so a machine with ``pip install anomalens[runtime]`` (ONNX Runtime, no torch) scores images with the
same results as the Python detector: both prepare the model input with :mod:`anomalens.resampling`
(bit-identical inputs, maps resized back alike).
Thresholds, calibration scores and parameters travel in the ONNX file's metadata, so the file alone
gives the same decisions, masks, p-values and regions.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from .calibration import Calibration
from .errors import ConfigError, ModelFileError
from .geometry import group_by_shape, images_per_call, model_input_hw
from .io import ImageLike
from .prediction import Prediction
from .resampling import model_inputs, resize_map

#: the exported graph's layout (4: model-input tensors in, ``pred_score``, ``anomaly_map``,
#: ``patch_scores`` and ``patch_features`` out; geometry, ``bank_rows`` and ``patch_stride`` in the
#: metadata; 5: the same layout, calibrated on model inputs resized by
#: :mod:`anomalens.resampling`). Only this format is read: a detector's folder graph of another format is exported
#: again (:func:`anomalens.export.onnx_for_model_dir`), a bare file of another format is refused.
ONNX_FORMAT_VERSION = 5
ONNX_NAME = "model.onnx"


def has_torch() -> bool:
    """True when torch can be imported here (a full install), False on a runtime-only install."""
    return importlib.util.find_spec("torch") is not None


class OnnxDetector:
    """Predict with an exported ONNX file on ONNX Runtime: the same :class:`Prediction` as the model.

    Args:
        path: an ``.onnx`` file written by :func:`export_onnx` (``anomalens export``).
        threads: intra-op threads (None = ONNX Runtime's default, all cores).
        batch_size: images per call at most (images of different sizes are run separately, and a
            large bank's calls are smaller: :func:`~anomalens.geometry.images_per_call`).

    Raises:
        ModelFileError: missing file, not an ONNX model, no or incompatible anomalens metadata, or
            thresholds that do not match the stored calibration scores.
    """

    #: what scores the images (as :attr:`anomalens.detectors.base.Detector.engine`)
    engine = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, batch_size: int = 8):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"ONNX model {path} does not exist")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for a bad file
            raise ModelFileError(f"{path} is not a loadable ONNX model ({str(exc)[:200]})") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get("anomalens")
        if raw is None:
            raise ModelFileError(f"{path} has no anomalens metadata: export it with `anomalens export`")
        try:
            meta = json.loads(raw)
            if meta["format_version"] != ONNX_FORMAT_VERSION:
                raise ModelFileError(
                    f"{path} has ONNX format version {meta['format_version']}, this anomalens reads {ONNX_FORMAT_VERSION}: "
                    "export it again from its torch model folder (`anomalens export`), or re-fit"
                )
            self._rows, self._stride = int(meta["bank_rows"]), int(meta["patch_stride"])
            c = meta["calibration"]
            cal = Calibration.restore(meta, np.asarray(c["scores"], np.float64), np.asarray(c["map_maxima"], np.float64), where=str(path))
        except ModelFileError:
            raise
        except Exception as exc:
            raise ModelFileError(f"{path} has unreadable anomalens metadata ({exc})") from None
        self.path = path
        self.meta = meta
        self.calibration = cal
        #: the name of the detector it was exported from (``"patchcore"``, ...)
        self.name = meta["detector"]
        self.batch_size = int(batch_size)
        #: the model folder it was loaded from or saved to (None: a bare ``.onnx`` file)
        self.model_dir: Path | None = None

    @property
    def threshold(self) -> float:
        return self.calibration.threshold

    @property
    def pixel_threshold(self) -> float:
        return self.calibration.pixel_threshold

    def input_shapes(self, hw: tuple[int, int]) -> tuple[tuple[int, int], ...]:
        """Model-input shapes, one per scale, for an image of ``hw`` pixels (the exported geometry)."""
        g = self.meta["geometry"]
        if g.get("fixed_hw"):
            return ((int(g["fixed_hw"][0]), int(g["fixed_hw"][1])),)
        return tuple(model_input_hw(hw, int(size), bool(g["keep_aspect"])) for size in g["image_sizes"])

    def score_batch(self, images: list[np.ndarray]) -> tuple[list[float], list[np.ndarray]]:
        """Image scores and maps (at each image's size) for ``uint8`` RGB images ``(H_i, W_i, 3)``;
        one session call per model-input shape, or several when the patch-to-bank distances of a
        large (few-shot) bank would exceed :data:`~anomalens.geometry.DISTANCE_BUDGET`."""
        scores: list[float] = [0.0] * len(images)
        maps: list[np.ndarray] = [None] * len(images)  # type: ignore[list-item]
        rows, stride = self._rows, self._stride
        for shapes, group in group_by_shape([self.input_shapes(img.shape[:2]) for img in images]).items():
            per_call = images_per_call(shapes, stride, rows)
            for start in range(0, len(group), per_call):
                idx = group[start : start + per_call]
                inputs = model_inputs([images[i] for i in idx], shapes)
                feeds = {("image" if k == 0 else f"image_{k}"): x for k, x in enumerate(inputs)}
                s, m = self.session.run(["pred_score", "anomaly_map"], feeds)
                for k, i in enumerate(idx):
                    scores[i] = float(s[k])
                    maps[i] = resize_map(m[k], images[i].shape[:2])
        return scores, maps

    def _scorer(self, images: list[np.ndarray]):
        s, m = self.score_batch(images)
        return s, m, None

    def predict(self, images: Iterable[ImageLike], *, keep_images: bool = False, progress=None) -> list[Prediction]:
        """Same contract as :meth:`anomalens.detectors.base.Detector.predict` (no evidence)."""
        from .inference import run_predictions

        return run_predictions(images, self._scorer, self.calibration, self.batch_size, keep_images=keep_images, progress=progress)

    def decision_function(self, images: Iterable[ImageLike]) -> np.ndarray:
        """Image anomaly scores, ``float64`` ``(N,)``; NaN for unreadable images."""
        return np.array([p.pred_score for p in self.predict(images)], dtype=np.float64)

    def fit(self, *args, **kwargs) -> "OnnxDetector":
        """Not available: an exported model is fitted already.

        Raises:
            ConfigError: always; fit the torch detector (``anomalens fit``) and export it.
        """
        raise ConfigError("an exported model is already fitted; fit the torch detector and export it (anomalens fit, anomalens export)")

    def save(self, directory: str | os.PathLike, key: bytes | None = None) -> Path:
        """Write a deployable model folder: ``model.onnx`` (this file, unchanged), ``config.json``
        (its detector, thresholds and calibration note), ``model.safetensors`` (the calibration
        scores, ``float64``) and ``manifest.json``, swapped in whole (:func:`anomalens.serialization.save_model`).
        :func:`anomalens.load_detector` loads it back, with or without torch.

        Args:
            key: signing key; None = ``ANOMALENS_MODEL_KEY`` when set.

        Raises:
            ModelFileError: ``directory`` holds files that are not model files, or the ONNX file
                cannot be read.
        """
        import hashlib

        from .serialization import save_model

        try:
            onnx_bytes = self.path.read_bytes()
        except OSError as exc:
            raise ModelFileError(f"cannot read {self.path} ({exc.strerror})") from None
        cal = self.calibration
        config = {"detector": "onnx", "exported_detector": self.name, "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
                  **cal.config_fields()}
        arrays = {"calibration.scores": np.asarray(cal.scores, dtype=np.float64),
                  "calibration.map_maxima": np.asarray(cal.map_maxima, dtype=np.float64)}
        save_model(directory, config, arrays, key=key, files={ONNX_NAME: onnx_bytes})
        self.path, self.model_dir = Path(directory) / ONNX_NAME, Path(directory)
        return Path(directory)


def load_exported(
    model_dir: Path, config: dict, threads: int | None = None, exported_from: bool = False, key: bytes | None = None
) -> OnnxDetector:
    """The :class:`OnnxDetector` of a verified model folder (``config`` from
    :func:`~anomalens.serialization.read_config`): a folder written by :meth:`OnnxDetector.save`,
    or, with ``exported_from``, an image detector's folder whose ``model.onnx`` was exported from it
    (the deployment path without torch). Needs no torch.

    Raises:
        ModelFileError: no ``model.onnx``, one exported from another model, or a saved calibration
            whose thresholds do not follow from its scores.
    """
    path = Path(model_dir) / ONNX_NAME
    if ONNX_NAME not in config.get("model_files", {}):
        raise ModelFileError(f"{model_dir} has no exported {ONNX_NAME}: run `anomalens export {model_dir}` where torch is installed")
    model = OnnxDetector(path, threads=threads)
    if exported_from:
        if model.meta.get("source_config_sha256") != config.get("config_sha256"):
            raise ModelFileError(f"{path} was exported from another version of this model: export it again where torch is installed")
        return model
    if config["model_files"][ONNX_NAME]["sha256"] != config.get("onnx_sha256"):
        raise ModelFileError(f"{path} is not the ONNX file {model_dir / 'config.json'} was saved with")
    from .serialization import load_arrays

    _, arrays = load_arrays(model_dir, key)
    model.calibration = Calibration.restore(config, arrays["calibration.scores"], arrays["calibration.map_maxima"], where=str(model_dir))
    model.model_dir = Path(model_dir)
    return model


def load_inference_model(model_dir: str | os.PathLike, engine: str = "auto", threads: int | None = None, key: bytes | None = None):
    """The model of ``model_dir`` ready to score (:func:`anomalens.load_detector`), with its
    ONNX Runtime graph opened now rather than at the first prediction: the service and the scale-out
    workers load with it, so that one process exports a missing graph before the others need it.

    Args:
        engine: ``"auto"`` (default), ``"torch"`` or ``"onnxruntime"`` (see :func:`anomalens.load_detector`).
        threads: ONNX Runtime intra-op threads of the model's session (an :class:`OnnxDetector`'s,
            or a detector's graph; None: all cores for the former, torch's thread count for the latter).
        key: signing key; None = ``ANOMALENS_MODEL_KEY`` when set.

    Raises:
        ModelFileError: the model cannot be loaded, or (without torch) has no current ``model.onnx``.
        ConfigError: an unknown engine (``"onnx"`` included), or ``"torch"`` on an install without torch.
    """
    from .loading import load_detector

    model = load_detector(model_dir, key=key, engine=engine, threads=threads)
    if getattr(model, "engine", None) == "onnxruntime" and hasattr(model, "use_engine"):
        from .detectors.engine import graph_session

        graph_session(model)  # exports into the folder when missing or stale (a failure warns and stays on torch)
    return model
