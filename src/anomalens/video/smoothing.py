"""Temporal smoothing of a frame-score curve, online.

Abnormal events last for many frames, while single-frame score spikes are mostly flow or feature
noise: the literature smooths the frame-score curve with a 1-D Gaussian before thresholding and
before the frame AUC (e.g. Georgescu et al., "Anomaly Detection in Video via Self-Supervised and
Multi-Task Learning", CVPR 2021). Here it is causal up to a fixed delay: the smoothed score of frame
``t`` is known once frame ``t + radius`` has arrived (``radius = ceil(3 sigma)`` frames; 3 frames,
0.3 s at 10 fps, for the default sigma = 1), so a stream is scored with that latency and never held in memory.
At the ends of a video the kernel is truncated and renormalised. The same code path serves fitting
(calibration) and prediction, so both see the same numbers.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Iterable, Iterator, TypeVar

import numpy as np

from ..errors import VideoReadError

T = TypeVar("T")


class TemporalSmoother:
    """Centred Gaussian smoothing of a stream of scores with delay ``radius``.

    Args:
        sigma: standard deviation in frames; 0 = no smoothing (no delay).

    ``push(score)`` returns the ``(index, smoothed score)`` pairs that became final (at most one);
    ``flush()`` returns the rest at the end of the stream.
    """

    def __init__(self, sigma: float):
        self.sigma = float(sigma)
        self.radius = int(math.ceil(3 * sigma)) if sigma > 0 else 0
        x = np.arange(-self.radius, self.radius + 1, dtype=np.float64)
        self.kernel = np.exp(-0.5 * (x / sigma) ** 2) if sigma > 0 else np.ones(1)
        self._buf: deque[float] = deque()  # scores of frames first .. last
        self._first = 0  # index of _buf[0]
        self._next_out = 0
        self._n = 0

    def _value(self, t: int, last: int) -> float:
        lo, hi = max(0, t - self.radius), min(last, t + self.radius)
        vals = np.array([self._buf[i - self._first] for i in range(lo, hi + 1)])
        w = self.kernel[lo - t + self.radius : hi - t + self.radius + 1]
        return float((vals * w).sum() / w.sum())

    def _trim(self) -> None:
        while self._buf and self._first < self._next_out - self.radius:
            self._buf.popleft()
            self._first += 1

    def push(self, score: float) -> list[tuple[int, float]]:
        self._buf.append(float(score))
        self._n += 1
        out = []
        while self._next_out + self.radius <= self._n - 1:
            out.append((self._next_out, self._value(self._next_out, self._n - 1)))
            self._next_out += 1
        self._trim()
        return out

    def flush(self) -> list[tuple[int, float]]:
        out = []
        while self._next_out < self._n:
            out.append((self._next_out, self._value(self._next_out, self._n - 1)))
            self._next_out += 1
        self._trim()
        return out


def smoothed_stream(parts: Iterable[tuple[T, float]], sigma: float) -> Iterator[tuple[T, float]]:
    """``(item, smoothed score)`` for each ``(item, raw score)`` of ``parts`` (one per frame, in
    order), each ``radius`` frames after it arrived; only the window's items are held.

    Raises:
        VideoReadError: from ``parts``, after the items that arrived before it have been yielded.
    """
    smoother = TemporalSmoother(sigma)
    pending: deque = deque()
    try:
        for item, raw in parts:
            pending.append(item)
            for _, s in smoother.push(raw):
                yield pending.popleft(), s
    except VideoReadError:
        for _, s in smoother.flush():
            yield pending.popleft(), s
        raise
    for _, s in smoother.flush():
        yield pending.popleft(), s


def smooth(scores: np.ndarray, sigma: float) -> np.ndarray:
    """Offline :class:`TemporalSmoother` of a whole curve, ``float64`` ``(T,)``."""
    sm = TemporalSmoother(sigma)
    out = [v for s in scores for _, v in sm.push(s)] + [v for _, v in sm.flush()]
    return np.asarray(out, dtype=np.float64)
