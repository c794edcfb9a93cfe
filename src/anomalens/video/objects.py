"""Objects of a fixed camera's frames: a background model, foreground boxes, and a small IoU tracker.

No detector weights ship offline, so objects are found the way a fixed camera allows: a pixel is
foreground where the frame differs from the background (the median of normal frames, adapted slowly
to light where nothing is seen) or where it moves (optical flow above a speed). Foreground pixels are
closed into blobs; each connected blob large enough is an object with its box. A group walking side
by side is one object; the training footage holds such groups too, so its size at its place is normal.

Tracking (:class:`IoUTracker`) matches each box to the previous frame's boxes by overlap (greedy,
highest intersection over union first), so that an object keeps its id and its speed can be averaged
over the last frames of its track; a box cut by the frame's border keeps its track's speed from
before it touched the border.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import ConfigError


@dataclass
class ObjectParams:
    """How foreground becomes objects.

    Attributes:
        diff: grey-level difference (0-255) from the background that makes a pixel foreground.
        speed: flow magnitude (pixels per frame) that makes a pixel foreground.
        min_area: smallest blob kept, in pixels (at the frame's resolution).
        close: side in pixels of the square that closes gaps between parts of one object.
        adapt: rate at which the background follows the frame where no object is (0 = fixed).
    """

    diff: float = 25.0
    speed: float = 1.0
    min_area: int = 60
    close: int = 7
    adapt: float = 0.02

    def check(self) -> "ObjectParams":
        """Raise :class:`ConfigError` on values out of range; returns self."""
        if not (0 < self.diff < 255 and self.speed > 0 and self.min_area >= 1 and self.close >= 1 and 0 <= self.adapt < 1):
            raise ConfigError(f"invalid object parameters {self}: need 0 < diff < 255, speed > 0, min_area >= 1, close >= 1, 0 <= adapt < 1")
        return self


def median_background(grays: list[np.ndarray]) -> np.ndarray:
    """The per-pixel median of ``uint8`` ``(H, W)`` frames: ``float32`` ``(H, W)``, the empty scene.

    Raises:
        ConfigError: no frames, or frames of different sizes.
    """
    if not grays:
        raise ConfigError("no frames to build a background from")
    if len({g.shape for g in grays}) != 1:
        raise ConfigError(f"frames of different sizes: {sorted({g.shape for g in grays})}")
    return np.median(np.stack(grays), axis=0).astype(np.float32)


class ForegroundBoxes:
    """Boxes of the moving or new things in each frame of one video (state: the adapted background).

    Args:
        background: ``float32`` ``(H, W)`` empty scene (:func:`median_background`); copied.
        params: :class:`ObjectParams`.
    """

    def __init__(self, background: np.ndarray, params: ObjectParams):
        self.bg = np.array(background, dtype=np.float32, copy=True)
        self.p = params.check()
        self._kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (params.close, params.close))

    def __call__(self, gray: np.ndarray, flow: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One frame: ``uint8`` ``(H, W)`` and its flow ``float32`` ``(H, W, 2)`` (None for the first).

        Returns:
            boxes ``int32`` ``(N, 4)`` as ``x0, y0, x1, y1`` (exclusive ends), largest first, and the
            foreground mask ``bool`` ``(H, W)``.

        Raises:
            ConfigError: the frame's size is not the background's.
        """
        if gray.shape != self.bg.shape:
            raise ConfigError(f"frame of {gray.shape[1]}x{gray.shape[0]} px, the background is {self.bg.shape[1]}x{self.bg.shape[0]}: another camera or resolution")
        g = gray.astype(np.float32)
        fg = np.abs(g - self.bg) > self.p.diff
        if flow is not None:
            fg |= (flow[..., 0] ** 2 + flow[..., 1] ** 2) > self.p.speed ** 2
        m = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, self._kernel)
        n, _, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= self.p.min_area]
        keep.sort(key=lambda i: -stats[i, cv2.CC_STAT_AREA])
        boxes = np.array([[stats[i, 0], stats[i, 1], stats[i, 0] + stats[i, 2], stats[i, 1] + stats[i, 3]] for i in keep], np.int32).reshape(-1, 4)
        if self.p.adapt > 0:
            still = m == 0
            self.bg[still] += self.p.adapt * (g[still] - self.bg[still])
        return boxes, m.astype(bool)


