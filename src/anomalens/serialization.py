"""Model files: a directory with ``model.safetensors`` (tensors) and ``config.json`` (everything else).

No pickle anywhere: safetensors stores raw tensors only, JSON stores the rest. ``config.json`` records
the format version, the anomalens version, the name, dtype and shape of every tensor, and SHA-256
checksums of the tensor file and of the config itself. Loading checks all of them, so a model from an
incompatible version, a truncated copy, or a hand-edited file is refused with a clear error (the
checksums detect corruption and accidental edits; they are not a cryptographic signature).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import ModelFileError

FORMAT_VERSION = 2  # 2: zero padding counted in patch averages, aspect-kept inputs (1 is refused: refit)
CONFIG_NAME = "config.json"
TENSORS_NAME = "model.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _config_digest(config: dict) -> str:
    body = {k: v for k, v in config.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_model(directory: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` and ``config`` to ``directory`` (created if needed); returns the directory.

    ``config`` must be JSON-serialisable; format and version fields and checksums are added.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tmp = d / (TENSORS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "anomalens", "format_version": str(FORMAT_VERSION)})
    os.replace(tmp, d / TENSORS_NAME)
    full = dict(config)
    full["format"] = "anomalens"
    full["format_version"] = FORMAT_VERSION
    full["anomalens_version"] = __version__
    full["tensors"] = {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in tensors.items()}
    full["tensors_sha256"] = _sha256(d / TENSORS_NAME)
    full["config_sha256"] = _config_digest(full)
    (d / CONFIG_NAME).write_text(json.dumps(full, indent=2, sort_keys=True))
    return d


def read_config(directory: str | os.PathLike) -> dict:
    """Read and verify ``config.json`` of a model directory (format, version, config checksum).

    Raises:
        ModelFileError: missing directory or file, invalid JSON, another format or format version,
            or a config that was edited after saving.
    """
    d = Path(directory)
    if not d.is_dir():
        raise ModelFileError(f"model directory {d} does not exist")
    cfg_path = d / CONFIG_NAME
    if not cfg_path.exists():
        raise ModelFileError(f"{d} is not an anomalens model: {CONFIG_NAME} is missing")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{cfg_path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != "anomalens":
        raise ModelFileError(f"{cfg_path} is not an anomalens model config")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{d} has model format version {version!r} (written by anomalens {config.get('anomalens_version', '?')}); "
            f"this anomalens ({__version__}) reads format version {FORMAT_VERSION}: re-fit the model with this version"
        )
    if config.get("config_sha256") != _config_digest(config):
        raise ModelFileError(f"{cfg_path} was modified after it was saved (checksum mismatch); refusing to load it")
    return config


def load_model(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load and verify a model directory written by :func:`save_model`.

    Returns:
        ``(config, tensors)``.

    Raises:
        ModelFileError: any check of :func:`read_config` fails, the tensor file is missing, corrupt or
            modified (checksum), or a tensor's name, dtype or shape differs from the config.
    """
    d = Path(directory)
    config = read_config(d)
    t_path = d / TENSORS_NAME
    if not t_path.exists():
        raise ModelFileError(f"{d} is missing {TENSORS_NAME}")
    if _sha256(t_path) != config.get("tensors_sha256"):
        raise ModelFileError(f"{t_path} does not match its checksum in {CONFIG_NAME}: the file is corrupt or was modified")
    try:
        tensors = load_file(str(t_path))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFileError(f"{t_path} is not a valid safetensors file ({exc})") from None
    expected = config.get("tensors", {})
    if set(expected) != set(tensors):
        raise ModelFileError(f"{t_path} holds tensors {sorted(tensors)} but the config lists {sorted(expected)}")
    for name, meta in expected.items():
        t = tensors[name]
        if list(t.shape) != list(meta["shape"]) or str(t.dtype).replace("torch.", "") != meta["dtype"]:
            raise ModelFileError(
                f"tensor {name!r} in {t_path} has shape {list(t.shape)} / {t.dtype}, expected {meta['shape']} / {meta['dtype']}"
            )
    return config, tensors
