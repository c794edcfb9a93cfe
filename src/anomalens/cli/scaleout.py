"""``anomalens batch-predict`` and ``fit-many``: many images or many categories on Ray."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import AnomalensError
from .common import ENGINE_HELP, console, fail as _fail, out_console, progress_bars


def batch_predict(
    model_dir: Path = typer.Argument(..., help="Model directory written by `anomalens fit`."),
    inputs: List[Path] = typer.Argument(..., help="Image files, folders (recursive), or .txt files listing one path a line."),
    out: Path = typer.Option(..., "--out", "-o", help="Output Parquet dataset folder (e.g. scores.parquet); re-runs resume."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (auto, ray://HOST:10001); default: a local Ray."),
    workers: int = typer.Option(2, help="Scoring actors; each loads the model once."),
    chunk: int = typer.Option(16, "--chunk", help="Images per chunk: per Parquet part, the unit of resumption."),
    engine: str = typer.Option("auto", help=ENGINE_HELP),
) -> None:
    """Score many images in parallel on Ray: one Parquet row per image, resumable after an interruption."""
    from ..distributed import batch_predict as run

    try:
        with progress_bars() as cb:
            summary = run(model_dir, inputs, out, address=address, workers=workers, chunk_size=chunk, engine=engine,
                          progress=lambda d, t: cb("predict", d, t))
    except AnomalensError as exc:
        _fail(exc)
    console.print(
        f"{summary.n_images} images in {summary.n_chunks} parts ({summary.n_skipped} already written); "
        f"scored {summary.n_scored} now with {summary.workers} workers in {summary.seconds:.1f} s "
        f"({summary.images_per_second:.1f} images/s), {summary.n_errors} error rows; results in {out}"
    )


def fit_many(
    root: Path = typer.Argument(..., help="Folder of categories (MVTec AD layout, or one folder of good images per category)."),
    out: Path = typer.Option(..., "--out", "-o", help="Models directory: one model folder per category."),
    model: str = typer.Option("patchcore", "--model", "-m", help="Detector: patchcore or padim."),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", "-b",
        help="efficientnet_lite0, efficientnet_lite2, mobilenet_v2 or vit_small_focus (default: efficientnet_lite2 for patchcore, efficientnet_lite0 for padim).",
    ),
    image_size: Optional[str] = typer.Option(
        None, help="Short side in pixels images are resized to, aspect ratio kept (multiple of 16); several, comma-separated, "
        "are fused (PatchCore). Default: 256,320 for PatchCore, 256 for PaDiM.",
    ),
    false_alarm_rate: Optional[float] = typer.Option(
        None, help="Target fraction of normal images flagged NG (default: 0.01, or the smallest rate each category's images support)."
    ),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: a local Ray."),
    workers: int = typer.Option(2, help="Categories fitted at the same time (one CPU each)."),
) -> None:
    """Fit one model per category folder in parallel on Ray, with a summary table."""
    from ..distributed import fit_many as run
    from .fitting import _sizes

    params: dict = {} if false_alarm_rate is None else {"false_alarm_rate": false_alarm_rate}
    if backbone:
        params["backbone"] = backbone
    if image_size is not None:
        params["image_size"] = _sizes(image_size)
    try:
        with progress_bars() as cb:
            results = run(root, out, detector=model, params=params, address=address,
                          workers=workers, progress=lambda r, d, t: cb("fit", d, t))
    except AnomalensError as exc:
        _fail(exc)
    t = Table(title=f"{len(results)} categories fitted into {out}")
    for c in ("category", "images", "seconds", "threshold", "status"):
        t.add_column(c)
    for r in results:
        t.add_row(r.category, str(r.n_images), f"{r.seconds:.1f}", "-" if r.threshold is None else f"{r.threshold:.4f}",
                  "ok" if r.error is None else escape(f"error: {r.error}"))
    out_console.print(t)
    if any(r.error for r in results):
        raise typer.Exit(code=1)
