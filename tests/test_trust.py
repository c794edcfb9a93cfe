"""Decisions users can trust: conformal thresholds, explanations, defect types (real images)."""

from __future__ import annotations

import os

import numpy as np
import torch
import pytest
from typer.testing import CliRunner

from conftest import DATA, require

from anomalens.cli import app
from anomalens.errors import CalibrationError

runner = CliRunner()


@pytest.fixture(scope="module")
def transistor_run(transistor, transistor_patchcore):
    """PatchCore fitted on transistor (defaults), and its predictions on the test set."""
    from anomalens.evaluation import evaluate

    return transistor_patchcore, evaluate(transistor_patchcore, transistor)


def test_false_alarm_rate_within_binomial_band_on_transistor(transistor_run):
    """The threshold comes from normal training images only; on the 60 good test images the observed
    false-alarm fraction stays within the 95% binomial band of each requested rate (3 of 60 at 10%),
    and what the threshold costs is checked: at the default 1% it detects at least 90% of the
    defective images (92.5% measured)."""
    from anomalens.evaluation import threshold_table

    det, res = transistor_run
    assert det.calibration.source == "leave-one-out" and det.calibration.scores.shape == (213,)
    rows = threshold_table(det, res.predictions, alphas=(0.01, 0.05, 0.1))
    for r in rows:
        assert r["n_good"] == 60
        assert r["band"][0] <= r["observed_far"] <= r["band"][1], r
    # a stricter rate never gives a lower threshold, and detection follows
    assert rows[0]["threshold"] >= rows[1]["threshold"] >= rows[2]["threshold"]
    assert rows[0]["detection_rate"] >= 0.9 and rows[2]["detection_rate"] >= 0.8, rows


def test_false_alarm_promise_on_magnetic_tile():
    """The same promise on a category no threshold rule was chosen on (grayscale textures of many
    sizes): fitted on all 300 good training images with the defaults, the 100 good test images are
    flagged at most at the upper edge of the 95% binomial band of each rate (measured 0 / 5 / 9 of
    100 at 1 / 5 / 10%; ``benchmarks/trust.py``). Only the good test images are predicted: the
    promise is about them, and the 392 defective ones would triple the test's time."""
    from anomalens import PatchCore
    from anomalens.data import MVTecCategory
    from anomalens.evaluation import threshold_table

    cat = MVTecCategory(require(DATA / "magnetic_tile"))
    det = PatchCore().fit(cat)
    assert det.calibration.source == "leave-one-out" and det.calibration.scores.shape == (300,)
    good = [s for s in cat.test_samples() if s.defect_type == "good"]
    rows = threshold_table(det, det.predict(good), alphas=(0.01, 0.05, 0.1))
    for r in rows:
        assert r["n_good"] == 100
        assert r["band"][0] <= r["observed_far"] <= r["band"][1], r
    assert rows[2]["false_alarms"] >= 1  # not vacuous: at 10% some good tiles do score above the threshold


def test_defect_types_discovered_on_transistor(transistor_run):
    """Clustering the defective images' regions recovers the four defect folders (NMI goal 0.6)."""
    from anomalens.discovery import agreement, discover_defect_types

    det, res = transistor_run
    defective = [p for p in res.predictions if p.gt_label == 1]
    clusters = discover_defect_types(det, defective)
    assert len(clusters.refs) == 40  # one region per defective image, flagged or not
    assert 2 <= clusters.n_clusters <= 8
    score = agreement([defective[i].defect_type for i, _ in clusters.refs], clusters.labels)
    assert score["nmi"] >= 0.55, score


def test_too_few_calibration_images_is_a_clear_error(hazelnut, tmp_path):
    """A rate asked for explicitly is strict: too few images stop fit before any work, saying how many."""
    from anomalens import PatchCore

    with pytest.raises(CalibrationError, match="needs at least 99 normal calibration images, got 50"):
        PatchCore(false_alarm_rate=0.01).fit(hazelnut)  # raised before any feature is extracted
    with pytest.raises(CalibrationError, match="needs at least 19 .* got 10"):
        PatchCore(false_alarm_rate=0.05).fit(hazelnut, holdout=0.2)
    r = runner.invoke(app, ["fit", str(hazelnut), "--out", str(tmp_path / "m"), "--false-alarm-rate", "0.01"])
    assert r.exit_code == 2 and "needs at least 99 normal calibration images" in r.output


