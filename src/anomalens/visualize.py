"""Pictures for people: heatmap overlays with mask contours and the decision written on them."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from .augment import apply_view
from .explain import Evidence, Region, crop_box
from .prediction import Prediction


def heat_colors(anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """``float32`` ``(H, W)`` map -> ``uint8`` RGB ``(H, W, 3)`` JET colours, ``vmin`` blue to ``vmax`` red."""
    scale = max(vmax - vmin, 1e-12)
    norm = np.clip((anomaly_map - vmin) / scale, 0.0, 1.0)
    bgr = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    pixel_threshold: float,
    mask: np.ndarray | None = None,
    alpha: float = 0.45,
    caption: str | None = None,
) -> np.ndarray:
    """Blend a heatmap over ``image`` (``uint8`` RGB ``(H, W, 3)``) and outline ``mask`` in white.

    Colours are on a fixed, model-wide scale: blue at half the pixel threshold, red at 1.5 times it,
    so a normal image stays blue and the same colour means the same score on every image.

    Returns:
        ``uint8`` RGB ``(H, W, 3)``.
    """
    heat = heat_colors(anomaly_map, 0.5 * pixel_threshold, 1.5 * pixel_threshold)
    out = cv2.addWeighted(image, 1.0 - alpha, heat, alpha, 0.0)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        thickness = max(1, round(min(image.shape[:2]) / 256))
        cv2.drawContours(out, contours, -1, (255, 255, 255), thickness)
    if caption:
        scale = max(0.4, min(image.shape[:2]) / 600)
        (tw, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.rectangle(out, (0, 0), (tw + 8, th + base + 8), (0, 0, 0), -1)
        cv2.putText(out, caption, (4, th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def caption_for(pred: Prediction) -> str:
    """A one-line caption: decision, score and p-value."""
    decision = "NG" if pred.pred_label else "OK"
    text = f"{decision}  score {pred.pred_score:.2f}"
    if pred.p_value is not None:
        text += f"  p={pred.p_value:.3f}"
    return text


def prediction_overlay(pred: Prediction, image: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """The overlay of one prediction: its map, its mask outlined, its decision as caption (``uint8`` RGB)."""
    assert pred.anomaly_map is not None
    return overlay(image, pred.anomaly_map, pixel_threshold=pixel_threshold, mask=pred.pred_mask, caption=caption_for(pred))


def save_overlay(pred: Prediction, image: np.ndarray, pixel_threshold: float, path: str | os.PathLike) -> Path:
    """Write the overlay of one prediction as PNG (side by side with the input); returns the path."""
    return save_image(np.concatenate([image, prediction_overlay(pred, image, pixel_threshold)], axis=1), path)


def _label_strip(img: np.ndarray, text: str) -> np.ndarray:
    """``img`` with a black caption strip of ``text`` above it."""
    strip = np.zeros((22, img.shape[1], 3), np.uint8)
    cv2.putText(strip, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([strip, img], axis=0)


def evidence_panel(image: np.ndarray, evidence: Evidence, train_image: np.ndarray | None, side: int = 192) -> np.ndarray:
    """Side-by-side crops: the flagged patch (left) and its nearest normal training patch (right).

    Args:
        image: the flagged ``uint8`` RGB image.
        evidence: from ``Prediction.evidence``.
        train_image: the training image it points to, or None when unavailable (a grey tile says so).
        side: output tile size in pixels.

    Returns:
        ``uint8`` RGB ``(side + 22, 2 * side + 8, 3)``.
    """
    x0, y0, x1, y1 = evidence.test_box
    left = cv2.resize(image[y0:y1, x0:x1], (side, side), interpolation=cv2.INTER_CUBIC)
    if train_image is not None and evidence.train_box is not None:
        a0, b0, a1, b1 = evidence.train_box
        # shown as the bank saw it (the augmented view), so that it lines up with the flagged crop
        crop = apply_view(train_image[b0:b1, a0:a1], evidence.train_view)
        right = cv2.resize(crop, (side, side), interpolation=cv2.INTER_CUBIC)
        name = os.path.basename(evidence.train_image or f"train #{evidence.train_index}")
    else:
        right = np.full((side, side, 3), 96, np.uint8)
        name = f"train #{evidence.train_index} (image not available)"
    gap = np.full((side + 22, 8, 3), 255, np.uint8)
    return np.concatenate(
        [_label_strip(left, "flagged"), gap, _label_strip(right, f"normal: {name}"[:40])], axis=1
    )


def save_image(rgb: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a ``uint8`` RGB image as PNG (parent folders created); returns the path.

    Raises:
        OSError: the file cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path


def region_crop(image: np.ndarray, region: Region | None, side: int = 120) -> np.ndarray:
    """A square ``side`` x ``side`` ``uint8`` RGB crop around ``region`` (1.4 times its box, at least a
    sixth of the image); the whole image when ``region`` is None."""
    h, w = image.shape[:2]
    box = region.box if region is not None else (0, 0, w, h)
    size = max(box[2] - box[0], box[3] - box[1], min(h, w) // 6) * 1.4
    x0, y0, x1, y1 = crop_box(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), (size, size), (h, w))
    return cv2.resize(image[y0:y1, x0:x1], (side, side), interpolation=cv2.INTER_AREA)


def tile_grid(tiles: list[np.ndarray], columns: int = 8, gap: int = 4) -> np.ndarray:
    """Equal-size ``uint8`` RGB tiles laid out in rows of ``columns`` on white."""
    th, tw = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    cols = min(columns, len(tiles))
    out = np.full((rows * (th + gap) - gap, cols * (tw + gap) - gap, 3), 255, np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, columns)
        out[r * (th + gap) : r * (th + gap) + th, c * (tw + gap) : c * (tw + gap) + tw] = t
    return out
