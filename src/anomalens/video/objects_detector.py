"""The object-level video detector for a fixed camera (``anomalens video fit --method objects``).

After Reiss & Hoshen ("Attribute-based Representations for Accurate and Interpretable Video Anomaly
Detection", 2022), with what ships offline: the objects of each frame are found from the background
and the optical flow and tracked (:mod:`anomalens.video.objects`); each is described by its speed, its
size at its place and its appearance (:mod:`anomalens.video.attributes`); each attribute is scored
by kNN distance to the objects of normal training video, in units learnt by cross-fit on that video
(:mod:`anomalens.video.density`), so that scores compare across videos and attributes. An object's
score is the sum of its attribute scores; a frame's is AI-VAD's, each attribute's largest score over
the frame's objects summed over attributes, smoothed in time; the cause names the attribute with the
largest term; each object keeps its own attribute scores, sum and cause.
The threshold keeps false-alarm episodes per hour of normal footage (:mod:`anomalens.video.alarm`).
"""

from __future__ import annotations

import os
import time
from typing import Iterator, Sequence

import numpy as np
import torch

from ..calibration import Calibration
from ..errors import ConfigError, DatasetError
from .alarm import ALARMS_PER_HOUR, episode_threshold
from .attributes import ATTRIBUTES, VELOCITY_DIM, CropEmbedder
from .base import VideoModel
from .density import PLACE_WEIGHT, AttributeDensity, attribute_vectors, frame_terms
from .io import as_videos, video_fps, video_name
from .objects import ObjectParams
from .persistence import check_tensor
from .pipeline import FrameObjects, ObjectPipeline
from .results import FramePrediction, ObjectScore
from .smoothing import TemporalSmoother, smoothed_stream
from .sources import Progress, fold_groups, no_progress, split_units


#: the attributes scored by default (size is measured and can be added: ``attributes=ATTRIBUTES``)
DEFAULT_ATTRIBUTES = ("speed", "appearance")


