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


def require(path: Path) -> Path:
    """Return ``path`` if it exists; otherwise skip (or fail when ANOMALENS_REQUIRE_DATA=1)."""
    if path.exists():
        return path
    msg = f"real data not found at {path} (set ANOMALENS_DATA to the folder holding mvtec_ad/)"
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
