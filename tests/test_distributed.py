"""Scale-out on Ray (local instance): batch scoring to Parquet, resumable; many models at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from anomalens.cli import app

runner = CliRunner()
pq = pytest.importorskip("pyarrow.parquet")


def test_batch_predict_on_ray_matches_single_process(fitted_patchcore, hazelnut, tmp_path):
    """2 Ray workers give the single-process scores; a bad file is an error row, not a failed job."""
    from anomalens.distributed import batch_predict

    det, model_dir = fitted_patchcore
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    images = sorted((hazelnut / "test").rglob("*.png"))
    out = tmp_path / "scores.parquet"
    s = batch_predict(model_dir, [hazelnut / "test", bad], out, workers=2, chunk_size=4, engine="torch")
    assert s.n_images == 11 and s.n_chunks == 3 and s.n_scored == 11 and s.n_errors == 1
    table = pq.read_table(out).to_pydict()
    assert sorted(table["path"]) == sorted([str(p) for p in images] + [str(bad)])
    got = dict(zip(table["path"], table["pred_score"]))
    for p in det.predict(images):
        # 1 thread vs 2: rounding only (scores are in normal-image SDs and can be near 0, hence abs)
        assert got[p.image_path] == pytest.approx(p.pred_score, rel=1e-5, abs=1e-4)
    row = table["path"].index(str(bad))
    assert table["pred_score"][row] is None and "bad.png" in table["error"][row]
    # the default engine (auto: the detector's graph on ONNX Runtime) gives the same scores too
    out2 = tmp_path / "onnx.parquet"
    batch_predict(model_dir, [hazelnut / "test"], out2, workers=1, chunk_size=16)
    t2 = pq.read_table(out2).to_pydict()
    for path, score in zip(t2["path"], t2["pred_score"]):
        assert score == pytest.approx(got[path], rel=1e-4)
    # another model into the same output is refused
    r = runner.invoke(app, ["batch-predict", str(model_dir), str(hazelnut / "test" / "good"), "--out", str(out)])
    assert r.exit_code == 2 and "another run" in r.output


def test_batch_predict_resumes_after_kill(fitted_patchcore, transistor, tmp_path):
    """Kill the job (SIGKILL, with its Ray processes) after a few parts; the re-run completes the
    dataset with every image exactly once."""
    from anomalens.distributed import batch_predict

    _, model_dir = fitted_patchcore
    test_dir = transistor / "test"
    out = tmp_path / "scores.parquet"
    cmd = [sys.executable, "-m", "anomalens.cli", "batch-predict", str(model_dir), str(test_dir), "--out", str(out),
           "--chunk", "5", "--workers", "2", "--engine", "torch"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    try:
        while time.time() - t0 < 180 and len(list(out.glob("part-*.parquet"))) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # the Ray actors share the job's process group; a killed actor caught inside its rename still
        # lands that part, so count only once every process of the group is gone
        t1 = time.time()
        while time.time() - t1 < 30:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    written = len(list(out.glob("part-*.parquet")))
    assert 3 <= written < 20, f"{written} parts written before the kill"
    s = batch_predict(model_dir, [test_dir], out, workers=2, chunk_size=5, engine="torch")
    # every part on disk is kept, and the rest is scored: no gap, no duplicate (checked below too)
    assert s.n_skipped >= written and s.n_scored == 100 - 5 * s.n_skipped
    paths = pq.read_table(out).column("path").to_pylist()
    assert len(paths) == 100 and len(set(paths)) == 100  # every image exactly once
    assert not list(out.glob("_tmp-*")) and not list(out.glob(".part-*.tmp"))  # no half-written part left


def test_fit_many_on_ray(hazelnut, tmp_path):
    """One model per category folder; a category that cannot be fitted is reported, the others finish."""
    from anomalens import load_detector

    root = tmp_path / "plant"
    root.mkdir()
    (root / "hazelnut").symlink_to(hazelnut, target_is_directory=True)
    few = root / "new_product"
    few.mkdir()
    for p in sorted((hazelnut / "train" / "good").glob("*.png"))[:3]:
        (few / p.name).symlink_to(p)
    r = runner.invoke(app, ["fit-many", str(root), "--out", str(tmp_path / "models"), "--false-alarm-rate", "0.05"])
    assert r.exit_code == 1, r.output  # one category failed
    assert "hazelnut" in r.output and "needs at least 19 normal calibration images, got 3" in r.output
    det = load_detector(tmp_path / "models" / "hazelnut")
    assert det.fit_info["n_train_images"] == 50
