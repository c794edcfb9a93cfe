"""The user's path end to end, through the command line, on real MVTec AD images."""

from __future__ import annotations

import csv
import json

import numpy as np
from conftest import screenshot
from PIL import Image
from typer.testing import CliRunner

from anomalens.cli import app
from anomalens.results import read_rows

runner = CliRunner()


def test_fit_predict_evaluate_cli(hazelnut, tmp_path):
    model = tmp_path / "model"
    # the defaults, as a new user runs them: 50 good images cannot support 1%, so the smallest rate they do
    r = runner.invoke(app, ["fit", str(hazelnut), "--out", str(model)])
    assert r.exit_code == 0, r.output
    assert (model / "config.json").exists() and (model / "model.safetensors").exists()
    assert "false-alarm rate 0.0196, not 0.01" in " ".join(r.output.split()), r.output
    assert "image score max" in r.output  # the paper's maximum patch score, said
    r = runner.invoke(app, ["info", str(model)])
    assert r.exit_code == 0 and "false-alarm rate 0.0196, not 0.01" in " ".join(r.output.split()), r.output

    # predict: one row per image, overlays written, defective images mostly flagged
    test_imgs = sorted((hazelnut / "test").rglob("*.png"))
    res = tmp_path / "pred"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    r = runner.invoke(app, ["predict", str(model), str(hazelnut / "test"), str(broken), "--out", str(res)])
    assert r.exit_code == 3, r.output  # one input could not be scored: its row says why, the rest are scored
    rows = list(csv.DictReader(open(res / "predictions.csv")))
    assert len(rows) == len(test_imgs) + 1
    assert "broken.png" in rows[-1]["error"] and rows[-1]["pred_score"] == ""  # reported, not fatal
    rows = rows[:-1]
    assert all(row["error"] == "" for row in rows)
    overlays = sorted((res / "overlays").glob("*.png"))
    assert len(overlays) == len(test_imgs)
    w, h = Image.open(overlays[0]).size
    assert w > 2 * 256 and h > 256  # header, the part and its heatmap side by side, colour bar
    good_ng = [row for row in rows if "/good/" in row["path"] and row["decision"] == "NG"]
    bad_ng = [row for row in rows if "/good/" not in row["path"] and row["decision"] == "NG"]
    assert len(good_ng) == 0, "a good hazelnut was flagged at a 2% false-alarm threshold"
    assert len(bad_ng) >= 6, f"only {len(bad_ng)} of 8 defective hazelnuts flagged"
    # explanations: every NG row has regions (bounding boxes inside the image) and an evidence panel
    detail = {d["path"]: d for d in read_rows(res / "predictions.jsonl")}
    for row in bad_ng:
        d = detail[row["path"]]
        assert int(row["n_regions"]) == len(d["regions"]) >= 1
        x0, y0, x1, y1 = d["regions"][0]["box"]
        assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256 and d["regions"][0]["area_px"] > 0
        assert d["evidence"]["train_image"].startswith(str(hazelnut / "train" / "good"))
        assert Image.open(d["evidence_png"]).size == (2 * 192 + 8, 192 + 22)

    # evaluate: metrics a broken detector would miss
    ev = tmp_path / "eval"
    r = runner.invoke(app, ["evaluate", str(model), str(hazelnut), "--out", str(ev)])
    assert r.exit_code == 0, r.output
    m = json.loads((ev / "metrics.json").read_text())["metrics"]
    assert m["image_auroc"] >= 0.95, m
    assert m["pixel_auroc"] >= 0.95, m
    assert m["aupro"] >= 0.85, m
    assert "image auroc" in r.output and "crack" in r.output  # the printed table, one row per defect type

    # the HTML report: self-contained, and it renders in headless Chromium
    r = runner.invoke(app, ["evaluate", str(model), str(hazelnut), "--out", str(ev), "--report"])
    assert r.exit_code == 0, r.output
    page = (ev / "report.html").read_text()
    for section in ("Decision threshold", "Metrics (%)", "image ROC", "PRO curve", "Highest-scoring good images",
                    "Lowest-scoring defective images", "Defect types found without labels", "NMI"):
        assert section in page, section
    assert "http://" not in page and "https://" not in page  # nothing fetched: plots and images are inline
    assert page.count("data:image/") >= 3 + 2 * 2  # 3 plots and the two galleries at least
    shot = screenshot((ev / "report.html").as_uri(), tmp_path / "report.png", height=2400)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2400, 1280)
    # a blank or error page is nearly one colour; the report has text, tables, plots and heatmaps
    assert len(np.unique(img.reshape(-1, 3)[::7], axis=0)) > 2000


def test_cli_reports_bad_input_without_traceback(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(app, ["fit", str(empty), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2
    assert "contains no image files" in r.output
    r = runner.invoke(app, ["fit", str(empty), "--out", str(tmp_path / "m"), "--backbone", "resnet50"])
    assert r.exit_code == 2 and "known backbones" in r.output
    r = runner.invoke(app, ["fit", str(empty), "--out", str(tmp_path / "m"), "--coreset-ratio", "0"])
    assert r.exit_code == 2 and "coreset_ratio must be in (0, 1]" in " ".join(r.output.split()), r.output
    r = runner.invoke(app, ["predict", str(tmp_path / "nomodel"), str(empty), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_padim_python_api_on_real_images(hazelnut, tmp_path):
    """PaDiM through the Python API: detects the defects, localises them, survives a save/load."""
    from anomalens import PaDiM, load_detector
    from anomalens.evaluation import evaluate

    det = PaDiM(false_alarm_rate=0.05).fit(hazelnut)
    assert det.calibration is not None and det.calibration.scores.shape == (50,)
    res = evaluate(det, hazelnut)
    assert res.metrics["image_auroc"] >= 0.9, res.metrics
    assert res.metrics["pixel_auroc"] >= 0.93, res.metrics
    det.save(tmp_path / "padim")
    again = load_detector(tmp_path / "padim")
    imgs = sorted((hazelnut / "test" / "crack").glob("*.png"))
    assert [p.pred_score for p in again.predict(imgs)] == [p.pred_score for p in det.predict(imgs)]
