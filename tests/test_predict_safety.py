"""`anomalens predict` unattended: every input a row, results kept through a kill, memory bounded by
pixels, and an image reader that only ever answers with an image or an ImageReadError (issue 34)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from anomalens.errors import ImageReadError
from anomalens.io import read_image
from anomalens.results import read_rows

PREDICT = [sys.executable, "-m", "anomalens", "predict"]


@pytest.fixture(scope="module")
def model(hazelnut, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("predict-safety") / "model"
    res = subprocess.run([sys.executable, "-m", "anomalens", "fit", str(hazelnut), "--out", str(d), "--image-size", "256"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return d


def test_every_input_gets_a_row_and_the_exit_code_says_so(model, hazelnut, tmp_path):
    good = sorted((hazelnut / "test" / "good").iterdir())[0]
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "good.png").symlink_to(good)
    (bad / "loop.png").symlink_to(bad / "loop.png")
    (bad / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (bad / "folder.png").mkdir()
    os.mkfifo(bad / "fifo.png")
    (bad / "corrupt.png").write_bytes(good.read_bytes()[:300])
    odd = os.fsencode(str(bad)) + b"/caf\xe9 \n.png"  # not UTF-8, with a newline
    with open(odd, "wb") as f:
        f.write(good.read_bytes())
    long_name = bad / ("x" * 300 + ".png")  # longer than a file name may be
    out = tmp_path / "out"
    res = subprocess.run([*PREDICT, str(model), str(bad), str(long_name), "--out", str(out)], capture_output=True, text=True, errors="replace", timeout=300)
    assert res.returncode == 3, res.stderr  # some inputs could not be scored
    rows = read_rows(out / "predictions.jsonl")
    by_name = {Path(r["path"]).name: r for r in rows}
    assert len(rows) == 8
    for name in ("good.png", os.fsdecode(b"caf\xe9 \n.png")):
        assert by_name[name]["error"] is None and by_name[name]["pred_score"] is not None
    reasons = {n: by_name[n]["error"] for n in ("loop.png", "dangling.png", "folder.png", "fifo.png", "corrupt.png", long_name.name)}
    assert "link loop" in reasons["loop.png"] and "dangling" in reasons["dangling.png"]
    assert "directory" in reasons["folder.png"] and "not a regular file" in reasons["fifo.png"]
    assert "corrupt" in reasons["corrupt.png"] or "truncated" in reasons["corrupt.png"]
    assert "too long" in reasons[long_name.name]
    assert len((out / "predictions.csv").read_bytes().splitlines()) >= 9  # header + 8 rows (one name holds a newline)
    assert len(list((out / "overlays").iterdir())) == 2
    # a reused --out is refused; all good inputs exit 0
    again = subprocess.run([*PREDICT, str(model), str(good), "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr
    ok = subprocess.run([*PREDICT, str(model), str(good), "--out", str(out), "--overwrite"], capture_output=True, text=True)
    assert ok.returncode == 0 and len(read_rows(out / "predictions.jsonl")) == 1


def test_a_killed_run_keeps_its_rows_and_resumes_exactly(model, hazelnut, tmp_path):
    src = sorted(p for d in (hazelnut / "test").iterdir() for p in d.iterdir())
    folder = tmp_path / "many"
    folder.mkdir()
    for k in range(4):  # 40 images
        for p in src:
            (folder / f"{k}_{p.parent.name}_{p.name}").symlink_to(p)
    n = len(list(folder.iterdir()))
    clean = tmp_path / "clean"
    assert subprocess.run([*PREDICT, str(model), str(folder), "--out", str(clean), "--no-heatmaps"], capture_output=True).returncode == 0
    want = {r["path"]: r["pred_score"] for r in read_rows(clean / "predictions.jsonl")}
    assert len(want) == n
    for kill_after in (4, 16, 28):  # rows on disk when the kill comes
        out = tmp_path / f"killed-{kill_after}"
        proc = subprocess.Popen([*PREDICT, str(model), str(folder), "--out", str(out), "--chunk", "4"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            f = out / "predictions.jsonl"
            if f.exists() and f.read_bytes().count(b"\n") >= kill_after:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kept = read_rows(out / "predictions.jsonl")
        assert len(kept) >= kill_after
        assert all(r["pred_score"] == pytest.approx(want[r["path"]], rel=1e-6) for r in kept)
        res = subprocess.run([*PREDICT, str(model), str(folder), "--out", str(out), "--resume", "--chunk", "4"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        rows = read_rows(out / "predictions.jsonl")
        assert sorted(r["path"] for r in rows) == sorted(want)  # every image exactly once
        assert all(r["pred_score"] == pytest.approx(want[r["path"]], rel=1e-6) for r in rows)
        assert json.loads((out / "run.json").read_text())["command"] == "predict"


# VmHWM, the peak of this process's own memory map. Not getrusage's ru_maxrss: Linux carries the
# parent's peak into a child started by vfork + exec (as subprocess does), so it reads pytest's peak.
PEAK_RSS = """
import sys
from anomalens.cli import app
try:
    app(sys.argv[1:])
except SystemExit as e:
    code = e.code
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("PEAK_MB", hwm / 1024, "EXIT", code)
"""


def peak_mb(args: list[str]) -> tuple[float, int]:
    res = subprocess.run([sys.executable, "-c", PEAK_RSS, *args], capture_output=True, text=True, timeout=600)
    words = res.stdout.split()
    return float(words[words.index("PEAK_MB") + 1]), int(words[words.index("EXIT") + 1])


@pytest.mark.slow
def test_memory_is_bounded_by_pixels_not_by_images(model, tmp_path):
    import cv2

    folder = tmp_path / "huge"
    folder.mkdir()
    cv2.imwrite(str(folder / "huge_0.png"), np.zeros((10000, 10000, 3), np.uint8))  # 100 MP, ~300 KB on disk
    for k in range(1, 6):
        os.link(folder / "huge_0.png", folder / f"huge_{k}.png")
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / "large_40mp.png"), rng.integers(0, 255, (6000, 6600, 3), dtype=np.uint8))  # 39.6 MP: scored
    mb, code = peak_mb(["predict", str(model), str(folder), "--out", str(tmp_path / "out")])
    rows = read_rows(tmp_path / "out" / "predictions.jsonl")
    assert code == 3 and len(rows) == 7
    assert sum("exceeds the limit" in (r["error"] or "") for r in rows) == 6
    assert [r["pred_score"] is not None for r in rows if "large" in r["path"]] == [True]
    assert mb < 2048, f"peak RSS {mb:.0f} MB"




SEEDS = {fmt: None for fmt in ("PNG", "JPEG", "TIFF", "BMP")}


def _seed(fmt: str) -> bytes:
    if SEEDS[fmt] is None:
        buf = io.BytesIO()
        arr = np.random.default_rng(1).integers(0, 255, (20, 28, 3), dtype=np.uint8)
        Image.fromarray(arr).save(buf, format=fmt)
        SEEDS[fmt] = buf.getvalue()
    return SEEDS[fmt]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 4000)),
    junk=st.binary(max_size=64),
)
def test_the_reader_answers_with_an_image_or_an_image_read_error(tmp_path, fmt, edits, cut, junk):
    data = bytearray(_seed(fmt))
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    data += junk
    path = tmp_path / f"fuzz.{fmt.lower()}"
    path.write_bytes(bytes(data))
    try:
        img = read_image(path)
    except ImageReadError:
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.size > 0
