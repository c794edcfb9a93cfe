"""The evaluation report: one self-contained HTML file (inline CSS, images as data URIs, no script).

Sections: the model and its threshold; metrics per defect type; the false-alarm promise checked at
several rates; ROC and PRO curves; score histograms of good vs defective images with the threshold;
the worst false positives and false negatives with their overlays and evidence; defect-type clusters.
Plots are drawn with matplotlib (Agg backend, off-screen).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .discovery import DefectClusters, cluster_region
from .errors import ImageReadError
from .evaluation import EvaluationResult
from .io import read_image
from .prediction import Prediction
from .visualize import evidence_panel, overlay_figure, region_crop

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#1b1f24;background:#fff}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.sub{color:#57606a;margin:0 0 16px}table{border-collapse:collapse;margin:8px 0;font-size:14px}
th,td{border:1px solid #d0d7de;padding:4px 9px;text-align:right}th{background:#f6f8fa}td:first-child,th:first-child{text-align:left}
.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;border:1px solid #d0d7de;padding:6px;background:#f6f8fa}figcaption{font-size:12px;color:#57606a;max-width:520px;word-break:break-all}
img{display:block;max-width:100%}.plots img{width:370px}.note{font-size:13px;color:#57606a;max-width:900px}
"""

METRIC_COLUMNS = (
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO"),
    ("image_f1_max", "F1-max"),
    ("image_ap", "AP"),
    ("false_alarm_rate", "false alarms"),
    ("detection_rate", "detected"),
)


def _pct(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _data_uri(rgb: np.ndarray, fmt: str = ".jpg") -> str:
    ok, buf = cv2.imencode(fmt, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85] if fmt == ".jpg" else [])
    if not ok:  # pragma: no cover - encoding an in-memory uint8 image does not fail
        raise RuntimeError("image encoding failed")
    mime = "image/jpeg" if fmt == ".jpg" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(buf.tobytes()).decode()


