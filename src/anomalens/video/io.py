"""Video sources, read one frame at a time: a folder of frame images (UCSD layout) or a video file.

A video is never loaded whole: :func:`iter_frames` yields ``(index, uint8 RGB (H, W, 3))`` frames in
order, so a long video costs the memory of a few frames. Everything that can go wrong is a
:class:`~anomalens.errors.VideoReadError` naming the video, raised *where* it goes wrong, after the
frames before it were yielded (their results are kept by the callers):

* a file OpenCV cannot open (missing, not a video, an MP4 cut before its index);
* a file that ends before the frame count in its header (a truncated AVI);
* a frame image that cannot be read, or a frame whose size differs from the first.

Layouts (:func:`list_videos`): a dataset root with ``frames/`` (UCSD: ``training/frames/NN``), a folder
of per-video frame folders and/or video files, a single frame folder, or a single video file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

from ..errors import DatasetError, ImageReadError, VideoReadError
from ..io import is_image_file, read_image

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".webm")


def is_video_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(VIDEO_EXTENSIONS)


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


def frame_paths(folder: str | os.PathLike) -> list[Path]:
    """The frame images of a frame folder, in natural order (``2.jpg`` before ``10.jpg``)."""
    return sorted((p for p in Path(folder).iterdir() if p.is_file() and is_image_file(p)), key=_natural_key)


def list_videos(root: str | os.PathLike) -> list[Path]:
    """Videos under ``root`` (see the module docstring for the layouts), sorted by name.

    Raises:
        DatasetError: ``root`` does not exist or holds no video.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root} does not exist")
    if root.is_file():
        if not is_video_file(root):
            raise DatasetError(f"{root} is not a video file ({', '.join(VIDEO_EXTENSIONS)})")
        return [root]
    if (root / "frames").is_dir():
        root = root / "frames"
    if any(is_image_file(p) for p in root.iterdir() if p.is_file()):
        return [root]
    videos = [p for p in root.iterdir() if (p.is_dir() and frame_paths(p)) or (p.is_file() and is_video_file(p))]
    if not videos:
        raise DatasetError(f"{root} holds no video: expected frame folders, video files, or frames/")
    return sorted(videos, key=_natural_key)


def as_videos(videos: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """A folder or file in a :func:`list_videos` layout, or a list of videos, as a list of paths.

    Raises:
        DatasetError: as :func:`list_videos`.
    """
    return list_videos(videos) if isinstance(videos, (str, os.PathLike)) else [Path(v) for v in videos]


def video_name(video: str | os.PathLike) -> str:
    """A short name: the folder name or the file stem."""
    p = Path(video)
    return p.stem if p.is_file() else p.name


def iter_frames(video: str | os.PathLike) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(index, frame)`` with ``frame`` ``uint8`` RGB ``(H, W, 3)``, one at a time.

    Raises:
        VideoReadError: as in the module docstring; ``frames_read`` says how many were yielded.
    """
    p = Path(video)
    if p.is_dir():
        yield from _iter_folder(p)
    elif p.is_file():
        yield from _iter_file(p)
    else:
        raise VideoReadError(p, "does not exist")


def _check_size(p: Path, i: int, frame: np.ndarray, first: tuple[int, int] | None) -> tuple[int, int]:
    hw = frame.shape[:2]
    if first is not None and hw != first:
        raise VideoReadError(p, f"frame {i} is {hw[1]}x{hw[0]}, the first frame {first[1]}x{first[0]}", i)
    return hw


def _iter_folder(p: Path) -> Iterator[tuple[int, np.ndarray]]:
    paths = frame_paths(p)
    if not paths:
        raise VideoReadError(p, "the folder holds no frame images")
    first = None
    for i, fp in enumerate(paths):
        try:
            frame = read_image(fp)
        except ImageReadError as exc:
            raise VideoReadError(p, f"frame {i} ({fp.name}) is unreadable: {exc.reason}", i) from None
        first = _check_size(p, i, frame, first)
        yield i, frame


def _iter_file(p: Path) -> Iterator[tuple[int, np.ndarray]]:
    cap = cv2.VideoCapture(str(p))
    try:
        if not cap.isOpened():
            raise VideoReadError(p, "OpenCV cannot open it (not a video, unsupported codec, or cut before its index)")
        declared = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        first = None
        i = 0
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            frame = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            first = _check_size(p, i, frame, first)
            yield i, frame
            i += 1
        if i == 0:
            raise VideoReadError(p, "no frame could be decoded")
        if declared > 0 and i < declared:
            raise VideoReadError(p, f"it ends after {i} of the {declared} frames its header declares (truncated or corrupt)", i)
    finally:
        cap.release()


def video_fps(video: str | os.PathLike, default: float = 10.0) -> float:
    """Frame rate of a video file (``default`` for frame folders, or when the file does not say)."""
    p = Path(video)
    if p.is_file():
        cap = cv2.VideoCapture(str(p))
        try:
            fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        finally:
            cap.release()
        if 0 < fps < 1000:
            return fps
    return default
