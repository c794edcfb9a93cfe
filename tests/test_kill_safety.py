"""A kill at any instant of a save leaves the old model or the new one, complete, never a mix: `fit
--out` over an existing model, `calibrate` in place (hazelnut_reduced, 256 px)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from anomalens import load_detector
from anomalens.serialization import read_config

# Installed in a process that is to be killed (test side only: it patches this process's modules).
# Once the save's new folder is created, each I/O step of the save is counted, and the process kills
# itself (SIGKILL) at step ANOMALENS_TEST_KILL_AT; a file write counted there is left torn (half written).
HOOK = r"""
import os, pathlib, shutil, signal, tempfile
import anomalens.atomic as _atomic

_at, _n, _armed = int(os.environ.get("ANOMALENS_TEST_KILL_AT", "0")), [0], [False]

def _step(torn=None):
    if not _armed[0]:
        return
    _n[0] += 1
    if _n[0] == _at:
        if torn is not None:
            torn()
        os.kill(os.getpid(), signal.SIGKILL)

def _after(owner, name):
    orig = getattr(owner, name)
    def f(*a, **k):
        r = orig(*a, **k)
        _step()
        return r
    setattr(owner, name, f)

def _write(name):
    orig = getattr(pathlib.Path, name)
    def f(self, data, *a, **k):
        _step(lambda: orig(self, data[: len(data) // 2], *a, **k))
        r = orig(self, data, *a, **k)
        _step()
        return r
    setattr(pathlib.Path, name, f)

_mkdtemp = tempfile.mkdtemp
def _arming_mkdtemp(*a, **k):
    r = _mkdtemp(*a, **k)
    if ".new-" in os.path.basename(r):
        _armed[0] = True
    _step()
    return r

tempfile.mkdtemp = _arming_mkdtemp
_write("write_bytes")
_write("write_text")
for _owner, _name in ((os, "fsync"), (os, "replace"), (shutil, "rmtree"), (_atomic, "_exchange"), (_atomic, "_fsync_dir")):
    _after(_owner, _name)
"""


def _fit(hazelnut, **params):
    from anomalens import PatchCore

    return PatchCore(false_alarm_rate=0.05, image_size=256, **params).fit(hazelnut)


@pytest.fixture(scope="module")
def models(hazelnut, tmp_path_factory):
    """Two different small models of hazelnut_reduced saved: ``old`` and ``new`` (another coreset)."""
    root = tmp_path_factory.mktemp("kill")
    _fit(hazelnut).save(root / "old")
    _fit(hazelnut, coreset_ratio=0.02).save(root / "new")
    return root


def _which(d: Path) -> str:
    """``"old"`` (coreset 1%) or ``"new"`` (2%): the model in ``d``, which must load completely."""
    read_config(d)  # every file checked
    return {0.01: "old", 0.02: "new"}[load_detector(d).coreset_ratio]


def _killed_in_child(save, k: int) -> bool:
    """Run ``save`` in a forked child with the hook set to kill it at step ``k``; True when killed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.environ["ANOMALENS_TEST_KILL_AT"] = str(k)
            exec(HOOK, {})
            save()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the save failed without being killed"
    return False


def test_kill_at_every_step_of_a_save_leaves_old_or_new(models, tmp_path):
    """Saving the ``new`` model over the ``old`` one (as `fit --out` does), killed after each of its
    I/O steps in turn (and inside each file write): every time the folder is the old model or the
    new one, complete; a later save clears what the killed one left."""
    new_det = load_detector(models / "new")
    seen = []
    for k in range(1, 100):
        d = tmp_path / str(k) / "m"
        shutil.copytree(models / "old", d)
        killed = _killed_in_child(lambda: new_det.save(d), k)
        seen.append(_which(d))
        if not killed:
            break
    else:
        pytest.fail("the save never completed")
    assert seen[-1] == "new" and len(seen) >= 10, seen  # the hook did see the save's steps
    first = seen.index("new")
    assert first > 3 and set(seen[:first]) == {"old"} and set(seen[first:]) == {"new"}, seen  # old, then new
    new_det.save(d.parent.parent / "1" / "m")  # the folder killed first: a later save tidies up
    assert [p.name for p in (tmp_path / "1").iterdir()] == ["m"]


def _cli(args: list[str], kill_at: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, ANOMALENS_TEST_KILL_AT=str(kill_at), OMP_NUM_THREADS="1")
    code = HOOK + "\nfrom anomalens.cli import app\napp(prog_name='anomalens')\n"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kill_at", [2, 7, 14])
def test_cli_calibrate_in_place_killed(models, hazelnut, tmp_path, kill_at):
    """`anomalens calibrate MODEL NEW_GOOD` in place, killed at a step of its save: the model holds
    its 50 scores and its model.onnx, or the 52 after it and no model.onnx (the old one's is stale)."""
    d = tmp_path / "m"
    shutil.copytree(models / "old", d)
    (d / "model.onnx").write_bytes(b"an export of the old model")  # listed in the manifest, as an export leaves it
    _relist(d)
    r = _cli(["calibrate", str(d), str(hazelnut / "test" / "good")], kill_at)
    assert r.returncode == -signal.SIGKILL, r.stderr
    n = load_detector(d).calibration.scores.size
    files = sorted(read_config(d)["model_files"])
    assert (n, files) in ((50, ["config.json", "model.onnx", "model.safetensors"]), (52, ["config.json", "model.safetensors"]))
    r = _cli(["calibrate", str(d), str(hazelnut / "test" / "good")], 0)  # and again, not killed
    if n == 50:  # the old model: the images are added now
        assert r.returncode == 0, r.stderr
    else:  # the new one (killed after its swap): they are in already, and count once
        assert r.returncode == 2 and "already in the model's calibration" in r.stderr, r.stderr
    assert load_detector(d).calibration.scores.size == 52 and sorted(os.listdir(d.parent)) == ["m"]


def _relist(d: Path) -> None:
    """Rewrite ``d``'s manifest for the files it holds (a save's own step)."""
    from anomalens.manifest import write_model_dir

    data = {p.name: p.read_bytes() for p in d.iterdir() if p.name != "manifest.json"}
    with write_model_dir(d) as tmp:
        for name, blob in data.items():
            (tmp / name).write_bytes(blob)


@pytest.mark.parametrize("kill_at", [3, 9])
def test_cli_fit_over_existing_model_killed(models, hazelnut, tmp_path, kill_at):
    """`anomalens fit --out` into an existing model folder, killed at a step of its save."""
    d = tmp_path / "m"
    shutil.copytree(models / "old", d)
    r = _cli(["fit", str(hazelnut), "--out", str(d), "--image-size", "256", "--false-alarm-rate", "0.05",
              "--coreset-ratio", "0.02"], kill_at)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert _which(d) in ("old", "new")  # complete either way
