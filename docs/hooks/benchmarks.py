"""mkdocs hook: the benchmark pages, generated at build time from ``benchmarks/results/*.jsonl``.

Each JSON Lines file becomes one page (``benchmarks/<file>.md``) with every row of the file in a
table, oldest first as the file holds them, and, where rows cover several categories, a summary of
the mean and the worst category per configuration (the rule the defaults were chosen by). Rows are
never edited here: a page shows what the benchmark scripts (``benchmarks/*.py``) appended.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"

#: what each results file holds (the script that writes it and its subject)
ABOUT = {
    "suite": "`benchmarks/run.py` (`make benchmark`): full-data detectors on every MVTec-layout category; metrics, fit time, inference time, memory, model size.",
    "bench-320": "`benchmarks/run.py` at one 320 px scale (older defaults): detectors x backbones.",
    "bench-sizes": "`benchmarks/run.py --sizes`: single image sizes against each other (older defaults).",
    "fewshot": "`benchmarks/fewshot.py`: zero-shot (k = 0) and few-shot (k = 1, 2, 4, 8; 5 draws of the k images) on every category; probe rows carry a `note`.",
    "fewshot-before-defaults": "`benchmarks/fewshot.py` before the feature defaults (one CNN scale, the ViT at 224 px).",
    "trust": "`benchmarks/trust.py`: the threshold's false-alarm promise (observed rate against the 95% binomial band) and defect-type discovery (NMI / ARI).",
    "onnx": "`benchmarks/onnx_latency.py`: Python (torch) against ONNX Runtime, ms per image at batch 1 and 16, largest score difference.",
    "load": "`benchmarks/load.py`: load test of `anomalens serve` (1 / 4 / 16 clients) and 200 malformed requests.",
    "ray": "`benchmarks/ray_throughput.py`: `batch-predict` on Ray against the single-process path.",
    "concurrency": "`benchmarks/concurrency.py`: one `video predict` alone and two side by side under three OpenMP spin settings.",
    "video": "`benchmarks/video.py`: UCSD Ped2, fit on training 01-12, settings chosen on 13-16 (synthetic events), reported on the real test videos.",
    "video-splits": "`benchmarks/video.py --held`: other held-out splits (report only) and probes.",
    "video-rules": "`benchmarks/video.py`: frame rule and part scales on every split.",
    "video-flow": "`benchmarks/video.py`: optical flow resolution and the enlarged far band on every split; alarm episodes on held-out normal video.",
    "video-fade": "`benchmarks/video.py --fade`: synthetic objects that fade in and out against abrupt ones, paired.",
    "speed": "`benchmarks/vs_anomalib.py`: anomalib 2.7's PatchCore beside ours in one run (fit, ms per image end to end and through `predict`, the backbone alone); `benchmarks/parity.py` rows (`kind: parity`): one model's scores, maps, decisions and evidence before and after a change; `benchmarks/model_input.py` rows (`kind: model input`): preparing the model input by image size.",
    "video-objects": "`benchmarks/video_objects.py`: the object video method, leave-one-video-out over UCSD Ped2 test 01-06 (settings chosen on the other five), one row per idea; alarm episodes on unseen normal footage; fps.",
}
ORDER = ["suite", "speed", "fewshot", "trust", "video-objects", "video", "video-splits", "video-rules", "video-flow", "video-fade",
         "onnx", "load", "ray", "concurrency", "bench-320", "bench-sizes", "fewshot-before-defaults"]
BIG = {"auc_by_temporal_sigma", "fit_info", "edge_frames_scores", "per_defect", "first_errors", "server_errors",
       "test_per_video_auc", "synthetic_per_video_auc", "held_out_false_alarm_per_video_pct", "fit_videos",
       "held_out_episode_promise", "test_episode_promise", "per_video", "image_auroc_alone_plain_turned"}


def read_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


# ---------------------------------------------------------------- cell formats


def num(v, digits: int = 1) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v != 0 and abs(v) < 10 ** -digits:
            return f"{v:.1e}"
        return f"{v:.{digits}f}"
    return cell(v)


def pct(v) -> str:
    """A fraction in [0, 1] as a percentage."""
    return "" if v is None else num(100 * v)


def mean_sd(v) -> str:
    """A list of per-draw values as mean ± SD (one value as it is)."""
    if v is None:
        return ""
    if not isinstance(v, list):
        return num(v)
    vals = [x for x in v if isinstance(x, (int, float))]
    if not vals:
        return ""
    if len(vals) == 1:
        return num(vals[0])
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (int, float)):
        return num(v)
    if isinstance(v, list):
        return ", ".join(cell(x) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{k}: {cell(x)}" for k, x in v.items())
    return " ".join(str(v).split()).replace("|", "\\|")


def worst(d: dict | None) -> str:
    """The lowest entry of a per-video dict, as ``value (name)``."""
    if not d:
        return ""
    k = min(d, key=lambda x: d[x])
    return f"{num(d[k])} ({k})"


# ---------------------------------------------------------------- column sets per file

METRIC_COLS = [
    ("date", lambda r: r.get("date", "")), ("category", lambda r: r["category"]), ("detector", lambda r: r["detector"]),
    ("backbone", lambda r: r["backbone"]), ("px", lambda r: r.get("image_size")), ("image score", lambda r: r.get("image_score", "")),
    ("img AUROC", lambda r: pct(r.get("image_auroc"))), ("pix AUROC", lambda r: pct(r.get("pixel_auroc"))),
    ("AUPRO", lambda r: pct(r.get("aupro"))), ("F1-max", lambda r: pct(r.get("image_f1_max"))),
    ("false alarms %", lambda r: pct(r.get("false_alarm_rate"))), ("detected %", lambda r: pct(r.get("detection_rate"))),
    ("fit s", lambda r: num(r.get("fit_s"))), ("backbone ms", lambda r: num(r.get("backbone_ms"))),
    ("e2e ms b1", lambda r: num(r.get("e2e_ms_b1"))), ("e2e ms b16", lambda r: num(r.get("e2e_ms_b16"))),
    ("peak RSS MB", lambda r: num(r.get("peak_rss_mb"), 0)), ("model MB", lambda r: num(r.get("model_mb"))),
    ("note", lambda r: r.get("note", "")),
]

FEWSHOT_COLS = [
    ("date", lambda r: r.get("date", "")), ("category", lambda r: r["category"]), ("method", lambda r: r["method"]),
    ("backbone", lambda r: r.get("backbone", "")), ("input", lambda r: r.get("image_size", "")), ("k", lambda r: r.get("k")),
    ("augment", lambda r: r.get("augment", "")), ("draws", lambda r: r.get("draws", "")),
    ("img AUROC", lambda r: mean_sd(r.get("image_auroc"))), ("pix AUROC", lambda r: mean_sd(r.get("pixel_auroc"))),
    ("AUPRO", lambda r: mean_sd(r.get("aupro"))), ("promised FAR %", lambda r: pct(r.get("promised_far"))),
    ("observed FAR %", lambda r: "" if not r.get("observed_far") else num(100 * statistics.mean(r["observed_far"]))),
    ("ms / image", lambda r: num(r.get("ms_per_image"), 0)), ("extra", lambda r: r.get("extra", "")),
    ("note", lambda r: r.get("note", "")),
]

VIDEO_COLS = [
    ("date", lambda r: r.get("date", "")), ("variant", lambda r: r.get("variant", "")),
    ("held out", lambda r: r.get("held_out_videos", "")), ("events / video", lambda r: r.get("synthetic_events_per_video")),
    ("fade", lambda r: r.get("synthetic_fade", "")),
    ("synthetic AUC", lambda r: num(r.get("synthetic_auc_micro"))), ("worst synthetic video", lambda r: worst(r.get("synthetic_per_video_auc"))),
    ("held-out normal flagged %", lambda r: num(r.get("held_out_false_alarm_pct"))),
    ("episodes / h", lambda r: num(r.get("held_out_alarm_episodes_per_hour"), 0)),
    ("promise", lambda r: "" if not r.get("held_out_episode_promise") else ("kept" if r["held_out_episode_promise"]["kept"] else "broken")),
    ("test AUC", lambda r: num(r.get("test_auc_micro"))), ("worst test video", lambda r: worst(r.get("test_per_video_auc"))),
    ("pooled AUC", lambda r: num(r.get("pooled_auc_micro"))), ("test far-from-event flagged %", lambda r: num(r.get("test_false_alarm_far_pct"))),
    ("test detected %", lambda r: num(r.get("test_detection_pct"))), ("fit s", lambda r: num(r.get("fit_s"), 0)),
    ("fps", lambda r: num(r.get("fps"))), ("peak MB", lambda r: num(r.get("peak_rss_mb"), 0)),
    ("params", lambda r: r.get("params", "")), ("note", lambda r: r.get("note", "")),
]

TRUST_COLS = [
    ("date", lambda r: r.get("date", "")), ("category", lambda r: r["category"]), ("detector", lambda r: r["detector"]),
    ("backbone", lambda r: r.get("backbone", "")), ("calibration", lambda r: r.get("calibration")), ("alpha", lambda r: r.get("alpha")),
    ("n cal", lambda r: r.get("n_calibration")), ("n good", lambda r: r.get("n_good")), ("false alarms", lambda r: r.get("false_alarms")),
    ("observed %", lambda r: pct(r.get("observed_far"))), ("95% band %", lambda r: "-".join(pct(b) for b in r.get("band") or [])),
    ("within", lambda r: r.get("within_band")), ("draws within", lambda r: r.get("draws_within")),
    ("detected %", lambda r: pct(r.get("detection_rate"))), ("note", lambda r: r.get("note", "")),
]

TYPES_COLS = [
    ("date", lambda r: r.get("date", "")), ("category", lambda r: r["category"]), ("detector", lambda r: r["detector"]),
    ("backbone", lambda r: r.get("backbone", "")), ("regions", lambda r: r.get("n_regions")),
    ("k (silhouette)", lambda r: r.get("k_auto")), ("NMI", lambda r: num(r.get("nmi_auto"), 3)), ("ARI", lambda r: num(r.get("ari_auto"), 3)),
    ("k given", lambda r: r.get("n_types", 4 if "nmi_k4" in r else None)),
    ("NMI at k given", lambda r: num(r.get("nmi_given", r.get("nmi_k4")), 3)), ("ARI at k given", lambda r: num(r.get("ari_given", r.get("ari_k4")), 3)),
    ("note", lambda r: r.get("note", "")),
]


def table(rows: list[dict], cols) -> list[str]:
    used = [(h, f) for h, f in cols if any(cell(f(r)) for r in rows)]
    out = ["| " + " | ".join(h for h, _ in used) + " |", "|" + "---|" * len(used)]
    out += ["| " + " | ".join(cell(f(r)) for _, f in used) + " |" for r in rows]
    return out + [""]


def generic(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and k not in BIG]
    return table(rows, [(k, (lambda r, k=k: r.get(k))) for k in keys])


# ---------------------------------------------------------------- summaries: mean and worst category


def suite_summary(rows: list[dict]) -> list[str]:
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        key = (r.get("date", "undated"), r["detector"], r["backbone"], str(r.get("image_size")), r.get("image_score", ""))
        groups.setdefault(key, {})[r["category"]] = r  # the last row of a category in a configuration counts
    out = ["| date | detector | backbone | px | image score | categories | mean img / pix / AUPRO | worst img (category) |",
           "|---|---|---|---|---|---|---|---|"]
    for (date, det, bb, px, score), by_cat in sorted(groups.items(), key=lambda kv: (kv[0][0] != "undated", kv[0][0]), reverse=True):
        rs = list(by_cat.values())
        if len(rs) < 2:
            continue
        m = [100 * statistics.mean(r[k] for r in rs) for k in ("image_auroc", "pixel_auroc", "aupro")]
        w = min(rs, key=lambda r: r["image_auroc"])
        out.append(f"| {date} | {det} | {bb} | {px} | {score} | {len(rs)} | {m[0]:.1f} / {m[1]:.1f} / {m[2]:.1f} "
                   f"| {100 * w['image_auroc']:.1f} ({w['category']}) |")
    return out + [""]


def fewshot_summary(rows: list[dict]) -> list[str]:
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if not isinstance(r.get("image_auroc"), list) or "note" in r and "probe" in r["note"]:
            continue
        key = (r["method"], r.get("backbone", ""), r.get("image_size", ""), r.get("augment", ""), r.get("k"),
               json.dumps(r.get("extra", {}), sort_keys=True), ",".join(r.get("cnn_views", [])), r.get("cnn_maps", ""))
        groups.setdefault(key, {})[r["category"]] = r
    out = ["| method | backbone | input | augment | k | extra | categories | mean img AUROC | worst (category) | newest row |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for (method, bb, size, aug, k, extra, views, maps), by_cat in groups.items():
        if len(by_cat) < 3:
            continue
        means = {c: statistics.mean(r["image_auroc"]) for c, r in by_cat.items()}
        wc = min(means, key=means.get)
        dates = sorted(r.get("date", "") for r in by_cat.values())
        parts = [cell(json.loads(extra)), f"CNN views {views}" if views else "", f"cnn_maps {maps}" if maps != "" else ""]
        extra_txt = "; ".join(p for p in parts if p)
        out.append(f"| {cell(method)} | {bb} | {size} | {aug} | {k} | {extra_txt} | {len(by_cat)} "
                   f"| {statistics.mean(means.values()):.1f} | {means[wc]:.1f} ({wc}) | {dates[-1] or 'undated'} |")
    return out + [""]


# ---------------------------------------------------------------- pages


def page(stem: str, rows: list[dict]) -> str:
    lines = [f"# {stem}.jsonl", "", ABOUT.get(stem, ""), "",
             f"{len(rows)} rows from `benchmarks/results/{stem}.jsonl`, in the order they were appended "
             "(newest last). Metrics in %; times on a shared 2-core CPU, comparable only within one day.", ""]
    if stem in ("suite", "bench-320", "bench-sizes"):
        lines += ["## Mean and worst category per configuration", "", *suite_summary(rows), "## Rows", "", *table(rows, METRIC_COLS)]
    elif stem in ("fewshot", "fewshot-before-defaults"):
        std = [r for r in rows if isinstance(r.get("image_auroc"), list)]
        other = [r for r in rows if not isinstance(r.get("image_auroc"), list)]
        lines += ["## Mean and worst category per configuration", "",
                  "Image AUROC (mean over the draws) per configuration measured on all three categories; probe rows left out.", "",
                  *fewshot_summary(std), "## Rows", "", *table(std, FEWSHOT_COLS)]
        if other:
            lines += ["## Probe rows", "", *generic(other)]
    elif stem == "trust":
        lines += ["## False-alarm promise", "", *table([r for r in rows if "alpha" in r], TRUST_COLS),
                  "## Defect types", "", *table([r for r in rows if r.get("kind") == "defect_types"], TYPES_COLS)]
    elif stem.startswith("video") and stem != "video-fade":
        std = [r for r in rows if "test_auc_micro" in r]
        other = [r for r in rows if "test_auc_micro" not in r]
        lines += ["## Detector runs", "", *table(std, VIDEO_COLS)]
        if other:
            lines += ["## Other rows", "", *generic(other)]
    else:
        lines += generic(rows)
    return "\n".join(lines) + "\n"


def index(stems: list[str]) -> str:
    lines = ["# Benchmarks", "",
             "Every number in these docs comes from a row of `benchmarks/results/*.jsonl`, appended by the scripts in",
             "`benchmarks/` (see `benchmarks/README.md` for how to run each). These pages are generated from the files",
             "when the site is built. The data: MVTec AD `hazelnut_reduced` (50 good training images), `transistor`",
             "and `magnetic_tile` (the held-out texture category), and UCSD Ped2 for video.", "",
             "| results file | what |", "|---|---|"]
    lines += [f"| [{s}.jsonl]({s}.md) | {ABOUT.get(s, '')} |" for s in stems]
    return "\n".join(lines) + "\n"


def stems() -> list[str]:
    found = sorted(p.stem for p in RESULTS.glob("*.jsonl"))
    return [s for s in ORDER if s in found] + [s for s in found if s not in ORDER]


def on_files(files, config):
    names = stems()
    files.append(File.generated(config, "benchmarks/index.md", content=index(names)))
    for s in names:
        files.append(File.generated(config, f"benchmarks/{s}.md", content=page(s, read_rows(RESULTS / f"{s}.jsonl"))))
    return files


def on_config(config):
    """Add one nav entry per results file under "Benchmarks" (the nav in mkdocs.yml names the section)."""
    nav = config.get("nav") or []
    for item in nav:
        if isinstance(item, dict) and "Benchmarks" in item:
            item["Benchmarks"] = ["benchmarks/index.md"] + [{f"{s}.jsonl": f"benchmarks/{s}.md"} for s in stems()]
    return config
