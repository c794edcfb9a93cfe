"""Few-shot PatchCore on real images: k = 1 (batch-relative decisions) and k = 4 with augmented views."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from anomalens.cli import app
from anomalens.errors import CalibrationError, ConfigError
from anomalens.metrics import image_auroc


def test_one_shot_end_to_end(hazelnut, tmp_path):
    model = tmp_path / "m1"
    r = CliRunner().invoke(app, ["fit", str(hazelnut), "--shots", "1", "--seed", "3", "--out", str(model)])
    assert r.exit_code == 0, r.output
    assert "set per batch" in r.output
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["fit_info"]["shots"] == 1 and len(cfg["train_images"]) == 1 and cfg["threshold"] is None
    # PatchCore's few-shot default: the shot and its 90, 180 and 270-degree turns in the bank
    assert cfg["fit_info"]["augment"] == "rotations" and cfg["train_views"] == ["id", "rot90", "rot180", "rot270"]
    assert "augment rotations" in r.output
    assert "image score max" in r.output  # one shot: the maximum

    r = CliRunner().invoke(app, ["predict", str(model), str(hazelnut / "test"), "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(tmp_path / "r" / "predictions.csv")))
    assert len(rows) == 10
    labels = [0 if "/good/" in x["path"] else 1 for x in rows]
    scores = [float(x["pred_score"]) for x in rows]
    assert image_auroc(labels, scores) >= 0.8
    # the batch set one threshold for all, and the decisions follow it
    thresholds = {float(x["threshold"]) for x in rows}
    assert len(thresholds) == 1
    t = thresholds.pop()
    assert [int(x["pred_label"]) for x in rows] == [int(s > t) for s in scores]
    assert len(list((tmp_path / "r" / "overlays").glob("*.png"))) == 10

    # too few images for a batch-relative decision: a clear error, and no ONNX export of that rule
    r = CliRunner().invoke(app, ["predict", str(model), str(hazelnut / "test" / "good"), "--out", str(tmp_path / "r2")])
    assert r.exit_code != 0 and "at least 5 images" in r.output
    r = CliRunner().invoke(app, ["export", str(model)])
    assert r.exit_code != 0 and "batch" in r.output

    # served: one image is a 409 that says why; a batch of 6 is decided together
    from fastapi.testclient import TestClient

    from anomalens.service import create_app

    client = TestClient(create_app({"one": model}))
    assert client.get("/models").json()["models"][0]["threshold"] is None
    files = sorted((hazelnut / "test").rglob("*.png"))
    r = client.post("/predict", files=[("files", (f.name, f.read_bytes(), "image/png")) for f in files[:1]])
    assert r.status_code == 409 and "at least 5 images" in r.json()["error"]
    r = client.post("/predict", files=[("files", (f.name, f.read_bytes(), "image/png")) for f in files[:6]])
    assert r.status_code == 200 and len({x["threshold"] for x in r.json()["results"]}) == 1


def test_few_shot_with_rotations_threshold_evidence_and_recalibration(hazelnut):
    from anomalens.data import MVTecCategory
    from anomalens.detectors import PatchCore

    cat = MVTecCategory(hazelnut)
    det = PatchCore().fit(cat, shots=4, augment="rotations", seed=1)
    for bank in det.banks:  # every patch of 4 views of 4 images, at each scale
        assert bank.bank.shape[0] == 4 * 4 * int(bank.grids[0].prod()) and bank.grids.shape[0] == 16
    cal = det.calibration
    assert cal.source == "few-shot" and cal.scores.size == 4
    assert det.false_alarm_rate == pytest.approx(0.2)  # 4 scores support 1/(4+1), not the default 0.01
    assert det.threshold == pytest.approx(cal.scores.max())
    assert "false-alarm rate 0.2, not 0.01" in cal.note

    samples = cat.test_samples()
    preds = det.predict(samples)
    assert image_auroc([s.gt_label for s in samples], [p.pred_score for p in preds]) >= 0.8
    flagged = [p for p in preds if p.pred_label and p.evidence is not None]
    assert flagged
    for p in flagged:
        ev = p.evidence
        assert ev.train_view in ("id", "rot90", "rot180", "rot270")
        assert ev.train_image in det.train_images
        x0, y0, x1, y1 = ev.train_box
        assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256

    # the other 46 training images calibrate it properly (split conformal at 5%)
    rest = [p for p in cat.train_paths() if str(p) not in det.train_images]
    assert len(rest) == 46
    with pytest.raises(CalibrationError):  # the shots themselves are refused
        det.calibrate(cat.train_paths(), 0.05)
    n_shots = det.calibration.scores.size
    det.calibrate(rest, 0.05)  # added to the few-shot calibration scores
    assert det.calibration.source == "few-shot+held-out" and det.false_alarm_rate == 0.05
    assert det.calibration.scores.size == n_shots + 46


def test_few_shot_model_round_trip(hazelnut, tmp_path):
    from anomalens.detectors import PatchCore, load_detector

    det = PatchCore().fit(hazelnut, shots=2, augment="flips", seed=0)
    det.save(tmp_path / "m")
    back = load_detector(tmp_path / "m")
    assert back.train_views == ["id", "hflip", "vflip"] and back.calibration.note == det.calibration.note
    imgs = sorted((hazelnut / "test").rglob("*.png"))[:3]
    np.testing.assert_allclose(back.decision_function(imgs), det.decision_function(imgs), rtol=1e-6)


def test_few_shot_refusals(hazelnut):
    from anomalens.detectors import PaDiM, PatchCore

    with pytest.raises(ConfigError, match="no memory bank"):
        PaDiM().fit(hazelnut, shots=2)
    with pytest.raises(ConfigError, match="shots must be in"):
        PatchCore().fit(hazelnut, shots=51)
    with pytest.raises(ConfigError, match="give shots"):
        PatchCore().fit(hazelnut, augment="rotations")
    with pytest.raises(ConfigError, match="augment must be one of"):
        PatchCore().fit(hazelnut, shots=2, augment="rot45")


@pytest.mark.parametrize("view", ["id", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "antitranspose", "rot45", "rot135", "rot315"])
def test_view_maps_back_to_source(view):
    """A marked pixel of a non-square image, found in the view, maps back to where it was: from view
    pixels, and from fractions of the view's size as evidence crops give it (a 45-degree turn of the
    fractions themselves missed it by 3.5 px here)."""
    from anomalens.augment import apply_view, view_to_source, view_to_source_normalised

    img = np.zeros((60, 100), np.uint8)
    img[25:31, 55:61] = 255  # a 6 x 6 square centred at (58, 28)
    v = apply_view(img, view)
    ys, xs = np.nonzero(v > 127)
    x, y = view_to_source(view, xs.mean() + 0.5, ys.mean() + 0.5, 100, 60)
    tol = 0.01 if view in ("rot45", "rot135", "rot315") else 0  # 45-degree views are interpolated
    assert abs(x - 58) <= 0.5 + tol and abs(y - 28) <= 0.5 + tol and (tol or (x, y) == (58.0, 28.0))
    u, w = view_to_source_normalised(view, (xs.mean() + 0.5) / v.shape[1], (ys.mean() + 0.5) / v.shape[0], 100, 60)
    assert abs(u * 100 - 58) <= 0.51 and abs(w * 60 - 28) <= 0.51


def test_anomalydino_few_shot_end_to_end(hazelnut, tmp_path):
    """AnomalyDINO from the CLI on 2 good images at 448 px, its references rotated in 45-degree steps:
    ranks and localises hazelnut's defects, saves, loads and scores the same; masking keeps the nut."""
    import json

    from anomalens import AnomalyDINO, load_detector
    from anomalens.data import MVTecCategory
    from anomalens.evaluation import evaluate

    model = tmp_path / "dino"
    r = CliRunner().invoke(app, ["fit", str(hazelnut), "--model", "anomalydino", "--shots", "2", "--augment", "rotations45", "--out", str(model)])
    assert r.exit_code == 0, r.output
    assert "vit_small_focus, 448 px" in r.output
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["fit_info"]["grid"] == [32, 32] and len(cfg["train_views"]) == 8
    det = load_detector(model)
    assert isinstance(det, AnomalyDINO) and det.memory_bank.shape == (2 * 8 * 32 * 32, 384)
    res = evaluate(det, hazelnut)
    assert res.metrics["image_auroc"] >= 0.95 and res.metrics["pixel_auroc"] >= 0.97, res.metrics
    assert 0.0 <= min(p.pred_score for p in res.predictions) and max(p.pred_score for p in res.predictions) <= 2.0  # cosine
    # evidence comes from a (possibly rotated) view of a reference image
    flagged = [p for p in res.predictions if p.pred_label and p.evidence is not None]
    assert flagged
    for p in flagged:
        assert p.evidence.train_view in cfg["train_views"] and p.evidence.train_image in det.train_images
        x0, y0, x1, y1 = p.evidence.train_box
        assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256

    masked = AnomalyDINO(masking=True).fit(hazelnut, shots=2)
    assert masked.fit_info["augment"] == "none" and masked.train_views == ["id"]  # AnomalyDINO's default: no views
    from anomalens.detectors.anomalydino import foreground_mask
    from anomalens.io import read_image

    fg = foreground_mask(masked.extract([read_image(MVTecCategory(hazelnut).train_paths()[0])])[0][0])
    assert 0.2 < float(fg.float().mean()) < 0.9  # the nut, not the whole image nor nothing
    assert masked.memory_bank.shape[0] < 2 * 32 * 32  # background patches left out of the bank
    m = evaluate(masked, hazelnut).metrics
    assert m["image_auroc"] >= 0.95, m
