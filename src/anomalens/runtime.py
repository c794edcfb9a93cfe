"""Scoring an exported model on ONNX Runtime, without torch: the deployment path.

An exported graph (:func:`anomalens.export.export_onnx`) takes the model input, ``float32``
``(B, 3, h, w)`` in [0, 1], and returns ``pred_score`` ``(B,)`` and ``anomaly_map`` ``(B, h, w)``.
This module prepares that input and post-processes the outputs with numpy, Pillow and OpenCV only,
so a machine with ``pip install anomalens[runtime]`` (ONNX Runtime, no torch) scores images with the
same results as the Python detector: resizing uses Pillow's bilinear filter on ``float32`` channels
(antialiased when shrinking, as torch's ``interpolate(..., antialias=True)``; the two agree within
1e-4 of the [0, 1] range) and the map goes back to the image size with OpenCV's bilinear resize.
Thresholds, calibration scores and parameters travel in the ONNX file's metadata, so the file alone
gives the same decisions, masks, p-values and regions.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
from PIL import Image

from .calibration import Calibration
from .errors import ConfigError, ModelFileError
from .geometry import group_by_shape, model_input_hw
from .io import ImageLike
from .prediction import Prediction

#: 2: model-input tensor in, aspect-kept geometry in the metadata; 3: also the ``patch_scores`` and
#: ``nearest`` outputs (read here as 2: only ``pred_score`` and ``anomaly_map`` are used)
ONNX_FORMAT_VERSION = 3
READABLE_ONNX_FORMATS = (2, 3)
ONNX_NAME = "model.onnx"


def has_torch() -> bool:
    """True when torch can be imported here (a full install), False on a runtime-only install."""
    return importlib.util.find_spec("torch") is not None


def model_input(images: Sequence[np.ndarray], hw: tuple[int, int]) -> np.ndarray:
    """Resize ``uint8`` RGB images ``(H_i, W_i, 3)`` to ``hw = (h, w)`` pixels and stack them.

    Returns ``float32`` ``(B, 3, h, w)`` in [0, 1]: bilinear, antialiased when shrinking (Pillow's
    filter on ``float32`` channels, as :func:`anomalens.common.to_model_input` with torch).
    """
    h, w = int(hw[0]), int(hw[1])
    out = np.empty((len(images), 3, h, w), dtype=np.float32)
    for i, img in enumerate(images):
        for c in range(3):
            ch = np.ascontiguousarray(img[..., c], dtype=np.float32) / np.float32(255.0)
            if ch.shape != (h, w):
                ch = np.asarray(Image.fromarray(ch, mode="F").resize((w, h), Image.BILINEAR))
            out[i, c] = ch
    return np.clip(out, 0.0, 1.0, out=out)


def resize_map(anomaly_map: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize one ``(h, w)`` anomaly map to the image size ``hw = (H, W)``: ``float32``, bilinear."""
    m = np.asarray(anomaly_map, dtype=np.float32)
    if m.shape != tuple(hw):
        m = cv2.resize(m, (int(hw[1]), int(hw[0])), interpolation=cv2.INTER_LINEAR)
    return m


class OnnxDetector:
    """Predict with an exported ONNX file on ONNX Runtime: the same :class:`Prediction` as the model.

    Args:
        path: an ``.onnx`` file written by :func:`export_onnx` (``anomalens export``).
        threads: intra-op threads (None = ONNX Runtime's default, all cores).
        batch_size: images per call (images of different sizes are run separately).

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
            if meta["format_version"] not in READABLE_ONNX_FORMATS:
                raise ModelFileError(f"{path} has ONNX format version {meta['format_version']}, this anomalens reads {READABLE_ONNX_FORMATS}")
            c = meta["calibration"]
            cal = Calibration.restore(
                np.asarray(c["scores"]), np.asarray(c["map_maxima"]), float(c["false_alarm_rate"]), source=c["source"],
                mode=c.get("mode", "conformal"), threshold=float(meta["threshold"]), pixel_threshold=float(meta["pixel_threshold"]),
                note=str(c.get("note", "")), where=str(path),
            )
        except ModelFileError:
            raise
        except Exception as exc:
            raise ModelFileError(f"{path} has unreadable anomalens metadata ({exc})") from None
        self.path = path
        self.meta = meta
        self.calibration = cal
        self.name = meta["detector"]
        self.batch_size = int(batch_size)

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
        one session call per model-input shape."""
        scores: list[float] = [0.0] * len(images)
        maps: list[np.ndarray] = [None] * len(images)  # type: ignore[list-item]
        for shapes, idx in group_by_shape([self.input_shapes(img.shape[:2]) for img in images]).items():
            group = [images[i] for i in idx]
            feeds = {("image" if k == 0 else f"image_{k}"): model_input(group, hw) for k, hw in enumerate(shapes)}
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


def load_inference_model(model_dir: str | os.PathLike, engine: str = "auto", threads: int | None = None):
    """The model that scores images for ``model_dir``, on the fastest runtime this install has.

    Engines: ``"onnx"``: an :class:`OnnxDetector` on the folder's ``model.onnx``, exported first when
    missing or stale (that needs torch); ``"torch"``: the Python detector on torch; ``"auto"``: the
    Python detector on its default engine (:mod:`anomalens.detectors.engine`: the same exported
    graph on ONNX Runtime where the model can be exported, with evidence; else torch). On an install
    without torch every engine means the folder's exported ``model.onnx``, which must belong to this model.

    Raises:
        ModelFileError: the model cannot be loaded, or (without torch) has no current ``model.onnx``.
        ConfigError: an unknown engine, or ``"torch"`` on an install without torch.
    """
    from .serialization import read_config

    if engine not in ("auto", "onnx", "torch"):
        raise ConfigError(f"unknown engine {engine!r}; use auto, onnx or torch")
    model_dir = Path(model_dir)
    if not has_torch():
        if engine == "torch":
            raise ConfigError("engine torch needs torch, which this install does not have (pip install anomalens, not [runtime] alone)")
        config = read_config(model_dir)
        path = model_dir / ONNX_NAME
        if not path.is_file():
            raise ModelFileError(f"{model_dir} has no exported {ONNX_NAME}: run `anomalens export {model_dir}` where torch is installed")
        model = OnnxDetector(path, threads=threads)
        if model.meta.get("source_config_sha256") != config.get("config_sha256"):
            raise ModelFileError(f"{path} was exported from another version of this model: export it again where torch is installed")
        return model
    from .detectors import load_detector
    from .export import check_exportable, onnx_for_model_dir

    detector = load_detector(model_dir)
    if engine != "onnx":
        return detector.use_engine(engine)
    try:
        check_exportable(detector)
    except ConfigError:
        return detector
    return onnx_for_model_dir(model_dir, read_config(model_dir)["config_sha256"], threads, detector)
