"""Exceptions raised by anomalens. Every error names the file or value that caused it."""

from __future__ import annotations


class AnomalensError(Exception):
    """Base class of every error anomalens raises on purpose."""


class ImageReadError(AnomalensError, ValueError):
    """An image (or mask) file is missing, corrupt, truncated or in an unsupported format.

    Attributes:
        path: the offending file.
        reason: a short human-readable reason.
    """

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class DatasetError(AnomalensError, ValueError):
    """A dataset folder is empty, has the wrong layout, or a mask does not match its image."""


class ModelFileError(AnomalensError, ValueError):
    """A saved model directory is missing, from an incompatible version, or has been tampered with."""


class ConfigError(AnomalensError, ValueError):
    """An option has an invalid value (unknown backbone or layer, bad image size, ...)."""


class CalibrationError(ConfigError):
    """Too few normal calibration images for the requested false-alarm rate (the message says how many)."""


class NotFittedError(AnomalensError, RuntimeError):
    """A detector was used before `fit` (or `load`)."""


class VideoReadError(AnomalensError, ValueError):
    """A video (file or frame folder) cannot be opened, or ends early: truncated file, unreadable
    frame, frame of another size.

    Attributes:
        video: the offending video.
        frames_read: how many frames were read before the error (their results are kept).
    """

    def __init__(self, video: object, reason: str, frames_read: int = 0):
        self.video = str(video)
        self.frames_read = int(frames_read)
        super().__init__(f"cannot read video {self.video}: {reason}")
