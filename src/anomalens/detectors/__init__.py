"""The image detectors (:class:`~anomalens.detectors.base.Detector`); with every other model kind they
follow :class:`~anomalens.contract.AnomalyDetector`. ``load_detector`` here is :func:`anomalens.load_detector`."""

from __future__ import annotations

from ..errors import ConfigError
from ..loading import load_detector
from .anomalydino import AnomalyDINO
from .base import Detector
from .padim import PaDiM
from .patchcore import PatchCore

DETECTORS: dict[str, type[Detector]] = {"patchcore": PatchCore, "padim": PaDiM, "anomalydino": AnomalyDINO}


def create_detector(name: str, **params) -> Detector:
    """A new, unfitted detector called ``name`` ("patchcore", "padim" or "anomalydino") with ``params``.

    Raises:
        ConfigError: unknown name (the message lists the known ones) or invalid parameters.
    """
    try:
        cls = DETECTORS[name]
    except KeyError:
        raise ConfigError(f"unknown detector {name!r}; known detectors: {', '.join(sorted(DETECTORS))}") from None
    return cls(**params)


__all__ = ["AnomalyDINO", "DETECTORS", "Detector", "PaDiM", "PatchCore", "create_detector", "load_detector"]
