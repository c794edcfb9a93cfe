"""Throughput of `batch-predict` on Ray against the single-process path, on transistor's test images.

Rows: the single-process Python model (``Detector.predict``, torch, all cores) and the ONNX Runtime
model in one process; then Ray with 1 and 2 workers (each worker one CPU thread; torch and onnx
engines). Images per second include reading the PNG files; Ray rows are the steady rate once the
actors are up (after the first part); the whole job's wall time, Ray start-up included, is reported
beside it. Also checks that Ray's scores equal the single-process ones.

Usage::

    python benchmarks/ray_throughput.py MODEL_DIR IMAGES_DIR[,IMAGES_DIR...] [--out benchmarks/results/ray.jsonl]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tables import append_jsonl, print_markdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("images", help="folder(s), comma-separated")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from anomalens.data import expand_inputs
    from anomalens.detectors import load_detector
    from anomalens.distributed import batch_predict
    from anomalens.export import onnx_for_model_dir
    from anomalens.serialization import read_config

    paths = expand_inputs(args.images.split(","))
    det = load_detector(args.model_dir).use_engine("torch")
    rows = []
    t0 = time.perf_counter()
    ref = {p.image_path: p.pred_score for p in det.predict(paths)}
    rows.append({"path": "single process, torch", "images_per_s": len(paths) / (time.perf_counter() - t0)})
    onnx = onnx_for_model_dir(Path(args.model_dir), read_config(args.model_dir)["config_sha256"])
    t0 = time.perf_counter()
    onnx.predict(paths)
    rows.append({"path": "single process, onnx", "images_per_s": len(paths) / (time.perf_counter() - t0)})
    for engine in ("torch", "auto"):
        for workers in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                s = batch_predict(args.model_dir, args.images.split(","), Path(tmp) / "s.parquet", workers=workers, chunk_size=10, engine=engine)
                total = time.perf_counter() - t0
                t = pq.read_table(Path(tmp) / "s.parquet").to_pydict()
                diff = max(abs(a - ref[p]) / abs(ref[p]) for p, a in zip(t["path"], t["pred_score"]))
            rows.append({"path": f"Ray, {workers} worker(s), {engine}", "images_per_s": s.steady_images_per_second,
                         "with_startup_s": round(total, 1), "max_rel_diff": diff})
    print_markdown(
        ["path", "images/s", "wall s incl. Ray start-up", "max rel. score diff vs single process"],
        [[r["path"], f"{r['images_per_s']:.1f}", r.get("with_startup_s", ""), format(r["max_rel_diff"], ".1e") if "max_rel_diff" in r else ""]
         for r in rows],
    )
    append_jsonl(args.out, rows)

if __name__ == "__main__":
    main()
