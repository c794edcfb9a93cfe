"""Saving and loading: identical results after a round trip; every model file refused, quickly and
with ModelFileError, when modified, swapped for something that is no regular file, oversized, nested
too deep, unsigned or badly signed with a key, or of an older format."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from anomalens import load_detector
from anomalens.detectors.persistence import load_detector as load_with_key
from anomalens.errors import ConfigError, ModelFileError
from anomalens.manifest import KEY_ENV, resolve_key, verify_model_dir

KEY = b"0123456789abcdef0123456789abcdef"
FILES = ("config.json", "model.safetensors", "model.onnx", "manifest.json")


def _test_images(hazelnut):
    return sorted((hazelnut / "test").rglob("*.png"))[:4]


def test_round_trip_gives_identical_scores_and_maps(fitted_patchcore, hazelnut, tmp_path):
    det, model_dir = fitted_patchcore
    d = _copy(model_dir, tmp_path)
    (d / "model.onnx").unlink(missing_ok=True)  # as saved (a prediction elsewhere may have cached a graph)
    _relist(d)
    loaded = load_detector(d).use_engine("torch")
    imgs = _test_images(hazelnut)
    det.use_engine("torch")
    try:
        assert det.engine == loaded.engine == "torch"
        a, b = det.predict(imgs), loaded.predict(imgs)
    finally:
        det.use_engine("auto")
    assert [p.pred_score for p in a] == [p.pred_score for p in b]
    for pa, pb in zip(a, b):
        np.testing.assert_array_equal(pa.anomaly_map, pb.anomaly_map)
        assert pa.pred_label == pb.pred_label and pa.p_value == pb.p_value
    assert loaded.threshold == det.threshold and loaded.get_params() == det.get_params()
    # a model saved by an anomalens that still had the image-score option is refused with "re-fit"
    from anomalens.detectors.persistence import detector_from_files
    from anomalens.serialization import load_model

    config, tensors = load_model(d)
    old = {**config, "params": {**config["params"], "image_score": "max", "num_neighbours": 9}}
    with pytest.raises(ModelFileError, match="re-fit"):
        detector_from_files(type(det), old, tensors)
    assert sorted(os.listdir(d)) == ["config.json", "manifest.json", "model.safetensors"]  # torch exports nothing


def _relist(d: Path) -> None:
    """Rewrite ``d``'s manifest for the files it holds."""
    from anomalens.manifest import write_model_dir

    data = {p.name: p.read_bytes() for p in d.iterdir() if p.name != "manifest.json"}
    with write_model_dir(d) as tmp:
        for name, blob in data.items():
            (tmp / name).write_bytes(blob)


@pytest.fixture(scope="module")
def exported(hazelnut, tmp_path_factory):
    """A small PatchCore (256 px) on hazelnut_reduced, saved with its model.onnx exported into the folder."""
    from anomalens import PatchCore
    from anomalens.export import export_onnx
    from anomalens.serialization import read_config

    det = PatchCore(false_alarm_rate=0.05, image_size=256).fit(hazelnut)
    d = tmp_path_factory.mktemp("exported") / "m"
    det.save(d)
    export_onnx(det, d / "model.onnx", source_config_sha256=read_config(d)["config_sha256"])
    assert sorted(json.loads((d / "manifest.json").read_text())["files"]) == ["config.json", "model.onnx", "model.safetensors"]
    return d


def _copy(model_dir, tmp_path, name="copy"):
    d = tmp_path / name
    shutil.copytree(model_dir, d, symlinks=True)
    return d


