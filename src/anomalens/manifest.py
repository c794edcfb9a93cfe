"""The manifest of a model folder: every file's name, size and SHA-256, optionally signed (HMAC-SHA256).

A model folder holds ``config.json``, ``model.safetensors``, optionally a cached ``model.onnx``, and
``manifest.json``, which lists the others::

    {"format": "anomalens-manifest", "format_version": 3,
     "files": {"config.json": {"size": 2113, "sha256": "..."}, ...},
     "signature": {"algorithm": "hmac-sha256", "value": "..."}}       # only when signed

Every loader calls :func:`verify_model_dir` before it uses a byte of the folder. It refuses, with
:class:`~anomalens.errors.ModelFileError` and without reading them, files that are not regular files
(FIFOs, devices, symbolic links, folders: checked with ``lstat`` before ``open``, opened with
``O_NOFOLLOW | O_NONBLOCK`` and checked again with ``fstat``, so a FIFO swapped in between cannot hang
the reader) and files whose size differs from the manifest or exceeds a limit; then it checks every
file's SHA-256, and parses JSON only under a size limit (:data:`MAX_JSON_BYTES`) and a nesting limit
(:data:`MAX_JSON_DEPTH`), so no file can hang, exhaust memory or overflow the stack.

Signing. The SHA-256 sums alone detect corruption and accidental edits, not a deliberate edit whose
sums were recomputed. With a key (the environment variable ``ANOMALENS_MODEL_KEY`` holds it, or a key
file: :func:`resolve_key`), saving signs the manifest with HMAC-SHA256, which covers every file
through its SHA-256, and loading refuses an unsigned manifest or a bad signature. Without a key, a
signed model still loads: its sums are checked, its signature cannot be (the returned config says
``"model_signature": "signed, not verified (no key)"``), so deployments that must refuse forged
models set the key wherever models are loaded.

This module needs the standard library only (no torch, no onnxruntime).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .atomic import replace_dir
from .errors import ConfigError, ModelFileError

#: model format version (config and manifest); 3: manifest.json, optional signature; 4: the model
#: input resized by :mod:`anomalens.resampling`
FORMAT_VERSION = 4
CONFIG_NAME = "config.json"
TENSORS_NAME = "model.safetensors"
ONNX_NAME = "model.onnx"
MANIFEST_NAME = "manifest.json"
#: files a model folder may hold besides the manifest (the first two are required)
MODEL_FILES = (CONFIG_NAME, TENSORS_NAME, ONNX_NAME)
KEY_ENV = "ANOMALENS_MODEL_KEY"
MIN_KEY_BYTES = 16
#: largest JSON file read (config.json, manifest.json), bytes
MAX_JSON_BYTES = 16 * 2**20
#: deepest nesting of arrays and objects accepted in a JSON file
MAX_JSON_DEPTH = 64
#: largest tensor or ONNX file read, bytes
MAX_FILE_BYTES = 8 * 2**30

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_EMPTY_PAIR = re.compile(rb"\[\]")
_NON_BRACKETS = bytes(range(256)).translate(None, b"[]{}")  # every byte but the brackets
_TO_SQUARE = bytes.maketrans(b"{}", b"[]")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(path: Path) -> tuple[int, int]:
    """``(fd, size)`` of ``path`` opened for reading, refused unless a regular file (no link, FIFO, device)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ModelFileError(f"{path} is missing") from None
    except OSError as exc:
        raise ModelFileError(f"cannot read {path} ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"{path} is {_kind(st.st_mode)}, not a regular file; refusing to read it")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ModelFileError(f"cannot open {path} ({exc.strerror}); refusing to read it") from None
    st2 = os.fstat(fd)
    if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise ModelFileError(f"{path} changed while it was opened (now {_kind(st2.st_mode)}); refusing to read it")
    return fd, st2.st_size


def read_regular(path: str | os.PathLike, limit: int, size: int | None = None) -> bytes:
    """All bytes of the regular file ``path``, refused before reading when it is no regular file,
    larger than ``limit`` bytes, or (``size`` given) not exactly ``size`` bytes.

    Raises:
        ModelFileError: missing, not a regular file, too large, or of another size (the message says which).
    """
    path = Path(path)
    fd, actual = _open_regular(path)
    try:
        if size is not None and actual != size:
            raise ModelFileError(f"{path} has {actual} bytes, its manifest says {size}: the file is truncated, corrupt or was replaced")
        if actual > limit:
            raise ModelFileError(f"{path} has {actual} bytes, more than the limit of {limit}; refusing to read it")
        chunks, got = [], 0
        while got <= actual:  # one read past the end tells a file that grew since fstat
            block = os.read(fd, min(1 << 24, actual + 1 - got))
            if not block:
                break
            chunks.append(block)
            got += len(block)
    finally:
        os.close(fd)
    if got != actual:
        raise ModelFileError(f"{path} changed size while it was read ({actual} -> {got} bytes)")
    return b"".join(chunks)


def parse_json(data: bytes, where: str | os.PathLike) -> object:
    """Parse JSON ``data`` with the size and nesting limits (:data:`MAX_JSON_BYTES`, :data:`MAX_JSON_DEPTH`).

    Raises:
        ModelFileError: too large, nested too deep, not UTF-8 or not valid JSON.
    """
    if len(data) > MAX_JSON_BYTES:
        raise ModelFileError(f"{where} has {len(data)} bytes, more than the limit of {MAX_JSON_BYTES} for JSON")
    brackets = _STRING.sub(b"", data).translate(_TO_SQUARE, _NON_BRACKETS)
    for _ in range(MAX_JSON_DEPTH):  # each pass removes the innermost level
        if not brackets:
            break
        brackets = _EMPTY_PAIR.sub(b"", brackets)
    if brackets:
        raise ModelFileError(f"{where} nests arrays or objects deeper than {MAX_JSON_DEPTH} levels (or is not valid JSON); refusing to read it")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelFileError(f"{where} is not valid JSON ({exc})") from None


def resolve_key(key_file: str | os.PathLike | None = None) -> bytes | None:
    """The model-signing key: the contents of ``key_file`` when given, else the environment variable
    ``ANOMALENS_MODEL_KEY`` (the key itself), else None (models are neither signed nor verified).
    Surrounding whitespace is dropped.

    Raises:
        ConfigError: the key file is missing, not a regular file or over 4 KB, or the key is shorter
            than 16 bytes.
    """
    if key_file is not None:
        try:
            key = read_regular(key_file, 4096).strip()
        except ModelFileError as exc:
            raise ConfigError(f"key file: {exc}") from None
        where = f"key file {key_file}"
    else:
        env = os.environ.get(KEY_ENV, "")
        if not env.strip():
            return None
        key, where = env.strip().encode("utf-8"), KEY_ENV
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"the model key in {where} has {len(key)} bytes; use at least {MIN_KEY_BYTES}, e.g. "
            "python -c \"import secrets; print(secrets.token_hex(32))\""
        )
    return key


