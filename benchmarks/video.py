"""Video rows on UCSD Ped2, with the evidence split so that no number comes from the videos a setting
was chosen on.

Split (fixed, by video name):

* **fit**: training videos 01-12 (the detector calibrates within them: cross-fit by default);
* **selection** (what settings are chosen on): training videos 13-16, never seen in fit, scored
  clean (every frame normal: the false-alarm rate on new normal video of the camera) and with
  synthetic events inserted (``anomalens.video.synthetic``: one per video, kinds in turn, exact
  labels; ``--events-per-video``);
* **report** (never used to choose): the real test videos 01-06 (labelled events), and the *pooled*
  micro AUC over the clean held-out videos and test 01-06 together, which asks what Ped2's full
  protocol asks (its test videos 08-11 are abnormal in every frame): is a normal frame of one video
  below an abnormal frame of another?
* **other splits** (``--held 01,02,03,04`` etc.: those videos held out, the other 12 fitted): the
  same selection measures on normal video that no setting was chosen on, also to report.

For each variant: frame AUC micro and per video, false alarms at the 1% target on normal frames (all,
and far from events), detection rate, the alarm-episode promise of the calibration checked on the
held-out normal videos and on the test videos' normal frames (``EpisodePromise.check``), fit seconds,
frames per second of `predict`, peak memory.
Each variant runs in its own subprocess so that the peak memory is its own.

    python benchmarks/video.py --data ../shared/data --out benchmarks/results/video.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from tables import append_jsonl, print_markdown  # noqa: E402

VARIANTS = {
    "appearance + motion (default)": {},
    "motion only": {"appearance": False},
    "appearance only": {"motion": False},
}
TRAINING = [f"{i:02d}" for i in range(1, 17)]
#: the held-out training videos settings are chosen on (``--held`` moves them: other splits to report on)
HELD = [f"{i:02d}" for i in range(13, 17)]


def _auc(y, s) -> float:
    """Frame AUC in % (NaN with one class only)."""
    from anomalens.video.evaluate import frame_auc

    return 100 * frame_auc(y, s)


def _smooth(raw, sigma):
    from anomalens.video.smoothing import TemporalSmoother

    sm = TemporalSmoother(sigma)
    return [x for r in raw for x in sm.push(float(r))] + list(sm.flush())


def run_one(ped2: str, name: str, extra: dict, events_per_video: int = 1, held: list[str] = HELD, fade: int | None = None) -> dict:
    import numpy as np

    from anomalens.video import VideoDetector
    from anomalens.video.evaluate import EpisodePromise, alarm_episodes, evaluate_videos, read_frame_labels
    from anomalens.video.synthetic import DEFAULT_FADE, make_synthetic_set

    frames = os.path.join(ped2, "training", "frames")
    fit_videos = [v for v in TRAINING if v not in held]
    det = VideoDetector(**{**VARIANTS.get(name, {}), **extra})
    t0 = time.perf_counter()
    det.fit([os.path.join(frames, v) for v in fit_videos])
    fit_s = time.perf_counter() - t0
    # report: the real test videos (their frame scores kept for the pooled AUC)
    lab = read_frame_labels(os.path.join(ped2, "testing", "frame_labels.json"))

    def keeping(store: dict):
        """A predict function for evaluate_videos that also keeps each video's prediction in ``store``."""
        def predict(video):
            store[os.path.basename(str(video))] = p = det.predict(video)
            return p
        return predict

    kept: dict = {}
    test = evaluate_videos(det, os.path.join(ped2, "testing"), lab, predict=keeping(kept))
    # selection: held-out normal videos, clean and with synthetic events
    clean = {v: det.predict(os.path.join(frames, v)) for v in held}
    synth_pred: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        fade = DEFAULT_FADE if fade is None else fade
        labels = make_synthetic_set([os.path.join(frames, v) for v in held], tmp, seed=0, events_per_video=events_per_video, fade=fade)
        synth = evaluate_videos(det, tmp, labels, predict=keeping(synth_pred))
    clean_s = np.concatenate([p.pred_scores for p in clean.values()])
    clean_episodes = sum(alarm_episodes(p.pred_scores > det.threshold) for p in clean.values())
    synth_y = [y for v, p in synth_pred.items() for y in labels[v][: p.n_frames]]
    test_y = [y for v, p in kept.items() for y in lab[v][: p.n_frames]]
    pooled_y = [0] * clean_s.size + test_y
    # the temporal smoothing width, re-applied to the raw frame scores (AUC only: the threshold was calibrated at the default)
    sigma_auc = {}
    for sigma in (0.0, 1.0, 2.0, 3.0, 5.0):
        def sm(preds):
            return np.concatenate([[v for _, v in _smooth(p.raw_scores, sigma)] for p in preds])
        sigma_auc[str(sigma)] = {
            "synthetic": _auc(synth_y, sm(synth_pred.values())),
            "test": _auc(test_y, sm(kept.values())),
            "pooled": _auc(pooled_y, sm([*clean.values(), *kept.values()])),
        }
    pooled_s = np.concatenate([clean_s, *(p.pred_scores for p in kept.values())])
    return {
        "variant": name, "params": extra, "synthetic_events_per_video": events_per_video, "synthetic_fade": fade, "fit_videos": fit_videos, "held_out_videos": held,
        "test_auc_micro": 100 * test["frame_auc_micro"], "test_auc_macro": 100 * test["frame_auc_macro"],
        "test_per_video_auc": {p["video"]: round(100 * p["frame_auc"], 2) for p in test["per_video"]},
        "test_false_alarm_pct": 100 * test["false_alarm_rate"], "test_false_alarm_far_pct": 100 * test["false_alarm_rate_far_from_events"],
        "test_detection_pct": 100 * test["detection_rate"],
        "pooled_auc_micro": _auc(pooled_y, pooled_s),
        "synthetic_auc_micro": 100 * synth["frame_auc_micro"], "synthetic_auc_macro": 100 * synth["frame_auc_macro"],
        "synthetic_per_video_auc": {p["video"]: round(100 * p["frame_auc"], 2) for p in synth["per_video"]},
        "synthetic_detection_pct": 100 * synth["detection_rate"],
        "held_out_false_alarm_pct": 100 * float((clean_s > det.threshold).mean()),
        "held_out_false_alarm_per_video_pct": {v: round(100 * float((p.pred_scores > det.threshold).mean()), 2) for v, p in clean.items()},
        # alarms as an operator sees them: runs of consecutive flagged frames, per hour of normal video (Ped2: 10 fps)
        "held_out_alarm_episodes_per_hour": clean_episodes / (clean_s.size / 10 / 3600),
        # the threshold's promise in episodes (calibration frames), checked on the held-out normal videos and the test videos' normal frames
        "held_out_episode_promise": EpisodePromise.of(det).check(clean_episodes, clean_s.size),
        "test_episode_promise": test["episode_promise"],
        "auc_by_temporal_sigma": sigma_auc,
        "threshold": det.threshold, "fit_s": fit_s, "fps": test["fps"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "fit_info": det.fit_info,
    }


def _promise_cell(c: dict) -> str:
    """Observed against expected alarm episodes, the test's p-value and its verdict (EpisodePromise.check)."""
    return f"{c['observed']} / {c['expected']:.1f} (p {c['p_value']:.2f}), {'kept' if c['kept'] else 'broken'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--extra", default="{}", help="JSON of VideoDetector arguments added to every variant (a probe)")
    ap.add_argument("--events-per-video", type=int, default=1, help="synthetic events in each held-out video (one kind after another)")
    ap.add_argument("--held", default=",".join(HELD),
                    help="training videos held out of the fit, scored clean and with synthetic events (default: the selection split)")
    ap.add_argument("--fade", type=int, default=None, help="synthetic events appear and vanish over this many frames (default: the tool's)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    ped2 = os.path.join(args.data, "ucsd_ped2")
    if args._one:
        print(json.dumps(run_one(ped2, args._one, json.loads(args.extra), args.events_per_video, args.held.split(","), args.fade)))
        return
    rows = []
    for name in args.variants.split(","):
        p = subprocess.run([sys.executable, __file__, "--data", args.data, "--extra", args.extra, "--events-per-video", str(args.events_per_video), "--held", args.held, "--_one", name] + ([] if args.fade is None else ["--fade", str(args.fade)]), capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print({k: v for k, v in rows[-1].items() if k != "fit_info"}, flush=True)
        append_jsonl(args.out, rows[-1:])
    print_markdown(
        ["variant", "selection: synthetic AUC micro", "selection: held-out normal flagged %", "report: test 01-06 AUC micro",
         "report: worst test video", "report: pooled AUC", "report: test normal far from events flagged %",
         "held-out normal: alarm episodes observed / expected (p), promise", "fit s", "fps", "peak MB"],
        [[r["variant"], f"{r['synthetic_auc_micro']:.1f}", f"{r['held_out_false_alarm_pct']:.1f}", f"{r['test_auc_micro']:.1f}",
          "{} {:.1f}".format(*min(((k, v) for k, v in r["test_per_video_auc"].items() if not math.isnan(v)), key=lambda kv: kv[1])),
          f"{r['pooled_auc_micro']:.1f}", f"{r['test_false_alarm_far_pct']:.1f}", _promise_cell(r['held_out_episode_promise']),
          f"{r['fit_s']:.0f}", f"{r['fps']:.1f}", f"{r['peak_rss_mb']:.0f}"]
         for r in rows],
    )


if __name__ == "__main__":
    main()
