"""Latency of the Python (torch) path vs the exported ONNX file on ONNX Runtime, batch 1 and 16.

For each category and detector: fit with the defaults, export, then time ``score_batch`` on decoded
images in memory (resize, backbone, scoring, map at the image's own size), interleaving the two
engines run by run and reporting medians, so that drift on a shared machine hits both alike. Also
checks the largest relative score difference on the test set.

Usage::

    python benchmarks/onnx_latency.py --data ../shared/data [--runs 15] [--out benchmarks/results/onnx.jsonl]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from tables import append_jsonl, print_markdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--categories", default="hazelnut_reduced,transistor")
    ap.add_argument("--detectors", default="patchcore,padim")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from anomalens import create_detector
    from anomalens.data import MVTecCategory
    from anomalens.export import export_onnx
    from anomalens.runtime import OnnxDetector
    from anomalens.io import read_image

    rows = []
    for cat_name in args.categories.split(","):
        cat = MVTecCategory(Path(args.data) / "mvtec_ad" / cat_name)
        imgs = [read_image(s.path) for s in cat.test_samples()]
        batch16 = (imgs * 2)[:16]
        for name in args.detectors.split(","):
            det = create_detector(name).fit(cat)  # defaults (the rate relaxes to what the images support)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                path = export_onnx(det, Path(tmp) / "m.onnx")
                export_s = time.perf_counter() - t0
                size_mb = path.stat().st_size / 2**20
                onnx_model = OnnxDetector(path)
                a = np.array(det.score_batch(imgs)[0])
                b = np.array(onnx_model.score_batch(imgs)[0])
                max_rel = float(np.max(np.abs(a - b) / np.abs(a)))
                times: dict[str, list[float]] = {"torch b1": [], "onnx b1": [], "torch b16": [], "onnx b16": []}
                det.score_batch(imgs[:1])
                onnx_model.score_batch(imgs[:1])  # warm-up
                for r in range(args.runs):
                    img = [imgs[r % len(imgs)]]
                    for key, fn, x in (("torch b1", det.score_batch, img), ("onnx b1", onnx_model.score_batch, img)):
                        t = time.perf_counter()
                        fn(x)
                        times[key].append(1000 * (time.perf_counter() - t))
                    if r % 5 == 0:  # batch 16 is 16x longer: fewer runs
                        for key, fn in (("torch b16", det.score_batch), ("onnx b16", onnx_model.score_batch)):
                            t = time.perf_counter()
                            fn(batch16)
                            times[key].append(1000 * (time.perf_counter() - t) / 16)
            row = {"category": cat_name, "detector": name, "export_s": round(export_s, 1), "onnx_mb": round(size_mb, 1),
                   "max_rel_score_diff": max_rel, **{k: round(statistics.median(v), 1) for k, v in times.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print_markdown(
        ["category", "detector", "torch ms b1", "onnx ms b1", "torch ms/img b16", "onnx ms/img b16", "max rel score diff", "export s", "onnx MB"],
        [[r["category"], r["detector"], r["torch b1"], r["onnx b1"], r["torch b16"], r["onnx b16"], f"{r['max_rel_score_diff']:.1e}",
          r["export_s"], r["onnx_mb"]] for r in rows],
    )
    append_jsonl(args.out, rows)

if __name__ == "__main__":
    main()
