"""Model files: a folder with ``model.safetensors`` (tensors), ``config.json`` (everything else) and
``manifest.json`` (every file's size and SHA-256, optionally signed: :mod:`anomalens.manifest`).

No pickle anywhere: safetensors stores raw tensors only, JSON stores the rest. ``config.json`` records
the format version, the anomalens version, the name, dtype and shape of every tensor and the tensor
file's SHA-256 (so the SHA-256 of ``config.json`` identifies the whole model). A save writes a whole
new folder and swaps it in (:func:`anomalens.manifest.write_model_dir`): a kill at any instant leaves
the old model or the new one. Loading checks the manifest before reading anything, so a model of
another format version, a truncated copy, an edited file, or a file swapped for a FIFO or a device is
refused with a clear :class:`~anomalens.errors.ModelFileError`.

:func:`read_config` needs no torch (deployments with ONNX Runtime only); saving and loading tensors do.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import ModelFileError
from .manifest import (
    CONFIG_NAME, FORMAT_VERSION, TENSORS_NAME, check_model_file, config_of, read_manifest, read_model_file, verify_model_dir,
    write_model_dir,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "TENSORS_NAME", "load_arrays", "load_model", "read_config", "save_model"]


def save_model(
    directory: str | os.PathLike, config: dict, tensors: dict, key: bytes | None = None,
    expect_manifest: str | None = None, files: dict[str, bytes] | None = None,
) -> Path:
    """Write ``tensors`` and ``config`` as a new model folder that replaces ``directory`` in one step.

    ``config`` must be JSON-serialisable; format and version fields and the tensors' checksum are
    added. A ``model.onnx`` cached in the old folder is dropped (it belonged to the old model).

    Args:
        tensors: name -> torch tensor, or name -> numpy array (then no torch is needed).
        key: signing key (:func:`anomalens.manifest.resolve_key`); None = ``ANOMALENS_MODEL_KEY`` when set.
        expect_manifest: read-modify-write: refuse when the folder changed since it was read
            (:func:`anomalens.manifest.manifest_digest`).
        files: further model files by name (``model.onnx`` of an exported model), listed in the manifest.

    Returns:
        The directory.

    Raises:
        ModelFileError: ``directory`` holds files that are not model files (it is not replaced), it
            was replaced by another writer since ``expect_manifest``, or ``files`` names a file that
            is not a model file.
    """
    import numpy as np

    d = Path(directory)
    if all(isinstance(v, np.ndarray) for v in tensors.values()):
        from safetensors.numpy import save as save_arrays

        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        blob = save_arrays(tensors, metadata={"format": "anomalens", "format_version": str(FORMAT_VERSION)})
    else:
        from safetensors.torch import save as save_tensors

        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        blob = save_tensors(tensors, metadata={"format": "anomalens", "format_version": str(FORMAT_VERSION)})
    full = {k: v for k, v in config.items() if k not in ("config_sha256", "model_signature", "model_files")}
    full["format"] = "anomalens"
    full["format_version"] = FORMAT_VERSION
    full["anomalens_version"] = __version__
    full["tensors"] = {k: {"dtype": _dtype_name(v), "shape": list(v.shape)} for k, v in tensors.items()}
    full["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
    with write_model_dir(d, key, expect_manifest) as tmp:
        (tmp / TENSORS_NAME).write_bytes(blob)
        (tmp / CONFIG_NAME).write_text(json.dumps(full, indent=2, sort_keys=True))
        for name, data in (files or {}).items():
            if name in (TENSORS_NAME, CONFIG_NAME) or Path(name).name != name:
                raise ModelFileError(f"{name} cannot be written beside the model's own files")
            (tmp / name).write_bytes(data)
    return d


def _dtype_name(t) -> str:
    """The dtype of a torch tensor or numpy array as torch names it (``float64``, ``uint8``, ``bool``...)."""
    return str(t.dtype).replace("torch.", "")


def read_config(directory: str | os.PathLike, key: bytes | None = None) -> dict:
    """Verify a model folder completely (:func:`anomalens.manifest.verify_model_dir`) and return its
    config, with ``config_sha256``, ``model_signature`` and ``model_files`` added. Needs no torch.

    Raises:
        ModelFileError: missing folder or file, a file that is not a regular file, of another size or
            checksum, invalid or oversized JSON, another format version (re-fit), or with a key an
            unsigned or badly signed model.
    """
    return verify_model_dir(directory, key)


def load_model(directory: str | os.PathLike, key: bytes | None = None) -> "tuple[dict, dict[str, torch.Tensor]]":
    """Load and verify a model folder written by :func:`save_model`; every byte used is checked
    against the manifest as it is read.

    Returns:
        ``(config, tensors)``; ``config`` as :func:`read_config` returns it.

    Raises:
        ModelFileError: any check of :func:`read_config` fails, the tensor file is corrupt, or a
            tensor's name, dtype or shape differs from the config.
    """
    from safetensors.torch import load as load_tensors

    return _load(directory, key, load_tensors)


def load_arrays(directory: str | os.PathLike, key: bytes | None = None) -> "tuple[dict, dict[str, np.ndarray]]":
    """As :func:`load_model`, with numpy arrays instead of torch tensors (needs no torch).

    Raises:
        ModelFileError: as :func:`load_model`.
    """
    from safetensors.numpy import load as load_numpy

    return _load(directory, key, load_numpy)


def _load(directory: str | os.PathLike, key: bytes | None, load_tensors) -> tuple[dict, dict]:
    d = Path(directory)
    manifest = read_manifest(d, key)
    config = config_of(d, manifest)
    blob = read_model_file(d, manifest, TENSORS_NAME)
    for name in set(manifest["files"]) - {CONFIG_NAME, TENSORS_NAME}:  # model.onnx: the folder verifies as a whole
        check_model_file(d, manifest, name)
    t_path = d / TENSORS_NAME
    if hashlib.sha256(blob).hexdigest() != config.get("tensors_sha256"):
        raise ModelFileError(f"{t_path} is not the tensor file {CONFIG_NAME} was saved with")
    try:
        tensors = load_tensors(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFileError(f"{t_path} is not a valid safetensors file ({exc})") from None
    expected = config.get("tensors", {})
    if not isinstance(expected, dict) or set(expected) != set(tensors):
        raise ModelFileError(f"{t_path} holds tensors {sorted(tensors)} but the config lists {sorted(expected)}")
    for name, meta in expected.items():
        t = tensors[name]
        if not isinstance(meta, dict) or list(t.shape) != list(meta.get("shape", [])) or _dtype_name(t) != meta.get("dtype"):
            raise ModelFileError(f"tensor {name!r} in {t_path} has shape {list(t.shape)} / {t.dtype}, expected {meta}")
    return config, tensors
