"""Video anomaly detection for fixed cameras: frame sources, motion features, the detector, outputs
and frame-level evaluation. See :mod:`anomalens.video.detector` for the method."""

from .detector import FramePrediction, VideoDetector, VideoPrediction
from .io import iter_frames, list_videos

__all__ = ["FramePrediction", "VideoDetector", "VideoPrediction", "iter_frames", "list_videos"]