def _reseal(d: Path, keep_signature: bool = True) -> None:
    """Recompute every size and SHA-256 in the manifest, as a forger without the key would (the
    signature, if any, is left as it was)."""
    m = json.loads((d / "manifest.json").read_text())
    for name in m["files"]:
        data = (d / name).read_bytes()
        m["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if not keep_signature:
        m.pop("signature", None)
    (d / "manifest.json").write_text(json.dumps(m))


def _loaders(d: Path):
    """Every loader of a model folder: the Python model, the folder check, the folder's ONNX model."""
    from anomalens.export import onnx_for_model_dir

    return [lambda: load_detector(d), lambda: verify_model_dir(d), lambda: onnx_for_model_dir(d)]


def _refused(fn, match: str, seconds: float = 10.0) -> None:
    """``fn`` raises ModelFileError matching ``match`` within ``seconds`` (no hang, no other error)."""
    box: dict = {}

    def run():
        try:
            fn()
            box["r"] = "loaded"
        except BaseException as exc:  # noqa: BLE001 - the test reports what it got
            box["r"] = exc

    t = threading.Thread(target=run, daemon=True)
    t0 = time.perf_counter()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"the loader hung for {seconds} s"
    assert isinstance(box["r"], ModelFileError), f"expected ModelFileError, got {box['r']!r}"
    assert re.search(match, str(box["r"])), str(box["r"])
    assert time.perf_counter() - t0 < seconds


@pytest.mark.parametrize("name", FILES)
def test_flipped_byte_in_any_model_file_is_refused(exported, tmp_path, name):
    d = _copy(exported, tmp_path)
    raw = bytearray((d / name).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (d / name).write_bytes(bytes(raw))
    for load in _loaders(d):
        _refused(load, "checksum|manifest|JSON|malformed")


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("swap", ["fifo", "dev_zero", "folder"])
def test_model_file_that_is_not_a_regular_file_is_refused_without_reading(exported, tmp_path, name, swap):
    """A FIFO would block a reader forever, /dev/zero never ends: both are refused before any read."""
    d = _copy(exported, tmp_path)
    (d / name).unlink()
    if swap == "fifo":
        os.mkfifo(d / name)
    elif swap == "dev_zero":
        (d / name).symlink_to("/dev/zero")
    else:
        (d / name).mkdir()
    what = {"fifo": "a FIFO", "dev_zero": "a symbolic link", "folder": "a folder"}[swap]
    for load in _loaders(d):
        _refused(load, f"is {what}, not a regular file")


def test_oversized_and_deeply_nested_json_is_refused(exported, tmp_path):
    # a 100 MB config (sparse: nothing is written): the manifest's size differs, or the limit is hit
    d = _copy(exported, tmp_path, "big")
    with open(d / "config.json", "r+b") as f:
        f.truncate(100 * 2**20)
    for load in _loaders(d):
        _refused(load, "manifest says")
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["config.json"]["size"] = 100 * 2**20
    (d / "manifest.json").write_text(json.dumps(m))
    for load in _loaders(d):
        _refused(load, "more than the limit", seconds=5)
    # a config nested 100000 deep (checksums recomputed): no RecursionError
    d = _copy(exported, tmp_path, "deep")
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    _reseal(d)
    for load in _loaders(d):
        _refused(load, "deeper than 64")
    (d / "manifest.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    for load in _loaders(d):
        _refused(load, "deeper than 64")


def test_edited_onnx_threshold_is_refused(exported, tmp_path, monkeypatch):
    """The attack on `serve`: an edited threshold in model.onnx's metadata lets every defect pass."""
    import onnx

    def edit(d):
        model = onnx.load(str(d / "model.onnx"))
        meta = json.loads(model.metadata_props[0].value)
        meta["threshold"] = 1e9
        model.metadata_props[0].value = json.dumps(meta)
        onnx.save(model, str(d / "model.onnx"))

    d = _copy(exported, tmp_path, "plain")
    edit(d)
    for load in _loaders(d):
        _refused(load, "checksum|manifest says")
    # signed: the same edit with every checksum recomputed is refused for its signature
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    signed = _signed_copy(exported, tmp_path)
    edit(signed)
    _reseal(signed)
    for load in _loaders(signed):
        _refused(load, "bad signature")


def _signed_copy(model_dir: Path, tmp_path: Path, name: str = "signed") -> Path:
    """A copy of ``model_dir`` with its manifest signed with :data:`KEY`, as a save with the key writes it."""
    from anomalens.manifest import write_model_dir

    d = tmp_path / name
    with write_model_dir(d, KEY) as tmp:
        for f in ("config.json", "model.safetensors", "model.onnx"):
            if (model_dir / f).exists():
                shutil.copyfile(model_dir / f, tmp / f)
    return d


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_signed_model_refuses_edits_with_recomputed_checksums(exported, tmp_path, monkeypatch, name):
    from anomalens.serialization import read_config

    signed = _signed_copy(exported, tmp_path)
    assert read_config(signed, KEY)["model_signature"] == "signed, verified"
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert read_config(signed)["model_signature"] == "signed, not verified (no key)"  # checksums still checked
    d = _copy(signed, tmp_path, "forged")
    if name == "config.json":
        cfg = json.loads((d / name).read_text())
        cfg["threshold"] = 1e9
        (d / name).write_text(json.dumps(cfg))
    else:
        raw = bytearray((d / name).read_bytes())
        raw[-9] ^= 0x01
        (d / name).write_bytes(bytes(raw))
    _reseal(d)
    _refused(lambda: load_with_key(d, KEY), "bad signature")
    monkeypatch.setenv(KEY_ENV, KEY.decode())  # the key from the environment, as a deployment sets it
    for load in _loaders(d):
        _refused(load, "bad signature")
    _reseal(d, keep_signature=False)
    for load in _loaders(d):
        _refused(load, "not signed")
    _refused(lambda: load_with_key(signed, b"another key, 32 bytes long......"), "bad signature")
    _refused(lambda: load_detector(exported), "not signed")  # an unsigned model, with a key set


def test_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert resolve_key(None) is None
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    assert resolve_key(None) == KEY
    (tmp_path / "key").write_bytes(b"  another key from a file, long enough\n")
    assert resolve_key(tmp_path / "key") == b"another key from a file, long enough"  # the file wins
    (tmp_path / "short").write_bytes(b"short")
    with pytest.raises(ConfigError, match="at least 16"):
        resolve_key(tmp_path / "short")
    with pytest.raises(ConfigError, match="missing"):
        resolve_key(tmp_path / "nothing")


def test_older_format_and_garbage_are_refused(exported, tmp_path):
    d = _copy(exported, tmp_path, "v2")
    cfg = json.loads((d / "config.json").read_text())
    cfg["format_version"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "manifest.json").unlink()
    with pytest.raises(ModelFileError, match="format version 2 .*re-fit"):
        load_detector(d)
    with pytest.raises(ModelFileError, match="does not exist"):
        load_detector(tmp_path / "nothing")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="manifest.json is missing"):
        load_detector(tmp_path / "m")


def test_shape_mismatch_with_parameters_is_refused(exported, tmp_path):
    """A config whose parameters no longer match its tensors (e.g. another backbone) is refused."""
    d = _copy(exported, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["params"].update(backbone="mobilenet_v2", layers=["features.6", "features.13"])
    (d / "config.json").write_text(json.dumps(cfg))
    _reseal(d)
    with pytest.raises(ModelFileError, match="memory_bank"):
        load_detector(d)


def test_save_never_replaces_a_folder_of_other_files(exported, tmp_path):
    """A save swaps the whole folder: into a folder holding other files it refuses, touching nothing."""
    det = load_detector(exported)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ModelFileError, match="not model files"):
        det.save(tmp_path / "mine")
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
