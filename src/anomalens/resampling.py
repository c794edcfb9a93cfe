"""Resampling between images and the model: the model input (``uint8`` RGB images resized to the
model's pixel sizes, scaled to [0, 1]) and the anomaly map back at the image's own size.

Torch-free, so the Python detectors (:func:`anomalens.common.to_model_inputs`) and the torch-free
ONNX runtime (:mod:`anomalens.runtime`) prepare bit-identical inputs and resize maps alike.

Resizing is bilinear. Where the image shrinks along an axis, Pillow's filter on the ``uint8`` image
(antialiased: the filter widens with the scale factor), as the PatchCore paper's code does through
torchvision's PIL transforms; the result is rounded to grey levels, and a camera-size image is never
copied to ``float32`` at full size. Where it only grows, OpenCV's bilinear interpolation on
``float32`` (no rounding; several times faster than Pillow's).
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
from PIL import Image


def resized(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """One ``uint8`` RGB image ``(H, W, 3)`` at ``hw = (h, w)`` pixels, ``float32`` ``(h, w, 3)`` in
    [0, 1]. Bilinear: Pillow's antialiased filter on the ``uint8`` image when either side shrinks,
    OpenCV's on ``float32`` when neither does."""
    h, w = int(hw[0]), int(hw[1])
    if img.shape[:2] == (h, w):
        return img / np.float32(255.0)
    if h >= img.shape[0] and w >= img.shape[1]:
        return cv2.resize(img / np.float32(255.0), (w, h), interpolation=cv2.INTER_LINEAR)
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((w, h), Image.BILINEAR)) / np.float32(255.0)


def model_inputs(images: Sequence[np.ndarray], shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """The model input of ``uint8`` RGB images ``(H_i, W_i, 3)`` at each of several ``shapes``
    ``(h_k, w_k)`` (one per scale): one ``float32`` ``(B, 3, h_k, w_k)`` array in [0, 1] per shape,
    C-contiguous, each image resized by :func:`resized`.

    Raises:
        ValueError: an image that is not ``uint8`` ``(H, W, 3)``.
    """
    out = [np.empty((len(images), 3, int(h), int(w)), dtype=np.float32) for h, w in shapes]
    for i, img in enumerate(images):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {img.dtype} {img.shape}")
        for k, hw in enumerate(shapes):
            out[k][i] = resized(img, hw).transpose(2, 0, 1)
    return out


def resize_map(anomaly_map, hw: tuple[int, int]) -> np.ndarray:
    """One anomaly map ``(h, w)`` (numpy array or CPU tensor) at the image size ``hw = (H, W)``:
    ``float32`` ``(H, W)``, bilinear (OpenCV's, half-pixel centres as torch's ``align_corners=False``)."""
    m = np.asarray(anomaly_map, dtype=np.float32)
    if m.shape != tuple(hw):
        m = cv2.resize(m, (int(hw[1]), int(hw[0])), interpolation=cv2.INTER_LINEAR)
    return m
