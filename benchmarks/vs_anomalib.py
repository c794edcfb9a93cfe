"""anomalib 2.7's PatchCore beside ours, in one run, on one MVTec AD category at batch 1.

anomalib runs in its own venv through the peer harness (``shared/peer/anomalib_patchcore.py``, a
subprocess; its README says how to build the venv), on the same EfficientNet-Lite0 ImageNet weights.
Ours runs here, at our defaults (Lite2, 256+320 px fused, 1% coreset) on each engine, and at
anomalib's geometry (Lite0, 256 px, 1% coreset). Per configuration:

* ``fit_s``: wall time of the fit (ours: ``PatchCore().fit(folder)``: PNG decoding, features, coreset,
  calibration; anomalib: ``Engine.fit``, whose ``fit_core_s`` leaves out its validation pass and
  checkpoint).
* ``ms_e2e``: ms per image from the decoded image to score and map (ours: ``score_batch([image])``;
  anomalib: its torch model alone, ``model_ms_b1``). ``ms_predict``: the user's path per image,
  from the PNG file to the finished prediction (ours: ``predict([path])``: decoding, scoring,
  decision, regions, evidence; anomalib: ``Engine.predict`` at batch 1, steady state).
* ``ms_backbone``: the backbone alone on the same runtime and input sizes (ours on ONNX Runtime: the
  backbone traced to ONNX by itself).
* ``image_auroc``, ``pixel_auroc``: on the test split (pixel: at the image size, 256 here).

Times are medians over ``--runs`` passes of every test image; within a pass each engine and step
runs as a block of its own (as a user runs one engine), and passes repeat so that drift on a shared
machine hits all alike. Rows go to ``--out`` (JSON lines).

Usage::

    python benchmarks/vs_anomalib.py --data ../shared/data [--category hazelnut_reduced] [--threads 1]
        [--peer-python /tmp/peer-venv/bin/python] [--peer-coresets 0.1,0.01] [--out benchmarks/results/speed.jsonl]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tables import append_jsonl, print_markdown


def run_peer(args, ratio: float, workdir: Path) -> dict:
    """One run of anomalib's harness; its results.json."""
    out = workdir / f"anomalib_{ratio}.json"
    cmd = [args.peer_python, str(Path(args.peer_dir) / "anomalib_patchcore.py"), str(Path(args.data) / "mvtec_ad" / args.category),
           "--model", "patchcore", "--image-size", "256", "--threads", str(args.threads), "--coreset-ratio", str(ratio),
           "--predict-runs", "2", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600)
    return json.loads(out.read_text())


def backbone_session(det, threads: int):
    """ONNX Runtime session of ``det``'s normalisation + backbone alone (inputs ``image``, ``image_1``, ...)."""
    import onnxruntime as ort
    import torch

    from anomalens.export import constant_pads

    class Backbones(torch.nn.Module):
        def __init__(self, extractor):
            super().__init__()
            self.extractor = extractor

        def forward(self, *images):
            return tuple(f for x in images for f in self.extractor.backbone_forward(x))

    shapes = det.input_shapes((256, 256))
    names = ["image"] + [f"image_{k}" for k in range(1, len(shapes))]
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(Backbones(det.extractor).eval(), tuple(torch.rand(1, 3, *hw) for hw in shapes), buf, dynamo=False,
                          input_names=names, opset_version=18)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    graph = constant_pads(buf.getvalue(), det)  # as the full graph's export does
    return ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"]), names, shapes


