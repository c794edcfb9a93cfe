"""The object-level video detector on UCSD Ped2: choose on real test videos by leave-one-video-out,
judge each fold on the video it did not choose on.

Protocol:

* **fit**: training videos 01-16 (normal), the detector's own fit path: background, objects, tracks,
  attributes, cross-fit scales over 4 folds of videos (:class:`anomalens.video.ObjectVideoDetector`).
  Objects are extracted once with the library's pipeline and cached (``--cache``, on /tmp), then
  every setting of the grid below is scored from the cache.
* **free settings** (the grid): attributes,
  the smallest object height scored, the weight of the place, the temporal smoothing. The frame rule
  is AI-VAD's (each attribute's largest object score, summed over attributes), as the library's;
  ``--frame-rules`` adds rules the library does not use (the most abnormal object's sum or largest
  attribute score) to the grid, to compare.
* **leave-one-video-out** over test 01-06: for each video, the setting with the best pooled micro
  frame AUC on the *other five* is chosen, and the held-out video's frame scores at that setting are
  kept; the row reports each fold's choice and held-out AUC, and the pooled micro AUC of the six
  held-out score sets (the number to compare with the cell detector's, whose settings were not
  chosen on these videos).
* **alarms on normal footage the model did not see**: for each fold of 4 training videos, the model
  is fitted on the other 12 (scales and threshold included) and its false-alarm episodes per hour
  on the 4 are counted, against what its calibration promised.
* **far-from-event false alarms** (% of normal test frames more than 18 frames from an event that
  are flagged) and detection, at the threshold of the model fitted on 01-16.
* **fps**: the library's ``evaluate`` over test 01-06 (``OMP_NUM_THREADS`` threads, default 2), end to end (frames read, flow,
  objects, crops, kNN).

The ideas this script refuted (other velocity descriptions, scales with a robust top, AI-VAD's
Gaussian mixture for speed, a max filter, smoothing along tracks, box size beside the appearance,
scores in threshold units) were measured with it up to commit ``2d70788``: their rows are in
``benchmarks/results/video-objects.jsonl`` and their lines in ``docs/design/decisions.md``.

Run: ``python benchmarks/video_objects.py --data /work/shared/data`` (about 10 minutes on 2 cores; the
extraction is cached). Rows go to ``benchmarks/results/video-objects.jsonl`` with ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tables import append_jsonl  # noqa: E402

TRAIN = [f"{i:02d}" for i in range(1, 17)]
TEST = [f"{i:02d}" for i in range(1, 7)]
GRID = {
    "attributes": [("speed", "appearance"), ("speed", "size", "appearance"), ("speed",), ("speed", "size")],
    "frame_rule": ["attribute_maxima"],  # the library's; --frame-rules for any of FRAME_RULES
    "min_height": [12, 20],
    "place_weight": [0.5, 1.0],
    "temporal_sigma": [1.0, 3.0, 6.0],
}
#: bump when the extraction (objects, velocity columns, embeddings) changes: the cache folder is named by it
EXTRACT_VERSION = "v6"
#: frame rules the grid can compare: AI-VAD's (the library's), the most abnormal object's sum, its largest attribute
FRAME_RULES = ("attribute_maxima", "object_sum", "object_max")


def extract(ped2: str, cache: str) -> dict:
    """Per ``(split, video, min_height)`` of the grid, ``{"frame", "track", "box", "speed", "geometry",
    "appearance", "n_frames", "seconds"}`` from the library's pipeline at that ``min_height`` (cached as
    .npz; one extraction per height, since a track's remembered appearance comes from its described boxes)."""
    import torch

    from anomalens.video import ObjectVideoDetector
    from anomalens.video.io import list_videos, video_name
    from anomalens.video.pipeline import ObjectPipeline

    torch.set_num_threads(1)
    os.makedirs(cache, exist_ok=True)
    bg_path = os.path.join(cache, "background.npy")
    train = list_videos(os.path.join(ped2, "training", "frames"))
    if not os.path.exists(bg_path):
        np.save(bg_path, ObjectPipeline.background_of(train, every=10))
    out = {}
    for h, split, vids in ((h, s, vs) for h in GRID["min_height"] for s, vs in (("train", train), ("test", list_videos(os.path.join(ped2, "testing", "frames"))))):
        det = ObjectVideoDetector(attributes=("speed", "size", "appearance"), min_height=h)
        det.background = np.load(bg_path)
        pipe = det._pipeline()
        os.makedirs(os.path.join(cache, f"h{h}"), exist_ok=True)
        for v in vids:
            f = os.path.join(cache, f"h{h}", f"{split}_{video_name(v)}.npz")
            if not os.path.exists(f):
                t0, n, rows = time.perf_counter(), 0, {k: [] for k in ("frame", "track", "box", "speed", "geometry", "appearance")}
                for fo in pipe.frames(v):
                    n += 1
                    for k, a in (("frame", np.full(len(fo), fo.index)), ("track", fo.tracks), ("box", fo.boxes), ("speed", fo.speed),
                                 ("geometry", fo.geometry), ("appearance", fo.appearance)):
                        rows[k].append(a)
                np.savez(f, **{k: np.concatenate(a) for k, a in rows.items()}, n_frames=n, seconds=time.perf_counter() - t0)
                print(f"extracted {split} {video_name(v)} at min_height {h}: {n} frames", flush=True)
            out[(split, video_name(v), h)] = dict(np.load(f))
    return out


