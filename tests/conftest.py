"""Shared fixtures. Real-data tests read ../shared/data (never copied into the project).

When the data is absent the tests that need it are skipped with the reason; with
ANOMALENS_REQUIRE_DATA=1 (set in .ci/run) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ANOMALENS_DATA", ROOT.parent / "shared" / "data"))
HAZELNUT = DATA / "mvtec_ad" / "hazelnut_reduced"
TRANSISTOR = DATA / "mvtec_ad" / "transistor"
PED2 = DATA / "ucsd_ped2"


def require(path: Path) -> Path:
    """Return ``path`` if it exists; otherwise skip (or fail when ANOMALENS_REQUIRE_DATA=1)."""
    if path.exists():
        return path
    msg = f"real data not found at {path} (set ANOMALENS_DATA to the folder holding mvtec_ad/ and ucsd_ped2/)"
    if os.environ.get("ANOMALENS_REQUIRE_DATA") == "1":
        pytest.fail(msg + " and ANOMALENS_REQUIRE_DATA=1")
    pytest.skip(msg)


def screenshot(url: str, out: Path, width: int = 1280, height: int = 3000) -> Path:
    """Render ``url`` in headless Chromium (Debian's ``chromium``) and save a PNG screenshot.

    Skips when Chromium is not installed; fails instead with ANOMALENS_REQUIRE_BROWSER=1 (.ci/run).
    """
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        msg = "headless Chromium not found (apt-get install chromium)"
        if os.environ.get("ANOMALENS_REQUIRE_BROWSER") == "1":
            pytest.fail(msg + " and ANOMALENS_REQUIRE_BROWSER=1")
        pytest.skip(msg)
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={out.parent / 'chromium-profile'}", f"--window-size={width},{height}",
        f"--screenshot={out}",
    ]
    subprocess.run([exe, *flags, url], check=True, timeout=120, capture_output=True)
    return out


@pytest.fixture(scope="session")
def hazelnut() -> Path:
    return require(HAZELNUT)


@pytest.fixture(scope="session")
def transistor() -> Path:
    return require(TRANSISTOR)


@pytest.fixture(scope="session")
def fitted_patchcore(hazelnut, tmp_path_factory):
    """PatchCore (defaults, but a 5% false-alarm rate: 50 images cannot calibrate 1%) fitted on
    hazelnut_reduced/train/good and saved; (detector, model_dir)."""
    from anomalens import PatchCore

    det = PatchCore(false_alarm_rate=0.05).fit(hazelnut)
    d = tmp_path_factory.mktemp("model") / "patchcore"
    det.save(d)
    return det, d


@pytest.fixture(scope="session")
def transistor_patchcore(transistor):
    """PatchCore with the defaults fitted on transistor's 213 good images (about 30 s)."""
    from anomalens import PatchCore

    return PatchCore().fit(transistor)


def link_frames(src: Path, dst: Path, start: int, stop: int) -> Path:
    """Frames ``[start, stop)`` of the frame folder ``src`` as ``dst/000.jpg ...`` (symlinks: nothing
    is copied); returns ``dst``."""
    dst.mkdir(parents=True)
    for i, f in enumerate(sorted(src.glob("*.jpg"))[start:stop]):
        (dst / f"{i:03d}.jpg").symlink_to(f)
    return dst


@pytest.fixture(scope="session")
def ped2_slice(tmp_path_factory) -> dict:
    """A small slice of UCSD Ped2, as symlinks to the shared frames (nothing is copied): 4 training
    videos of 60 frames, and 2 test videos of 60 frames around the start of an abnormal event
    (02: frames 64-123, event from 94; 04: frames 0-59, event from 30), with their frame labels."""
    import json

    ped2 = require(PED2)
    root = tmp_path_factory.mktemp("ped2")
    labels = json.loads((ped2 / "testing" / "frame_labels.json").read_text())

    def link(split: str, video: str, start: int, stop: int) -> None:
        link_frames(ped2 / split / "frames" / video, root / split / "frames" / video, start, stop)

    for v in ("01", "02", "03", "04"):
        link("training", v, 0, 60)
    sliced = {}
    for v, (a, b) in {"02": (64, 124), "04": (0, 60)}.items():
        link("testing", v, a, b)
        sliced[v] = labels[v][a:b]
    (root / "testing" / "frame_labels.json").write_text(json.dumps(sliced))
    return {"root": root, "train": root / "training", "test": root / "testing", "labels": root / "testing" / "frame_labels.json"}


@pytest.fixture(scope="session")
def ped2_model(ped2_slice, tmp_path_factory) -> Path:
    """A video model fitted on the training slice (cross-fit: each of its 4 videos calibrates against the other 3, at 5%)."""
    from anomalens.video import CellVideoDetector

    out = tmp_path_factory.mktemp("video_model") / "m"
    CellVideoDetector(false_alarm_rate=0.05).fit(ped2_slice["train"]).save(out)
    return out
