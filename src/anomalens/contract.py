"""The one contract every kind of model follows: :class:`AnomalyDetector`.

The kinds: the image detectors (:class:`~anomalens.detectors.base.Detector`: PatchCore, PaDiM,
AnomalyDINO), an exported model on ONNX Runtime (:class:`~anomalens.runtime.OnnxDetector`), the
zero-shot :class:`~anomalens.zeroshot.musc.MuSc`, and the video detectors
(:class:`~anomalens.video.base.VideoModel`). Each is fitted (or not: see :meth:`AnomalyDetector.fit`),
predicts, scores, saves into a model folder, and is loaded back by the one
:func:`anomalens.load_detector`::

    from anomalens import AnomalyDetector, load_detector
    model = load_detector("model")             # whatever kind the folder holds
    assert isinstance(model, AnomalyDetector)
    scores = model.decision_function(inputs)   # float64 (N,) per image, or (T,) per video frame

This module needs neither torch nor ONNX Runtime.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .calibration import Calibration

#: the engines a model can be asked to run on (:func:`anomalens.load_detector`, ``--engine``)
ENGINES = ("auto", "torch", "onnxruntime")


#: what :class:`AnomalyDetector` asks of a model
MEMBERS = ("name", "engine", "calibration", "threshold", "pixel_threshold", "fit", "predict", "decision_function", "save")
_ABSENT = object()


class _StaticCheck(type(Protocol)):  # type: ignore[misc]
    """``isinstance`` looks the members up without running them (as Python 3.12 does), so that an
    unfitted model, whose ``threshold`` raises :class:`~anomalens.errors.NotFittedError`, is still
    an :class:`AnomalyDetector`."""

    def __instancecheck__(cls, instance: object) -> bool:
        return all(inspect.getattr_static(instance, m, _ABSENT) is not _ABSENT for m in MEMBERS)


@runtime_checkable
class AnomalyDetector(Protocol, metaclass=_StaticCheck):
    """What every model kind offers (``isinstance(model, AnomalyDetector)`` holds for each).

    Inputs are images (file paths, PIL images, ``uint8`` arrays ``(H, W)``, ``(H, W, C)`` or a stack
    ``(N, H, W, C)``, or :class:`~anomalens.data.Sample`) for the image kinds, and one video (a file
    or a folder of frames) for the video kinds.

    Attributes:
        name: the model's name: ``"patchcore"``, ``"padim"``, ``"anomalydino"``, ``"musc"``,
            ``"video"``; an exported model carries the name of the detector it was exported from.
        engine: what scores the inputs: ``"onnxruntime"`` or ``"torch"``.
        calibration: the :class:`~anomalens.calibration.Calibration` the thresholds come from
            (calibration scores, target false-alarm rate, source, note); batch-relative
            (``calibration.is_batch_relative``, no scores, NaN rate) for models whose decisions are
            relative to each predicted batch (MuSc, one-shot detectors). None before a fit.
        threshold: image (video: frame) threshold, ``pred_label = pred_score > threshold``, in the
            units of ``pred_score``; for a batch-relative model that of the last predicted batch
            (NaN before any).
        pixel_threshold: threshold of ``anomaly_map`` for ``pred_mask``, in the same way.
    """

    name: str

    @property
    def engine(self) -> str: ...

    @property
    def calibration(self) -> Calibration | None: ...

    @property
    def threshold(self) -> float: ...

    @property
    def pixel_threshold(self) -> float: ...

    def fit(self, *args: Any, **kwargs: Any) -> "AnomalyDetector":
        """Learn from normal data and set the thresholds; returns the model itself.

        Image detectors take normal images (or a folder); video detectors normal videos; MuSc
        takes nothing (zero-shot) or a few normal images it keeps as references (few-shot).

        Raises:
            ConfigError: an exported model (:class:`~anomalens.runtime.OnnxDetector`): it is already
                fitted; fit the torch detector and export it. Invalid options of the other kinds.
            DatasetError: no normal data (an empty folder).
            ImageReadError: a training image cannot be read.
            CalibrationError: too few normal images for an explicit false-alarm rate.
        """
        ...

    def predict(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        """Score the inputs and decide.

        Returns:
            Image kinds: one :class:`~anomalens.prediction.Prediction` per input, in order
            (``pred_score``, ``pred_label``, ``anomaly_map`` ``float32`` ``(H, W)`` at the image's
            size, ``pred_mask``); an unreadable input gives a prediction with ``error`` set and NaN
            score. Video kinds: one :class:`~anomalens.video.results.VideoPrediction`.

        Raises:
            NotFittedError: not fitted or loaded.
            AnomalensError: MuSc with fewer than 3 readable images (mutual scoring needs others).
        """
        ...

    def decision_function(self, data: Any) -> np.ndarray:
        """Anomaly scores, higher is more anomalous, in the units of :attr:`threshold`.

        Returns:
            ``float64`` ``(N,)``, one ``pred_score`` per image (NaN for an unreadable one), or
            ``float64`` ``(T,)``, one smoothed ``pred_score`` per frame of a video. MuSc's scores
            are relative to the batch they are computed in.

        Raises:
            NotFittedError: not fitted or loaded.
        """
        ...

    def save(self, directory: str | os.PathLike) -> Any:
        """Write the model to ``directory`` as a model folder (``config.json``, ``model.safetensors``,
        an exported model's ``model.onnx``, and ``manifest.json``; no pickle), swapped in whole: a
        kill leaves the old folder or the new one. :func:`anomalens.load_detector` loads it back.

        Raises:
            NotFittedError: not fitted.
            ModelFileError: ``directory`` holds files that are not model files.
        """
        ...


def check_engine(engine: str) -> str:
    """``engine`` if it is one of :data:`ENGINES`.

    Raises:
        ConfigError: any other name (``"onnx"`` included: the engine is called ``"onnxruntime"``).
    """
    from .errors import ConfigError

    if engine not in ENGINES:
        hint = " (the ONNX Runtime engine is called 'onnxruntime')" if str(engine).lower() == "onnx" else ""
        raise ConfigError(f"unknown engine {engine!r}{hint}; use one of {', '.join(ENGINES)}")
    return engine


__all__ = ["AnomalyDetector", "ENGINES", "MEMBERS", "check_engine"]
