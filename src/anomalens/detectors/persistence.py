"""Saving and loading fitted detectors (the file format itself is :mod:`anomalens.serialization`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..augment import AUGMENTATIONS
from ..calibration import Calibration
from ..errors import ModelFileError
from ..serialization import load_model, save_model


def save_detector(det, directory: str | os.PathLike, key: bytes | None = None, expect_manifest: str | None = None) -> None:
    """Write a fitted detector: its learned tensors and calibration scores (safetensors) and a JSON
    config with its parameters, thresholds, calibration note, training images and fit information.

    The new folder replaces ``directory`` in one step (:func:`anomalens.serialization.save_model`):
    a kill leaves the old model or the new one; a ``model.onnx`` of the old model is dropped.

    Args:
        key: signing key; None = ``ANOMALENS_MODEL_KEY`` when set (:mod:`anomalens.manifest`).
        expect_manifest: refuse when the folder changed since it was read (read-modify-write).

    Raises:
        ModelFileError: ``directory`` holds files that are not model files, or changed meanwhile.
    """
    cal = det.calibration
    tensors = dict(det._state_tensors())
    tensors["calibration.scores"] = torch.from_numpy(np.asarray(cal.scores, dtype=np.float64))
    tensors["calibration.map_maxima"] = torch.from_numpy(np.asarray(cal.map_maxima, dtype=np.float64))
    config = {
        "detector": det.name,
        "params": det.get_params(),
        **cal.config_fields(),
        "train_images": det.train_images,
        "train_views": det.train_views,
        "fit_info": det.fit_info,
    }
    save_model(directory, config, tensors, key=key, expect_manifest=expect_manifest)
    det._forget_graph(Path(directory), key)  # the graph is exported into the new folder on first use


def detector_from_files(cls, config: dict, tensors: dict[str, torch.Tensor]):
    """A ``cls`` detector rebuilt from a model's config and tensors.

    Raises:
        ModelFileError: invalid parameters, tensors whose shapes the parameters do not allow, or a
            calibration whose thresholds do not follow from its scores.
    """
    try:
        det = cls(**config["params"])
    except (TypeError, KeyError, AttributeError) as exc:
        raise ModelFileError(f"model config has invalid parameters ({exc}): a model of another anomalens version must be re-fit") from None
    expected = det._expected_shapes(config)
    if expected:
        for key, shape in expected.items():
            if key not in tensors or list(tensors[key].shape) != list(shape):
                got = list(tensors[key].shape) if key in tensors else None
                raise ModelFileError(f"tensor {key!r} has shape {got}, but the model's parameters require {shape}")
    scores = tensors.pop("calibration.scores").numpy()
    maxima = tensors.pop("calibration.map_maxima").numpy()
    det._load_state_tensors(tensors)
    det.calibration = Calibration.restore(config, scores, maxima)
    if not det.calibration.is_batch_relative:
        det.false_alarm_rate = det.calibration.false_alarm_rate
    det.fit_info = config.get("fit_info", {})
    views = config.get("train_views") or ["id"]
    if not (isinstance(views, list) and all(v in set().union(*AUGMENTATIONS.values()) for v in views)):
        raise ModelFileError(f"model config has invalid train_views {views!r}")
    det.train_views = views
    train = config.get("train_images") or []
    det.train_images = [str(x) if isinstance(x, str) else None for x in train] if isinstance(train, list) else []
    return det


def load_detector(directory: str | os.PathLike, key: bytes | None = None):
    """Load a saved image detector (PatchCore, PaDiM, AnomalyDINO) from a model directory, every file
    checked against its manifest first (:mod:`anomalens.manifest`). The helper of
    :func:`anomalens.load_detector`, which loads every kind of model and is the one to use.

    Args:
        key: signing key; None = ``ANOMALENS_MODEL_KEY`` when set. With a key, unsigned or badly
            signed models are refused; without one, a signed model's checksums are checked, not its
            signature.

    Raises:
        ModelFileError: missing, incompatible (older format: re-fit), corrupt, modified or unsigned
            (with a key) model files, files that are not regular files (see
            :func:`anomalens.serialization.load_model`), or an unknown detector type.
    """
    from . import DETECTORS

    config, tensors = load_model(directory, key)
    name = config.get("detector")
    if name in ("video", "musc", "onnx"):
        raise ModelFileError(f"{directory} holds a {name} model, not an image detector: load it with anomalens.load_detector")
    if name not in DETECTORS:
        raise ModelFileError(f"model in {directory} is of unknown detector type {name!r}; known: {sorted(DETECTORS)} (anomalens.load_detector loads every kind)")
    det = detector_from_files(DETECTORS[name], config, tensors)
    det._forget_graph(Path(directory), key)  # its exported graph, cached there, runs predict (engine "auto")
    return det
