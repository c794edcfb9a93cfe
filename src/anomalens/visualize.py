"""Pictures for people: the part beside its heatmap (inferno, with a colour bar), the anomalous
pixels outlined, and the decision on its colour (green OK, red NG) with the score against the threshold."""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np

from .atomic import write_bytes
from .augment import apply_view
from .explain import Evidence, Region, crop_box
from .prediction import Prediction


#: the colour map of every heatmap: inferno, perceptually uniform (equal score steps look equally
#: different, and it stays readable in greyscale and to colour-blind eyes), black = low, yellow = high
COLORMAP = cv2.COLORMAP_INFERNO
#: decision colours (RGB): OK green, NG red
OK_RGB = (26, 150, 65)
NG_RGB = (215, 35, 35)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def heat_colors(anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """``float32`` ``(H, W)`` map -> ``uint8`` RGB ``(H, W, 3)`` in :data:`COLORMAP`, ``vmin`` black to ``vmax`` yellow."""
    scale = max(vmax - vmin, 1e-12)
    norm = np.clip((anomaly_map - vmin) / scale, 0.0, 1.0)
    bgr = cv2.applyColorMap((norm * 255).astype(np.uint8), COLORMAP)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def heat_range(pixel_threshold: float, anomaly_map: np.ndarray | None = None) -> tuple[float, float]:
    """The fixed, model-wide colour scale ``(vmin, vmax)``: half to 1.5 times the pixel threshold, so
    the threshold sits mid-scale and the same colour means the same score on every image. For a
    threshold that is not positive (or NaN), the map's own range (or ``(0, 1)`` without a map)."""
    if math.isfinite(pixel_threshold) and pixel_threshold > 0:
        return 0.5 * pixel_threshold, 1.5 * pixel_threshold
    if anomaly_map is not None and anomaly_map.size and np.isfinite(anomaly_map).all():
        lo, hi = float(anomaly_map.min()), float(anomaly_map.max())
        return lo, max(hi, lo + 1e-6)
    return 0.0, 1.0


def decision_color(pred: Prediction) -> tuple[int, int, int]:
    """:data:`NG_RGB` for a flagged image, :data:`OK_RGB` otherwise."""
    return NG_RGB if pred.pred_label else OK_RGB


def _text_box(out: np.ndarray, text: str, org: tuple[int, int], scale: float, fg, bg, pad: int) -> int:
    """Draw ``text`` on a filled ``bg`` box whose top-left corner is ``org``; returns the box's right edge."""
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, max(1, round(scale * 2)))
    x, y = org
    cv2.rectangle(out, (x, y), (x + tw + 2 * pad, y + th + base + 2 * pad), bg, -1)
    cv2.putText(out, text, (x + pad, y + pad + th), _FONT, scale, fg, max(1, round(scale * 2)), cv2.LINE_AA)
    return x + tw + 2 * pad


def overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    pixel_threshold: float,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
    caption: str | None = None,
    caption_color: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Blend a heatmap over ``image`` (``uint8`` RGB ``(H, W, 3)``) and outline ``mask`` in white.

    Colours are on the fixed, model-wide scale of :func:`heat_range` (:data:`COLORMAP`), so a normal
    image stays dark and the same colour means the same score on every image. ``caption`` is written
    top left, white on black, or on ``caption_color`` (RGB) when given.

    Returns:
        ``uint8`` RGB ``(H, W, 3)``.
    """
    heat = heat_colors(anomaly_map, *heat_range(pixel_threshold, anomaly_map))
    out = cv2.addWeighted(image, 1.0 - alpha, heat, alpha, 0.0)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        thickness = max(1, round(min(image.shape[:2]) / 256))
        cv2.drawContours(out, contours, -1, (255, 255, 255), thickness)
    if caption:
        scale = max(0.4, min(image.shape[:2]) / 600)
        _text_box(out, caption, (0, 0), scale, (255, 255, 255), caption_color or (0, 0, 0), 4)
    return out


def caption_for(pred: Prediction) -> str:
    """A one-line caption: decision, score against the threshold, p-value (``p <= 1/51`` at its floor)."""
    decision = "NG" if pred.pred_label else "OK"
    text = f"{decision}  score {pred.pred_score:.2f}"
    if pred.threshold is not None and math.isfinite(pred.threshold):
        text += f" {'>' if pred.pred_label else '<='} {pred.threshold:.2f}"
    if pred.p_value_text is not None:
        text += f"  p {'' if pred.p_value_at_floor else '= '}{pred.p_value_text}"
    return text


def prediction_overlay(pred: Prediction, image: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """The heatmap panel of one prediction: its map, its mask outlined, its decision as a caption on
    the decision's colour (``uint8`` RGB, the image's size)."""
    assert pred.anomaly_map is not None
    return overlay(image, pred.anomaly_map, pixel_threshold=pixel_threshold, mask=pred.pred_mask,
                   caption=caption_for(pred), caption_color=decision_color(pred))


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def colour_bar(height: int, vmin: float, vmax: float, pixel_threshold: float | None, scale: float) -> np.ndarray:
    """A vertical colour bar of :data:`COLORMAP` (``vmax`` at the top) with its values written beside
    it and the pixel threshold marked (``uint8`` RGB ``(height, width, 3)`` on white)."""
    bar_w = max(10, round(14 * scale / 0.45))
    (tw, th), _ = cv2.getTextSize("0.000 thr", _FONT, scale, 1)
    out = np.full((height, bar_w + tw + 10, 3), 255, np.uint8)
    ramp = np.linspace(vmax, vmin, height, dtype=np.float32)[:, None].repeat(bar_w, axis=1)
    out[:, :bar_w] = heat_colors(ramp, vmin, vmax)
    ticks = [(vmax, _fmt(vmax)), (vmin, _fmt(vmin))]
    if pixel_threshold is not None and math.isfinite(pixel_threshold) and vmin < pixel_threshold < vmax:
        ticks.insert(1, (pixel_threshold, f"{_fmt(pixel_threshold)} thr"))
    for v, label in ticks:
        y = int(round((vmax - v) / max(vmax - vmin, 1e-12) * (height - 1)))
        cv2.line(out, (0, y), (bar_w + 3, y), (0, 0, 0), 1)
        ty = min(max(y + th // 2, th + 1), height - 2)
        cv2.putText(out, label, (bar_w + 5, ty), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out


MAX_FIGURE_SIDE = 2048  # pixels: the long side of the part shown in an overlay figure


def overlay_figure(pred: Prediction, image: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """What an operator reads at a glance: a header with the decision on its colour (green OK, red NG),
    the score against the threshold, the normalized score and the p-value; below it the part (left),
    its heatmap with the anomalous pixels outlined (right) and a colour bar with the pixel threshold.

    Args:
        pred: a scored prediction (``anomaly_map`` set).
        image: its ``uint8`` RGB ``(H, W, 3)`` input.
        pixel_threshold: the model's pixel threshold (sets the colour scale, :func:`heat_range`).

    Returns:
        ``uint8`` RGB ``(header + H, 2 W + gaps + colour bar, 3)``; the part is unchanged at
        ``[-H:, :W]``. An image larger than :data:`MAX_FIGURE_SIDE` pixels on its long side is shown
        downscaled to it (area interpolation; the mask nearest), so a figure's memory is bounded.
    """
    assert pred.anomaly_map is not None
    amap, mask = pred.anomaly_map, pred.pred_mask
    vmin, vmax = heat_range(pixel_threshold, amap)
    if max(image.shape[:2]) > MAX_FIGURE_SIDE:
        f = MAX_FIGURE_SIDE / max(image.shape[:2])
        size = (max(1, round(image.shape[1] * f)), max(1, round(image.shape[0] * f)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        amap = cv2.resize(np.asarray(amap, np.float32), size, interpolation=cv2.INTER_AREA)
        if mask is not None:
            mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    h, w = image.shape[:2]
    scale = max(0.4, min(1.6, h / 560))
    heat = overlay(image, amap, pixel_threshold=pixel_threshold, mask=mask)
    gap = np.full((h, max(4, w // 64), 3), 255, np.uint8)
    body = np.concatenate([image, gap, heat, gap, colour_bar(h, vmin, vmax, pixel_threshold, scale)], axis=1)
    return np.concatenate([_header(pred, body.shape[1], scale), body], axis=0)


def _header(pred: Prediction, width: int, scale: float) -> np.ndarray:
    """The decision strip above the panels (white, ``uint8`` RGB)."""
    pad = max(3, round(6 * scale))
    big = scale * 1.5
    (_, th), base = cv2.getTextSize("NG", _FONT, big, max(1, round(big * 2)))
    out = np.full((th + base + 4 * pad, width, 3), 255, np.uint8)
    x = _text_box(out, "NG" if pred.pred_label else "OK", (pad, pad), big, (255, 255, 255), decision_color(pred), pad)
    parts = [f"score {pred.pred_score:.2f}"]
    if pred.threshold is not None and math.isfinite(pred.threshold):
        parts[0] += f" {'>' if pred.pred_label else '<='} threshold {pred.threshold:.2f}"
    if pred.normalized_score is not None and math.isfinite(pred.normalized_score):
        parts.append(f"normalized {pred.normalized_score:.2f}")
    if pred.p_value_text is not None:
        parts.append(f"p {'' if pred.p_value_at_floor else '= '}{pred.p_value_text}")
    text = "  |  ".join(parts)
    s = scale
    while s > 0.3 and cv2.getTextSize(text, _FONT, s, 1)[0][0] > width - x - 2 * pad:
        s *= 0.9
    (_, ty), _ = cv2.getTextSize(text, _FONT, s, 1)
    cv2.putText(out, text, (x + 2 * pad, (out.shape[0] + ty) // 2), _FONT, s, (20, 20, 20), 1, cv2.LINE_AA)
    return out


def save_overlay(pred: Prediction, image: np.ndarray, pixel_threshold: float, path: str | os.PathLike) -> Path:
    """Write :func:`overlay_figure` of one prediction as PNG (atomically); returns the path."""
    return save_image(overlay_figure(pred, image, pixel_threshold), path)


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
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    return write_bytes(path, buf.tobytes())


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
