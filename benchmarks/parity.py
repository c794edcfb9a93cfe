"""Same numbers before and after a change: scores, maps, labels and evidence of one fitted model,
predicted by an earlier checkout and by this one, on every MVTec-layout category under ``--data``.

The earlier code (``--before``: a checkout's ``src`` folder, e.g. a ``git worktree``) fits each
detector once and predicts every ``--every``-th test image on each engine; this checkout loads the
same model files and predicts the same images. One row per category x detector x engine: the
largest relative score difference (and the largest score difference divided by the median
absolute score, which stays meaningful for a score near 0), the largest map difference (on every 97th pixel of each map)
relative to the map's largest absolute value,
whether decisions and evidence (the matched training image and patch) are the same.

Usage::

    git worktree add /tmp/before <commit>
    python benchmarks/parity.py --data ../shared/data --before /tmp/before/src --label <commit> \\
        [--detectors patchcore,padim] [--every 2] [--out benchmarks/results/speed.jsonl]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tables import append_jsonl, print_markdown


def predict_here(model_dir: str, tests: list[str], out: str) -> None:
    """Predict ``tests`` with the model in ``model_dir`` on each engine; write a JSON summary to ``out``."""
    import numpy as np

    from anomalens import load_detector

    res = {}
    for engine in ("torch", "onnxruntime"):
        det = load_detector(model_dir).use_engine(engine)
        preds = det.predict(tests)
        res[engine] = {
            "scores": [p.pred_score for p in preds], "labels": [int(p.pred_label) for p in preds],
            "maps": [np.asarray(p.anomaly_map, dtype=np.float32).ravel().tolist()[:: 97] for p in preds],
            "map_absmax": [float(np.max(np.abs(p.anomaly_map))) for p in preds],
            "evidence": [None if p.evidence is None else [p.evidence.train_index, *p.evidence.train_grid_xy] for p in preds],
        }
    Path(out).write_text(json.dumps(res))


def fit_here(category: str, detector: str, model_dir: str) -> None:
    from anomalens import create_detector

    create_detector(detector).fit(Path(category) / "train" / "good").save(model_dir)


def compare(a: dict, b: dict) -> dict:
    import numpy as np

    sa, sb = np.asarray(a["scores"]), np.asarray(b["scores"])
    map_rel = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) / max(abs(m), 1e-12)
                  for x, y, m in zip(a["maps"], b["maps"], a["map_absmax"]))
    return {
        "max_rel_score_diff": float(np.max(np.abs(sa - sb) / np.maximum(np.abs(sa), 1e-12))),
        # a score near 0 makes the relative difference above meaningless: also against the category's median |score|
        "max_score_diff_vs_median": float(np.max(np.abs(sa - sb)) / max(float(np.median(np.abs(sa))), 1e-12)),
        "max_map_diff_rel": map_rel, "labels_same": a["labels"] == b["labels"],
        "evidence_same": a["evidence"] == b["evidence"], "n_images": len(sa),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--before", help="the earlier checkout's src folder (required)")
    ap.add_argument("--label", default="before", help="what --before is (a commit), for the rows")
    ap.add_argument("--detectors", default="patchcore,padim")
    ap.add_argument("--every", type=int, default=2, help="predict every n-th test image")
    ap.add_argument("--out", default=None)
    ap.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        {"fit": fit_here, "predict": lambda *a: predict_here(a[0], json.loads(Path(a[1]).read_text()), a[2])}[args._child[0]](*args._child[1:])
        return
    if not args.before:
        ap.error("--before is required")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import find_categories

    rows = []
    work = Path(tempfile.mkdtemp(prefix="parity-"))
    env_before = {**os.environ, "PYTHONPATH": str(Path(args.before).resolve())}
    me = [sys.executable, str(Path(__file__).resolve())]
    try:
        for cat in find_categories(Path(args.data)):
            tests = sorted(str(p) for p in (cat / "test").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".bmp"))[:: args.every]
            (work / "tests.json").write_text(json.dumps(tests))
            for name in args.detectors.split(","):
                old_dir, new_dir = work / f"{cat.name}-{name}-before", work / f"{cat.name}-{name}-after"
                subprocess.run([*me, "--_child", "fit", str(cat), name, str(old_dir)], check=True, env=env_before)
                shutil.copytree(old_dir, new_dir)  # the same fitted files; each side exports its own graph
                subprocess.run([*me, "--_child", "predict", str(old_dir), str(work / "tests.json"), str(work / "a.json")], check=True, env=env_before)
                subprocess.run([*me, "--_child", "predict", str(new_dir), str(work / "tests.json"), str(work / "b.json")], check=True)
                a, b = (json.loads((work / f).read_text()) for f in ("a.json", "b.json"))
                for engine in a:
                    rows.append({"kind": "parity", "category": cat.name, "model": name, "before": args.label, "engine": engine,
                                 **compare(a[engine], b[engine]), "date": datetime.date.today().isoformat()})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_markdown(["category", "model", "engine", "max rel score diff", "max score diff / median |score|", "max map diff / max |map|",
                    "labels same", "evidence same", "images"],
                   [[r["category"], r["model"], r["engine"], f"{r['max_rel_score_diff']:.1e}", f"{r['max_score_diff_vs_median']:.1e}",
                     f"{r['max_map_diff_rel']:.1e}",
                     r["labels_same"], r["evidence_same"], r["n_images"]] for r in rows])
    if args.out:
        append_jsonl(args.out, rows)


if __name__ == "__main__":
    main()