_RAW: dict = {}


def _raw(data: dict, attr: str, min_height: int, place_weight: float, train: list[str], test: list[str]) -> tuple[np.ndarray, dict]:
    """Cross-fit raw kNN scores of the ``train`` objects (4 folds of videos, as the detector's fit)
    and raw scores of each ``test`` video's objects against all of them, for one attribute (memoised)."""
    from anomalens.video.density import attribute_vectors, knn_scores
    from anomalens.video.sources import fold_groups

    key = (attr, min_height, place_weight if attr != "appearance" else 0.0, tuple(train), tuple(test))
    if key not in _RAW:
        tr = [data[("train", v, min_height)] for v in train]
        fold_of = {u: g for g, members in enumerate(fold_groups(len(tr), 4, 0)) for u in members}
        def vec(x: dict) -> np.ndarray:
            return attribute_vectors(x["speed"], x["geometry"], x["appearance"], place_weight)[attr]

        x = np.concatenate([vec(t) for t in tr])
        folds = np.concatenate([np.full(len(t["frame"]), fold_of[u]) for u, t in enumerate(tr)])
        r = np.zeros(len(x), np.float32)
        for f in np.unique(folds):
            r[folds == f] = knn_scores(x[folds != f], x[folds == f], 1)
        _RAW[key] = (r, {v: knn_scores(x, vec(data[("test", v, min_height)]), 1) for v in test})
    return _RAW[key]


def score_setting(data: dict, s: dict, train: list[str], test: list[str]) -> tuple[dict, list[np.ndarray]]:
    """Frame scores (smoothed) of each ``test`` video and the smoothed cross-fit runs of the ``train``
    videos for setting ``s``: the detector's fit path (each attribute min-max scaled on the cross-fit
    normal objects, combined into the frame's score by the setting's frame rule, smoothed) on cached objects."""
    from anomalens.video.density import frame_terms, scale_of
    from anomalens.video.smoothing import smooth

    raws = [_raw(data, a, s["min_height"], s["place_weight"], train, test) for a in s["attributes"]]
    scales = [scale_of(r) for r, _ in raws]
    sm = (lambda f: smooth(f, s["temporal_sigma"])) if s["temporal_sigma"] > 0 else (lambda f: f)  # noqa: E731

    def frames(cols: np.ndarray, x: dict) -> np.ndarray:
        n = int(x["n_frames"])
        if s["frame_rule"] == "attribute_maxima":
            return frame_terms(cols, x["frame"], n).sum(1)
        comb = cols.sum(1) if s["frame_rule"] == "object_sum" else cols.max(1)
        return frame_terms(comb[:, None], x["frame"], n)[:, 0]

    obj = np.stack([(r - c[0]) / c[1] for (r, _), c in zip(raws, scales)], 1)
    runs, start = [], 0
    for v in train:
        x = data[("train", v, s["min_height"])]
        n = len(x["frame"])
        runs.append(sm(frames(obj[start:start + n], x)))
        start += n
    res = {}
    for v in test:
        x = data[("test", v, s["min_height"])]
        res[v] = sm(frames(np.stack([(t[v] - c[0]) / c[1] for (_, t), c in zip(raws, scales)], 1), x))
    return res, runs