def _body(manifest: dict) -> bytes:
    return json.dumps({k: v for k, v in manifest.items() if k != "signature"}, sort_keys=True, separators=(",", ":")).encode()


def _sign(manifest: dict, key: bytes) -> str:
    return hmac.new(key, _body(manifest), hashlib.sha256).hexdigest()


def _sha256_file(path: Path, size: int, limit: int) -> str:
    """SHA-256 of a regular file of exactly ``size`` bytes, read in blocks."""
    fd, actual = _open_regular(path)
    h = hashlib.sha256()
    try:
        if actual != size:
            raise ModelFileError(f"{path} has {actual} bytes, its manifest says {size}: the file is truncated, corrupt or was replaced")
        if actual > limit:
            raise ModelFileError(f"{path} has {actual} bytes, more than the limit of {limit}; refusing to read it")
        got = 0
        while block := os.read(fd, 1 << 20):
            h.update(block)
            got += len(block)
    finally:
        os.close(fd)
    if got != size:
        raise ModelFileError(f"{path} changed size while it was read")
    return h.hexdigest()


def _old_format_error(d: Path) -> ModelFileError:
    """The error for a folder without a manifest: an older model (re-fit) or no model at all."""
    try:
        cfg = parse_json(read_regular(d / CONFIG_NAME, MAX_JSON_BYTES), d / CONFIG_NAME)
    except ModelFileError:
        cfg = None
    if isinstance(cfg, dict) and cfg.get("format") == "anomalens":
        return ModelFileError(
            f"{d} has model format version {cfg.get('format_version')!r} (written by anomalens "
            f"{cfg.get('anomalens_version', '?')}), without {MANIFEST_NAME}; this anomalens reads format version "
            f"{FORMAT_VERSION} only: re-fit the model with this version (anomalens fit)"
        )
    return ModelFileError(f"{d} is not an anomalens model: {MANIFEST_NAME} is missing")


