"""Video anomaly detection for fixed cameras: frame sources, motion features, the detector, outputs
and frame-level evaluation. See :mod:`anomalens.video.detector` for the methods."""

from .detector import CellVideoDetector, FramePrediction, ObjectScore, ObjectVideoDetector, VideoDetector, VideoPrediction, make_video_detector
from .io import iter_frames, list_videos

__all__ = ["CellVideoDetector", "FramePrediction", "ObjectScore", "ObjectVideoDetector", "VideoDetector", "VideoPrediction", "iter_frames", "list_videos", "make_video_detector"]
