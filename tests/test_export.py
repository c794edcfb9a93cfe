"""ONNX export: the exported file gives the same scores, maps and decisions as the Python model."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from anomalens import load_detector
from anomalens.cli import app

runner = CliRunner()


def assert_parity(python_preds, onnx_preds):
    """Scores and maps within 1e-4 (relative, or of the map's range: fused multi-scale maps are in
    normal-SD units and cross zero), decisions identical but for a score within that tolerance of the
    threshold, p-values identical but where a calibration score lies between the two scores (then one
    step of the >= 100 calibration scores apart: seen on transistor's good/036, scores 5e-6 apart
    across CPUs), masks identical but for pixels at the threshold."""
    assert len(python_preds) == len(onnx_preds)
    for a, b in zip(python_preds, onnx_preds):
        assert a.ok and b.ok
        tol = 1e-4 * max(1.0, abs(a.pred_score))
        assert abs(b.pred_score - a.pred_score) <= tol
        if abs(a.pred_score - a.threshold) > tol:
            assert b.pred_label == a.pred_label
        assert abs(b.p_value - a.p_value) <= 0.01
        np.testing.assert_allclose(b.anomaly_map, a.anomaly_map, rtol=1e-4, atol=1e-4 * float(np.abs(a.anomaly_map).max()))
        assert np.mean(a.pred_mask != b.pred_mask) < 1e-4
        assert len(a.regions) == len(b.regions)


def test_onnx_parity_on_hazelnut_cli(hazelnut, fitted_patchcore, tmp_path):
    """`anomalens export` writes a file whose ONNX Runtime predictions equal the Python ones."""
    from anomalens.runtime import OnnxDetector

    det, model_dir = fitted_patchcore
    out = tmp_path / "m.onnx"
    r = runner.invoke(app, ["export", str(model_dir), "--format", "onnx", "--out", str(out)])
    assert r.exit_code == 0, r.output
    images = sorted((hazelnut / "test").rglob("*.png"))
    onnx_model = OnnxDetector(out)
    assert onnx_model.threshold == det.threshold and onnx_model.pixel_threshold == det.pixel_threshold
    assert_parity(load_detector(model_dir).use_engine("torch").predict(images), onnx_model.predict(images))
    # a batch of 16 (same size) in one call gives the same as one image per call
    batch = [p for p in images][:5] * 3
    s16, _ = onnx_model.score_batch([__import__("anomalens.io", fromlist=["read_image"]).read_image(p) for p in batch])
    assert s16[:5] == pytest.approx([p.pred_score for p in onnx_model.predict(batch[:5])], rel=1e-5)


def test_onnx_parity_few_shot_max_score(hazelnut, tmp_path, monkeypatch):
    """A few-shot model (4 shots: every patch and its turned views in the bank) exports with the
    same scores and decisions; with a distance budget below one image's patch-to-bank distances,
    the exported model scores one image per call, with the same scores."""
    import anomalens.geometry
    from anomalens import PatchCore
    from anomalens.export import export_onnx
    from anomalens.io import read_image
    from anomalens.runtime import OnnxDetector

    det = PatchCore().fit(hazelnut, shots=4, seed=1)
    assert det.train_views == ["id", "rot90", "rot180", "rot270"]
    images = sorted((hazelnut / "test").rglob("*.png"))
    onnx_model = OnnxDetector(export_onnx(det, tmp_path / "few.onnx"))
    assert_parity(det.predict(images), onnx_model.predict(images))
    arrays = [read_image(p) for p in images[:4]]
    whole, _ = onnx_model.score_batch(arrays)
    calls = []
    run = onnx_model.session.run
    monkeypatch.setattr(onnx_model, "session", type("S", (), {"run": lambda self, *a: calls.append(1) or run(*a)})())
    monkeypatch.setattr(anomalens.geometry, "DISTANCE_BUDGET", 1)
    chunked, _ = onnx_model.score_batch(arrays)
    assert len(calls) == 4 and chunked == pytest.approx(whole, rel=1e-5)


def test_onnx_parity_padim(hazelnut, tmp_path):
    from anomalens import PaDiM
    from anomalens.export import export_onnx
    from anomalens.runtime import OnnxDetector

    det = PaDiM(false_alarm_rate=0.05).fit(hazelnut)
    path = export_onnx(det, tmp_path / "padim.onnx")
    images = sorted((hazelnut / "test").rglob("*.png"))
    assert_parity(det.predict(images), OnnxDetector(path).predict(images))


def test_onnx_parity_on_transistor(transistor, transistor_patchcore, tmp_path):
    """All 100 transistor test images (512 x 512): same scores, maps and decisions."""
    from anomalens.data import MVTecCategory
    from anomalens.export import export_onnx
    from anomalens.runtime import OnnxDetector

    path = export_onnx(transistor_patchcore, tmp_path / "t.onnx")
    samples = MVTecCategory(transistor).test_samples()
    a = transistor_patchcore.predict(samples)
    b = OnnxDetector(path).predict(samples)
    assert_parity(a, b)
    assert sum(p.pred_label for p in b) >= 20  # not a degenerate "all OK" comparison


def test_onnx_bad_files(tmp_path, fitted_patchcore):
    from anomalens.errors import ModelFileError
    from anomalens.runtime import OnnxDetector

    with pytest.raises(ModelFileError, match="does not exist"):
        OnnxDetector(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ModelFileError, match="not a loadable ONNX model"):
        OnnxDetector(bad)
    r = runner.invoke(app, ["export", str(fitted_patchcore[1]), "--format", "tflite"])
    assert r.exit_code == 2 and "unknown export format" in r.output


def test_loaded_model_predicts_on_onnx_runtime_by_default(fitted_patchcore, hazelnut, tmp_path, monkeypatch):
    """A model folder's predictions run the same graph on ONNX Runtime: exported into the folder at
    the first prediction (not at fit or save), listed in the manifest, reused by the next load; the
    predictions, and the evidence of flagged images, are the torch engine's."""
    import shutil

    from anomalens.detectors import engine
    from anomalens.manifest import verify_model_dir

    d = tmp_path / "m"
    shutil.copytree(fitted_patchcore[1], d)
    load_detector(d).save(d)  # as `anomalens fit` leaves it: no model.onnx
    assert not (d / "model.onnx").exists()
    fast, slow = load_detector(d), load_detector(d).use_engine("torch")
    assert fast.engine == "onnxruntime" and slow.engine == "torch"
    images = sorted((hazelnut / "test").rglob("*.png"))
    a, b = slow.predict(images), fast.predict(images)
    assert "model.onnx" in verify_model_dir(d)["model_files"] and fast._graph is not None
    assert_parity(a, b)
    flagged = [(x.evidence, y.evidence) for x, y in zip(a, b) if x.pred_label]
    assert len(flagged) >= 5 and all(x is not None and y is not None for x, y in flagged)
    assert [(x.train_index, x.train_grid_xy, x.train_box) for x, _ in flagged] == [(y.train_index, y.train_grid_xy, y.train_box) for _, y in flagged]
    stamp = (d / "model.onnx").stat().st_mtime_ns
    again = load_detector(d)
    assert again.predict(images[:1])[0].pred_score == pytest.approx(b[0].pred_score, rel=1e-6)
    assert (d / "model.onnx").stat().st_mtime_ns == stamp and again._graph is not None  # the cached graph, not a new export
    monkeypatch.setattr(engine, "onnxruntime_available", lambda: False)
    assert load_detector(d).engine == "torch"


