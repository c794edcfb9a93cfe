"""Augmented views of the few normal images of a few-shot model.

With k = 1..8 normal images the memory bank is small, and a good part seen at another orientation
finds no match. Where the product allows it (round or symmetric parts, textures), adding rotated and
flipped copies of the k images to the bank covers those poses; this is the support-set augmentation
of RegAD (Huang et al., "Registration based Few-Shot Anomaly Detection", ECCV 2022) and of the
few-shot rows of PatchCore (Roth et al., CVPR 2022). Where orientation matters (a transistor whose
misplacement *is* a defect), augmentations could teach the model that the defect is normal; even
so, ``"rotations"`` is PatchCore's few-shot default
(:attr:`~anomalens.detectors.base.Detector.default_augment`; why: docs/design/decisions.md);
``"none"`` turns it off.

Flips and multiples of 90 degrees are exact pixel permutations (no interpolation). ``"rotations45"``
adds the 45-degree steps of AnomalyDINO (Damm et al., "AnomalyDINO: Boosting Patch-based Few-shot
Anomaly Detection with DINOv2", WACV 2025): those views are rotated about the image centre with
bilinear interpolation at the image's own size, so their corners are black. The view name tells how
to map a position back to the original image (:func:`view_to_source`).
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError

#: augmentation option -> the views it adds (the original view ``"id"`` always comes first)
AUGMENTATIONS: dict[str, tuple[str, ...]] = {
    "none": ("id",),
    "flips": ("id", "hflip", "vflip"),
    "rotations": ("id", "rot90", "rot180", "rot270"),
    "dihedral": ("id", "rot90", "rot180", "rot270", "hflip", "vflip", "transpose", "antitranspose"),
    "rotations45": ("id", "rot45", "rot90", "rot135", "rot180", "rot225", "rot270", "rot315"),
}
_OBLIQUE = ("45", "135", "225", "315")
#: views whose width is the original's height
_SWAPPING = ("rot90", "rot270", "transpose", "antitranspose")


def check_augment(augment: str) -> tuple[str, ...]:
    """The view names of option ``augment``.

    Raises:
        ConfigError: unknown option.
    """
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"augment must be one of {sorted(AUGMENTATIONS)}, got {augment!r}")
    return AUGMENTATIONS[augment]


def apply_view(img: np.ndarray, view: str) -> np.ndarray:
    """View ``view`` of an ``(H, W, C)`` or ``(H, W)`` array (``(W, H, ...)`` for 90-degree turns).

    Raises:
        ConfigError: unknown view name.
    """
    if view == "id":
        return img
    if view == "hflip":
        out = img[:, ::-1]
    elif view == "vflip":
        out = img[::-1]
    elif view.startswith("rot") and view[3:] in ("90", "180", "270"):
        out = np.rot90(img, int(view[3:]) // 90, axes=(0, 1))  # counter-clockwise
    elif view.startswith("rot") and view[3:] in _OBLIQUE:
        from PIL import Image

        out = np.asarray(Image.fromarray(img).rotate(int(view[3:]), resample=Image.BILINEAR))  # counter-clockwise
    elif view == "transpose":
        out = np.swapaxes(img, 0, 1)
    elif view == "antitranspose":
        out = np.swapaxes(img, 0, 1)[::-1, ::-1]
    else:
        raise ConfigError(f"unknown view {view!r}")
    return np.ascontiguousarray(out)


def view_to_source(view: str, x: float, y: float, w: float, h: float) -> tuple[float, float]:
    """Map a position ``(x, y)`` in view ``view`` of a ``w x h`` image (sizes of the *original*) back
    to the original image; continuous coordinates, origin at the top-left corner.

    Raises:
        ConfigError: unknown view name.
    """
    if view == "id":
        return x, y
    if view == "hflip":
        return w - x, y
    if view == "vflip":
        return x, h - y
    if view == "rot90":  # view (W x H): view[i, j] = img[j, W - 1 - i]
        return w - y, x
    if view == "rot180":
        return w - x, h - y
    if view == "rot270":  # view[i, j] = img[H - 1 - j, i]
        return y, h - x
    if view == "transpose":
        return y, x
    if view == "antitranspose":
        return w - y, h - x
    if view.startswith("rot") and view[3:] in _OBLIQUE:  # same size, rotated counter-clockwise about the centre
        a = math.radians(int(view[3:]))
        dx, dy = x - w / 2, y - h / 2
        return w / 2 + math.cos(a) * dx - math.sin(a) * dy, h / 2 + math.sin(a) * dx + math.cos(a) * dy
    raise ConfigError(f"unknown view {view!r}")


def view_to_source_normalised(view: str, u: float, v: float, w: float, h: float) -> tuple[float, float]:
    """:func:`view_to_source` for positions given as fractions of the *view's* width and height,
    returned as fractions of the original ``w x h`` image's (``w``, ``h`` in pixels: an oblique turn
    of a non-square image is not a turn of fractional coordinates, and 90-degree views swap the sides).

    Raises:
        ConfigError: unknown view name.
    """
    vw, vh = (h, w) if view in _SWAPPING else (w, h)
    x, y = view_to_source(view, u * vw, v * vh, w, h)
    return x / w, y / h
