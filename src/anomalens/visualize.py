"""Pictures for people: heatmap overlays with mask contours and the decision written on them."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

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


def save_overlay(pred: Prediction, image: np.ndarray, pixel_threshold: float, path: str | os.PathLike) -> Path:
    """Write the overlay of one prediction as PNG (side by side with the input); returns the path."""
    assert pred.anomaly_map is not None
    ov = overlay(image, pred.anomaly_map, pixel_threshold=pixel_threshold, mask=pred.pred_mask, caption=caption_for(pred))
    both = np.concatenate([image, ov], axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(both, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path
