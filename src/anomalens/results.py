"""Result files written as they are produced: ``predictions.jsonl`` and ``predictions.csv``.

One row per input image, appended (and flushed to disk) as each chunk of images is scored, so a run
that is killed keeps every row it wrote; at most the last, half-written line is lost, and it is
dropped when the folder is read again. ``run.json`` records which model wrote the rows, so that
``--resume`` continues the same run and never mixes the results of two models.

JSON Lines (one JSON object a line) is the machine-readable form: it holds the region list and the
evidence of each image; the CSV holds the flat columns for spreadsheets.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from . import atomic
from .errors import ConfigError

JSONL = "predictions.jsonl"
CSV = "predictions.csv"
RUN = "run.json"
#: everything a results folder of ours may hold (removed by ``overwrite``; nothing else is touched)
OUTPUTS = (JSONL, CSV, RUN, "predictions.json", "overlays", "evidence")
#: nested fields: in the JSON Lines only
NESTED = ("regions", "evidence")


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The complete rows of a JSON Lines file; a torn last line (a killed writer) is skipped.

    Raises:
        ConfigError: a line other than the last is not a JSON object (the file is not ours).
    """
    rows: list[dict] = []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if k >= len(lines) - 2:  # the last line: cut short by a kill
                continue
            raise ConfigError(f"{path} line {k + 1} is not JSON: not a results file of anomalens") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path} line {k + 1} is not a JSON object")
        rows.append(row)
    return rows


def _csv_text(rows: Iterable[dict], columns: list[str], header: bool) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", restval="")
    if header:
        w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


class ResultWriter:
    """Append prediction rows to ``out/predictions.jsonl`` and ``out/predictions.csv``.

    Args:
        out: the results folder (created when missing).
        run: what identifies the run (e.g. ``{"command": "predict", "model_sha256": ...}``); stored in
            ``run.json`` and compared on ``resume``.
        resume: continue the run in ``out``: rows with a result are kept (their images are in
            :attr:`done`), error rows are dropped so their images are tried again.
        overwrite: remove the results of an earlier run in ``out`` (only the files this class and the
            overlays write; other files are left alone).

    Raises:
        ConfigError: ``out`` is not empty and neither ``resume`` nor ``overwrite`` is given; ``resume``
            of a folder written by another model or command; both flags at once.
    """

    def __init__(self, out: str | os.PathLike, run: dict, *, resume: bool = False, overwrite: bool = False):
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} exists and is not a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        self.run = dict(run)
        self.columns: list[str] | None = None
        kept: list[dict] = []
        existing = sorted(p.name for p in self.out.iterdir())
        if existing and not (resume or overwrite):
            raise ConfigError(
                f"--out {self.out} is not empty ({', '.join(existing[:4])}{' ...' if len(existing) > 4 else ''}): "
                "pass --resume to continue that run, or --overwrite to replace its results"
            )
        if overwrite:
            for name in OUTPUTS:
                p = self.out / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
        elif resume and (self.out / JSONL).exists():
            before = self._read_run()
            if before is not None and before != self.run:
                diff = sorted(k for k in set(before) | set(self.run) if before.get(k) != self.run.get(k))
                raise ConfigError(f"--resume: {self.out} holds results of another run (differs in {', '.join(diff)}); use another --out or --overwrite")
            kept = [r for r in read_rows(self.out / JSONL) if r.get("error") is None and r.get("path") is not None]
        #: paths of the images whose rows are kept from an earlier, interrupted run
        self.done: set[str] = {str(r["path"]) for r in kept}
        self.n_kept = len(kept)
        atomic.write_text(self.out / RUN, json.dumps(self.run, indent=2, sort_keys=True))
        # start both files afresh from the kept rows (drops a torn line and the error rows)
        atomic.write_text(self.out / JSONL, "".join(json.dumps(r) + "\n" for r in kept))
        if kept:
            self.columns = self._columns(kept[0])
        atomic.write_bytes(self.out / CSV, _csv_text(kept, self.columns, True).encode("utf-8", "surrogateescape") if kept else b"")

    def _read_run(self) -> dict | None:
        try:
            return json.loads((self.out / RUN).read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _columns(row: dict) -> list[str]:
        return [k for k in row if k not in NESTED]

    def append(self, rows: list[dict]) -> None:
        """Append ``rows`` to both files and flush them to disk (one call per scored chunk)."""
        if not rows:
            return
        header = self.columns is None
        if header:
            self.columns = self._columns(rows[0])
        for name, text in ((JSONL, "".join(json.dumps(r) + "\n" for r in rows)),
                           (CSV, _csv_text(rows, self.columns, header))):
            with open(self.out / name, "a", encoding="utf-8", errors="surrogateescape", newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())


def write_rows(out: str | os.PathLike, rows: list[dict]) -> None:
    """Write all ``rows`` at once, atomically: ``predictions.jsonl`` and ``predictions.csv`` in ``out``
    (commands that produce their rows together, such as ``evaluate`` and ``zero-shot``)."""
    out = Path(out)
    atomic.write_text(out / JSONL, "".join(json.dumps(r) + "\n" for r in rows))
    columns = ResultWriter._columns(rows[0]) if rows else ["path"]
    atomic.write_bytes(out / CSV, _csv_text(rows, columns, True).encode("utf-8", "surrogateescape"))