def read_manifest(directory: str | os.PathLike, key: bytes | None = None) -> dict:
    """The checked manifest of a model folder, with ``"model_signature"`` added: ``"unsigned"``,
    ``"signed, verified"`` or ``"signed, not verified (no key)"``. Files are not read here.

    Args:
        key: the signing key; None = ``ANOMALENS_MODEL_KEY`` when set (:func:`resolve_key`).

    Raises:
        ModelFileError: no folder, no or malformed manifest, another format version, or (with a
            key) an unsigned manifest or a wrong signature.
    """
    d = Path(directory)
    if not d.is_dir():
        raise ModelFileError(f"model directory {d} does not exist")
    path = d / MANIFEST_NAME
    if not os.path.lexists(path):
        raise _old_format_error(d)
    m = parse_json(read_regular(path, 2**20), path)
    if not isinstance(m, dict) or m.get("format") != "anomalens-manifest":
        raise ModelFileError(f"{path} is not an anomalens model manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{d} has model format version {m.get('format_version')!r}; this anomalens reads format version "
            f"{FORMAT_VERSION}: re-fit the model with this version (anomalens fit)"
        )
    files = m.get("files")
    if not (isinstance(files, dict) and CONFIG_NAME in files and TENSORS_NAME in files and set(files) <= set(MODEL_FILES)
            and all(isinstance(e, dict) and type(e.get("size")) is int and e["size"] >= 0
                    and isinstance(e.get("sha256"), str) and len(e["sha256"]) == 64 for e in files.values())):
        raise ModelFileError(f"{path} is malformed: it must list {CONFIG_NAME} and {TENSORS_NAME} (size, sha256), and only {MODEL_FILES}")
    sig = m.get("signature")
    key = key if key is not None else resolve_key(None)
    if sig is not None and not (isinstance(sig, dict) and sig.get("algorithm") == "hmac-sha256" and isinstance(sig.get("value"), str)):
        raise ModelFileError(f"{path} has a malformed signature")
    if key is not None:
        if sig is None:
            raise ModelFileError(f"{d} is not signed, and a model key is set ({KEY_ENV} or --key-file): refusing an unsigned model")
        if not hmac.compare_digest(sig["value"], _sign(m, key)):
            raise ModelFileError(f"{d} has a bad signature: it was modified, or signed with another key; refusing to load it")
        m["model_signature"] = "signed, verified"
    else:
        m["model_signature"] = "unsigned" if sig is None else "signed, not verified (no key)"
    return m


