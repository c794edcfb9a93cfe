"""The cell-level video detector: per grid cell, optical-flow histograms and CNN appearance against
memories of normal video (the method before the object detector; ``anomalens video fit --method cells``).

* **motion**: per-cell histograms of optical-flow direction weighted by speed (with the busiest cell
  of each 3 x 3 neighbourhood beside them), against a per-cell memory of the normal motion of that
  place (:mod:`anomalens.video.motion`);
* **appearance**: frozen ImageNet CNN patch features against a PatchCore memory bank (Roth et al.,
  CVPR 2022) of patches of normal frames;
* each part is divided by the 95th percentile of its frame maxima on held-out normal video; the map
  is the larger of the two at each cell (upsampled and blurred), the frame score its maximum,
  smoothed in time. Fitting and calibration: :mod:`anomalens.video.cell_fit`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import get_spec, make_backbone
from ..common import PatchFeatureExtractor, to_tensor_batch
from ..errors import ConfigError
from ..explain import find_regions
from ..knn import NearestNeighbours
from .alarm import ALARMS_PER_HOUR
from .base import VideoModel
from .io import iter_frames
from .motion import FlowComputer, cell_distances, flow_descriptors
from .persistence import check_tensor
from .results import FramePrediction
from .smoothing import smoothed_stream
from .sources import Progress, Segment

#: widest working resolution for optical flow, in pixels (wider videos are downscaled)
MAX_WIDTH = 480
#: each part is divided by this quantile of its frame maxima on the calibration frames
SCALE_QUANTILE = 0.95
#: DIS patch side in pixels (stride 3/8 of it)
FLOW_PATCH = 8
#: the top FLOW_UPSCALE_ROWS of the frame (the far part of the scene) is enlarged FLOW_UPSCALE times
#: for the optical flow, so that small far objects keep their speed (:class:`~anomalens.video.motion.FlowComputer`)
FLOW_UPSCALE, FLOW_UPSCALE_ROWS = 1.5, 0.6


class CellVideoDetector(VideoModel):
    """Appearance + motion patch kNN video anomaly detector (see the module docstring).

    Args:
        backbone: CNN for appearance (``efficientnet_lite0``, ``efficientnet_lite2``, ``mobilenet_v2``).
        image_size: square size in pixels frames are resized to for the backbone (multiple of 16).
        appearance, motion: use that cue (at least one).
        cell: motion cell side in pixels at the working resolution (frames wider than 480 px are
            downscaled to 480; sizes are rounded to multiples of ``cell``).
        flow_bins: direction bins of the motion histograms.
        motion_step: every ``motion_step``-th training frame goes into the motion memory.
        motion_memory: normal motion descriptors kept per cell (greedy k-center).
        appearance_step: every ``appearance_step``-th training frame goes into the appearance bank.
        coreset_ratio: fraction of appearance patches kept in its bank.
        temporal_sigma: Gaussian smoothing of the frame scores, in frames (delay ``ceil(3 sigma)``).
        blur_sigma: spatial smoothing of the anomaly map, in pixels at the working resolution.
        alarms_per_hour: target false-alarm episodes per hour of normal footage (:mod:`~anomalens.video.alarm`,
            the same promise as the object method's); used unless ``false_alarm_rate`` is given.
        fps: frame rate of the footage (None: read from the training videos; frame folders: 10).
        false_alarm_rate: a per-frame target instead (fraction of normal frames flagged; None: use
            ``alarms_per_hour``). After fit, :attr:`false_alarm_rate` is the per-frame rate the threshold implies.
        folds: groups of videos for cross-fit calibration, each scored against memories fitted
            without it (a single video is cut into this many parts).
        seed: which videos go to which fold.
        pretrained: shipped ImageNet weights (False: random, tests only).

    Raises:
        ConfigError: invalid values.
    """

    method = "cells"

    def __init__(
        self, backbone: str = "efficientnet_lite0", image_size: int = 256, *, appearance: bool = True, motion: bool = True,
        cell: int = 8, flow_bins: int = 8,
        motion_step: int = 2, motion_memory: int = 64, appearance_step: int = 10, coreset_ratio: float = 0.01,
        temporal_sigma: float = 1.0, blur_sigma: float = 4.0, alarms_per_hour: float = ALARMS_PER_HOUR, fps: float | None = None,
        false_alarm_rate: float | None = None, folds: int = 4, seed: int = 0, pretrained: bool = True,
    ):
        spec = get_spec(backbone)
        if spec.build is None:
            raise ConfigError(f"backbone {backbone} cannot be used for video; choose a CNN")
        if not (appearance or motion):
            raise ConfigError("use appearance, motion or both")
        if image_size % 16 or not 64 <= image_size <= 1024:
            raise ConfigError(f"image_size must be a multiple of 16 in [64, 1024] pixels, got {image_size}")
        for name, v in (("cell", cell), ("flow_bins", flow_bins), ("motion_step", motion_step), ("motion_memory", motion_memory), ("appearance_step", appearance_step)):
            if int(v) < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")
        if not 0.0 < coreset_ratio <= 1.0:
            raise ConfigError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if temporal_sigma < 0 or blur_sigma < 0:
            raise ConfigError("temporal_sigma and blur_sigma must be >= 0")
        check_calibration_args(false_alarm_rate, folds)
        if not alarms_per_hour > 0 or (fps is not None and not fps > 0):
            raise ConfigError(f"alarms_per_hour and fps must be > 0, got {alarms_per_hour} and {fps}")
        self.backbone_name, self.image_size = backbone, int(image_size)
        self.appearance, self.motion = bool(appearance), bool(motion)
        self.cell, self.flow_bins = int(cell), int(flow_bins)
        self.motion_step, self.motion_memory = int(motion_step), int(motion_memory)
        self.appearance_step, self.coreset_ratio = int(appearance_step), float(coreset_ratio)
        self.temporal_sigma, self.blur_sigma = float(temporal_sigma), float(blur_sigma)
        self.alarms_per_hour, self.fps, self.target_false_alarm_rate = float(alarms_per_hour), fps, false_alarm_rate
        #: the per-frame rate of the threshold: the target given, or (set by fit) the one the episode target implies
        self.false_alarm_rate = float(false_alarm_rate) if false_alarm_rate is not None else float("nan")
        self.folds, self.seed = int(folds), int(seed)
        self.pretrained = bool(pretrained)
        #: working size ``(h, w)`` in pixels (multiples of ``cell``), set by fit
        self.work_hw: tuple[int, int] | None = None
        self.motion_bank: torch.Tensor | None = None  # (cells, k, 2 * bins)
        self._motion_sq: torch.Tensor | None = None  # (cells, k)
        self.appearance_bank: torch.Tensor | None = None  # (M, D)
        self.scales = (1.0, 1.0)  # (motion, appearance) typical frame maxima on held-out video
        self.calibration = None
        self.fit_info: dict = {}
        self._extractor: PatchFeatureExtractor | None = None
        self._nn: NearestNeighbours | None = None

    def get_params(self) -> dict:
        """The constructor's arguments (JSON-serialisable)."""
        return {
            "backbone": self.backbone_name, "image_size": self.image_size, "appearance": self.appearance, "motion": self.motion,
            "cell": self.cell, "flow_bins": self.flow_bins, "motion_step": self.motion_step, "motion_memory": self.motion_memory,
            "appearance_step": self.appearance_step, "coreset_ratio": self.coreset_ratio, "temporal_sigma": self.temporal_sigma,
            "blur_sigma": self.blur_sigma, "alarms_per_hour": self.alarms_per_hour, "fps": self.fps,
            "false_alarm_rate": self.target_false_alarm_rate, "folds": self.folds, "seed": self.seed, "pretrained": self.pretrained,
        }

    # ------------------------------------------------------------------ parts
    @property
    def extractor(self) -> PatchFeatureExtractor:
        if self._extractor is None:
            # frames keep the 32 px reflected border their settings were chosen with (CNN backbones only)
            self._extractor = PatchFeatureExtractor(make_backbone(self.backbone_name, None, self.pretrained), 3, 32)
        return self._extractor

    @property
    def grid(self) -> tuple[int, int]:
        assert self.work_hw is not None
        return self.work_hw[0] // self.cell, self.work_hw[1] // self.cell

    def _set_work_size(self, h: int, w: int) -> None:
        scale = min(1.0, MAX_WIDTH / w)
        gh, gw = max(1, round(h * scale / self.cell)), max(1, round(w * scale / self.cell))
        self.work_hw = (gh * self.cell, gw * self.cell)

    @torch.inference_mode()
    def _features(self, frame: np.ndarray) -> torch.Tensor:
        """Appearance patch features of one frame, ``float32`` ``(D, h, w)``."""
        return self.extractor(to_tensor_batch([frame], self.image_size))[0]

    def _flow_computer(self) -> FlowComputer:
        """A new optical-flow estimator with this model's settings (one per video), at full resolution."""
        return FlowComputer(0, FLOW_PATCH, upscale=FLOW_UPSCALE, upscale_rows=FLOW_UPSCALE_ROWS)

    def _raw_parts(self, segment: Segment, with_features: bool = True) -> Iterator[tuple[int, np.ndarray, torch.Tensor | None, torch.Tensor | None]]:
        """``(index, frame, motion descriptors | None, appearance features (D, h, w) | None)`` of each
        frame of ``segment``; the first frame's motion is zero. ``with_features=False`` leaves the
        appearance features out (the caller picks frames)."""
        flow = self._flow_computer()
        prev = None
        for i, frame in iter_frames(segment.video):
            if segment.stop is not None and i >= segment.stop:
                break
            gray = None
            if self.motion:
                assert self.work_hw is not None
                small = cv2.resize(frame, (self.work_hw[1], self.work_hw[0]), interpolation=cv2.INTER_AREA)
                gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
            if i < segment.start:
                prev = gray
                continue
            mdesc = None
            if self.motion:
                fl = flow(prev, gray) if prev is not None else np.zeros((*self.work_hw, 2), np.float32)  # type: ignore[misc]
                mdesc = flow_descriptors(fl, self.cell, self.flow_bins, True)
            prev = gray
            yield i, frame, mdesc, (self._features(frame) if self.appearance and with_features else None)

    def _part_grids(self, mdesc: torch.Tensor | None, feats: torch.Tensor | None, memories: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw ``(gh, gw)`` motion and appearance distance grids (zeros when off), against the model's
        memories or ``memories = (motion_bank, its squared lengths, appearance NearestNeighbours)``."""
        motion_bank, motion_sq, nn = memories if memories is not None else (self.motion_bank, self._motion_sq, self._nn)
        gh, gw = self.grid
        m = cell_distances(mdesc, motion_bank, motion_sq) if mdesc is not None else torch.zeros(gh, gw)  # type: ignore[arg-type]
        if feats is not None:
            assert nn is not None
            d, h, w = feats.shape
            dist, _ = nn.search(feats.permute(1, 2, 0).reshape(-1, d), 1)
            a = F.interpolate(dist.view(1, 1, h, w), size=(gh, gw), mode="bilinear", align_corners=False)[0, 0]
        else:
            a = torch.zeros(gh, gw)
        return m, a

    def _combine(self, m: torch.Tensor, a: torch.Tensor) -> tuple[np.ndarray, float, float, str]:
        """The cell-wise maximum of the normalised parts ``(gh, gw)``, the parts' frame maxima (NaN
        when off), and the cue that dominates at the grid's peak."""
        mn, an = m / self.scales[0], a / self.scales[1]
        total = torch.maximum(mn, an).numpy().astype(np.float32)
        peak = int(np.argmax(total))
        if self.motion and self.appearance:
            cause = "motion" if float(mn.flatten()[peak]) >= float(an.flatten()[peak]) else "appearance"
        else:
            cause = "motion" if self.motion else "appearance"
        return total, float(mn.max()) if self.motion else math.nan, float(an.max()) if self.appearance else math.nan, cause

    def _map(self, grid: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """Grid -> ``float32`` anomaly map at the frame size ``hw``, blurred by ``blur_sigma`` working pixels."""
        assert self.work_hw is not None
        m = cv2.resize(grid, (self.work_hw[1], self.work_hw[0]), interpolation=cv2.INTER_LINEAR)
        if self.blur_sigma > 0:
            m = cv2.GaussianBlur(m, (0, 0), self.blur_sigma, borderType=cv2.BORDER_REFLECT)
        if m.shape != tuple(hw):
            m = cv2.resize(m, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
        return m

    def fit(self, videos: str | os.PathLike | Sequence[str | os.PathLike], progress: Progress | None = None) -> "CellVideoDetector":
        """Learn normal appearance and motion from normal videos of one fixed camera, and calibrate
        (:func:`anomalens.video.cell_fit.fit_cells`, which documents the arguments and errors)."""
        from .cell_fit import fit_cells

        return fit_cells(self, videos, progress)

    def predict_stream(self, video: str | os.PathLike, *, keep_frames: bool = False) -> Iterator[FramePrediction]:
        """Score a video frame by frame, holding only the few frames of the smoothing window.

        Yields :class:`FramePrediction` in frame order, each ``delay`` frames after its frame was read.

        Raises:
            NotFittedError: not fitted.
            VideoReadError: the video cannot be opened, or stops early; raised after the frames read
                before the error have been yielded.
        """
        self._check_fitted()

        def finish(item, smoothed: float) -> FramePrediction:
            i, frame, total, ms, as_, cause = item
            amap = self._map(total, frame.shape[:2])
            mask = amap > self.pixel_threshold
            return FramePrediction(
                index=i, pred_score=smoothed, raw_score=float(total.max()), pred_label=int(smoothed > self.threshold),
                anomaly_map=amap, pred_mask=mask, motion_score=ms, appearance_score=as_, cause=cause,
                regions=find_regions(amap, mask), image=frame if keep_frames else None,
            )

        def parts():
            for i, frame, mdesc, feats in self._raw_parts(Segment(Path(video))):
                total, ms, as_, cause = self._combine(*self._part_grids(mdesc, feats))
                yield (i, frame, total, ms, as_, cause), float(total.max())

        for item, s in smoothed_stream(parts(), self.temporal_sigma):
            yield finish(item, s)

    # ------------------------------------------------------------------ persistence
    def _state(self) -> tuple[dict, dict]:
        assert self.work_hw is not None
        tensors = {k: v for k, v in (("motion_bank", self.motion_bank), ("appearance_bank", self.appearance_bank)) if v is not None}
        return tensors, {"work_hw": list(self.work_hw), "scales": list(self.scales), "fps": self.fps}

    def _restore(self, state: dict, tensors: dict, where: str) -> None:
        self.work_hw = tuple(int(v) for v in state["work_hw"])  # type: ignore[assignment]
        self.scales = tuple(float(v) for v in state["scales"])  # type: ignore[assignment]
        self.fps = float(state["fps"])
        gh, gw = self.grid
        if self.motion:
            self.motion_bank = check_tensor(tensors, "motion_bank", (gh * gw, None, 2 * self.flow_bins), where)
            self._motion_sq = (self.motion_bank * self.motion_bank).sum(-1)
        if self.appearance:
            self.appearance_bank = check_tensor(tensors, "appearance_bank", (None, self.extractor.feature_dim), where)
            self._nn = NearestNeighbours(self.appearance_bank.float(), "faiss")


def check_calibration_args(false_alarm_rate: float | None, folds: int) -> None:
    """Raise :class:`ConfigError` for an invalid calibration setting (``false_alarm_rate`` None: an episode target)."""
    if false_alarm_rate is not None and not 0.0 < false_alarm_rate < 1.0:
        raise ConfigError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate}")
    if folds < 2:
        raise ConfigError(f"folds must be >= 2, got {folds}")
