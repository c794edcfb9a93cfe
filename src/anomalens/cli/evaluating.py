"""``anomalens evaluate`` and ``discover``: metrics against ground truth, and defect types."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import AnomalensError
from .common import DETECTOR_ENGINE_HELP, KEY_FILE_HELP, fail as _fail, image_detector, fmt_pct as _fmt, model_key, out_console, progress_bars
from .common import metrics_table
from .outputs import write_rows


def evaluate(
    model_dir: Path = typer.Argument(..., help="Model directory written by `anomalens fit`."),
    data: Optional[Path] = typer.Argument(
        None, help="Labelled test images: an MVTec AD category (test/, ground_truth/), or a folder with good/ beside "
        "folders of defective images (ng/, ...; masks optional in ground_truth/<folder>/), or the folder --normal-dir "
        "and --abnormal-dir are relative to.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Results directory: metrics.json, predictions.csv/.json (and report.html)."),
    normal_dir: Optional[Path] = typer.Option(None, "--normal-dir", help="anomalib's Folder layout: the folder of normal (good) test images."),
    abnormal_dir: Optional[List[Path]] = typer.Option(
        None, "--abnormal-dir", help="anomalib's Folder layout: a folder of defective images (repeatable; its name is the defect type)."
    ),
    mask_dir: Optional[Path] = typer.Option(
        None, "--mask-dir", help="anomalib's Folder layout: ground-truth masks, matched to defective images by file stem (<stem>.png or <stem>_mask.png)."
    ),
    report: bool = typer.Option(False, "--report", help="Also write report.html: curves, histograms, galleries, defect types."),
    n_types: Optional[int] = typer.Option(None, help="Number of defect types for the report's clustering (default: chosen by silhouette)."),
    engine: str = typer.Option("auto", help=DETECTOR_ENGINE_HELP),
    key_file: Optional[Path] = typer.Option(None, "--key-file", help=KEY_FILE_HELP),
) -> None:
    """Evaluate a model on labelled images: image AUROC, F1-max, AP and the threshold's false-alarm and
    detection rates always; pixel AUROC and AUPRO when every defective image has a mask."""
    from ..atomic import write_text
    from ..evaluation import METRIC_NAMES, f1_comparison, threshold_table
    from ..evaluation import evaluate as run_evaluation

    where = str(data) if data is not None else ""
    if normal_dir is not None or abnormal_dir:
        parts = [f"normal {normal_dir}"] if normal_dir is not None else []
        parts += [f"abnormal {a}" for a in abnormal_dir or []] + ([f"masks {mask_dir}"] if mask_dir is not None else [])
        where = (f"{data}: " if data is not None else "") + ", ".join(parts)
    name = data.name if data is not None else (normal_dir or (abnormal_dir or [Path("?")])[0]).name
    try:
        det = image_detector(model_dir, model_key(key_file), engine)
        with progress_bars() as cb:
            result = run_evaluation(det, data, normal_dir=normal_dir, abnormal_dir=abnormal_dir or None, mask_dir=mask_dir, progress=cb)
        thresholds = threshold_table(det, result.predictions)
        f1 = f1_comparison(result.predictions)
        d = result.to_dict()
        d["model"] = {"dir": str(model_dir), "detector": det.name, **det.get_params(), "threshold": det.threshold}
        d["calibration"] = {"source": det.calibration.source, "mode": det.calibration.mode, "note": det.calibration.note}
        d["data"] = where
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
                d["defect_types"] = clusters.to_dict()
                if len({p.defect_type for p in defective}) > 1:  # else there is no grouping to compare with
                    agree = agreement([defective[i].defect_type for i, _ in clusters.refs], clusters.labels)
                    d["defect_types"].update(agree)
            title = f"{det.name} / {det.backbone_name} on {name}"
            html_text = render_report(
                result, det, title=title, data=where, thresholds=thresholds, f1=f1,
                clusters=clusters, cluster_preds=defective, agreement=agree,
            )
            report_path = write_report(out / "report.html", html_text)
    except AnomalensError as exc:
        _fail(exc)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "metrics.json", json.dumps(d, indent=2))
    write_rows([p.summary(detail=True) for p in result.predictions], out)
    gt = d["ground_truth"]
    table = metrics_table(d, f"{det.name} / {det.backbone_name} / {det.size_label} on {name} (%)")
    table.caption = f"{gt['n_good']} good, {gt['n_defective']} defective images ({gt['n_defective_with_mask']} with a mask); layout {d['layout'] or 'samples'}"
    out_console.print(table)
    by_reason: dict[str, list[str]] = {}
    for k, why in result.absent.items():
        by_reason.setdefault(why, []).append(METRIC_NAMES.get(k, k))
    for why, names in by_reason.items():
        out_console.print(f"[yellow]not computed:[/] {', '.join(names)}: {escape(why)}", soft_wrap=True)
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
        vs = f"NMI {dt['nmi']:.3f}, ARI {dt['ari']:.3f} against the defect folders" if "nmi" in dt else "one defect folder: nothing to compare with"
        out_console.print(f"defect types found: {dt['n_clusters']} ({vs})")
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
    from ..atomic import write_text
    from ..data import expand_inputs
    from ..discovery import cluster_region, discover_defect_types
    from ..io import read_image
    from ..visualize import region_crop, save_image, tile_grid

    try:
        det = image_detector(model_dir, None, "auto")
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
    write_text(out / "defect_types.json", json.dumps({**clusters.to_dict(), "rows": rows}, indent=2))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    w.writeheader()
    w.writerows(rows)
    write_text(out / "defect_types.csv", buf.getvalue())
    t = Table(title=f"{len(rows)} regions of {len(chosen)} images: {clusters.n_clusters} defect types")
    for col in ("type", "regions", "gallery"):
        t.add_column(col)
    for c in range(clusters.n_clusters):
        members = clusters.members(c)
        tiles = [region_crop(read_image(chosen[i].image_path), cluster_region(chosen[i], j)) for i, j in members[:32]]
        path = save_image(tile_grid(tiles), out / "gallery" / f"type_{c:02d}.png")
        t.add_row(str(c), str(len(members)), str(path))
    out_console.print(t)
