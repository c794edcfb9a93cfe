"""From frames to described objects: flow, foreground boxes, tracks and attributes, frame by frame.

:class:`ObjectPipeline` holds what a video's frames go through (the background, the optical flow, the
crop embedder); :meth:`ObjectPipeline.frames` streams one video's :class:`FrameObjects`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np

from .attributes import VELOCITY_DIM, CropEmbedder, geometry, object_velocity
from .io import iter_frames
from .motion import FlowComputer
from .objects import ForegroundBoxes, IoUTracker, ObjectParams, median_background, on_border


@dataclass
class FrameObjects:
    """The objects of one frame.

    Attributes:
        index: frame number (0-based).
        boxes: ``int32`` ``(N, 4)`` ``x0, y0, x1, y1`` in the frame's pixels.
        tracks: ``int64`` ``(N,)`` track ids (unique within the video).
        speed: ``float32`` ``(N, VELOCITY_DIM)`` velocity (:func:`~anomalens.video.attributes.object_velocity`) averaged over the track's last frames.
        geometry: ``float32`` ``(N, 4)`` (:func:`~anomalens.video.attributes.geometry`).
        appearance: ``float32`` ``(N, D)`` crop embeddings (``(N, 0)`` when appearance is off).
        hw: the frame's ``(H, W)``.
        image: the frame (``uint8`` RGB) when asked for, else None.
    """

    index: int
    boxes: np.ndarray
    tracks: np.ndarray
    speed: np.ndarray
    geometry: np.ndarray
    appearance: np.ndarray
    hw: tuple[int, int]
    image: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.boxes)


class ObjectPipeline:
    """Finds, tracks and describes the objects of a fixed camera's frames.

    Args:
        background: ``float32`` ``(H, W)`` empty scene (:meth:`background_of`).
        params: :class:`~anomalens.video.objects.ObjectParams`.
        embedder: :class:`~anomalens.video.attributes.CropEmbedder`, or None (no appearance).
        track_frames: frames the speed is averaged over along a track.
        min_height: boxes less tall (pixels) are tracked but not described or scored.

    A box touching the frame's border takes its track's speed and appearance from the last frame it
    was off the border (:meth:`~anomalens.video.objects.IoUTracker.off_border`): a walker half out of
    the frame neither looks slow for its place nor like half a person.
    """

    def __init__(
        self, background: np.ndarray, params: ObjectParams, embedder: CropEmbedder | None, track_frames: int = 5, min_height: int = 12
    ):
        self.background = np.asarray(background, np.float32)
        self.params = params.check()
        self.embedder = embedder
        self.track_frames = int(track_frames)
        self.min_height = int(min_height)
        self.flow = FlowComputer(finest_scale=0)

    def _appearance(self, rgb: np.ndarray, boxes: np.ndarray, ids: np.ndarray, edge: np.ndarray, tracker: IoUTracker) -> np.ndarray:
        """``float32`` ``(N, D)`` crop embeddings; a box on the border whose track was seen off it
        takes that embedding (and is not embedded); ``(N, 0)`` without an embedder."""
        if self.embedder is None:
            return np.zeros((len(boxes), 0), np.float32)
        app = np.zeros((len(boxes), self.embedder.dim), np.float32)
        own = np.array([not e or not tracker.remembers(int(t), "appearance") for t, e in zip(ids, edge)], bool)
        if own.any():
            app[own] = self.embedder(rgb, boxes[own])
        for j, (t, e) in enumerate(zip(ids, edge)):
            app[j] = tracker.off_border(int(t), app[j], bool(e), "appearance")
        return app

    @staticmethod
    def background_of(videos: list[os.PathLike], every: int = 10) -> np.ndarray:
        """The median of every ``every``-th frame of ``videos`` (grayscale): the empty scene, ``float32`` ``(H, W)``.

        Raises:
            VideoReadError: unreadable frames; ConfigError: frames of different sizes.
        """
        grays = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for v in videos for i, f in iter_frames(v) if i % every == 0]
        return median_background(grays)

    def frames(self, video: str | os.PathLike, keep_frames: bool = False) -> Iterator[FrameObjects]:
        """Stream the :class:`FrameObjects` of one video (frame 0 has no flow: its speeds are 0).

        Raises:
            VideoReadError: an unreadable frame (the frames before it were yielded).
            ConfigError: frames whose size is not the background's.
        """
        fg = ForegroundBoxes(self.background, self.params)
        tracker = IoUTracker(history=self.track_frames)
        prev = None
        for i, rgb in iter_frames(video):
            gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            flow = self.flow(prev, gray) if prev is not None else None
            prev = gray
            boxes, mask = fg(gray, flow)
            ids = tracker.update(boxes)
            speed = np.zeros((len(boxes), VELOCITY_DIM), np.float32)
            edge = on_border(boxes, gray.shape)
            if flow is not None and len(boxes):  # every track's history, so that scoring fewer objects changes no speed
                speed = np.stack([tracker.mean_of(int(t), v) for t, v in zip(ids, object_velocity(flow, boxes, mask))])
                speed = np.stack([tracker.off_border(int(t), v, e) for t, v, e in zip(ids, speed, edge)])
            tall = (boxes[:, 3] - boxes[:, 1]) >= self.min_height
            boxes, ids, speed, edge = boxes[tall], ids[tall], speed[tall], edge[tall]
            app = self._appearance(rgb, boxes, ids, edge, tracker)
            yield FrameObjects(i, boxes, ids, speed.astype(np.float32), geometry(boxes, gray.shape), app, gray.shape, rgb if keep_frames else None)
