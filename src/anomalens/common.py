"""Building blocks shared by the detectors: preprocessing, patch features, anomaly-map smoothing.

Patch features follow PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection",
CVPR 2022, Sec. 3.1): each layer's feature map is averaged over a local ``p x p`` neighbourhood
(``p = 3``) to give every patch some context, the coarser maps are bilinearly upsampled to the finest
grid, and the layers are concatenated along channels.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone
from .geometry import MAX_ASPECT, group_by_shape, model_input_hw  # noqa: F401  (re-exported)
from .resampling import model_inputs


def to_model_input(images: Sequence[np.ndarray], hw: tuple[int, int]) -> torch.Tensor:
    """Resize ``uint8`` RGB images ``(H_i, W_i, 3)`` to ``hw = (h, w)`` pixels and stack them:
    ``float32`` ``(B, 3, h, w)`` in [0, 1] (:func:`anomalens.resampling.model_inputs`)."""
    return to_model_inputs(images, (hw,))[0]


def to_model_inputs(images: Sequence[np.ndarray], shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """:func:`to_model_input` at each of several ``shapes`` (one per scale): one ``float32``
    ``(B, 3, h_k, w_k)`` tensor per shape, the same values as the torch-free runtime's input."""
    return [torch.from_numpy(x) for x in model_inputs(images, shapes)]


def to_tensor_batch(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Square-resize ``uint8`` RGB images to ``size x size``: ``float32`` ``(B, 3, size, size)`` in [0, 1]
    (fixed-size networks: the ViT, the video detector)."""
    return to_model_input(images, (size, size))


class PatchFeatureExtractor(nn.Module):
    """Backbone + locally aggregated, multi-layer patch features.

    Input: ``float32`` ``(B, 3, H, W)`` in [0, 1], ``H`` and ``W`` multiples of 16. Output: ``float32``
    ``(B, D, h, w)`` with ``h = H / min(stride)``, ``w = W / min(stride)``, and ``D`` is the sum of the chosen layers' channels (e.g. 40 + 112 = 152 for
    EfficientNet-Lite0 blocks 4 + 10).

    Args:
        backbone: a :class:`~anomalens.backbones.Backbone`.
        patch_size: side of the local averaging window (PatchCore's ``p``; 1 disables aggregation).
        border_pad: pixels of reflected image added on every side before the backbone (a multiple of
            the coarsest stride, 16) and cropped off the feature maps again. Without it, patches at
            the image border see the CNN's zero padding and cut-off structures; on objects whose
            position varies (MVTec AD transistor: the board shifts) these border patches were the
            top-scoring patches of normal images. 0 disables it.
    """

    def __init__(self, backbone: Backbone, patch_size: int = 3, border_pad: int = 0):
        super().__init__()
        self.backbone = backbone
        self.patch_size = int(patch_size)
        self.border_pad = int(border_pad)
        self.micro_batch = 1

    @property
    def feature_dim(self) -> int:
        return int(sum(self.backbone.channels))

    @property
    def stride(self) -> int:
        """Pixels of model input per patch (the finest chosen layer's stride)."""
        return int(min(self.backbone.strides))

    def backbone_forward(self, x01: torch.Tensor) -> list[torch.Tensor]:
        """Normalise, reflect-pad and run the backbone: the raw per-layer maps (padding included).

        The backbone runs on ``micro_batch`` images at a time (default 1: on a CPU, one image per call
        is the fastest per image, as larger batches thrash the cache).
        """
        pad = self.border_pad
        x = self.backbone.normalize(x01)
        if pad:
            x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        if x.shape[0] <= self.micro_batch:
            return self.backbone(x)
        parts = [self.backbone(x[s : s + self.micro_batch]) for s in range(0, x.shape[0], self.micro_batch)]
        return [torch.cat(level, 0) for level in zip(*parts)]

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        pad = self.border_pad
        feats = self.backbone_forward(x01)
        if self.patch_size > 1:
            p = self.patch_size
            # zero padding counted in the border average, as in the PatchCore paper's code and anomalib,
            # not an average of the valid pixels only (measured reason: docs/design/decisions.md)
            feats = [F.avg_pool2d(f, p, stride=1, padding=p // 2, count_include_pad=True) for f in feats]
        if pad:
            feats = [f[..., pad // s : f.shape[-2] - pad // s, pad // s : f.shape[-1] - pad // s] for f, s in zip(feats, self.backbone.strides)]
        h, w = feats[int(np.argmin(self.backbone.strides))].shape[-2:]
        feats = [f if f.shape[-2:] == (h, w) else F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False) for f in feats]
        return torch.cat(feats, 1)


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian, ``float32``, length ``2 * ceil(4 sigma) + 1``."""
    radius = max(1, int(math.ceil(4.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


class AnomalyMapHead(nn.Module):
    """Patch-score grid ``(B, h, w)`` -> smoothed anomaly map ``(B, h * stride, w * stride)``, ``float32``.

    Bilinear upsampling by the patch ``stride`` (pixels per patch: 8 for the CNNs' default layers) to
    the model input size, then a separable Gaussian blur of ``sigma`` pixels (PatchCore uses sigma = 4)
    with reflect padding. ``sigma = 0`` disables the blur.

    Both steps are linear and separable, so the map is ``A_h @ grid @ A_w^T`` with one
    ``(n * stride, n)`` matrix per axis (:meth:`axis_operator`: the upsampling and blur applied to
    the ``n`` unit impulses). Two small matrix products replace the full-resolution single-channel
    convolutions, which are slower in ONNX Runtime (measured reason: docs/design/decisions.md); the
    result equals upsample-then-blur up to float rounding (~5e-7 relative).
    """

    def __init__(self, stride: int, sigma: float = 4.0):
        super().__init__()
        self.stride = int(stride)
        self.sigma = float(sigma)
        k = gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", k, persistent=False)

    def axis_operator(self, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(n * stride, n)`` matrix taking ``n`` patch scores along one axis to the upsampled,
        blurred ``n * stride`` pixels (``n`` may be a traced size)."""
        m = torch.eye(n, dtype=dtype)[:, None, :]  # (n, 1, n): one unit impulse per patch
        if self.stride > 1:
            m = F.interpolate(m, scale_factor=float(self.stride), mode="linear", align_corners=False)
        if self.sigma > 0:
            r = self.kernel.numel() // 2
            m = F.conv1d(F.pad(m, (r, r), mode="reflect"), self.kernel.to(dtype).view(1, 1, -1))
        return m[:, 0].transpose(0, 1)

    def forward(self, patch_scores: torch.Tensor) -> torch.Tensor:
        a_h = self.axis_operator(patch_scores.shape[-2], patch_scores.dtype)
        a_w = self.axis_operator(patch_scores.shape[-1], patch_scores.dtype)
        return torch.matmul(torch.matmul(a_h, patch_scores), a_w.transpose(0, 1))


