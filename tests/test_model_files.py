"""Saving and loading: identical results after a round trip; refused when modified or incompatible."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anomalens import load_detector
from anomalens.errors import ModelFileError


def _test_images(hazelnut):
    return sorted((hazelnut / "test").rglob("*.png"))[:4]


def test_round_trip_gives_identical_scores_and_maps(fitted_patchcore, hazelnut):
    det, model_dir = fitted_patchcore
    loaded = load_detector(model_dir)
    imgs = _test_images(hazelnut)
    a, b = det.predict(imgs), loaded.predict(imgs)
    assert [p.pred_score for p in a] == [p.pred_score for p in b]
    for pa, pb in zip(a, b):
        np.testing.assert_array_equal(pa.anomaly_map, pb.anomaly_map)
        assert pa.pred_label == pb.pred_label and pa.p_value == pb.p_value
    assert loaded.threshold == det.threshold and loaded.get_params() == det.get_params()
    # the image score chosen at fit time (50 images: the top-1% mean) is the one saved and loaded
    assert det.image_score == loaded.image_score == loaded.image_score_option == "mean_top1"


def _copy(model_dir, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(model_dir, d)
    return d


def test_tampered_tensor_file_is_refused(fitted_patchcore, tmp_path):
    d = _copy(fitted_patchcore[1], tmp_path)
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="checksum"):
        load_detector(d)


def _edit_config(model_dir, tmp_path, edit, reseal):
    """Copy the model, apply ``edit`` to its config; ``reseal`` recomputes the config checksum
    (as a newer anomalens, or a careful forger, would write it)."""
    from anomalens.serialization import _config_digest

    d = _copy(model_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    if reseal:
        cfg["config_sha256"] = _config_digest(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_edited_config_is_refused(fitted_patchcore, tmp_path):
    d = _edit_config(fitted_patchcore[1], tmp_path, lambda c: c.update(threshold=0.0), reseal=False)
    with pytest.raises(ModelFileError, match="modified"):
        load_detector(d)


def test_other_format_version_is_refused(fitted_patchcore, tmp_path):
    d = _edit_config(fitted_patchcore[1], tmp_path, lambda c: c.update(format_version=99), reseal=True)
    with pytest.raises(ModelFileError, match="format version 99"):
        load_detector(d)


def test_shape_mismatch_with_parameters_is_refused(fitted_patchcore, tmp_path):
    """A config whose parameters no longer match its tensors (e.g. another backbone) is refused."""

    def other_backbone(cfg):
        cfg["params"].update(backbone="mobilenet_v2", layers=["features.6", "features.13"])

    d = _edit_config(fitted_patchcore[1], tmp_path, other_backbone, reseal=True)
    with pytest.raises(ModelFileError, match="memory_bank"):
        load_detector(d)


def test_missing_or_garbage_model_is_refused(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_detector(tmp_path / "nothing")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_detector(tmp_path / "m")