def _auc(y, s) -> float:
    from anomalens.video.evaluate import frame_auc

    return 100 * frame_auc(np.asarray(y), np.asarray(s))


def pooled(labels: dict, res: dict, videos: list[str]) -> float:
    return _auc(np.concatenate([labels[v] for v in videos]), np.concatenate([res[v] for v in videos]))


def alarm_check(data: dict, s: dict, fps: float, per_hour: float) -> dict:
    """Fit on 12 training videos, count false-alarm episodes on the 4 held out, for each of 4 folds."""
    from anomalens.video.alarm import episode_threshold
    from anomalens.video.evaluate import alarm_episodes

    observed, frames, promised = 0, 0, []
    for k in range(4):
        held = TRAIN[k::4]
        fit = [v for v in TRAIN if v not in held]
        data_h = {**data, **{("test", "h" + v, h): data[("train", v, h)] for v in held for h in GRID["min_height"]}}
        res, runs = score_setting(data_h, s, fit, ["h" + v for v in held])
        t, _, cal_eps = episode_threshold(runs, fps, per_hour)
        observed += sum(alarm_episodes(r > t) for r in res.values())
        frames += sum(r.size for r in res.values())
        promised.append(cal_eps)
    hours = frames / fps / 3600
    return {"held_out_frames": frames, "held_out_episodes": observed, "held_out_episodes_per_hour": observed / hours,
            "calibration_episodes_per_fold": promised}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("ANOMALENS_DATA", "/work/shared/data"))
    ap.add_argument("--cache", default=f"/tmp/anomalens-video-objects-{EXTRACT_VERSION}", help="extraction cache (versioned: a change of extraction gets a new folder)")
    ap.add_argument("--out", default=None, help="append the row to this JSON Lines file")
    ap.add_argument("--no-fps", action="store_true", help="skip the end-to-end fit and fps run")
    ap.add_argument("--sigmas", default="", help="comma-separated temporal sigmas of the grid (default 1,3,6)")
    ap.add_argument("--frame-rules", default="", help="comma-separated frame rules of the grid (attribute_maxima, object_sum, object_max; default the library's, attribute_maxima)")
    ap.add_argument("--note", default="", help="what this run tries (goes into the row's variant)")
    args = ap.parse_args()
    if args.sigmas:
        GRID["temporal_sigma"] = [float(x) for x in args.sigmas.split(",")]
    if args.frame_rules:
        GRID["frame_rule"] = args.frame_rules.split(",")
        if set(GRID["frame_rule"]) - set(FRAME_RULES):
            ap.error(f"--frame-rules: each of {FRAME_RULES}")
    ped2 = os.path.join(args.data, "ucsd_ped2")
    labels = {k: np.asarray(v) for k, v in json.load(open(os.path.join(ped2, "testing", "frame_labels.json"))).items()}
    data = extract(ped2, args.cache)
    settings = [dict(zip(GRID, vals)) for vals in itertools.product(*GRID.values())]
    scored = []
    for s in settings:
        res, runs = score_setting(data, s, TRAIN, TEST)
        scored.append((s, res, runs))
    # leave one test video out: choose on the other five (pooled micro AUC), report the held-out one
    folds, held_scores = [], {}
    for v in TEST:
        rest = [u for u in TEST if u != v]
        best = max(range(len(scored)), key=lambda i: pooled(labels, scored[i][1], rest))
        held_scores[v] = scored[best][1][v]
        folds.append({"video": v, "chosen": scored[best][0], "chosen_on_others_pooled_auc": pooled(labels, scored[best][1], rest),
                      "held_out_auc": _auc(labels[v], scored[best][1][v])})
    lovo_pooled = pooled(labels, held_scores, TEST)
    # the default: the setting chosen on all six videos
    best_all = max(range(len(scored)), key=lambda i: pooled(labels, scored[i][1], TEST))
    # the library's defaults (ObjectVideoDetector()), reported beside the setting chosen on all six
    from anomalens.video import ObjectVideoDetector

    p = ObjectVideoDetector(pretrained=False).get_params()
    s_lib = {"attributes": tuple(p["attributes"]), **{k: p[k] for k in GRID if k not in ("attributes", "frame_rule")}, "frame_rule": "attribute_maxima"}
    s_def, res_def, runs_def = next((x for x in scored if x[0] == s_lib), scored[best_all])
    from anomalens.video.alarm import ALARMS_PER_HOUR, episode_threshold
    from anomalens.video.evaluate import EVENT_MARGIN, _far_from_events, false_alarm_episodes

    fps_data = 10.0
    t, alpha, cal_eps = episode_threshold(runs_def, fps_data, ALARMS_PER_HOUR)
    far = np.concatenate([_far_from_events(labels[v], EVENT_MARGIN) for v in TEST])
    flagged = np.concatenate([res_def[v] > t for v in TEST])
    y = np.concatenate([labels[v] for v in TEST])
    row = {
        "variant": "objects: LOVO over test 01-06" + (f" ({args.note})" if args.note else ""), "fit_videos": TRAIN, "grid": {k: [list(x) if isinstance(x, tuple) else x for x in v] for k, v in GRID.items()},
        "lovo_pooled_auc_micro": lovo_pooled, "lovo_per_video_auc": {f["video"]: f["held_out_auc"] for f in folds},
        "lovo_worst_video": min(folds, key=lambda f: f["held_out_auc"])["video"], "lovo_folds": folds,
        "best_on_all_six": scored[best_all][0], "best_on_all_six_pooled_auc_micro": pooled(labels, scored[best_all][1], TEST),
        "default_setting": s_def, "default_pooled_auc_micro": pooled(labels, res_def, TEST),
        "default_per_video_auc": {v: _auc(labels[v], res_def[v]) for v in TEST},
        "threshold": t, "threshold_frame_alpha": alpha, "calibration_episodes": cal_eps,
        "test_false_alarm_far_pct": 100 * float(flagged[far].mean()), "test_detection_pct": 100 * float(flagged[y == 1].mean()),
        "test_false_alarm_episodes": int(sum(false_alarm_episodes(res_def[v] > t, labels[v]) for v in TEST)),
        "normal_footage_alarms": alarm_check(data, s_def, fps_data, ALARMS_PER_HOUR),
    }
    if not args.no_fps:
        import torch

        from anomalens.video import ObjectVideoDetector
        from anomalens.video.evaluate import evaluate_videos

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # the shared machine: 1 thread unless told
        det = ObjectVideoDetector()
        t0 = time.perf_counter()
        det.fit(os.path.join(ped2, "training"))
        row["fit_s"] = time.perf_counter() - t0
        ev = evaluate_videos(det, os.path.join(ped2, "testing"), {k: v.tolist() for k, v in labels.items()})
        row.update(library_pooled_auc_micro=100 * ev["frame_auc_micro"], library_per_video_auc={p["video"]: 100 * p["frame_auc"] for p in ev["per_video"]},
                   fps=ev["fps"], library_threshold=det.threshold, library_false_alarm_far_pct=100 * ev["false_alarm_rate_far_from_events"])
    print(json.dumps(row, default=float, indent=1))
    append_jsonl(args.out, [row])


if __name__ == "__main__":
    main()