class ObjectVideoDetector(VideoModel):
    """Objects, their attributes and kNN density (see the module docstring).

    Args:
        backbone: CNN for the crop embeddings (``efficientnet_lite0``, ``efficientnet_lite2``, ``mobilenet_v2``).
        attributes: which attributes score (of ``speed``, ``size``, ``appearance``).
        k: neighbours averaged in each attribute's kNN.
        place_weight: weight of an object's place (fractions of the frame) in the speed and size vectors.
        min_height: objects less tall (pixels) are not scored (far noise).
        diff, flow_speed, min_area, close: foreground: grey-level difference from the background, flow
            speed (pixels per frame), smallest blob in pixels and side of the closing square in pixels
            (:class:`~anomalens.video.objects.ObjectParams`).
        temporal_sigma: Gaussian smoothing of the frame scores in frames (delay ``ceil(3 sigma)``).
        alarms_per_hour: target false-alarm episodes per hour of normal footage (:mod:`~anomalens.video.alarm`).
        fps: frame rate of the footage (None: read from the training videos; frame folders: 10).
        folds: cross-fit groups of training videos (a single video is cut into this many parts).
        seed: which videos go to which fold.
        pretrained: shipped ImageNet weights (False: random, tests only).

    Raises:
        ConfigError: invalid values.
    """

    method = "objects"

    def __init__(
        self, backbone: str = "efficientnet_lite0", *, attributes: Sequence[str] = DEFAULT_ATTRIBUTES,
        k: int = 1, place_weight: float = PLACE_WEIGHT, min_height: int = 20, diff: float = 25.0,
        flow_speed: float = 1.0, min_area: int = 60, close: int = 7, temporal_sigma: float = 3.0, alarms_per_hour: float = ALARMS_PER_HOUR,
        fps: float | None = None, folds: int = 4, seed: int = 0, pretrained: bool = True,
    ):
        if temporal_sigma < 0 or place_weight < 0 or min_height < 1 or folds < 2:
            raise ConfigError("need temporal_sigma >= 0, place_weight >= 0, min_height >= 1 and folds >= 2")
        if not alarms_per_hour > 0 or (fps is not None and not fps > 0):
            raise ConfigError(f"alarms_per_hour and fps must be > 0, got {alarms_per_hour} and {fps}")
        self.backbone_name = backbone
        self.density = AttributeDensity(k, tuple(attributes))  # validates them
        self.attributes = self.density.attributes
        self.k = int(k)
        self.place_weight, self.min_height = float(place_weight), int(min_height)
        self.object_params = ObjectParams(diff=float(diff), speed=float(flow_speed), min_area=int(min_area), close=int(close)).check()
        self.temporal_sigma, self.alarms_per_hour, self.fps = float(temporal_sigma), float(alarms_per_hour), fps
        self.folds, self.seed, self.pretrained = int(folds), int(seed), bool(pretrained)
        self.false_alarm_rate = float("nan")  # the per-frame rate the threshold implies, set by fit
        self.background: np.ndarray | None = None
        self.calibration = None
        self.fit_info: dict = {}
        self._embedder: CropEmbedder | None = None

    def get_params(self) -> dict:
        """The constructor's arguments (JSON-serialisable)."""
        p = self.object_params
        return {
            "backbone": self.backbone_name, "attributes": list(self.attributes), "k": self.k,
            "place_weight": self.place_weight, "min_height": self.min_height, "diff": p.diff,
            "flow_speed": p.speed, "min_area": p.min_area, "close": p.close, "temporal_sigma": self.temporal_sigma,
            "alarms_per_hour": self.alarms_per_hour, "fps": self.fps, "folds": self.folds, "seed": self.seed, "pretrained": self.pretrained,
        }

    # ------------------------------------------------------------------ parts
    def _pipeline(self) -> ObjectPipeline:
        if self._embedder is None and "appearance" in self.attributes:
            self._embedder = CropEmbedder(self.backbone_name, pretrained=self.pretrained)
        assert self.background is not None
        return ObjectPipeline(self.background, self.object_params, self._embedder, min_height=self.min_height)

    def _vectors(self, speed: np.ndarray, geometry: np.ndarray, appearance: np.ndarray) -> dict[str, np.ndarray]:
        return attribute_vectors(speed, geometry, appearance, self.place_weight)

    # ------------------------------------------------------------------ fit
    def fit(self, videos: str | os.PathLike | Sequence[str | os.PathLike], progress: Progress | None = None) -> "ObjectVideoDetector":
        """Learn the normal objects of one fixed camera from normal videos, and set the alarm threshold.

        The background is the median of every 10th frame; the training objects of each fold are
        scored against the other folds' objects (cross-fit), which gives each attribute's scale and
        the calibration frames' scores.

        Args:
            videos: a folder (see :func:`~anomalens.video.io.list_videos`) or a list of videos.
            progress: optional ``progress(stage, done, total)``; stages ``"background"``, ``"frames"``.

        Returns:
            ``self``.

        Raises:
            DatasetError: no video, a single one too short, or fewer than 2 folds with objects.
            VideoReadError: a training video cannot be read to its end.
            ConfigError: videos of different frame sizes.
        """
        progress = progress or no_progress
        vids = as_videos(videos)
        if not vids:
            raise DatasetError("no training videos given")
        t0 = time.perf_counter()
        units = split_units(vids, self.folds)
        groups = fold_groups(len(units), self.folds, self.seed)
        fold_of = {u: g for g, members in enumerate(groups) for u in members}
        progress("background", 0, 1)
        self.background = ObjectPipeline.background_of(vids, every=10)
        progress("background", 1, 1)
        pipe = self._pipeline()
        cols: dict[str, list] = {k: [] for k in ("frame", "unit", "speed", "geometry", "appearance")}
        n_frames = [0] * len(units)
        for i, video in enumerate(vids):  # each video read once; a single video's parts are its frame ranges
            parts = [(u, seg) for u, seg in enumerate(units) if seg.video == video]
            for fo in pipe.frames(video):
                u, seg = next((u, seg) for u, seg in parts if fo.index >= seg.start and (seg.stop is None or fo.index < seg.stop))
                n_frames[u] += 1
                for k, v in (("frame", np.full(len(fo), fo.index - seg.start)), ("unit", np.full(len(fo), u)), ("speed", fo.speed),
                             ("geometry", fo.geometry), ("appearance", fo.appearance)):
                    cols[k].append(v)
            progress("frames", i + 1, len(vids))
        t1 = time.perf_counter()
        cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
        if len(cat["frame"]) == 0:
            raise DatasetError("no objects found in the training videos: nothing moves or differs from the background")
        unit = cat["unit"].astype(np.int64)
        folds_of_objects = np.array([fold_of[int(u)] for u in unit])
        if np.unique(folds_of_objects).size < 2:
            raise DatasetError("objects were found in only one fold of the training videos; give more normal footage")
        raw = self.density.fit(self._vectors(cat["speed"], cat["geometry"], cat["appearance"]), folds_of_objects)
        scaled = self.density.scaled(raw)
        frame = cat["frame"].astype(np.int64)
        runs, maxima = [], []
        for u in range(len(units)):
            m = unit == u
            s = frame_terms(scaled[m], frame[m], n_frames[u]).sum(1)
            maxima.append(frame_terms(scaled[m].sum(1)[:, None], frame[m], n_frames[u])[:, 0])  # the map's maximum: the top object's score
            sm = TemporalSmoother(self.temporal_sigma)
            runs.append(np.array([v for x in s for _, v in sm.push(float(x))] + [v for _, v in sm.flush()]))
        self.fps = self.fps or video_fps(vids[0])
        threshold, alpha, episodes = episode_threshold(runs, self.fps, self.alarms_per_hour)
        self.false_alarm_rate = alpha
        self.calibration = Calibration.from_scores(np.concatenate(runs), np.concatenate(maxima), alpha, "cross-fit")
        minutes = sum(n_frames) / self.fps / 60
        self.calibration.note = (
            f"lowest threshold with at most {self.alarms_per_hour:g} false-alarm episodes per hour on {minutes:.1f} min of normal "
            f"footage ({sum(n_frames)} frames at {self.fps:g} fps, each scored by a model fitted without its fold): {episodes} episodes"
        )
        self.fit_info = {
            "train_videos": [str(s) for s in units], "folds": [[video_name(units[u].video) for u in g] for g in groups],
            "n_train_frames": int(sum(n_frames)), "n_objects": int(len(frame)), "calibration_part_frames": [int(n) for n in n_frames],
            "scales": dict(self.density.scales), "offsets": dict(self.density.offsets), "seconds_frames": round(t1 - t0, 2), "seconds_total": round(time.perf_counter() - t0, 2),
        }
        return self

    # ------------------------------------------------------------------ predict
    def _score_frame(self, fo: FrameObjects) -> tuple[float, list[ObjectScore], np.ndarray, dict[str, float], str]:
        """A frame's raw score, its objects (most abnormal first), its anomaly map (each box filled with
        its object's score), its terms (each attribute's largest object score) and its cause."""
        amap = np.zeros(fo.hw, np.float32)
        if not len(fo):
            return 0.0, [], amap, {}, ""
        scaled = self.density.scaled(self.density.raw(self._vectors(fo.speed, fo.geometry, fo.appearance)))
        obj = scaled.sum(1)
        objects = []
        for j in np.argsort(-obj):
            x0, y0, x1, y1 = (int(v) for v in fo.boxes[j])
            scores = {a: float(scaled[j, i]) for i, a in enumerate(self.attributes)}
            objects.append(ObjectScore(int(fo.tracks[j]), (x0, y0, x1, y1), scores, float(obj[j]), max(scores, key=scores.get)))
        for o in reversed(objects):  # the most abnormal drawn last, on top
            x0, y0, x1, y1 = o.box
            amap[y0:y1, x0:x1] = np.maximum(amap[y0:y1, x0:x1], o.score)
        terms = {a: float(scaled[:, i].max()) for i, a in enumerate(self.attributes)}
        return float(sum(terms.values())), objects, amap, terms, max(terms, key=terms.get)

    def predict_stream(self, video: str | os.PathLike, *, keep_frames: bool = False) -> Iterator[FramePrediction]:
        """Score a video frame by frame, holding only the frames of the smoothing window.

        Yields :class:`FramePrediction` in frame order (with ``objects``), each ``delay`` frames after
        its frame was read.

        Raises:
            NotFittedError: not fitted.
            ConfigError: frames of another size than the training video's.
            VideoReadError: the video cannot be opened, or stops early; raised after the frames read
                before the error have been yielded.
        """
        self._check_fitted()

        def finish(item, smoothed: float) -> FramePrediction:
            fo, raw, objects, amap, terms, cause = item
            mask = amap > self.pixel_threshold
            return FramePrediction(
                index=fo.index, pred_score=smoothed, raw_score=raw, pred_label=int(smoothed > self.threshold), anomaly_map=amap,
                pred_mask=mask, motion_score=terms.get("speed", float("nan")), appearance_score=terms.get("appearance", float("nan")),
                cause=cause, objects=objects, image=fo.image if keep_frames else None,
            )

        def parts():
            for fo in self._pipeline().frames(video, keep_frames=keep_frames):
                raw, objects, amap, terms, cause = self._score_frame(fo)
                yield (fo, raw, objects, amap, terms, cause), raw

        for item, s in smoothed_stream(parts(), self.temporal_sigma):
            yield finish(item, s)

    # ------------------------------------------------------------------ persistence
    def _state(self) -> tuple[dict, dict]:
        assert self.background is not None
        tensors = {"background": torch.from_numpy(self.background)}
        tensors.update({f"bank.{a}": torch.from_numpy(b) for a, b in self.density.banks.items()})
        return tensors, {"scales": dict(self.density.scales), "offsets": dict(self.density.offsets), "fps": self.fps}

    def _restore(self, state: dict, tensors: dict, where: str) -> None:
        self.background = check_tensor(tensors, "background", (None, None), where).numpy()
        dims = {"speed": VELOCITY_DIM + 2, "size": 4, "appearance": None}
        for a in self.attributes:
            self.density.banks[a] = check_tensor(tensors, f"bank.{a}", (None, dims[a]), where).numpy()
            self.density.scales[a] = float(state["scales"][a])
            self.density.offsets[a] = float(state["offsets"][a])
        self.fps = float(state["fps"])


__all__ = ["ATTRIBUTES", "ObjectVideoDetector"]