def _fig_uri(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumb(rgb: np.ndarray, width: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    return cv2.resize(rgb, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA) if w > width else rgb


def _plots(preds: Sequence[Prediction], threshold: float, alpha: float, pro: tuple[np.ndarray, np.ndarray] | None) -> list[tuple[str, str]]:
    """(title, data URI) of the ROC curve, the PRO curve and the score histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    ok = [p for p in preds if p.ok and p.gt_label is not None]
    y = np.array([p.gt_label for p in ok])
    s = np.array([p.pred_score for p in ok])
    out = []
    if y.size and y.min() != y.max():
        fpr, tpr, _ = roc_curve(y, s)
        fig, ax = plt.subplots(figsize=(4.2, 3.6))
        ax.plot(fpr, tpr, lw=2)
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set(xlabel="false positive rate (good images)", ylabel="true positive rate", title="image ROC")
        out.append(("image ROC", _fig_uri(fig)))
        if pro is not None:
            fig, ax = plt.subplots(figsize=(4.2, 3.6))
            ax.plot(pro[0], pro[1], lw=2, color="tab:green")
            ax.set(xlim=(0, 0.3), ylim=(0, 1.02), xlabel="false positive rate (normal pixels)", ylabel="per-region overlap", title="PRO curve (AUPRO range)")
            out.append(("PRO curve up to 30% false-positive rate", _fig_uri(fig)))
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    good, bad = s[y == 0], s[y == 1]
    bins = np.histogram_bin_edges(s, bins=30) if s.size else 10
    if good.size:
        ax.hist(good, bins=bins, alpha=0.6, label=f"good ({good.size})", color="tab:blue")
    if bad.size:
        ax.hist(bad, bins=bins, alpha=0.6, label=f"defective ({bad.size})", color="tab:red")
    far = float(np.mean(good > threshold)) if good.size else math.nan
    ax.axvline(threshold, color="k", ls="--", lw=1.5, label=f"threshold (target {alpha:g}, observed {_pct(far)}%)")
    ax.set(xlabel="image anomaly score", ylabel="images", title="scores of good vs defective images")
    ax.legend(fontsize=8)
    out.append(("score histogram with the threshold", _fig_uri(fig)))
    return out


def _read(path: str | None) -> np.ndarray | None:
    if not path:
        return None
    try:
        return read_image(path)
    except ImageReadError:
        return None


def _figure(pred: Prediction, pixel_threshold: float, width: int = 540, with_evidence: bool = True) -> str:
    img = pred.image if pred.image is not None else _read(pred.image_path)
    if img is None or pred.anomaly_map is None:
        return ""
    ov = overlay_figure(pred, img, pixel_threshold)
    parts = [f'<img src="{_data_uri(_thumb(ov, width))}" alt="overlay">']
    if with_evidence and pred.evidence is not None:
        panel = evidence_panel(img, pred.evidence, _read(pred.evidence.train_image), side=140)
        parts.append(f'<img src="{_data_uri(panel)}" alt="evidence">')
    name = html.escape(f"{pred.defect_type or ''} / {Path(pred.image_path or '').name}")
    regions = ", ".join(f"{r.area_px} px ({r.area_pct:.2f}%) peak {r.peak_score:.2f}" for r in pred.regions[:3]) or "no region"
    return f"<figure>{''.join(parts)}<figcaption>{name}<br>regions: {html.escape(regions)}</figcaption></figure>"


def _metric_table(result: EvaluationResult) -> str:
    head = "".join(f"<th>{label} %</th>" for _, label in METRIC_COLUMNS)
    rows = [("all", result.metrics)] + list(result.per_defect.items())
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{_pct(m.get(k))}</td>" for k, _ in METRIC_COLUMNS) + "</tr>" for name, m in rows
    )
    return f"<table><tr><th>subset</th>{head}</tr>{body}</table>"


def _absent_note(result: EvaluationResult) -> str:
    """What the test data allowed: the image counts, and each metric left out with the reason."""
    gt = result.ground_truth()
    head = (f"<p class='note'>{gt['n_good']} good and {gt['n_defective']} defective images, "
            f"{gt['n_defective_with_mask']} of them with a ground-truth mask (layout: {html.escape(result.layout or 'samples')}).")
    if not result.absent:
        return head + " Every metric could be computed.</p>"
    labels = dict(METRIC_COLUMNS)
    by_reason: dict[str, list[str]] = {}
    for k, why in result.absent.items():
        by_reason.setdefault(why, []).append(labels.get(k, k))
    items = "".join(f"<li><b>{html.escape(', '.join(names))}</b>: {html.escape(why)}</li>" for why, names in by_reason.items())
    return head + f" Not computed (shown as –):</p><ul class='note'>{items}</ul>"


def _threshold_table(rows: list[dict]) -> str:
    out = ["<table><tr><th>target false-alarm rate</th><th>threshold</th><th>false alarms</th><th>observed %</th><th>95% binomial band %</th><th>within</th><th>detected %</th></tr>"]
    for r in rows:
        if "error" in r:
            out.append(f'<tr><td>{r["alpha"]:g}</td><td colspan="6">{html.escape(r["error"])}</td></tr>')
            continue
        cls, word = ("ok", "yes") if r["within_band"] else ("bad", "no")
        out.append(
            f'<tr><td>{r["alpha"]:g}</td><td>{r["threshold"]:.4f}</td><td>{r["false_alarms"]} / {r["n_good"]}</td>'
            f'<td>{_pct(r["observed_far"])}</td><td>{_pct(r["band"][0])} – {_pct(r["band"][1])}</td>'
            f'<td class="{cls}">{word}</td><td>{_pct(r["detection_rate"])}</td></tr>'
        )
    out.append("</table>")
    return "".join(out)


def _cluster_section(clusters: DefectClusters, preds: Sequence[Prediction], agreement: dict | None) -> str:
    types = sorted({preds[i].defect_type or "?" for i, _ in clusters.refs})
    head = "".join(f"<th>{html.escape(t)}</th>" for t in types)
    rows, galleries = [], []
    for c in range(clusters.n_clusters):
        members = clusters.members(c)
        counts = [sum(1 for i, _ in members if (preds[i].defect_type or "?") == t) for t in types]
        rows.append(f"<tr><td>type {c}</td><td>{len(members)}</td>" + "".join(f"<td>{n}</td>" for n in counts) + "</tr>")
        tiles = []
        for i, j in members[:8]:
            p = preds[i]
            img = p.image if p.image is not None else _read(p.image_path)
            if img is None:
                continue
            tile = region_crop(img, cluster_region(p, j))
            tiles.append(f'<img src="{_data_uri(tile)}" title="{html.escape(Path(p.image_path or "").name)}">')
        galleries.append(f"<h3>type {c} ({len(members)} regions)</h3><div class='grid'>{''.join(tiles)}</div>")
    agree = ""
    if agreement:
        agree = f"<p>Agreement with the defect folders: NMI {agreement['nmi']:.3f}, ARI {agreement['ari']:.3f} (1 = identical grouping).</p>"
    sil = "" if math.isnan(clusters.silhouette) else f", silhouette {clusters.silhouette:.3f}"
    return (
        f"<p>{len(clusters.refs)} regions grouped into <b>{clusters.n_clusters}</b> types, chosen without labels{sil}. "
        "Columns: the known defect folder of each region's image (for checking only).</p>"
        f"{agree}<table><tr><th>found type</th><th>regions</th>{head}</tr>{''.join(rows)}</table>{''.join(galleries)}"
    )


def render_report(
    result: EvaluationResult,
    detector,
    *,
    title: str,
    data: str = "",
    thresholds: list[dict] | None = None,
    f1: dict | None = None,
    clusters: DefectClusters | None = None,
    cluster_preds: Sequence[Prediction] | None = None,
    agreement: dict | None = None,
    n_gallery: int = 4,
) -> str:
    """The report as one HTML string (see the module docstring).

    Args:
        result: from :func:`anomalens.evaluation.evaluate` (predictions with maps).
        detector: the evaluated detector (for its threshold and calibration).
        thresholds: rows of :func:`anomalens.evaluation.threshold_table`.
        f1: from :func:`anomalens.evaluation.f1_comparison`.
        clusters, cluster_preds, agreement: defect-type discovery on ``cluster_preds`` and its NMI/ARI.
        n_gallery: images in each of the false-positive and false-negative galleries.
    """
    cal = detector.calibration
    preds = result.predictions
    ok = [p for p in preds if p.ok and p.gt_label is not None]
    good = sorted((p for p in ok if p.gt_label == 0), key=lambda p: -p.pred_score)[:n_gallery]
    bad = sorted((p for p in ok if p.gt_label == 1), key=lambda p: p.pred_score)[:n_gallery]
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='sub'>{html.escape(detector.name)} · {html.escape(detector.backbone_name)} · {detector.size_label} · "
        f"data {html.escape(str(data))} · {result.n_images} images ({result.n_errors} unreadable) · {result.to_dict()['ms_per_image']} ms/image</p>",
        "<h2>Decision threshold</h2>",
        f"<p>Image threshold <b>{cal.threshold:.4f}</b>, pixel threshold {cal.pixel_threshold:.4f}: {html.escape(cal.note)}.</p>",
    ]
    if thresholds:
        parts.append(
            "<p class='note'>The conformal threshold is set from normal images only, before any test image is seen. "
            "Below, for several target rates, it is re-derived from the same calibration scores and applied to the good test images: "
            "the observed false-alarm fraction should fall in the 95% binomial band of the target.</p>"
        )
        parts.append(_threshold_table(thresholds))
    if f1:
        parts.append(
            f"<p class='note'>For comparison, the best-F1 threshold chosen on these labelled test images themselves would be "
            f"{f1['threshold']:.4f} (F1 {f1['f1']:.3f}; optimistic, as it is fitted to this set); the model's threshold gives F1 {f1['model_f1']:.3f}.</p>"
        )
    parts += ["<h2>Metrics (%)</h2>", _metric_table(result), _absent_note(result), "<h2>Curves and scores</h2><div class='grid plots'>"]
    parts += [f"<figure><img src='{uri}' alt='{name}'><figcaption>{name}</figcaption></figure>" for name, uri in _plots(preds, cal.threshold, cal.false_alarm_rate, result.pro_curve)]
    parts.append("</div>")
    parts.append(f"<h2>Highest-scoring good images (false positives when flagged)</h2><div class='grid'>{''.join(_figure(p, cal.pixel_threshold) for p in good)}</div>")
    parts.append(f"<h2>Lowest-scoring defective images (false negatives when not flagged)</h2><div class='grid'>{''.join(_figure(p, cal.pixel_threshold) for p in bad)}</div>")
    if clusters is not None and cluster_preds is not None:
        parts += ["<h2>Defect types found without labels</h2>", _cluster_section(clusters, cluster_preds, agreement)]
    parts.append("</body></html>")
    return "".join(parts)


def write_report(path: str | os.PathLike, html_text: str) -> Path:
    """Write the report (atomically); returns its path."""
    from .atomic import write_text

    return write_text(path, html_text)