def test_an_older_graph_in_a_signed_folder_is_replaced_privately(hazelnut, tmp_path, monkeypatch):
    """A model folder whose cached model.onnx has an older graph format is not run on it: a folder
    signed with a key the reader does not have cannot take a new export, so the detector exports
    privately and still runs on ONNX Runtime, without a warning."""
    import json
    import warnings

    import onnx

    import anomalens.export as ex
    import anomalens.runtime
    from anomalens.errors import ModelFileError
    from anomalens.runtime import OnnxDetector
    from anomalens import PatchCore
    from anomalens.detectors.persistence import save_detector

    key = b"0123456789abcdef0123456789abcdef"
    monkeypatch.delenv("ANOMALENS_MODEL_KEY", raising=False)
    images = sorted((hazelnut / "test").rglob("*.png"))[:2]
    det = PatchCore(image_size=128).fit(sorted((hazelnut / "train" / "good").glob("*.png"))[:6])
    save_detector(det, tmp_path / "m", key=key)
    with monkeypatch.context() as m:
        older = ex.ONNX_FORMAT_VERSION - 1
        m.setattr(ex, "ONNX_FORMAT_VERSION", older)
        m.setattr(anomalens.runtime, "ONNX_FORMAT_VERSION", older)  # as an older anomalens wrote and read it
        load_detector(tmp_path / "m", key=key).predict(images[:1])  # caches an older-format graph, signed
    meta = json.loads(onnx.load(str(tmp_path / "m" / "model.onnx")).metadata_props[0].value)
    assert meta["format_version"] == ex.ONNX_FORMAT_VERSION - 1
    with pytest.raises(ModelFileError, match="export it again"):  # the bare older file is refused
        OnnxDetector(tmp_path / "m" / "model.onnx")
    again = load_detector(tmp_path / "m")  # no key: the folder can be read, not re-signed
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        preds = again.predict(images)
    assert again.engine == "onnxruntime" and again._graph.path.parent != tmp_path / "m"
    np.testing.assert_allclose([p.pred_score for p in preds], [p.pred_score for p in det.use_engine("torch").predict(images)], rtol=1e-4)
