"""What ``predict``, ``zero-shot`` and ``evaluate`` write: prediction rows, overlays and evidence panels."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence


def write_rows(rows: list[dict], out: Path) -> None:
    """All rows at once, atomically: ``predictions.jsonl`` (with region lists and evidence) and
    ``predictions.csv`` (one flat row per image)."""
    from ..results import write_rows as write

    out.mkdir(parents=True, exist_ok=True)
    write(out, rows)


def _safe(text: str, limit: int) -> str:
    """``text`` with only letters, digits, ``-``, ``_`` and ``.``, at most ``limit`` characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:limit]


def overlay_name(i: int, path: str | None) -> str:
    """File name of the ``i``-th input's overlay: its index, folder and stem, made safe and short
    (odd or overlong names of the input never make the overlay unwritable)."""
    if not path:
        return f"{i:05d}.png"
    p = Path(path)
    return f"{i:05d}_{_safe(p.parent.name, 40)}_{_safe(p.stem, 80)}.png"


def save_overlays(det, preds, out: Path, rows: list[dict], indices: Sequence[int] | None = None) -> None:
    """Overlay PNG per image, and the evidence panel (flagged crop | normal crop) per flagged image.

    ``indices``: each prediction's position among all the run's inputs (names the files); default 0, 1, ...
    Adds ``overlay`` and ``evidence_png`` (paths or None) to each row.
    """
    from ..errors import ImageReadError
    from ..io import read_image
    from ..visualize import evidence_panel, save_image, save_overlay

    for i, p, row in zip(indices if indices is not None else range(len(preds)), preds, rows):
        row["overlay"] = None
        row["evidence_png"] = None
        if not p.ok or p.image_path is None:
            continue
        img = p.image if p.image is not None else read_image(p.image_path)
        row["overlay"] = str(save_overlay(p, img, det.pixel_threshold, out / "overlays" / overlay_name(i, p.image_path)))
        if p.evidence is not None:
            train = None
            if p.evidence.train_image:
                try:
                    train = read_image(p.evidence.train_image)
                except ImageReadError:
                    train = None  # moved or deleted since fitting: the panel says so
            panel = evidence_panel(img, p.evidence, train)
            row["evidence_png"] = str(save_image(panel, out / "evidence" / overlay_name(i, p.image_path)))
