"""The deployment install: the wheel with [runtime] in a fresh venv without torch scores an exported
model with the same results as the Python path (issue 35, item 1)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_runtime_wheel_without_torch_scores_like_python(hazelnut, tmp_path):
    model = tmp_path / "model"
    fit = [sys.executable, "-m", "anomalens", "fit", hazelnut, "--out", model, "--image-size", "256"]
    assert subprocess.run([str(c) for c in fit], capture_output=True).returncode == 0
    exp = subprocess.run([sys.executable, "-m", "anomalens", "export", str(model)], capture_output=True, text=True)
    assert exp.returncode == 0, exp.stderr
    images = [hazelnut / "test" / "good", hazelnut / "test" / "crack"]

    wheel_dir = tmp_path / "wheel"
    b = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(ROOT)],
                       capture_output=True, text=True)
    assert b.returncode == 0, b.stderr[-2000:]
    wheel = next(wheel_dir.glob("anomalens-*.whl"))

    venv = tmp_path / "rt"
    assert subprocess.run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    pip = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", f"{wheel}[runtime]"], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-3000:]
    py = venv / "bin" / "python"
    no_torch = subprocess.run([py, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"])
    assert no_torch.returncode == 0, "the [runtime] install pulled in torch"

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out_rt, out_py = tmp_path / "rt-out", tmp_path / "py-out"
    rt = subprocess.run([venv / "bin" / "anomalens", "predict", model, *images, "--out", out_rt], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert rt.returncode == 0, rt.stderr[-3000:]
    pyres = subprocess.run([sys.executable, "-m", "anomalens", "predict", str(model), *map(str, images), "--out", str(out_py)],
                           capture_output=True, text=True)
    assert pyres.returncode == 0, pyres.stderr[-3000:]
    version = subprocess.run([venv / "bin" / "anomalens", "--version"], capture_output=True, text=True)
    assert version.stdout.startswith("anomalens ")

    def rows(out: Path) -> dict:
        with open(out / "predictions.csv", newline="") as f:
            return {r["path"]: r for r in csv.DictReader(f)}

    a, b = rows(out_rt), rows(out_py)
    assert set(a) == set(b) and len(a) == len(list((hazelnut / "test" / "good").iterdir())) + len(list((hazelnut / "test" / "crack").iterdir()))
    threshold = float(next(iter(b.values()))["threshold"])
    for path, r in b.items():
        s_py, s_rt = float(r["pred_score"]), float(a[path]["pred_score"])
        assert s_rt == pytest.approx(s_py, rel=1e-4), path
        if abs(s_py - threshold) > 1e-4 * abs(threshold):
            assert a[path]["decision"] == r["decision"], path
    # the overlays are drawn on the runtime install too
    assert any((out_rt / "overlays").iterdir())
    assert json.loads((out_rt / "run.json").read_text())["command"] == "predict"
