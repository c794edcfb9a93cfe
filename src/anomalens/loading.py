"""One way to load any saved model: :func:`load_detector`.

A model folder holds an image detector (PatchCore, PaDiM, AnomalyDINO), a video detector, or, on a
deployment install without torch, an image detector's exported ``model.onnx``. The folder's
``config.json`` says which; this function returns the matching object, all of which follow one
contract: ``predict(images)``, ``decision_function(images)``, ``threshold``, ``calibration``.
"""

from __future__ import annotations

import os


def load_detector(directory: str | os.PathLike):
    """Load the model saved in ``directory``, whatever its kind.

    Returns:
        A :class:`~anomalens.detectors.base.Detector` (image models, where torch is installed), a
        :class:`~anomalens.video.VideoDetector` (video models), or an
        :class:`~anomalens.runtime.OnnxDetector` on the folder's exported ``model.onnx`` (image models
        on an install without torch).

    Raises:
        ModelFileError: a missing, incompatible, corrupt or modified model folder, an unknown kind,
            or (without torch) an image model with no current ``model.onnx``.
    """
    from .runtime import has_torch, load_inference_model
    from .serialization import read_config

    config = read_config(directory)
    if not has_torch():
        if config.get("detector") == "video":
            from .errors import ModelFileError

            raise ModelFileError(f"{directory} is a video model: it needs torch (pip install 'anomalens[video]')")
        return load_inference_model(directory, engine="onnx")
    if config.get("detector") == "video":
        from .video import VideoDetector

        return VideoDetector.load(directory)
    from .detectors.persistence import load_detector as load_image_detector

    return load_image_detector(directory)
