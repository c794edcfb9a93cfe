"""Benchmark table: every MVTec-layout category under ``--data`` x detector x backbone x image sizes.

For each configuration, in a fresh subprocess (so peak memory is its own): fit on ``train/good``,
evaluate on ``test``, and time inference on in-memory images. After the rows, one summary line per
configuration: the mean over categories and the worst category, since defaults must hold on products
nobody tuned them for.

Columns: image AUROC, pixel AUROC, AUPRO (%), fit seconds, backbone-only ms/image, end-to-end
ms/image at batch 1 and batch 16 (decoded images in memory -> score + map at the image's own
resolution), peak RSS MB of the process, model size on disk MB.

Usage::

    python benchmarks/run.py --data ../shared/data                     # the defaults on every category
    python benchmarks/run.py --data ../shared/data --sizes 256,320,256+320 --out rows.jsonl
    python benchmarks/run.py --data ../shared/data --categories transistor --detectors patchcore,padim \
        --backbones efficientnet_lite0,mobilenet_v2 --extra '{"border_pad": 32}'

``--sizes``: comma-separated image-size sets, ``+`` joining the scales of one set (``256+320``);
``default`` is the detector's own default.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path



def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def find_categories(data: Path) -> list[Path]:
    """Every MVTec-layout category (a folder with ``train/good``) at most two levels under ``data``."""
    from anomalens.data import is_mvtec_category

    found = [p for p in sorted(data.glob("*")) + sorted(data.glob("*/*")) if p.is_dir() and is_mvtec_category(p)]
    return found


def run_one(category_dir: str, detector: str, backbone: str, sizes: list[int] | None, extra: dict) -> dict:
    import torch

    from anomalens import create_detector, load_detector
    from anomalens.common import to_model_input
    from anomalens.data import MVTecCategory
    from anomalens.evaluation import evaluate
    from anomalens.io import read_image

    cat = MVTecCategory(category_dir)
    extra = dict(extra)
    if sizes:
        extra["image_size"] = sizes if len(sizes) > 1 else sizes[0]
    det = create_detector(detector, backbone=None if backbone == "default" else backbone, **extra)
    t0 = time.perf_counter()
    det.fit(cat.train_paths())
    fit_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        det.save(tmp)
        size_mb = _dir_mb(Path(tmp))
        det = load_detector(tmp)
    res = evaluate(det, cat)
    # timing on decoded images
    samples = cat.test_samples()
    imgs = [read_image(s.path) for s in samples[:32]]
    imgs = (imgs * (32 // len(imgs) + 1))[:32]  # small test sets are repeated to 32 images
    ext = det.extractor
    with torch.inference_mode():
        # backbone-only: the backbone's forward passes as the model runs them (every scale)
        def run_backbone(img):
            for hw in det.input_shapes(img.shape[:2]):
                ext.backbone_forward(to_model_input([img], hw))

        for _ in range(3):
            run_backbone(imgs[0])
        n1 = min(20, len(imgs))
        t = time.perf_counter()
        for img in imgs[:n1]:
            run_backbone(img)
        backbone_ms = (time.perf_counter() - t) / n1 * 1e3
        for _ in range(2):
            det.score_batch(imgs[:1])
        t = time.perf_counter()
        for img in imgs[:n1]:
            det.score_batch([img])
        e2e1 = (time.perf_counter() - t) / n1 * 1e3
        det.score_batch(imgs[:16])
        t = time.perf_counter()
        for s in range(0, 32, 16):
            det.score_batch(imgs[s : s + 16])
        e2e16 = (time.perf_counter() - t) / 32 * 1e3
    m = res.metrics
    return {
        "category": cat.name,
        "detector": detector,
        "backbone": det.backbone_name,
        "image_size": "+".join(str(x) for x in det.image_sizes),
        "n_train": len(cat.train_paths()),
        "n_test": len(res.predictions),
        **{k: v for k, v in extra.items()},
        # the image score of the method (PatchCore: the maximum; AnomalyDINO: the top-1% mean)
        **({"image_score": det.image_score} if hasattr(det, "image_score") else {}),
        "image_auroc": m["image_auroc"],
        "pixel_auroc": m["pixel_auroc"],
        "aupro": m["aupro"],
        "image_f1_max": m["image_f1_max"],
        "false_alarm_rate": m["false_alarm_rate"],
        "detection_rate": m["detection_rate"],
        "fit_s": fit_s,
        "coreset_s": det.fit_info.get("seconds_fit"),
        "backbone_ms": backbone_ms,
        "e2e_ms_b1": e2e1,
        "e2e_ms_b16": e2e16,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "model_mb": size_mb,
        "per_defect": {k: v["image_auroc"] for k, v in res.per_defect.items()},
    }


COLUMNS = [
    ("category", "category", "{}"), ("detector", "detector", "{}"), ("backbone", "backbone", "{}"), ("image_size", "px (short side)", "{}"),
    ("image_auroc", "img AUROC", "pct"), ("pixel_auroc", "pix AUROC", "pct"), ("aupro", "AUPRO", "pct"),
    ("fit_s", "fit s", "{:.1f}"), ("backbone_ms", "backbone ms", "{:.1f}"), ("e2e_ms_b1", "e2e ms b1", "{:.1f}"),
    ("e2e_ms_b16", "e2e ms b16", "{:.1f}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}"), ("model_mb", "model MB", "{:.1f}"),
]


def fmt_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, f in COLUMNS:
            v = r.get(key)
            if v is None:
                cells.append("-")
            elif f == "pct":
                cells.append(f"{100 * v:.1f}")
            else:
                cells.append(f.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per configuration (detector, backbone, sizes, extra settings): mean and worst category."""
    keys = ("image_auroc", "pixel_auroc", "aupro")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        tag = f"{r['detector']} / {r['backbone']} / {r['image_size']} px" + "".join(
            f" / {k}={r[k]}" for k in sorted(r) if k in ("border_pad", "coreset_ratio", "keep_aspect", "image_score"))
        groups.setdefault(tag, []).append(r)
    lines = ["| configuration | categories | mean img / pix / AUPRO | worst img (category) | worst pix (category) | mean fit s | mean e2e ms b1 |",
             "|---|---|---|---|---|---|---|"]
    for tag, rs in groups.items():
        mean = [100 * sum(r[k] for r in rs) / len(rs) for k in keys]
        wi = min(rs, key=lambda r: r["image_auroc"])
        wp = min(rs, key=lambda r: r["pixel_auroc"])
        lines.append(
            f"| {tag} | {len(rs)} | {mean[0]:.1f} / {mean[1]:.1f} / {mean[2]:.1f} | {100 * wi['image_auroc']:.1f} ({wi['category']}) "
            f"| {100 * wp['pixel_auroc']:.1f} ({wp['category']}) | {sum(r['fit_s'] for r in rs) / len(rs):.1f} "
            f"| {sum(r['e2e_ms_b1'] for r in rs) / len(rs):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--categories", default="all", help="comma-separated category folder names, or all (every MVTec-layout folder under --data)")
    ap.add_argument("--detectors", default="patchcore")
    ap.add_argument("--backbones", default="default", help="comma-separated backbone names, or default (each detector's own)")
    ap.add_argument("--sizes", default="default", help="image-size sets: 256,320,256+320 or default")
    ap.add_argument("--extra", default="{}", help="JSON of extra detector parameters, e.g. '{\"coreset_ratio\": 0.1}'")
    ap.add_argument("--out", default=None, help="also write rows as JSON lines here")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        cat, det, bb, size, extra = json.loads(args._one)
        print("RESULT " + json.dumps(run_one(cat, det, bb, size, extra)), flush=True)
        return
    rows = []
    extra = json.loads(args.extra)
    cats = find_categories(Path(args.data))
    if args.categories != "all":
        wanted = args.categories.split(",")
        cats = [c for c in cats if c.name in wanted]
    if not cats:
        sys.exit(f"no MVTec-layout category found under {args.data} for --categories {args.categories}")
    for cpath in cats:
        cdir = str(cpath)
        for det in args.detectors.split(","):
            for bb in args.backbones.split(","):
                for size_set in args.sizes.split(","):
                    size = None if size_set == "default" else [int(x) for x in size_set.split("+")]
                    ex = {k: v for k, v in extra.items() if det == "patchcore" or k != "coreset_ratio"}
                    job = json.dumps([cdir, det, bb, size, ex])
                    p = subprocess.run([sys.executable, __file__, "--_one", job], capture_output=True, text=True)
                    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
                    if p.returncode != 0 or not line:
                        print(f"FAILED {job}\n{p.stderr[-2000:]}", file=sys.stderr)
                        continue
                    row = json.loads(line[0][7:])
                    rows.append(row)
                    print(fmt_table([row]).splitlines()[-1], file=sys.stderr, flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(row) + "\n")
    print(fmt_table(rows))
    print()
    print(summary(rows))


if __name__ == "__main__":
    main()
