"""How unusual each object is, per attribute: kNN distance to the normal training objects, in units
learnt from normal video.

Each attribute (:data:`~anomalens.video.attributes.ATTRIBUTES`) has its own vectors
(:func:`attribute_vectors`) and its own bank (every training object). An object's raw score for an
attribute is the mean distance to its ``k`` nearest training objects. Raw distances of different
attributes, and of objects in different videos, are not comparable; so each attribute's raw score is
put on the scale of normal objects that were *not* in the bank (cross-fit: each group of training
videos scored against the others' objects): AI-VAD's min-max, (raw - min) / (max - min) of those
scores, so that 0 and 1 are the least and the most unusual normal object. An object's score is the
sum of its attribute scores; a frame's score is AI-VAD's: for each attribute, the largest score of
the frame's objects, summed over attributes (:func:`frame_terms`; 0 without objects). The attribute
with the largest term is the frame's cause.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from ..knn import NearestNeighbours
from .attributes import ATTRIBUTES, VELOCITY_DIM

#: weight of the foot row and centre column (fractions of the frame) against pixels per frame (speed)
#: and log pixels (size): a tenth of the frame's height weighs as much as 0.05 px per frame
PLACE_WEIGHT = 0.5


def attribute_vectors(
    speed: np.ndarray, geometry: np.ndarray, appearance: np.ndarray | None, place_weight: float = PLACE_WEIGHT
) -> dict[str, np.ndarray]:
    """The vectors each attribute's kNN compares, for ``N`` objects.

    Args:
        speed: ``float32`` ``(N, VELOCITY_DIM)`` velocities (:func:`~anomalens.video.attributes.object_velocity`).
        geometry: ``float32`` ``(N, 4)``: log height, log width, foot row, centre column.
        appearance: ``float32`` ``(N, D)`` crop embeddings, or None / ``D = 0`` (no appearance).
        place_weight: weight of the place (fractions of the frame) beside speed and size.

    Returns:
        ``{"speed": (N, VELOCITY_DIM + 2), "size": (N, 4), "appearance": (N, D)}`` (``float32``; no appearance key
        without embeddings): velocity beside the place; height, width and place; the embedding.
    """
    g = np.asarray(geometry, np.float32).reshape(-1, 4)
    place = place_weight * g[:, 2:]
    out = {"speed": np.concatenate([np.asarray(speed, np.float32).reshape(-1, VELOCITY_DIM), place], 1), "size": np.concatenate([g[:, :2], place], 1)}
    if appearance is not None and np.asarray(appearance).ndim == 2 and np.asarray(appearance).shape[1]:
        out["appearance"] = np.asarray(appearance, np.float32)
    return out


def scale_of(raw: np.ndarray) -> tuple[float, float]:
    """``(offset, scale)`` = ``(min, max - min)`` of raw scores ``(N,)`` of normal objects: AI-VAD's
    min-max, which puts every attribute on one scale (see :class:`AttributeDensity`)."""
    lo = float(np.min(raw))
    return lo, float(max(np.max(raw) - lo, 1e-6))


def knn_scores(bank: np.ndarray | NearestNeighbours, queries: np.ndarray, k: int) -> np.ndarray:
    """Mean L2 distance of each query ``(Q, D)`` to its ``k`` nearest rows of ``bank`` ``(M, D)``
    (or of a :class:`~anomalens.knn.NearestNeighbours` built on it, kept across calls): ``(Q,)``."""
    if not len(queries):
        return np.zeros(0, np.float32)
    nn = bank if isinstance(bank, NearestNeighbours) else NearestNeighbours(torch.from_numpy(np.ascontiguousarray(bank, np.float32)))
    d, _ = nn.search(torch.from_numpy(np.ascontiguousarray(queries, np.float32)), min(k, nn.bank.shape[0]))
    return d.mean(1).numpy()


class AttributeDensity:
    """Per-attribute kNN density of normal objects, with cross-fit min-max scales: (raw - min) / (max
    - min) of the cross-fit normal objects' raw scores (AI-VAD's normalisation).

    Args:
        k: neighbours averaged.
        attributes: which attributes score (a subset of :data:`ATTRIBUTES`).

    Raises:
        ConfigError: invalid values.
    """

    def __init__(self, k: int = 1, attributes: tuple[str, ...] = ATTRIBUTES):
        if k < 1 or not attributes or set(attributes) - set(ATTRIBUTES):
            raise ConfigError(f"need k >= 1 and attributes among {ATTRIBUTES}; got k={k}, attributes={attributes}")
        self.k, self.attributes = int(k), tuple(a for a in ATTRIBUTES if a in attributes)
        self.banks: dict[str, np.ndarray] = {}
        self.scales: dict[str, float] = {}
        self.offsets: dict[str, float] = {}
        self._search: dict[str, tuple[np.ndarray, NearestNeighbours]] = {}  # per attribute: its bank and the search built on it

    def fit(self, vectors: dict[str, np.ndarray], groups: np.ndarray) -> dict[str, np.ndarray]:
        """Banks from every training object, scales from cross-fit scores.

        Args:
            vectors: :func:`attribute_vectors` of all training objects.
            groups: ``int`` ``(N,)`` the fold of each object (objects of one video in one fold; at least 2 folds).

        Returns:
            the cross-fit raw scores per attribute, ``(N,)`` each (the calibration uses them).

        Raises:
            ConfigError: fewer than 2 folds, or an attribute without vectors.
        """
        folds = np.unique(groups)
        if len(folds) < 2:
            raise ConfigError("cross-fit needs normal objects from at least 2 groups of videos")
        raw = {}
        for a in self.attributes:
            if a not in vectors:
                raise ConfigError(f"attribute {a!r} has no vectors (appearance off?)")
            x = vectors[a]
            r = np.zeros(len(x), np.float32)
            for f in folds:
                inside = groups == f
                r[inside] = knn_scores(x[~inside], x[inside], self.k)
            raw[a] = r
            self.banks[a] = np.ascontiguousarray(x, np.float32)
            self.offsets[a], self.scales[a] = scale_of(r)
        return raw

    def raw(self, vectors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw kNN scores of objects against the banks, per attribute ``(N,)`` (each bank's search is
        built once, at the first call after the bank was set)."""
        out = {}
        for a in self.attributes:
            bank, nn = self._search.get(a, (None, None))
            if bank is not self.banks[a]:
                bank, nn = self.banks[a], NearestNeighbours(torch.from_numpy(np.ascontiguousarray(self.banks[a], np.float32)))
                self._search[a] = (bank, nn)
            out[a] = knn_scores(nn, vectors[a], self.k)
        return out

    def scaled(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        """``float32`` ``(N, A)``: each attribute's raw score over its scale (columns in :attr:`attributes` order)."""
        n = len(next(iter(raw.values()))) if raw else 0
        return np.stack([(raw[a] - self.offsets.get(a, 0.0)) / self.scales[a] for a in self.attributes], 1).reshape(n, len(self.attributes)).astype(np.float32)


def frame_terms(object_scores: np.ndarray, frames: np.ndarray, n_frames: int) -> np.ndarray:
    """Each attribute's largest score over a frame's objects (0 for a frame without objects): AI-VAD's
    frame score is the sum of a frame's terms.

    Args:
        object_scores: ``(N, A)`` (or ``(N,)``: one attribute) scaled scores, any sign.
        frames: ``int`` ``(N,)`` frame of each object, in ``[0, n_frames)``.
        n_frames: frames of the video.

    Returns:
        ``float64`` ``(n_frames, A)``.

    Raises:
        IndexError: a frame number at or above ``n_frames``.
    """
    frames = np.asarray(frames, np.int64)
    x = np.asarray(object_scores)
    x = x[:, None] if x.ndim == 1 else x
    if len(frames) and (frames.min() < 0 or frames.max() >= n_frames):
        raise IndexError(f"frame numbers must lie in [0, {n_frames}); got {frames.min()} to {frames.max()}")
    s = np.full((n_frames, x.shape[1]), -np.inf)
    np.maximum.at(s, frames, x)
    s[np.bincount(frames, minlength=n_frames) == 0] = 0.0  # frames without objects
    return s
