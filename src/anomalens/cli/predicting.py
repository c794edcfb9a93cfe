"""``anomalens predict`` and ``zero-shot``: score images and write their results."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import AnomalensError, ConfigError
from .common import ENGINE_HELP, KEY_FILE_HELP, console, describe_model, fail as _fail, model_key, out_console, progress_bars, split_names
from .outputs import save_overlays, write_rows


#: exit code when some inputs could not be scored (each has an error row); 0: all scored, 2: usage error
EXIT_PARTIAL = 3
#: pixels of input images scored per chunk: images, maps and masks of a chunk are held until its rows
#: and overlays are written, so memory is bounded by pixels, not by the number of images
CHUNK_PIXELS = 64 * 2**20
CHUNK_IMAGES = 64


def chunks_by_pixels(paths: list[Path], budget: int = CHUNK_PIXELS, most: int = CHUNK_IMAGES) -> Iterator[list[int]]:
    """Indices of ``paths`` in consecutive chunks of at most ``budget`` pixels (from the image headers;
    an unreadable image counts as none) and at most ``most`` images; a chunk holds at least one image."""
    from ..errors import ImageReadError
    from ..io import image_size

    chunk: list[int] = []
    pixels = 0
    for i, p in enumerate(paths):
        try:
            w, h = image_size(p)
            n = w * h
        except ImageReadError:
            n = 0
        if chunk and (pixels + n > budget or len(chunk) >= most):
            yield chunk
            chunk, pixels = [], 0
        chunk.append(i)
        pixels += n
    if chunk:
        yield chunk


def printable(text) -> str:
    """``text`` for a terminal: bytes of a file name that are not UTF-8 shown as ``\\xNN``."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def predict(
    model_dir: Path = typer.Argument(..., help="Model directory written by `anomalens fit`."),
    images: List[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Results folder: predictions.csv, predictions.jsonl, overlays/ and evidence/."),
    heatmaps: bool = typer.Option(True, "--heatmaps/--no-heatmaps", help="Write a heatmap overlay PNG per image."),
    false_alarm_rate: Optional[float] = typer.Option(None, help="Override the model's target false-alarm rate."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out: images that already have a result row are skipped."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results of an earlier run in --out."),
    chunk: int = typer.Option(CHUNK_IMAGES, "--chunk", min=1, help="Images scored and written together (fewer if their pixels exceed 64 MP): a kill loses at most one chunk."),
    engine: str = typer.Option("auto", help=ENGINE_HELP),
    key_file: Optional[Path] = typer.Option(None, "--key-file", help=KEY_FILE_HELP),
) -> None:
    """Score images: a score, an OK/NG decision, a p-value and a heatmap overlay per image.

    Rows are appended to predictions.jsonl and predictions.csv as each chunk of images is scored, so an
    interrupted run keeps its rows (`--resume` continues it). Every input gets a row: one that cannot
    be read (missing, a dangling link, a folder, too large, corrupt) gets its error and the others are
    scored. Exit code: 0 every input scored, 3 some could not be scored, 2 a usage error (nothing scored)."""
    from ..data import expand_inputs
    from ..loading import load_detector
    from ..results import ResultWriter
    from ..serialization import read_config

    rows: list[dict] = []
    try:
        key = model_key(key_file)
        det = load_detector(model_dir, key=key, engine=engine)
        if getattr(det, "is_video", False):
            raise ConfigError(f"{model_dir} is a video model: score videos with `anomalens video predict`")
        whole = getattr(det, "scores_whole_batch", False)  # MuSc: the images are scored against each other
        if whole and resume:
            raise ConfigError(f"--resume: the {det.name} model of {model_dir} scores all images against each other; run them again as one job")
        if false_alarm_rate is not None:
            if not hasattr(det, "set_false_alarm_rate"):
                raise ConfigError(f"--false-alarm-rate: {model_dir} holds {describe_model(det)}, whose threshold is fixed "
                                  "(an exported model: change it with `anomalens calibrate` where torch is installed and export again)")
            det.set_false_alarm_rate(false_alarm_rate)
        run = {"command": "predict", "model": str(model_dir.resolve()), "model_sha256": read_config(model_dir, key).get("config_sha256"),
               "false_alarm_rate": false_alarm_rate}
        writer = ResultWriter(out, run, resume=resume, overwrite=overwrite)
        paths = expand_inputs(images)
        todo = [i for i, p in enumerate(paths) if str(p) not in writer.done]
        with progress_bars() as cb:
            done = 0
            chunks = [list(range(len(todo)))] if whole else chunks_by_pixels([paths[i] for i in todo], most=chunk)
            for chunk in chunks:
                idx = [todo[k] for k in chunk]
                part = det.predict([paths[i] for i in idx], keep_images=heatmaps,
                                   progress=lambda st, d, t, base=done: cb(st, base + d, len(todo)))
                part_rows = [p.summary(detail=True) for p in part]
                if heatmaps:
                    save_overlays(det, part, out, part_rows, indices=idx)
                writer.append(part_rows)
                rows.extend(part_rows)
                done += len(idx)
                del part
    except AnomalensError as exc:
        _fail(exc)
    n_bad = sum(r["error"] is not None for r in rows)
    n_ng = sum(1 for r in rows if r["pred_label"] == 1)
    kept = f"; {writer.n_kept} kept from the interrupted run" if writer.n_kept else ""
    t = Table(title=f"{len(rows)} images scored: {n_ng} NG, {len(rows) - n_ng - n_bad} OK, {n_bad} not scored{kept}")
    for c in ("path", "score", "normalized", "decision", "p-value"):
        t.add_column(c)
    for r in rows[:50]:
        t.add_row(
            escape(printable(r["path"])),
            "-" if r["pred_score"] is None else f"{r['pred_score']:.3f}",
            "-" if r.get("normalized_score") is None else f"{r['normalized_score']:.3f}",
            r["decision"] or "ERROR",
            r.get("p_value_text") or ("-" if r["p_value"] is None else f"{r['p_value']:.3f}"),
        )
    if len(rows) > 50:
        t.caption = f"first 50 of {len(rows)} rows; all in predictions.csv"
    out_console.print(t)
    for r in rows:
        if r["error"] is not None:
            console.print("[yellow]not scored:[/]", escape(printable(r["error"])), soft_wrap=True)
    console.print(f"results written to {out}")
    if n_bad:
        raise typer.Exit(code=EXIT_PARTIAL)