def median_ms(xs: list[float]) -> float:
    return round(1e3 * statistics.median(xs), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--category", default="hazelnut_reduced")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--peer-python", default="/tmp/peer-venv/bin/python")
    ap.add_argument("--peer-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "peer"))
    ap.add_argument("--peer-coresets", default="0.1,0.01", help="anomalib coreset ratios to run ('' = none)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    from anomalens import PatchCore, load_detector
    from anomalens.common import to_model_inputs
    from anomalens.data import MVTecCategory
    from anomalens.evaluation import compute_metrics
    from anomalens.io import read_image

    cat = MVTecCategory(Path(args.data) / "mvtec_ad" / args.category)
    samples = cat.test_samples()
    images = [read_image(s.path) for s in samples]
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="vs-anomalib-"))
    peers = {r: run_peer(args, r, work) for r in (float(x) for x in args.peer_coresets.split(",") if x)}

    configs = {"defaults": {}, "lite0-256-1%": {"backbone": "efficientnet_lite0", "image_size": 256}}
    rows = []
    for label, params in configs.items():
        t = time.perf_counter()
        det = PatchCore(false_alarm_rate=0.05, **params).fit(cat.root / "train" / "good")
        fit_s = time.perf_counter() - t
        det.save(work / label)
        engines = {"onnxruntime": load_detector(work / label), "torch": load_detector(work / label).use_engine("torch")}
        t = time.perf_counter()
        engines["onnxruntime"].predict(images[:1])  # the first prediction exports the graph into the folder
        first_use_s = time.perf_counter() - t
        sess, names, shapes = backbone_session(det, args.threads)
        times: dict[str, list[float]] = {k: [] for k in ("e2e_onnxruntime", "e2e_torch", "predict_onnxruntime", "predict_torch", "bb_onnxruntime", "bb_torch")}
        inputs = [{n: x.numpy() for n, x in zip(names, to_model_inputs([img], shapes))} for img in images]  # the backbones' feeds
        for _ in range(args.runs):
            # each engine, and each step, in a block of its own: one runtime's spinning threads never wait on the
            # cores while another runs (as for a user, who runs one); passes repeat so that drift hits all alike
            for name, d in engines.items():
                for img in images:
                    t = time.perf_counter()
                    d.score_batch([img])
                    times[f"e2e_{name}"].append(time.perf_counter() - t)
                for s in samples:
                    t = time.perf_counter()
                    d.predict([s])
                    times[f"predict_{name}"].append(time.perf_counter() - t)
            for feeds in inputs:
                t = time.perf_counter()
                sess.run(None, feeds)
                times["bb_onnxruntime"].append(time.perf_counter() - t)
            with torch.inference_mode():
                for feeds in inputs:
                    xs = [torch.from_numpy(feeds[n]) for n in names]
                    t = time.perf_counter()
                    for x in xs:
                        det.extractor.backbone_forward(x)
                    times["bb_torch"].append(time.perf_counter() - t)
        for name, d in engines.items():
            m = compute_metrics(d.predict(samples))
            rows.append({
                "tool": "anomalens", "config": label, "engine": name, "backbone": det.backbone_name, "image_sizes": list(det.image_sizes),
                "coreset_ratio": det.coreset_ratio, "threads": args.threads, "fit_s": round(fit_s, 2),
                "first_use_export_s": round(first_use_s, 2) if name == "onnxruntime" else None,
                "ms_e2e": median_ms(times[f"e2e_{name}"]), "ms_predict": median_ms(times[f"predict_{name}"]),
                "ms_backbone": median_ms(times[f"bb_{name}"]),
                "image_auroc": round(100 * m["image_auroc"], 2), "pixel_auroc": round(100 * m["pixel_auroc"], 2),
            })
    for ratio, p in peers.items():
        rows.append({
            "tool": "anomalib 2.7", "config": f"PatchCore {ratio:.0%} coreset", "engine": "torch", "backbone": "efficientnet_lite0",
            "image_sizes": [256], "coreset_ratio": ratio, "threads": args.threads, "fit_s": round(p["fit_s"], 2),
            "fit_core_s": round(p["fit_core_s"], 2), "ms_e2e": round(p["model_ms_b1"], 1),
            "ms_predict": round(p["predict"]["b1"]["warm"]["steady_ms_per_image"], 1), "ms_backbone": round(p["backbone_ms_b1"], 1),
            "image_auroc": round(100 * p["image_auroc"], 2), "pixel_auroc": round(100 * p["pixel_auroc"], 2),
        })
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for r in rows:
        r.update(category=args.category, date=stamp, loadavg_start=round(load, 2), loadavg_end=round(os.getloadavg()[0], 2),
                 machine="2 cores shared with other jobs" if load > 0.5 else "2 cores")
    print_markdown(
        ["tool", "config", "engine", "image / pixel AUROC", "fit s", "ms e2e", "ms predict", "ms backbone", "e2e / backbone"],
        [[r["tool"], r["config"], r["engine"], f"{r['image_auroc']} / {r['pixel_auroc']}", r["fit_s"], r["ms_e2e"], r["ms_predict"],
          r["ms_backbone"], round(r["ms_e2e"] / r["ms_backbone"], 2)] for r in rows],
    )
    ours = next(r for r in rows if r["config"] == "defaults" and r["engine"] == "onnxruntime")
    for r in rows:
        if r["tool"] != "anomalens":
            print(f"vs {r['config']}: per image (e2e) {r['ms_e2e'] / ours['ms_e2e']:.2f}x faster, predict path "
                  f"{r['ms_predict'] / ours['ms_predict']:.2f}x, fit {r['fit_s'] / ours['fit_s']:.1f}x (core {r['fit_core_s'] / ours['fit_s']:.1f}x)")
    append_jsonl(args.out, rows)


if __name__ == "__main__":
    sys.exit(main())
