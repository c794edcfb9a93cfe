"""``anomalens evaluate`` and ``discover``: metrics against ground truth, and defect types."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import AnomalensError
from .common import fail as _fail, fmt_pct as _fmt, out_console, progress_bars
from .common import metrics_table
from .outputs import _write_rows


def evaluate(
    model_dir: Path = typer.Argument(..., help="Model directory written by `anomalens fit`."),
    data: Path = typer.Argument(..., help="MVTec AD category folder (test/ and ground_truth/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Results directory: metrics.json, predictions.csv/.json (and report.html)."),
    report: bool = typer.Option(False, "--report", help="Also write report.html: curves, histograms, galleries, defect types."),
    n_types: Optional[int] = typer.Option(None, help="Number of defect types for the report's clustering (default: chosen by silhouette)."),
) -> None:
    """Evaluate a model against ground truth: image AUROC, pixel AUROC, AUPRO, F1-max, AP, and the threshold's false-alarm rate."""
    from ..detectors import load_detector
    from ..evaluation import evaluate as run_evaluation
    from ..evaluation import f1_comparison, threshold_table

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
            from ..discovery import agreement, discover_defect_types
            from ..report import render_report, write_report

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


def discover(
    model_dir: Path = typer.Argument(..., help="Model directory written by `anomalens fit`."),
    images: List[Path] = typer.Argument(..., help="Image files and/or folders, e.g. a week of NG parts."),
    out: Path = typer.Option(..., "--out", "-o", help="Results directory: defect_types.csv/.json and gallery/type_NN.png."),
    n_types: Optional[int] = typer.Option(None, help="Number of defect types (default: chosen by silhouette, 2-8)."),
    all_images: bool = typer.Option(False, "--all", help="Use every image, not only those flagged NG."),
) -> None:
    """Group the anomalous regions of flagged images into defect types, without labels."""
    from ..data import expand_inputs
    from ..detectors import load_detector
    from ..discovery import cluster_region, discover_defect_types
    from ..io import read_image
    from ..visualize import region_crop, save_image, tile_grid

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
