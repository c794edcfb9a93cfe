"""Synthetic abnormal events inserted into normal video, with exact frame labels.

Real abnormal footage is scarce (UCSD Ped2 has twelve labelled test videos), so a setting checked only
on it is checked on very little. Following the anomaly-synthesis line for images (DRAEM, Zavrtanik et
al., ICCV 2021: paste foreign texture into normal images; SeaS, 2025), this module pastes moving
objects into *normal* video of the same camera, which can be had in any quantity:

* ``fast``: a person cut from the scene moves along the walking direction at cyclist speed (0.15
  body heights per frame, about 2.5 times walking pace, which is near 0.06 in UCSD Ped2);
* ``cross``: a person moves at right angles to the usual direction of travel (down the frame) at a
  brisk pace (0.08 body heights per frame);
* ``object``: a foreign object (a textured block cut from the top of the frame: bushes, building,
  with a person's height and 1.5 times as wide, like a cart) moves at walking pace (0.06 per frame);
* ``still``: the same kind of foreign object stands on the walkway, not moving.

People are found without labels: the median of a video's frames is its empty background; connected
regions that differ from it, taller than wide, are people (each with its own alpha mask). Their
heights against their foot row give the camera's perspective (a straight line fitted by least
squares), so an inserted object has the size of a person at the place it is drawn, and its speed
scales with that size: far objects are small and slow in pixels, as real ones are.

A frame is labelled abnormal while at least 30% of the object's area is inside the frame.

An object that appears or vanishes in the middle of the frame from one frame to the next is not
something a camera sees, and it is not harmless to the measure: optical flow between the frame with
the object and the frame without it is large and meaningless, and a detector's temporal smoothing
carries that spike into the normal frames beside the event. With ``fade`` (frames), such an object
comes and goes gradually instead: its opacity ramps up over the first ``fade`` frames (unless it
enters at the frame's edge) and down over the last ``fade`` frames, and its visible fraction, which
decides the label, counts the opacity.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ..atomic import write_text
from ..errors import ConfigError, DatasetError
from .io import as_videos, iter_frames, video_name

#: speed of each event kind, in body heights per frame (horizontal, vertical)
KIND_SPEED = {"fast": (0.15, 0.0), "cross": (0.0, 0.08), "object": (0.06, 0.0), "still": (0.0, 0.0)}
KINDS = tuple(KIND_SPEED)
#: frames over which an object appears and vanishes (see the module's docstring)
DEFAULT_FADE = 4


@dataclass
class Sprite:
    """An object to paste: ``rgb`` ``uint8`` ``(h, w, 3)`` and ``alpha`` ``float32`` ``(h, w)`` in [0, 1]."""

    rgb: np.ndarray
    alpha: np.ndarray


@dataclass
class Perspective:
    """Apparent person height in pixels at a foot row ``y``: ``max(min_height, a * y + b)``."""

    a: float
    b: float
    #: foot rows where people were seen (10th and 90th percentile), pixels
    rows: tuple[float, float]
    min_height: float = 6.0
    max_height: float = 1e9

    def height(self, y: float) -> float:
        return float(np.clip(self.a * y + self.b, self.min_height, self.max_height))


@dataclass
class SyntheticEvent:
    """One inserted event: frames ``[start, stop)`` of its video, and the path of the object's foot
    point: (x0, y0) at ``start``, then (vx, vy) pixels per frame."""

    video: str
    kind: str
    start: int
    stop: int
    x0: float
    y0: float
    vx: float
    vy: float


def _background(frames: list[np.ndarray]) -> np.ndarray:
    return np.median(np.stack(frames[:: max(1, len(frames) // 40)]), axis=0).astype(np.uint8)


def find_people(frames: list[np.ndarray], max_sprites: int = 40) -> tuple[list[Sprite], list[tuple[float, float]]]:
    """People in a normal video, found as regions that differ from its median frame.

    Args:
        frames: ``uint8`` RGB ``(H, W, 3)`` frames of one fixed-camera video.
        max_sprites: cut-outs returned (the largest regions first).

    Returns:
        cut-outs, and ``(foot row, height)`` in pixels of every person-like region found (for
        :func:`fit_perspective`).
    """
    bg = _background(frames).astype(np.int16)
    sprites, sizes = [], []
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    for f in frames[:: max(1, len(frames) // 30)]:
        diff = np.abs(f.astype(np.int16) - bg).max(-1)
        fg = cv2.morphologyEx((diff > 30).astype(np.uint8), cv2.MORPH_CLOSE, kernel, iterations=2)
        n, lab, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
        H, W = fg.shape
        for i in range(1, n):
            x, y, w, h, area = stats[i]
            if h < 8 or area < 30 or not 1.5 <= h / max(w, 1) <= 4.0 or x == 0 or y == 0 or x + w >= W or y + h >= H:
                continue
            sizes.append((float(y + h), float(h)))
            alpha = cv2.GaussianBlur((lab[y : y + h, x : x + w] == i).astype(np.float32), (3, 3), 0.7)
            sprites.append((area, Sprite(f[y : y + h, x : x + w].copy(), alpha)))
    sprites.sort(key=lambda t: -t[0])
    return [s for _, s in sprites[:max_sprites]], sizes


def fit_perspective(sizes: Sequence[tuple[float, float]], frame_height: int) -> Perspective:
    """Least-squares line of person height against foot row (pixels), through the median height of
    five bands of foot rows, capped at the 90th percentile of the heights seen; events are drawn
    between the 10th and 90th percentile of the foot rows seen. A flat 1/8 of the frame height
    when fewer than 10 people were found or the fit is not plausible (heights must grow downwards)."""
    if len(sizes) >= 10:
        y, h = np.asarray(sizes).T
        # the median height per band of foot rows (merged groups of people are tall outliers)
        edges = np.quantile(y, np.linspace(0, 1, 6))
        band = np.clip(np.searchsorted(edges, y, side="right") - 1, 0, 4)
        yb = np.array([np.median(y[band == k]) for k in range(5) if (band == k).any()])
        hb = np.array([np.median(h[band == k]) for k in range(5) if (band == k).any()])
        a, b = np.polyfit(yb, hb, 1) if yb.size >= 2 else (0.0, 0.0)
        if a > 0 and a * frame_height + b > 0:
            lo, hi = np.quantile(y, [0.1, 0.9])
            return Perspective(float(a), float(b), max_height=float(np.quantile(h, 0.9)), rows=(float(lo), float(hi)))
    return Perspective(0.0, frame_height / 8, rows=(0.45 * frame_height, 0.95 * frame_height))


def _foreign_object(frame: np.ndarray, height: int, rng: np.random.Generator) -> Sprite:
    """A block cut from the top fifth of the frame (scene content that never walks), ``height`` tall,
    1.5 times as wide, with soft edges."""
    H, W = frame.shape[:2]
    top = frame[: max(8, H // 5)]
    th, tw = top.shape[:2]
    y = int(rng.integers(0, max(1, th - 4)))
    x = int(rng.integers(0, max(1, tw - 8)))
    patch = top[y : y + max(4, th // 2), x : x + max(8, tw // 6)]
    width = max(4, round(1.5 * height))
    rgb = cv2.resize(patch, (width, height), interpolation=cv2.INTER_LINEAR)
    rgb = np.clip(rgb.astype(np.float32) * 0.8, 0, 255).astype(np.uint8)  # darker than its source: an object, not scenery
    alpha = np.ones((height, width), np.float32)
    alpha[:, :1] = alpha[:, -1:] = alpha[:1] = alpha[-1:] = 0.5
    return Sprite(rgb, alpha)


def _paste(frame: np.ndarray, sprite: Sprite, cx: float, foot: float, opacity: float = 1.0) -> float:
    """Alpha-blend ``sprite`` (its alpha times ``opacity``) with its bottom centre at ``(cx, foot)``;
    returns the visible fraction, opacity counted (the pasted alpha over the sprite's full alpha)."""
    h, w = sprite.alpha.shape
    x0, y0 = int(round(cx - w / 2)), int(round(foot - h))
    H, W = frame.shape[:2]
    xa, ya, xb, yb = max(0, x0), max(0, y0), min(W, x0 + w), min(H, y0 + h)
    if xa >= xb or ya >= yb:
        return 0.0
    a = opacity * sprite.alpha[ya - y0 : yb - y0, xa - x0 : xb - x0, None]
    region = frame[ya:yb, xa:xb].astype(np.float32)
    frame[ya:yb, xa:xb] = (a * sprite.rgb[ya - y0 : yb - y0, xa - x0 : xb - x0] + (1 - a) * region).astype(np.uint8)
    return float(a.sum() / max(sprite.alpha.sum(), 1e-6))


def insert_events(
    frames: list[np.ndarray], kinds: Sequence[str], rng: np.random.Generator, *, video: str = "", people: list[Sprite] | None = None,
    perspective: Perspective | None = None, duration: int = 40, min_visible: float = 0.3, fade: int = DEFAULT_FADE,
) -> tuple[list[np.ndarray], list[int], list[SyntheticEvent]]:
    """Paste one event of each kind in ``kinds`` into a copy of a normal video, one after another:
    the video is cut into one slot per event and each event takes at most half of its slot, so that
    at least half of the frames stay normal. Horizontal movers enter at the frame's edge.

    Args:
        frames: ``uint8`` RGB ``(H, W, 3)`` frames (not modified).
        kinds: event kinds (:data:`KINDS`), in order.
        rng: random generator (placement, direction, which person).
        video: a name for the events' records.
        people, perspective: from :func:`find_people` / :func:`fit_perspective` (found in ``frames``
            when None).
        duration: frames per event (fewer when the video is short).
        min_visible: a frame is abnormal when at least this fraction of the object is in view
            (0.3: an object mostly outside the frame does not count; 0.01: any part of it).
        fade: frames over which an object appears (unless it enters at the frame's edge) and
            vanishes, its opacity ramping in steps of ``1 / (fade + 1)``; 0: from one frame to the next.

    Returns:
        new frames, frame labels (1 = abnormal: at least ``min_visible`` of the object visible,
        opacity counted; with ``fade=0`` also the frame right after the event if the object was
        visible just before, since it vanishes there), and the events.

    Raises:
        ConfigError: an unknown kind, a video too short for the events, ``min_visible`` outside
        (0, 1], or a negative ``fade``.
    """
    bad = [k for k in kinds if k not in KIND_SPEED]
    if bad:
        raise ConfigError(f"unknown synthetic event kind(s) {bad}; choose from {list(KINDS)}")
    if not 0.0 < min_visible <= 1.0:
        raise ConfigError(f"min_visible must be in (0, 1], got {min_visible}")
    if fade < 0:
        raise ConfigError(f"fade must be >= 0 frames, got {fade}")
    T = len(frames)
    if T < 8 * max(1, len(kinds)):
        raise ConfigError(f"video {video or '?'} has {T} frames, too few for {len(kinds)} events")
    H, W = frames[0].shape[:2]
    if people is None or perspective is None:
        found, sizes = find_people(frames)
        people = people if people is not None else found
        perspective = perspective or fit_perspective(sizes, H)
    out = [f.copy() for f in frames]
    labels = [0] * T
    events = []
    slot = T // max(1, len(kinds))
    dur = max(2, min(duration, slot // 2))
    for j, kind in enumerate(kinds):
        start = j * slot + int(rng.integers(0, max(1, slot - dur)))
        foot = float(rng.uniform(*perspective.rows))
        hgt = perspective.height(foot)
        sx, sy = KIND_SPEED[kind]
        direction = 1.0 if rng.random() < 0.5 else -1.0
        vx, vy = direction * sx * hgt, sy * hgt
        if kind in ("fast", "cross") and people:
            src = people[int(rng.integers(0, len(people)))]
            scale = hgt / src.alpha.shape[0]
            size = (max(2, round(src.alpha.shape[1] * scale)), max(4, round(hgt)))
            sprite = Sprite(cv2.resize(src.rgb, size, interpolation=cv2.INTER_LINEAR), cv2.resize(src.alpha, size, interpolation=cv2.INTER_LINEAR))
        else:
            sprite = _foreign_object(frames[0], max(4, round(hgt)), rng)
        if kind == "cross":  # starts high enough to cross the rows where people walk
            foot = float(rng.uniform(perspective.rows[0] - 0.1 * H, perspective.rows[0] + 0.1 * H))
        # horizontal movers enter at the edge they move away from; others anywhere across the frame
        half = sprite.alpha.shape[1] / 2
        x0 = float(rng.uniform(0.15 * W, 0.85 * W)) if vx == 0 else (-half + 2 if vx > 0 else W + half - 2)
        stop = min(T, start + dur)
        visible = 0.0
        for t in range(start, stop):
            k = t - start
            opacity = 1.0
            if fade:  # in over the first frames (an edge entry needs none), out over the last
                opacity = min(1.0, (stop - t) / (fade + 1), 1.0 if vx else (k + 1) / (fade + 1))
            visible = _paste(out[t], sprite, x0 + vx * k, foot + vy * k, opacity)
            labels[t] = int(visible >= min_visible)
        if not fade and stop < T and visible > 0:
            labels[stop] = 1
        events.append(SyntheticEvent(video, kind, start, stop, x0, foot, vx, vy))
    return out, labels, events


def make_synthetic_set(
    videos: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike, kinds: Sequence[str] = KINDS, seed: int = 0,
    duration: int = 40, events_per_video: int = 1, min_visible: float = 0.3, fade: int = DEFAULT_FADE,
) -> dict[str, list[int]]:
    """Write copies of normal videos with events inserted, as a UCSD-style test set.

    Writes ``out/frames/<video>/000.png ...`` (lossless) and ``out/frame_labels.json``
    (video name -> 0/1 per frame) and ``out/events.json`` (one record per event), readable by
    ``anomalens video evaluate``.

    Args:
        videos: normal videos (a folder in a :func:`~anomalens.video.io.list_videos` layout, or a list).
        out: output folder (created; must not already hold ``frames/``).
        kinds: event kinds, taken in turn: video ``j`` gets kinds ``j * e ... j * e + e - 1``
            (modulo their number), ``e = events_per_video``.
        seed: random seed (same seed, same events).
        duration: frames per event.
        min_visible, fade: see :func:`insert_events`.

    Returns:
        the frame labels written.

    Raises:
        DatasetError: no videos, or ``out`` already holds a set.
        ConfigError: unknown kinds, or a video too short.
        VideoReadError: a video cannot be read.
    """
    vids = as_videos(videos)
    if not vids:
        raise DatasetError("no normal videos given")
    out = Path(out)
    if (out / "frames").exists():
        raise DatasetError(f"{out / 'frames'} exists; choose an empty output folder")
    if events_per_video < 1 or not kinds:
        raise ConfigError("give at least one event kind and events_per_video >= 1")
    rng = np.random.default_rng(seed)
    labels, records = {}, []
    for j, v in enumerate(vids):
        frames = [f for _, f in iter_frames(v)]
        name = video_name(v)
        mine = [kinds[(j * events_per_video + i) % len(kinds)] for i in range(events_per_video)]
        new, y, events = insert_events(frames, mine, rng, video=name, duration=duration, min_visible=min_visible, fade=fade)
        d = out / "frames" / name
        d.mkdir(parents=True)
        for i, f in enumerate(new):
            cv2.imwrite(str(d / f"{i:03d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        labels[name] = y
        records += [asdict(e) for e in events]
    write_text(out / "frame_labels.json", json.dumps(labels))
    write_text(out / "events.json", json.dumps(records, indent=1))
    return labels