def on_border(boxes: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``bool`` ``(N,)``: which boxes ``(N, 4)`` (``x0, y0, x1, y1``, exclusive ends) touch the border of a frame of ``hw = (H, W)``."""
    b = np.asarray(boxes).reshape(-1, 4)
    return (b[:, 0] <= 0) | (b[:, 1] <= 0) | (b[:, 2] >= hw[1]) | (b[:, 3] >= hw[0])


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes ``(N, 4)`` and ``(M, 4)`` (``x0, y0, x1, y1``): ``(N, M)``."""
    a = a.astype(np.float64)[:, None]
    b = b.astype(np.float64)[None]
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


class IoUTracker:
    """Greedy IoU tracker: a box continues the track of the previous frame's box it overlaps most.

    Args:
        min_iou: least overlap that continues a track.
        max_missed: frames a track survives unseen (then its id is not reused).
        history: frames of per-track values kept (:meth:`mean_of`).
    """

    def __init__(self, min_iou: float = 0.2, max_missed: int = 2, history: int = 5):
        self.min_iou, self.max_missed, self.history = float(min_iou), int(max_missed), int(history)
        self._next = 0
        self._tracks: dict[int, dict] = {}

    def update(self, boxes: np.ndarray) -> np.ndarray:
        """Assign ids to one frame's boxes ``int (N, 4)``: returns ``int64`` ``(N,)`` track ids."""
        ids = np.full(len(boxes), -1, np.int64)
        live = [t for t, v in self._tracks.items()]
        if live and len(boxes):
            iou = box_iou(boxes, np.stack([self._tracks[t]["box"] for t in live]))
            for flat in np.argsort(-iou, axis=None):
                i, j = np.unravel_index(flat, iou.shape)
                if iou[i, j] < self.min_iou:
                    break
                if ids[i] < 0 and live[j] is not None:
                    ids[i] = live[j]
                    live[j] = None  # type: ignore[call-overload]
        for i in range(len(boxes)):
            if ids[i] < 0:
                ids[i] = self._next
                self._tracks[self._next] = {"values": []}
                self._next += 1
            self._tracks[int(ids[i])].update(box=boxes[i], missed=0)
        for t in list(self._tracks):
            if t not in set(ids.tolist()):
                self._tracks[t]["missed"] += 1
                if self._tracks[t]["missed"] > self.max_missed:
                    del self._tracks[t]
        return ids

    def off_border(self, track: int, value: np.ndarray, on_border: bool, what: str = "speed") -> np.ndarray:
        """``value`` for a box off the frame's border (it is remembered as ``track``'s ``what``); for a
        box touching the border, the ``what`` last remembered for its track (``value`` if none): a
        person cut by the frame's edge shows only part of its motion and of itself, its track knows
        the whole."""
        inner = self._tracks[track].setdefault("inner", {})
        if not on_border:
            inner[what] = np.asarray(value, np.float32)
            return inner[what]
        return inner.get(what, np.asarray(value, np.float32))

    def remembers(self, track: int, what: str) -> bool:
        """Whether ``track`` has a ``what`` from a frame where it was off the border (:meth:`off_border`)."""
        return what in self._tracks[track].get("inner", {})

    def mean_of(self, track: int, value: np.ndarray) -> np.ndarray:
        """Record ``value`` for ``track`` this frame; returns the mean of its last ``history`` values."""
        vals = self._tracks[track]["values"]
        vals.append(np.asarray(value, np.float32))
        del vals[: -self.history]
        return np.mean(vals, axis=0)
