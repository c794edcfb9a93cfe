"""One way to load any saved model: :func:`load_detector`.

A model folder holds an image detector (PatchCore, PaDiM, AnomalyDINO), the zero-shot MuSc (with
its few-shot references, if any), a video detector, or an exported model (``model.onnx`` saved by
:meth:`~anomalens.runtime.OnnxDetector.save`). The folder's ``config.json`` says which; every kind
follows :class:`~anomalens.contract.AnomalyDetector`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .contract import AnomalyDetector, check_engine
from .errors import ConfigError, ModelFileError


def load_detector(
    directory: str | os.PathLike, *, key: bytes | None = None, engine: str = "auto", threads: int | None = None
) -> AnomalyDetector:
    """Load the model saved in ``directory``, whatever its kind; every file is checked against the
    folder's manifest first (:mod:`anomalens.manifest`).

    Args:
        directory: a model folder written by ``save`` (or ``anomalens fit``).
        key: the model-signing key; None = ``ANOMALENS_MODEL_KEY`` when set. With a key, unsigned
            or badly signed models are refused.
        engine: ``"auto"`` (default), ``"torch"`` or ``"onnxruntime"``. An image detector runs its
            scoring graph on ONNX Runtime (exported into the folder at its first prediction, with
            evidence) under ``"auto"`` and ``"onnxruntime"`` where the model can be exported, else
            on torch; ``"torch"`` forces torch. On an install without torch, an image detector
            folder gives the :class:`~anomalens.runtime.OnnxDetector` of its exported ``model.onnx``
            (``"torch"`` is refused). Video models and MuSc run on torch; exported models on ONNX
            Runtime.
        threads: ONNX Runtime intra-op threads of an :class:`~anomalens.runtime.OnnxDetector` or of
            an image detector's graph (None: all cores for the former, torch's thread count for the
            latter).

    Returns:
        An :class:`~anomalens.contract.AnomalyDetector`: a :class:`~anomalens.detectors.base.Detector`,
        a :class:`~anomalens.zeroshot.musc.MuSc`, a :class:`~anomalens.video.base.VideoModel` or an
        :class:`~anomalens.runtime.OnnxDetector`.

    Raises:
        ModelFileError: a missing, incompatible, corrupt, modified or (with a key) unsigned model
            folder, an unknown kind, or (without torch) an image model with no current ``model.onnx``
            or a model that needs torch.
        ConfigError: an unknown engine (``"onnx"`` included: say ``"onnxruntime"``), ``"torch"`` for
            an exported model or on an install without torch, a bad key in ``ANOMALENS_MODEL_KEY``,
            or MuSc without its ``[zeroshot]`` extra.
    """
    from .runtime import has_torch, load_exported
    from .serialization import read_config

    check_engine(engine)
    directory = Path(directory)
    config = read_config(directory, key)
    kind = config.get("detector")
    if kind == "onnx":
        if engine == "torch":
            raise ConfigError(f"{directory} is an exported model: it runs on ONNX Runtime only (engine auto or onnxruntime)")
        return load_exported(directory, config, threads, key=key)
    if not has_torch():
        if kind in ("video", "musc"):
            raise ModelFileError(f"{directory} is a {kind} model: it needs torch (pip install anomalens, not [runtime] alone)")
        if engine == "torch":
            raise ConfigError("engine torch needs torch, which this install does not have (pip install anomalens, not [runtime] alone)")
        return load_exported(directory, config, threads, exported_from=True, key=key)
    if kind == "video":
        from .video.persistence import load_video_model

        return load_video_model(directory, key)
    if kind == "musc":
        from .zeroshot.musc import load_musc

        return load_musc(directory, key)
    from .detectors.persistence import load_detector as load_image_detector

    det = load_image_detector(directory, key).use_engine(engine)
    det.graph_threads = threads
    return det