def zero_shot(
    images: List[Path] = typer.Argument(..., help="Unlabeled images of one product (files/folders): scored against each other."),
    out: Path = typer.Option(..., "--out", "-o", help="Results folder: predictions.csv, predictions.jsonl and overlays/."),
    heatmaps: bool = typer.Option(True, "--heatmaps/--no-heatmaps", help="Write a heatmap overlay PNG per image."),
    chunk: int = typer.Option(8, help="Query images per block of the pairwise scoring (bounds memory)."),
    reference: Optional[List[Path]] = typer.Option(
        None, "--reference", "-r",
        help="Known-good images (files/folders; repeatable): few-shot, their PatchCore score is added to the mutual score.",
    ),
    augment: str = typer.Option("none", help="Augmentation of the --reference images: none, flips, rotations, dihedral, rotations45."),
    image_size: int = typer.Option(224, help="Side in pixels the ViT sees (multiple of 14; 448 = 32 x 32 tokens, 4 times 224's)."),
    max_references: int = typer.Option(100, help="Other images each image is compared with at most (0 = every pair; cost grows with the batch squared)."),
    cnn: str = typer.Option(
        "efficientnet_lite0,mobilenet_v2",
        help="CNNs (comma-separated) whose patch features are scored mutually beside the ViT's (robust z-scores added, one vote each); 'none' = the ViT alone.",
    ),
    cnn_size: int = typer.Option(256, help="Side in pixels the CNN sees (multiple of 16)."),
    cnn_augment: str = typer.Option(
        "rotations",
        help="Views of the other images a CNN patch may also match: rotations (their 90-degree turns: parts at any angle), none (one view instead of four: faster), flips, dihedral.",
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
            save_overlays(model, preds, out, rows)
        write_rows(rows, out)
    except AnomalensError as exc:
        _fail(exc)
    n_ng = sum(1 for r in rows if r["pred_label"] == 1)
    how = f" and against {len(refs)} good image(s)" if refs else ""
    console.print(f"{len(rows)} images scored against each other{how}: {n_ng} NG (batch-relative threshold {model.threshold:.4f}); results in {out}")
