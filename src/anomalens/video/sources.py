"""Normal footage as the fitting sees it: segments of videos, the folds of cross-fit calibration,
and compact storage of per-frame tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from ..errors import DatasetError
from .io import frame_paths, iter_frames, video_name

#: ``progress(stage, done, total)``
Progress = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    """A :data:`Progress` that reports nothing."""
    return None


@dataclass
class Segment:
    """Frames ``[start, stop)`` of a video (stop None = to the end)."""

    video: Path
    start: int = 0
    stop: int | None = None

    def frames(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(index, frame)`` of the segment's frames."""
        for i, frame in iter_frames(self.video):
            if self.stop is not None and i >= self.stop:
                return
            if i >= self.start:
                yield i, frame

    def __str__(self) -> str:
        return f"{self.video}[{self.start}:{self.stop or ''}]"


def count_frames(video: Path) -> int:
    """Frames of a video (folder: its images; file: read through once)."""
    if video.is_dir():
        return len(frame_paths(video))
    return sum(1 for _ in iter_frames(video))


def split_units(videos: list[Path], parts: int) -> list[Segment]:
    """The pieces of normal footage that fit and calibration are split by: whole videos, or the
    ``parts`` consecutive parts of a single video.

    Raises:
        DatasetError: a single video shorter than ``2 * parts`` frames.
    """
    if len(videos) > 1:
        return [Segment(v) for v in videos]
    n = count_frames(videos[0])
    if n < 2 * parts:
        raise DatasetError(f"{videos[0]} has {n} frames; a single training video needs at least {2 * parts} (it is cut into {parts} parts)")
    cuts = [round(k * n / parts) for k in range(parts + 1)]
    return [Segment(videos[0], cuts[k], cuts[k + 1] if k + 1 < parts else None) for k in range(parts)]


def fold_groups(n_units: int, folds: int, seed: int) -> list[list[int]]:
    """Indices of the units scored together, each group against memories of the others (cross-fit):
    ``min(folds, n_units)`` groups, units dealt at random (``seed``)."""
    order = np.random.default_rng(seed).permutation(n_units)
    k = min(folds, n_units)
    return [sorted(order[j::k].tolist()) for j in range(k)]


class Rows:
    """Per-frame tensors of one shape, copied into blocks of ``block`` frames.

    Keeping thousands of small tensors (a frame's motion descriptor: tens of KB), each allocated
    among large freed temporaries (the flow histograms, megabytes a frame), fragments the C heap:
    resident memory grows to many times what the tensors weigh. Copied into blocks, they cost what
    they weigh (measured reason: docs/design/decisions.md, "Video").
    """

    def __init__(self, block: int = 256):
        self.block = block
        self._blocks: list[torch.Tensor] = []
        self._used = 0

    def append(self, t: torch.Tensor) -> torch.Tensor:
        """Copy ``t`` in; returns the stored view (same shape, dtype and values)."""
        if not self._blocks or self._used == self.block or self._blocks[-1].shape[1:] != t.shape:
            self._blocks.append(torch.empty((self.block, *t.shape), dtype=t.dtype))
            self._used = 0
        row = self._blocks[-1][self._used]
        row.copy_(t)
        self._used += 1
        return row


def iter_labelled(videos: Iterable[Path], labels: dict[str, list[int]]) -> Iterator[tuple[Path, list[int]]]:
    """``(video, frame labels)`` pairs; the labels are looked up by video name.

    Raises:
        DatasetError: a video without labels.
    """
    for v in videos:
        name = video_name(v)
        if name not in labels:
            raise DatasetError(f"no frame labels for video {name!r} (labels cover {sorted(labels)[:6]}...)")
        yield v, labels[name]
