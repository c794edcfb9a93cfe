"""Video rows: UCSD Ped2, fit on the training videos, frame-level evaluation on the test videos.

For the default detector (appearance + motion) and the two ablations (motion only, appearance only):
frame AUC (micro over all frames, and the mean over videos), the threshold's false-alarm rate on
normal frames (all, and those more than twice the smoothing delay from an event), the detection rate,
fit time, frames per second of `predict` (reading, flow, backbone, scoring; no output files), and the
process's peak memory. Each variant runs in its own subprocess so that the peak memory is its own.

    python benchmarks/video.py --data ../shared/data --out benchmarks/results/video.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from tables import append_jsonl, print_markdown  # noqa: E402

VARIANTS = {
    "appearance + motion": {},
    "motion only": {"appearance": False},
    "appearance only": {"motion": False},
}


def run_one(ped2: str, name: str) -> dict:
    from anomalens.video import VideoDetector
    from anomalens.video.evaluate import evaluate_videos, read_frame_labels

    det = VideoDetector(**VARIANTS[name])
    t0 = time.perf_counter()
    det.fit(os.path.join(ped2, "training"))
    fit_s = time.perf_counter() - t0
    r = evaluate_videos(det, os.path.join(ped2, "testing"), read_frame_labels(os.path.join(ped2, "testing", "frame_labels.json")))
    return {
        "variant": name, "frame_auc_micro": 100 * r["frame_auc_micro"], "frame_auc_macro": 100 * r["frame_auc_macro"],
        "per_video_auc": {p["video"]: round(100 * p["frame_auc"], 2) for p in r["per_video"]},
        "false_alarm_pct": 100 * r["false_alarm_rate"], "false_alarm_far_pct": 100 * r["false_alarm_rate_far_from_events"],
        "detection_pct": 100 * r["detection_rate"], "threshold": r["threshold"], "fit_s": fit_s, "fps": r["fps"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "fit_info": det.fit_info,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    ped2 = os.path.join(args.data, "ucsd_ped2")
    if args._one:
        print(json.dumps(run_one(ped2, args._one)))
        return
    rows = []
    for name in args.variants.split(","):
        p = subprocess.run([sys.executable, __file__, "--data", args.data, "--_one", name], capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print({k: v for k, v in rows[-1].items() if k != "fit_info"}, flush=True)
    append_jsonl(args.out, rows)
    print_markdown(
        ["variant", "frame AUC micro", "frame AUC mean of videos", "normal frames flagged %", "… far from events %", "abnormal detected %",
         "fit s", "fps", "peak MB"],
        [[r["variant"], f"{r['frame_auc_micro']:.1f}", f"{r['frame_auc_macro']:.1f}", f"{r['false_alarm_pct']:.1f}",
          f"{r['false_alarm_far_pct']:.1f}", f"{r['detection_pct']:.1f}", f"{r['fit_s']:.0f}", f"{r['fps']:.1f}", f"{r['peak_rss_mb']:.0f}"]
         for r in rows],
    )


if __name__ == "__main__":
    main()