def read_model_file(directory: str | os.PathLike, manifest: dict, name: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the model file ``name``, checked against ``manifest`` (size before reading, then SHA-256).

    Raises:
        ModelFileError: not listed, missing, not a regular file, another size or checksum.
    """
    path = Path(directory) / name
    entry = manifest["files"].get(name)
    if entry is None:
        raise ModelFileError(f"{path} is not listed in {MANIFEST_NAME}")
    data = read_regular(path, limit, size=entry["size"])
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ModelFileError(f"{path} does not match its checksum in {MANIFEST_NAME}: the file is corrupt or was modified")
    return data


def check_config(config: object, where: str | os.PathLike) -> dict:
    """``config`` if it is an anomalens config of this format version.

    Raises:
        ModelFileError: another format, or another format version (re-fit).
    """
    if not isinstance(config, dict) or config.get("format") != "anomalens":
        raise ModelFileError(f"{where} is not an anomalens model config")
    if config.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{where} has model format version {config.get('format_version')!r} (written by anomalens "
            f"{config.get('anomalens_version', '?')}); this anomalens reads format version {FORMAT_VERSION}: "
            "re-fit the model with this version (anomalens fit)"
        )
    return config


def verify_model_dir(directory: str | os.PathLike, key: bytes | None = None) -> dict:
    """Check a model folder completely before use and return its parsed config.

    Checks the manifest (format version, signature with a key), that every listed file is a regular
    file of the listed size (before reading it) and SHA-256, and parses ``config.json`` under the JSON
    limits. Added to the returned config: ``"config_sha256"`` (SHA-256 of ``config.json``, which
    holds the tensors' SHA-256: the model's identity), ``"model_signature"`` (see
    :func:`read_manifest`) and ``"model_files"`` (name -> ``{"size", "sha256"}``, as verified).

    Args:
        key: the signing key; None = ``ANOMALENS_MODEL_KEY`` when set (:func:`resolve_key`).

    Raises:
        ModelFileError: anything missing, not a regular file, of another size or checksum, too
            large or deeply nested, from another format version (re-fit), unsigned or badly signed
            with a key.
    """
    d = Path(directory)
    manifest = read_manifest(d, key)
    for name in manifest["files"]:
        if name != CONFIG_NAME:
            check_model_file(d, manifest, name)
    return config_of(d, manifest)


def check_model_file(directory: str | os.PathLike, manifest: dict, name: str) -> None:
    """Check the model file ``name`` against ``manifest`` without keeping it in memory (read in blocks).

    Raises:
        ModelFileError: missing, not a regular file, another size or checksum.
    """
    path, entry = Path(directory) / name, manifest["files"][name]
    if _sha256_file(path, entry["size"], MAX_FILE_BYTES) != entry["sha256"]:
        raise ModelFileError(f"{path} does not match its checksum in {MANIFEST_NAME}: the file is corrupt or was modified")


def config_of(directory: Path, manifest: dict) -> dict:
    """The verified ``config.json`` of a folder whose ``manifest`` was read (see :func:`verify_model_dir`)."""
    path = Path(directory) / CONFIG_NAME
    config = check_config(parse_json(read_model_file(directory, manifest, CONFIG_NAME, MAX_JSON_BYTES), path), path)
    config["config_sha256"] = manifest["files"][CONFIG_NAME]["sha256"]
    config["model_signature"] = manifest["model_signature"]
    config["model_files"] = {k: dict(v) for k, v in manifest["files"].items()}
    return config


def manifest_digest(directory: str | os.PathLike) -> str | None:
    """SHA-256 of a folder's ``manifest.json`` as it is now (None when there is none): tells whether
    the folder was replaced since."""
    try:
        return hashlib.sha256(read_regular(Path(directory) / MANIFEST_NAME, 2**20)).hexdigest()
    except ModelFileError:
        return None


def _check_replaceable(d: Path) -> None:
    """Refuse to replace a folder that holds anything but model files (a user's folder, not a model)."""
    if not d.exists():
        return
    if not d.is_dir():
        raise ModelFileError(f"{d} exists and is not a folder")
    other = sorted(p.name for p in d.iterdir() if p.name not in (*MODEL_FILES, MANIFEST_NAME))
    if other:
        raise ModelFileError(
            f"{d} holds files that are not model files ({', '.join(other[:5])}); a save replaces the whole "
            "folder: save into a new or empty folder, or move those files out"
        )


@contextmanager
def write_model_dir(directory: str | os.PathLike, key: bytes | None = None, expect_manifest: str | None = None) -> Iterator[Path]:
    """Yield an empty folder; write the model files into it; on success its manifest (signed with a
    key) is written and it replaces ``directory`` in one step (:func:`anomalens.atomic.replace_dir`):
    a kill at any instant leaves the old model or the new one, complete.

    Args:
        key: signing key; None = ``ANOMALENS_MODEL_KEY`` when set.
        expect_manifest: the :func:`manifest_digest` the folder had when it was read (read-modify-
            write: calibrate, export); the swap is refused when another writer replaced it since.

    Raises:
        ModelFileError: ``directory`` holds other files than model files, a file other than
            :data:`MODEL_FILES` was written, or the folder changed since ``expect_manifest``.
        ConfigError: a bad key in ``ANOMALENS_MODEL_KEY``.
    """
    d = Path(directory)
    key = key if key is not None else resolve_key(None)
    _check_replaceable(d)
    with replace_dir(d) as tmp:
        yield tmp
        files = {}
        for p in sorted(tmp.iterdir()):
            if p.name not in MODEL_FILES or not p.is_file():
                raise ModelFileError(f"{p.name} is not a model file ({MODEL_FILES})")
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            files[p.name] = {"size": p.stat().st_size, "sha256": h.hexdigest()}
        manifest: dict = {"format": "anomalens-manifest", "format_version": FORMAT_VERSION, "files": files}
        if key is not None:
            manifest["signature"] = {"algorithm": "hmac-sha256", "value": _sign(manifest, key)}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if expect_manifest is not None and manifest_digest(d) != expect_manifest:
            raise ModelFileError(f"{d} was replaced by another writer while this one worked; nothing was written: try again")
