"""Benchmark table: category x detector x backbone (x image size).

For each configuration, in a fresh subprocess (so peak memory is its own):
fit on ``train/good``, evaluate on ``test``, and time inference on in-memory images.

Columns: image AUROC, pixel AUROC, AUPRO (%), fit seconds, backbone-only ms/image, end-to-end
ms/image at batch 1 and batch 16 (decoded images in memory -> score + map at the image's own
resolution), peak RSS MB of the process, model size on disk MB.

Usage::

    python benchmarks/run.py --data ../shared/data                     # default grid
    python benchmarks/run.py --data ../shared/data --categories hazelnut_reduced --detectors patchcore \
        --backbones efficientnet_lite0 --sizes 224,320
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


def run_one(category_dir: str, detector: str, backbone: str, size: int, extra: dict) -> dict:
    import torch

    from anomalens import create_detector, load_detector
    from anomalens.data import MVTecCategory
    from anomalens.evaluation import evaluate
    from anomalens.io import read_image

    from anomalens.calibration import min_calibration_images

    cat = MVTecCategory(category_dir)
    extra = dict(extra)
    if "false_alarm_rate" not in extra and len(cat.train_paths()) < min_calibration_images(0.01):
        extra["false_alarm_rate"] = 0.05  # too few normal images to calibrate 1% (hazelnut_reduced: 50)
    det = create_detector(detector, backbone=backbone, image_size=size, **extra)
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
        from anomalens.common import to_tensor_batch

        # backbone-only: the backbone's forward pass as the model runs it (normalised, border-padded input)
        x = to_tensor_batch(imgs[:1], size)
        for _ in range(3):
            ext.backbone_forward(x)
        n1 = min(20, len(imgs))
        t = time.perf_counter()
        for img in imgs[:n1]:
            ext.backbone_forward(to_tensor_batch([img], size))
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
        "backbone": backbone,
        "image_size": size,
        **{k: v for k, v in extra.items()},
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
    ("category", "category", "{}"), ("detector", "detector", "{}"), ("backbone", "backbone", "{}"), ("image_size", "px", "{}"),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--categories", default="hazelnut_reduced,transistor")
    ap.add_argument("--detectors", default="patchcore,padim")
    ap.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite2,mobilenet_v2")
    ap.add_argument("--sizes", default="320")
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
    for cat in args.categories.split(","):
        cdir = str(Path(args.data) / "mvtec_ad" / cat)
        for det in args.detectors.split(","):
            for bb in args.backbones.split(","):
                for size in [int(s) for s in args.sizes.split(",")]:
                    ex = {k: v for k, v in extra.items() if det == "patchcore" or k not in ("coreset_ratio", "image_score")}
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


if __name__ == "__main__":
    main()
