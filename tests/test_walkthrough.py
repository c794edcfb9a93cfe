"""The walkthrough of a quality engineer with plain folders (good parts, rejects, rarely masks),
through the command line, on real MVTec AD hazelnut images."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from anomalens.cli import app
from anomalens.detectors import load_detector
from anomalens.io import read_image

runner = CliRunner()
DEFECTS = ("crack", "cut", "hole", "print")


def _link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)
    return dst


def _reject_folders(hazelnut: Path, root: Path) -> Path:
    """``root/good`` (the good test parts) and ``root/ng`` (every defective one, named <defect>_<name>): symlinks."""
    for f in sorted((hazelnut / "test" / "good").glob("*.png")):
        _link(f, root / "good" / f.name)
    for d in DEFECTS:
        for f in sorted((hazelnut / "test" / d).glob("*.png")):
            _link(f, root / "ng" / f"{d}_{f.name}")
    return root


def _json_rows(res: Path) -> list[dict]:
    """The detailed rows of a results folder (JSON Lines, or the older one JSON list)."""
    lines = res / "predictions.jsonl"
    if lines.exists():
        return [json.loads(line) for line in lines.read_text().splitlines() if line.strip()]
    return json.loads((res / "predictions.json").read_text())


def _colour_count(rgb: np.ndarray, colour: str) -> int:
    r, g, b = (rgb[..., k].astype(int) for k in range(3))
    if colour == "red":
        return int(np.sum((r > 170) & (g < 90) & (b < 90)))
    return int(np.sum((g > 120) & (r < 90) & (b < 130)))  # green


def _check_overlay(path: str, image_path: str, decision: str) -> None:
    """Two panels (the part unchanged, its heatmap), a colour bar (dark to bright upwards), and the
    decision tag in its colour above them."""
    fig = np.asarray(Image.open(path).convert("RGB"))
    img = read_image(image_path)
    h, w = img.shape[:2]
    assert fig.shape[0] > h and fig.shape[1] > 2 * w
    body, header = fig[-h:], fig[:-h]
    assert np.array_equal(body[:, :w], img)  # the part, as it is
    gap = 0
    while np.all(body[:, w + gap] == 255):
        gap += 1
    assert gap >= 1
    heat = body[:, w + gap : 2 * w + gap].astype(int)
    assert heat.shape[:2] == (h, w) and np.abs(heat - img).mean() > 10  # the heatmap panel beside it
    bar = body[:, 2 * w + 2 * gap : 2 * w + 2 * gap + 8].astype(float).mean(axis=2)
    assert bar[:4].mean() > bar[-4:].mean() + 100  # colour bar: bright (high scores) at the top
    red, green = _colour_count(header, "red"), _colour_count(header, "green")
    if decision == "NG":
        assert red > 100 and green == 0, (red, green)
    else:
        assert green > 100 and red == 0, (red, green)


def test_walkthrough_on_plain_folders(hazelnut, tmp_path):
    # fit on a plain folder of good parts
    model = tmp_path / "model"
    r = runner.invoke(app, ["fit", str(hazelnut / "train" / "good"), "--image-size", "256", "--out", str(model)])
    assert r.exit_code == 0, r.output
    det = load_detector(model)
    n_cal = det.calibration.scores.size
    assert n_cal == 50

    # predict a plain folder of incoming parts
    rejects = _reject_folders(hazelnut, tmp_path / "line")
    incoming = tmp_path / "incoming"
    for f in sorted(rejects.rglob("*.png")):
        _link(f.resolve(), incoming / f"{f.parent.name}_{f.name}")
    res = tmp_path / "pred"
    r = runner.invoke(app, ["predict", str(model), str(incoming), "--out", str(res)])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(res / "predictions.csv")))
    assert len(rows) == 10 and all(row["error"] == "" for row in rows)
    threshold = float(rows[0]["threshold"])
    score = np.array([float(row["pred_score"]) for row in rows])
    norm = np.array([float(row["normalized_score"]) for row in rows])
    ng = np.array([row["decision"] == "NG" for row in rows])
    assert np.all((norm >= 0) & (norm <= 1))
    assert np.array_equal(norm > 0.5, ng) and np.array_equal(ng, score > threshold)
    order = np.argsort(score)
    assert np.all(np.diff(norm[order]) >= 0)  # ranks as pred_score does
    above = order[score[order] > det.calibration.scores.min()]
    assert np.all(np.diff(norm[above]) > 0)  # strictly, above the lowest calibration score (NG included)
    assert ng.sum() >= 6 and not any(ng[i] for i, row in enumerate(rows) if "good_" in row["path"])
    floor = [row for row in rows if row["p_value_at_floor"] == "True"]
    assert len(floor) >= 5  # defects beyond every calibration image: the p-value cannot rank them
    for row in rows:
        p = float(row["p_value"])
        if row["p_value_at_floor"] == "True":
            assert p == pytest.approx(1 / (n_cal + 1)) and row["p_value_text"] == f"<= 1/{n_cal + 1}"
        else:
            assert p > 1 / (n_cal + 1) + 1e-9 and row["p_value_text"] == f"{p:.3f}"
    # the normalized score spreads the floored NG parts by severity where the p-value cannot
    assert len({float(row["normalized_score"]) for row in floor}) == len(floor)
    detail = {d["path"]: d for d in _json_rows(res)}
    for decision in ("NG", "OK"):
        row = next(row for row in rows if row["decision"] == decision)
        _check_overlay(detail[row["path"]]["overlay"], row["path"], decision)

    # exactly 0.5 at the threshold, on a real image through the real prediction path
    part = str(rejects / "ng" / "crack_000.png")
    s = det.predict([part])[0].pred_score
    det.calibration = dataclasses.replace(det.calibration, threshold=s)
    at = det.predict([part])[0]
    assert at.pred_score == s and at.normalized_score == 0.5 and at.pred_label == 0

    # one numpy image is one image; a stack of N is N
    arr = read_image(part)
    one = det.predict(arr)
    assert len(one) == 1 and one[0].pred_score == pytest.approx(s, rel=1e-5)
    assert len(det.predict(np.stack([arr, arr[:, ::-1]]))) == 2

    # evaluate good/ + ng/ without masks: image metrics, and why there are no pixel metrics
    ev = tmp_path / "eval"
    r = runner.invoke(app, ["evaluate", str(model), str(rejects), "--out", str(ev), "--report"])
    assert r.exit_code == 0, r.output
    d = json.loads((ev / "metrics.json").read_text())
    m = d["metrics"]
    assert m["image_auroc"] >= 0.95 and m["image_f1_max"] >= 0.9 and m["image_ap"] >= 0.95, m
    assert m["false_alarm_rate"] == 0.0 and m["detection_rate"] >= 0.75, m
    assert "pixel_auroc" not in m and "aupro" not in m
    assert set(d["metrics_absent"]) == {"pixel_auroc", "aupro"} and "mask" in d["metrics_absent"]["aupro"]
    assert d["layout"] == "good+defective" and d["ground_truth"] == {"n_good": 2, "n_defective": 8, "n_defective_with_mask": 0}
    out = " ".join(r.output.split())
    assert "not computed: pixel AUROC, AUPRO" in out and "no ground-truth masks" in out, r.output
    page = (ev / "report.html").read_text()
    assert "Not computed" in page and "no ground-truth masks" in page

    # anomalib's Folder layout with masks named by image stem: pixel metrics too
    masks = tmp_path / "masks"
    for d_ in DEFECTS:
        for f in sorted((hazelnut / "ground_truth" / d_).glob("*_mask.png")):
            _link(f, masks / f"{d_}_{f.name}")
    ev2 = tmp_path / "eval_folder"
    args = ["evaluate", str(model), str(rejects), "--normal-dir", "good", "--abnormal-dir", "ng", "--mask-dir", str(masks)]
    r = runner.invoke(app, [*args, "--out", str(ev2)])
    assert r.exit_code == 0, r.output
    d = json.loads((ev2 / "metrics.json").read_text())
    assert d["metrics_absent"] == {} and d["layout"] == "folder", d
    assert d["metrics"]["pixel_auroc"] >= 0.95 and d["metrics"]["aupro"] >= 0.8, d["metrics"]
    assert d["metrics"]["image_auroc"] == m["image_auroc"]

    # one mask missing: no pixel metric rather than one over the masked defects only
    (masks / "hole_001_mask.png").unlink()
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "eval_partial")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "eval_partial" / "metrics.json").read_text())
    assert "pixel_auroc" not in d["metrics"] and "1 of 8 defective images" in d["metrics_absent"]["pixel_auroc"]
    assert "hole_001.png" in d["metrics_absent"]["pixel_auroc"]


def test_evaluate_says_which_layouts_it_reads(tmp_path, hazelnut):
    """A folder of unlabelled images is refused with the layouts evaluate reads, not a traceback."""
    r = runner.invoke(app, ["evaluate", str(tmp_path / "nomodel"), str(hazelnut / "train" / "good"), "--out", str(tmp_path / "e")])
    assert r.exit_code == 2
    from anomalens.folders import labelled_samples

    with pytest.raises(Exception, match="good/ beside one or more folders") as e:
        labelled_samples(hazelnut / "train" / "good")
    assert "anomalens predict" in str(e.value)


def test_scaleout_options_reach_the_work(monkeypatch, tmp_path):
    """fit-many takes --backbone and --image-size as fit does; batch-predict takes --chunk as predict
    does."""
    import anomalens.distributed as dist

    seen: dict = {}
    monkeypatch.setattr(dist, "fit_many", lambda root, out, **kw: seen.update(kw) or [])
    r = runner.invoke(app, ["fit-many", str(tmp_path), "-o", str(tmp_path / "m"), "--backbone", "mobilenet_v2", "--image-size", "256,320"])
    assert r.exit_code == 0, r.output
    assert seen["params"] == {"backbone": "mobilenet_v2", "image_size": [256, 320]}

    class Summary:
        n_images = n_chunks = n_skipped = n_scored = workers = n_errors = 0
        seconds = images_per_second = 0.0

    monkeypatch.setattr(dist, "batch_predict", lambda model_dir, inputs, out, **kw: seen.update(kw) or Summary())
    r = runner.invoke(app, ["batch-predict", str(tmp_path), str(tmp_path), "-o", str(tmp_path / "p"), "--chunk", "5"])
    assert r.exit_code == 0, r.output
    assert seen["chunk_size"] == 5
    for cmd in ("batch-predict", "predict"):
        assert "--chunk-size" not in runner.invoke(app, [cmd, "--help"]).output