def test_held_out_calibration(hazelnut, fitted_patchcore, tmp_path):
    """Split conformal: hold out 40% at fit time; or add new normal images to a fitted model's
    calibration (pooled with its leave-one-out scores; --replace uses them alone)."""
    from anomalens import PatchCore, load_detector

    det = PatchCore(false_alarm_rate=0.05).fit(hazelnut, holdout=0.4)
    assert det.calibration.source == "held-out" and det.calibration.scores.shape == (20,)
    assert det.fit_info["n_train_images"] == 30
    det.save(tmp_path / "m")
    again = load_detector(tmp_path / "m")
    assert again.calibration.source == "held-out" and again.threshold == det.threshold

    base, model_dir = fitted_patchcore
    model = load_detector(model_dir)  # a copy: the session's model stays as fitted
    train = sorted((hazelnut / "train" / "good").glob("*.png"))
    with pytest.raises(CalibrationError, match="50 of the 50 calibration images were used to fit the model"):
        model.calibrate(train)
    good_test = sorted((hazelnut / "test" / "good").glob("*.png"))
    with pytest.raises(CalibrationError, match="needs at least 19 normal calibration images, got 2"):
        model.calibrate(good_test, replace=True)  # 2 images alone cannot set a 5% threshold
    model.calibrate(good_test)  # added to the 50 leave-one-out scores
    cal = model.calibration
    assert cal.scores.size == 52 and cal.source == "leave-one-out+held-out" and model.false_alarm_rate == 0.05
    np.testing.assert_array_equal(cal.scores[:50], base.calibration.scores)
    assert np.mean(cal.scores > cal.threshold) <= 0.05  # the pooled threshold keeps the rate on its own scores
    with pytest.raises(CalibrationError, match="already in the model's calibration"):
        model.calibrate(good_test)  # an image counts once
    r = runner.invoke(app, ["calibrate", str(model_dir), str(hazelnut / "test" / "good"), "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "calibration now holds 52 normal scores (50 + 2 added)" in " ".join(r.output.split())
    assert load_detector(tmp_path / "c").calibration.added == cal.added
    r = runner.invoke(app, ["calibrate", str(model_dir), str(hazelnut / "test" / "good"), "--replace", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "got 2" in r.output and not (tmp_path / "r").exists()

    # best-F1 threshold from labelled images, kept through save/load: an MVTec AD category, or good/
    # beside folders of defective images
    layout = tmp_path / "lab"
    layout.mkdir()
    for name, src in (("good", "good"), ("ng", "crack"), ("scratched", "print")):
        (layout / name).symlink_to(hazelnut / "test" / src)
    for data, out in ((hazelnut, "f1"), (layout, "f1_folders")):
        r = runner.invoke(app, ["calibrate", str(model_dir), str(data), "--f1", "--out", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
        f1 = load_detector(tmp_path / out)
        assert f1.calibration.mode == "f1" and "best-F1" in f1.calibration.note
    assert "on 6 labelled images (4 defective)" in f1.calibration.note
    f1 = load_detector(tmp_path / "f1")
    preds = f1.predict(sorted((hazelnut / "test").rglob("*.png")))
    labels = [int("/good/" not in p.image_path) for p in preds]
    assert [p.pred_label for p in preds] == labels  # hazelnut_reduced's test set is separable


def test_evidence_points_to_the_training_image_a_patch_came_from(hazelnut, fitted_patchcore):
    """Copy an 80 px patch of a training image (around one of its memory-bank patches) into a good
    test image elsewhere: the image is flagged, and the evidence names that training image and the
    same place in it."""
    from anomalens.io import read_image

    det, _ = fitted_patchcore
    train = sorted((hazelnut / "train" / "good").glob("*.png"))
    goods = [read_image(p) for p in sorted((hazelnut / "test" / "good").glob("*.png"))]
    bank = det.banks[-1]  # evidence comes from the largest scale's bank
    rng = np.random.default_rng(0)
    half, hits, flagged, trials = 40, 0, 0, 24
    for t in range(trials):
        ti, pos = (int(v) for v in bank.origin(torch.tensor([int(rng.integers(bank.index.numel()))])))
        gh, gw = (int(v) for v in bank.grids[ti])
        ty, tx = divmod(pos, gw)
        src = read_image(train[ti])
        size = src.shape[0]
        cx, cy = int((tx + 0.5) * size / gw), int((ty + 0.5) * size / gh)
        x0, y0 = min(max(0, cx - half), size - 2 * half), min(max(0, cy - half), size - 2 * half)
        px, py = size - 2 * half - x0, size - 2 * half - y0  # the mirrored position: out of place
        img = goods[t % len(goods)].copy()
        img[py : py + 2 * half, px : px + 2 * half] = src[y0 : y0 + 2 * half, x0 : x0 + 2 * half]
        pred = det.predict([img])[0]
        ev = pred.evidence
        if pred.pred_label == 0 or ev is None:  # e.g. plain background pasted on background: nothing out of place
            continue
        flagged += 1
        assert ev.train_image == os.path.abspath(train[ev.train_index])
        # the same training image, and the two crops sit at the same offset inside the pasted patch
        tcx, tcy = (ev.test_box[0] + ev.test_box[2]) / 2 - px, (ev.test_box[1] + ev.test_box[3]) / 2 - py
        scx, scy = (ev.train_box[0] + ev.train_box[2]) / 2 - x0, (ev.train_box[1] + ev.train_box[3]) / 2 - y0
        hits += ev.train_index == ti and abs(tcx - scx) <= 16 and abs(tcy - scy) <= 16
    # 16 of 24 with the defaults, EfficientNet-Lite2 or Lite0 (8 cases gave 4-6 hits by draw). Lite2 flags
    # 23 of the 24 and names the right training image in 17 (Lite0: 24 and 21), so most of its misses name
    # another image; Lite0's misses were mostly the right image 18-32 px off (no reflected border;
    # border_pad=32 placed 7 of 8, and costs detection: transistor 99.8 -> 97.2 at 320 px). By chance: ~0.
    assert flagged >= trials - 2 and hits >= 14, f"{flagged} of {trials} flagged; source image and place found in {hits}"


def test_discover_cli_groups_flagged_images(hazelnut, fitted_patchcore, tmp_path):
    """`anomalens discover`: one row per flagged image, a gallery per type, types that follow the folders."""
    import csv

    from PIL import Image

    from anomalens.discovery import agreement

    _, model_dir = fitted_patchcore
    r = runner.invoke(app, ["discover", str(model_dir), str(hazelnut / "test"), "--out", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(tmp_path / "d" / "defect_types.csv")))
    assert len(rows) >= 6 and all("/good/" not in row["path"] for row in rows)  # flagged images only
    types = {row["defect_type"] for row in rows}
    galleries = sorted((tmp_path / "d" / "gallery").glob("type_*.png"))
    assert len(galleries) == len(types) >= 2
    assert Image.open(galleries[0]).size[1] == 120  # one row of 120 px tiles
    folders = [row["path"].split("/")[-2] for row in rows]
    assert agreement(folders, [int(row["defect_type"]) for row in rows])["nmi"] >= 0.6
