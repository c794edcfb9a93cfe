"""What each object is: its velocity, its size and place, and how it looks.

The attributes follow Reiss & Hoshen ("Attribute-based Representations for Accurate and
Interpretable Video Anomaly Detection", 2022), with what ships offline:

* **speed**: the optical flow on the object's foreground pixels (pixels per frame), averaged over
  the last frames of the object's track, beside the object's place (the camera's perspective: far
  objects move fewer pixels). :func:`object_velocity` measures AI-VAD's histogram (mean speed per
  direction sector) beside the same histogram of the box's fastest person-wide strip (a box from
  background subtraction can hold a group, and a cyclist in it);
* **size**: the box's height, width (log pixels) and the place of its foot in the frame (the camera's
  perspective: far objects are small), so that a cart or a group is judged against what is seen *there*;
* **appearance**: a frozen ImageNet CNN's embedding of the object's crop (mean of its last feature
  map), L2-normalised.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import make_backbone

#: orientation bins of the velocity histogram (:func:`object_velocity`), as AI-VAD's
N_BINS = 8
#: length of the velocity vector (:func:`object_velocity`): the box's histogram, then its fastest strip's
VELOCITY_DIM = 2 * N_BINS
#: width of the strips of a box (fraction of its height; about one person) whose fastest one gives
#: the strip histogram (:func:`object_velocity`)
STRIP_WIDTH = 0.5
#: the attributes, in the order of scores and causes
ATTRIBUTES = ("speed", "size", "appearance")
def object_velocity(flow: np.ndarray, boxes: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per object, its velocity from the flow on its foreground pixels.

    Args:
        flow: ``float32`` ``(H, W, 2)`` pixels per frame.
        boxes: ``int`` ``(N, 4)`` ``x0, y0, x1, y1``.
        mask: ``bool`` ``(H, W)`` foreground.

    Returns:
        ``float32`` ``(N, VELOCITY_DIM)`` in pixels per frame: the mean speed of the object's foreground
        pixels whose flow points into each of :data:`N_BINS` equal sectors of orientation from -pi (0
        for an empty sector; Reiss & Hoshen's velocity histogram), then the same histogram of the box's
        fastest person-wide vertical strip (a cyclist merged into a group's box keeps its own speed).
        Zeros for an object without pixels.
    """
    out = np.zeros((len(boxes), VELOCITY_DIM), np.float32)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        f = flow[y0:y1, x0:x1][mask[y0:y1, x0:x1]]
        if not len(f):
            continue
        out[i, :N_BINS] = _histogram(f, np.hypot(f[:, 0], f[:, 1]))
        out[i, N_BINS:] = _fastest_strip(flow[y0:y1, x0:x1], mask[y0:y1, x0:x1])
    return out


def _histogram(f: np.ndarray, mag: np.ndarray) -> np.ndarray:
    """Mean speed ``(N_BINS,)`` of the flow vectors ``f`` ``(P, 2)`` (speeds ``mag``) per orientation sector."""
    b = np.minimum(((np.arctan2(f[:, 1], f[:, 0]) + np.pi) * (N_BINS / (2 * np.pi))).astype(np.int64), N_BINS - 1)
    return np.bincount(b, weights=mag, minlength=N_BINS) / np.maximum(np.bincount(b, minlength=N_BINS), 1)


def _fastest_strip(flow: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The velocity histogram of the box's fastest vertical strip (``STRIP_WIDTH`` of its height wide,
    steps of half that; strips with foreground on under a quarter of their pixels are skipped; the
    whole box when it is narrower than a strip): a cyclist in a group's box keeps its own speed."""
    h, w = mask.shape
    sw = max(2, int(round(STRIP_WIDTH * h)))
    best, best_speed = None, -1.0
    for x in range(0, max(w - sw, 0) + 1, max(1, sw // 2)):
        m = mask[:, x:x + sw]
        if m.sum() < 0.25 * m.size and w > sw:
            continue
        f = flow[:, x:x + sw][m]
        mag = np.hypot(f[:, 0], f[:, 1])
        if len(f) and mag.mean() > best_speed:
            best, best_speed = (f, mag), float(mag.mean())
    if best is None:
        f = flow[mask]
        best = (f, np.hypot(f[:, 0], f[:, 1]))
    return _histogram(*best) if len(best[0]) else np.zeros(N_BINS, np.float32)


def geometry(boxes: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``float32`` ``(N, 4)``: log height and log width in pixels, foot row and centre column as
    fractions of the frame's height and width."""
    b = boxes.astype(np.float32).reshape(-1, 4)
    h, w = hw
    return np.stack([np.log(np.maximum(b[:, 3] - b[:, 1], 1)), np.log(np.maximum(b[:, 2] - b[:, 0], 1)), b[:, 3] / h, (b[:, 0] + b[:, 2]) / (2 * w)], 1)


class CropEmbedder:
    """A frozen CNN's embedding of object crops.

    Args:
        backbone: a name of :data:`anomalens.backbones.BACKBONES` (a CNN).
        size: crops are resized to ``size x size`` pixels (multiple of 16).
        context: fraction of the box's side added around it.
        grid: each feature map is averaged over ``grid x grid`` parts of the crop (1: the whole crop).
        pretrained: False only for tests that do not need the weights.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", size: int = 96, context: float = 0.1, grid: int = 2, pretrained: bool = True):
        self.net = make_backbone(backbone, pretrained=pretrained)
        self.size, self.context, self.grid = int(size), float(context), int(grid)
        self.dim = int(sum(self.net.channels)) * self.grid ** 2

    def crops(self, rgb: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
        """``uint8`` ``(H, W, 3)`` frame, boxes ``(N, 4)`` -> ``float32`` ``(N, 3, size, size)`` in [0, 1]."""
        h, w = rgb.shape[:2]
        t = torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).float().div_(255.0)
        out = []
        for x0, y0, x1, y1 in boxes:
            px, py = self.context * (x1 - x0), self.context * (y1 - y0)
            a, b = max(0, int(x0 - px)), max(0, int(y0 - py))
            c, d = min(w, int(np.ceil(x1 + px))), min(h, int(np.ceil(y1 + py)))
            out.append(F.interpolate(t[None, :, b:d, a:c], size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True))
        return torch.cat(out) if out else torch.zeros((0, 3, self.size, self.size))

    @torch.inference_mode()
    def __call__(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """``float32`` ``(N, dim)`` L2-normalised embeddings (mean of each chosen layer's map, concatenated)."""
        if not len(boxes):
            return np.zeros((0, self.dim), np.float32)
        maps = self.net(self.net.normalize(self.crops(rgb, boxes)))
        e = torch.cat([F.adaptive_avg_pool2d(m, self.grid).flatten(1) for m in maps], 1)
        return F.normalize(e, dim=1).numpy().astype(np.float32)
