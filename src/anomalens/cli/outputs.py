"""What ``predict``, ``zero-shot`` and ``evaluate`` write: prediction rows, overlays and evidence panels."""

from __future__ import annotations

import csv
import json
from pathlib import Path


NESTED = ("regions", "evidence")


def _write_rows(rows: list[dict], out: Path) -> None:
    """predictions.json (with region lists and evidence) and predictions.csv (one flat row per image)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.json").write_text(json.dumps(rows, indent=2))
    flat = [{k: v for k, v in r.items() if k not in NESTED} for r in rows]
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat[0].keys()) if flat else ["path"])
        w.writeheader()
        w.writerows(flat)


def _overlay_name(i: int, path: str | None) -> str:
    if not path:
        return f"{i:05d}.png"
    p = Path(path)
    return f"{i:05d}_{p.parent.name}_{p.stem}.png"


def _save_overlays(det, preds, out: Path, rows: list[dict], start: int = 0) -> None:
    """Overlay PNG per image, and the evidence panel (flagged crop | normal crop) per flagged image."""
    from ..errors import ImageReadError
    from ..io import read_image
    from ..visualize import evidence_panel, save_image, save_overlay

    for i, (p, row) in enumerate(zip(preds, rows), start):
        row["overlay"] = None
        row["evidence_png"] = None
        if not p.ok or p.image_path is None:
            continue
        img = p.image if p.image is not None else read_image(p.image_path)
        row["overlay"] = str(save_overlay(p, img, det.pixel_threshold, out / "overlays" / _overlay_name(i, p.image_path)))
        if p.evidence is not None:
            train = None
            if p.evidence.train_image:
                try:
                    train = read_image(p.evidence.train_image)
                except ImageReadError:
                    train = None  # moved or deleted since fitting: the panel says so
            panel = evidence_panel(img, p.evidence, train)
            row["evidence_png"] = str(save_image(panel, out / "evidence" / _overlay_name(i, p.image_path)))
