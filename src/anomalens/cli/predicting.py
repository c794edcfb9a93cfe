"""``anomalens predict`` and ``zero-shot``: score images and write their results."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import AnomalensError
from .common import console, fail as _fail, out_console, progress_bars, split_names
from .outputs import _save_overlays, _write_rows


def predict(
    model_dir: Path = typer.Argument(..., help="Model directory written by `anomalens fit`."),
    images: List[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Results directory: predictions.csv/.json and overlays/."),
    heatmaps: bool = typer.Option(True, "--heatmaps/--no-heatmaps", help="Write a heatmap overlay PNG per image."),
    false_alarm_rate: Optional[float] = typer.Option(None, help="Override the model's target false-alarm rate."),
) -> None:
    """Score images: a score, an OK/NG decision, a p-value and a heatmap overlay per image."""
    from ..data import expand_inputs
    from ..detectors import load_detector

    try:
        det = load_detector(model_dir)
        if false_alarm_rate is not None:
            det.set_false_alarm_rate(false_alarm_rate)
        paths = expand_inputs(images)
        rows: list[dict] = []
        # chunks keep memory flat on large folders: maps and images of a chunk are dropped once written
        chunk = 64
        with progress_bars() as cb:
            for s in range(0, len(paths), chunk):
                part = det.predict(
                    paths[s : s + chunk], keep_images=heatmaps, progress=lambda st, d, t: cb(st, s + d, len(paths))
                )
                part_rows = [p.summary(detail=True) for p in part]
                if heatmaps:
                    _save_overlays(det, part, out, part_rows, start=s)
                rows.extend(part_rows)
        _write_rows(rows, out)
    except AnomalensError as exc:
        _fail(exc)
    n_bad = sum(r["error"] is not None for r in rows)
    n_ng = sum(1 for r in rows if r["pred_label"] == 1)
    t = Table(title=f"{len(rows)} images: {n_ng} NG, {len(rows) - n_ng - n_bad} OK, {n_bad} unreadable")
    for c in ("path", "score", "decision", "p-value"):
        t.add_column(c)
    for r in rows[:50]:
        t.add_row(
            str(r["path"]),
            "-" if r["pred_score"] is None else f"{r['pred_score']:.3f}",
            r["decision"] or "ERROR",
            "-" if r["p_value"] is None else f"{r['p_value']:.3f}",
        )
    if len(rows) > 50:
        t.caption = f"first 50 of {len(rows)} rows; all in predictions.csv"
    out_console.print(t)
    for r in rows:
        if r["error"] is not None:
            console.print("[yellow]skipped:[/]", escape(r["error"]), soft_wrap=True)
    console.print(f"results written to {out}")


def zero_shot(
    images: List[Path] = typer.Argument(..., help="Unlabeled images of one product (files/folders): scored against each other."),
    out: Path = typer.Option(..., "--out", "-o", help="Results directory: predictions.csv/.json and overlays/."),
    heatmaps: bool = typer.Option(True, "--heatmaps/--no-heatmaps", help="Write a heatmap overlay PNG per image."),
    chunk: int = typer.Option(8, help="Query images per block of the pairwise scoring (bounds memory)."),
    reference: Optional[List[Path]] = typer.Option(
        None, "--reference", "-r",
        help="Known-good images (files/folders; repeatable): few-shot, their PatchCore score is added to the mutual score.",
    ),
    augment: str = typer.Option("none", help="Augmentation of the --reference images: none, flips, rotations, dihedral, rotations45."),
    image_size: int = typer.Option(224, help="Side in pixels the ViT sees (multiple of 14; 448 = 32 x 32 tokens at 4x the ViT time)."),
    max_references: int = typer.Option(100, help="Other images each image is compared with at most (0 = every pair; cost grows with the batch squared)."),
    cnn: str = typer.Option(
        "efficientnet_lite0,mobilenet_v2",
        help="CNNs (comma-separated) whose patch features are scored mutually beside the ViT's (robust z-scores added, one vote each); 'none' = the ViT alone.",
    ),
    cnn_size: int = typer.Option(256, help="Side in pixels the CNN sees (multiple of 16)."),
    cnn_augment: str = typer.Option(
        "rotations",
        help="Views of the other images a CNN patch may also match: rotations (their 90-degree turns: parts at any angle), none (2.6 times faster), flips, dihedral.",
    ),
) -> None:
    """Zero-shot (no normal images): MuSc mutual scoring of a batch of unlabeled images on the ViT and a CNN.

    With --reference (a few good images), few-shot: each image's mutual score and its distance to the
    good images' patches are combined (robust z-scores over the batch, added)."""
    from ..data import expand_inputs
    from ..zeroshot import MuSc

    try:
        paths = expand_inputs(images)
        model = MuSc(
            chunk=chunk, reference_augment=augment, image_size=image_size, max_references=max_references or None,
            cnn_backbone=None if cnn.lower() == "none" else split_names(cnn), cnn_size=cnn_size,
            cnn_augment=cnn_augment,
        )
        refs = expand_inputs(reference) if reference else None
        preds = model.predict(paths, references=refs)
        rows = [p.summary(detail=True) for p in preds]
        if heatmaps:
            _save_overlays(model, preds, out, rows)
        _write_rows(rows, out)
    except AnomalensError as exc:
        _fail(exc)
    n_ng = sum(1 for r in rows if r["pred_label"] == 1)
    how = f" and against {len(refs)} good image(s)" if refs else ""
    console.print(f"{len(rows)} images scored against each other{how}: {n_ng} NG (batch-relative threshold {model.threshold:.4f}); results in {out}")
