"""Files and folders that are either wholly old or wholly new: a kill at any instant loses neither.

Every file a user relies on (model folders, predictions, metrics) is written to a temporary name in the
same folder, flushed to disk, and renamed into place (``os.replace`` is atomic on POSIX). A model folder
is written as a whole new folder beside the old one and swapped in with ``renameat2(RENAME_EXCHANGE)``
(Linux), so readers see the old folder or the new one, never a mix.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: the process's file-creation mask, read once at import (os.umask can only be read by setting it)
_UMASK = _read_umask()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename).

    Raises:
        OSError: the folder cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would create it (mkstemp makes it owner-only)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return publish(tmp, path)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make the finished file ``tmp`` (written in ``path``'s folder) durable and rename it onto
    ``path`` in one step: readers see the old file or the whole new one. ``tmp`` is removed on failure.

    Raises:
        OSError: the file cannot be synced or renamed.
    """
    tmp, path = Path(tmp), Path(path)
    try:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`write_bytes`."""
    return write_bytes(path, text.encode("utf-8"))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2``); False where the system cannot."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


@contextmanager
def replace_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder beside ``target``; on success it replaces ``target`` in one step.

    Write every file of the new folder into the yielded path. When the block raises (or the process
    is killed), ``target`` is untouched and the temporary folder is removed (or left as a hidden
    ``.name.new-*`` folder after a kill, which the next write removes).

    Raises:
        OSError: the parent folder cannot be written, or ``target`` exists and is not a folder.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder")
    for stale in parent.glob(f".{target.name}.new-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if target.exists() and _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        elif target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            os.rmdir(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
