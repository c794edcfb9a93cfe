"""Model-input geometry: the pixel size each image is resized to before the backbone. Torch-free, so
the ONNX runtime (:mod:`anomalens.runtime`) and the Python detectors share one definition."""

from __future__ import annotations

from typing import Sequence


#: longest side of the model input, as a multiple of its short side: longer strips are squeezed to this
MAX_ASPECT = 4.0


def model_input_hw(hw: tuple[int, int], size: int, keep_aspect: bool = True, multiple: int = 16) -> tuple[int, int]:
    """Model-input ``(height, width)`` in pixels for an image of ``hw = (H, W)`` pixels.

    With ``keep_aspect``, the short side becomes ``size`` and the long side keeps the aspect ratio,
    rounded to a multiple of ``multiple`` (16: the CNNs' coarsest stride, at most 8 px off, under 3%
    at ``size = 256``; 14: the ViT's patch) and capped at :data:`MAX_ASPECT` times ``size``.
    Without it: ``(size, size)``.
    """
    if not keep_aspect:
        return size, size
    h, w = int(hw[0]), int(hw[1])
    short, long_ = min(h, w), max(h, w)
    side = int(round(long_ * size / short / multiple)) * multiple
    side = int(min(max(side, size), MAX_ASPECT * size) // multiple * multiple)
    return (size, side) if h <= w else (side, size)


def group_by_shape(shapes: Sequence[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    """Indices of ``shapes`` grouped by equal shape, in first-seen order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, hw in enumerate(shapes):
        groups.setdefault(tuple(hw), []).append(i)
    return groups


#: bytes of patch-to-bank distances one graph call may hold (a large few-shot bank scores fewer images per call)
DISTANCE_BUDGET = 256 << 20


def images_per_call(shapes: Sequence[tuple[int, int]], stride: int, bank_rows: int) -> int:
    """How many images of model-input ``shapes`` (one per scale) one graph call may score so that
    its ``float32`` patch-to-bank distances, ``patches x bank_rows`` per image, stay within
    :data:`DISTANCE_BUDGET` (at least one; no bank: any number)."""
    patches = max(h * w for h, w in shapes) // max(1, stride) ** 2
    return max(1, DISTANCE_BUDGET // max(1, 4 * patches * bank_rows))
