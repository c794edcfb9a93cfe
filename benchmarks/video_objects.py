"""The object-level video detector on UCSD Ped2: choose on real test videos by leave-one-video-out,
judge each fold on the video it did not choose on.

Protocol:

* **fit**: training videos 01-16 (normal), the detector's own fit path: background, objects, tracks,
  attributes, cross-fit scales over 4 folds of videos (:class:`anomalens.video.ObjectVideoDetector`).
  Objects are extracted once with the library's pipeline and cached (``--cache``, on /tmp), then
  every setting of the grid below is scored from the cache.
* **free settings** (the grid): attributes, how an object's attribute scores combine (sum / max),
  the smallest object height scored, the weight of the place, the temporal smoothing.
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
    "combine": ["sum", "max"],
    "min_height": [12, 20],
    "place_weight": [0.5, 1.0],
    "temporal_sigma": [1.0, 3.0, 6.0],
}
#: settings held fixed in one run (``--set key=value`` changes one; each idea tried is one row):
#: velocity (a key of anomalens.video.attributes.VELOCITY_KINDS), scale (AttributeDensity's, or "minqQ":
#: (raw - min) / (quantile Q - min), min-max with a robust top), edge
#: ("as-is", or "track": a box touching the frame's border takes its track's last speed off the border;
#: "track-max": the element-wise larger of that and its own velocity histogram)
#: close, flow_near: the object finder's (ObjectParams; changing one extracts into another cache folder)
#: frame_unit: "raw", or "threshold": each setting's frame scores divided by its alarm threshold on its own
#: cross-fitted training runs (1 = the alarm level), so that held-out scores of folds that chose
#: different settings are pooled in one unit (within a setting the order of frames does not change)
#: speed_density: "knn" (nearest training object), or "gmmK": AI-VAD's Gaussian mixture of K components
#: fitted on the training objects' speed vectors (velocity and place; "gmmKv": the velocity alone), raw score
#: = negative log-likelihood
#: peak: half-widths (frames, comma-separated, a grid dimension) of a centred max filter applied to the
#: frame scores before the Gaussian ("0": none)
#: app_size: weights (comma-separated, a grid dimension) of the box's log height and width beside the crop embedding (the appearance of a big
#: group or a near walker compared with objects of its size; "0": the embedding alone)
#: track_sigma: sigmas (frames, comma-separated, a grid dimension) of a centred Gaussian applied to each
#: object's score along its own track before the frame takes its most abnormal object ("0": none)
FIXED = {"velocity": "hist+strip", "scale": "minmax", "edge": "track", "close": "7", "flow_near": "0", "frame_unit": "raw",
         "speed_density": "knn", "peak": "0", "track_sigma": "0", "app_size": "0"}
#: the smallest min_height of the grid: objects are extracted down to it, taller ones kept per setting
MIN_EXTRACT = min(GRID["min_height"])
#: bump when the extraction (objects, velocity columns, embeddings) changes: the cache folder is named by it
EXTRACT_VERSION = "v3"


def extract(ped2: str, cache: str) -> dict:
    """Per video ``{"frame", "track", "box", "speed", "geometry", "appearance", "n_frames", "seconds"}`` from the library's pipeline (cached as .npz)."""
    import torch

    from anomalens.video import ObjectVideoDetector
    from anomalens.video.io import list_videos, video_name
    from anomalens.video.pipeline import ObjectPipeline

    torch.set_num_threads(1)
    os.makedirs(cache, exist_ok=True)
    det = ObjectVideoDetector(attributes=("speed", "size", "appearance"), min_height=MIN_EXTRACT, close=int(FIXED["close"]), flow_near=int(FIXED["flow_near"]))
    bg_path = os.path.join(cache, "background.npy")
    train = list_videos(os.path.join(ped2, "training", "frames"))
    if not os.path.exists(bg_path):
        np.save(bg_path, ObjectPipeline.background_of(train, every=10))
    det.background = np.load(bg_path)
    global HW
    HW = tuple(det.background.shape)
    pipe = det._pipeline()
    pipe.edge_track = False  # cached as measured: FIXED["edge"] is applied to the cache (_edge_track)
    out = {}
    for split, vids in (("train", train), ("test", list_videos(os.path.join(ped2, "testing", "frames")))):
        for v in vids:
            f = os.path.join(cache, f"{split}_{video_name(v)}.npz")
            if not os.path.exists(f):
                t0, n, rows = time.perf_counter(), 0, {k: [] for k in ("frame", "track", "box", "speed", "geometry", "appearance")}
                for fo in pipe.frames(v):
                    n += 1
                    for k, a in (("frame", np.full(len(fo), fo.index)), ("track", fo.tracks), ("box", fo.boxes), ("speed", fo.speed),
                                 ("geometry", fo.geometry), ("appearance", fo.appearance)):
                        rows[k].append(a)
                np.savez(f, **{k: np.concatenate(a) for k, a in rows.items()}, n_frames=n, seconds=time.perf_counter() - t0)
                print(f"extracted {split} {video_name(v)}: {n} frames", flush=True)
            out[(split, video_name(v))] = dict(np.load(f))
    return out


HW: tuple[int, int] = (240, 360)  # set by extract from the background


def _edge_track(x: dict, keys: tuple[str, ...] = ("speed",)) -> dict:
    """``x`` with each border-touching box's ``keys`` (speed; with ``edge=track+appearance`` also the
    crop embedding) replaced by its track's at the last frame its box was off the border (kept when
    it never was)."""
    b = x["box"]
    h, w = HW
    edge = (b[:, 0] <= 0) | (b[:, 1] <= 0) | (b[:, 2] >= w) | (b[:, 3] >= h)
    out = dict(x)
    for k in keys:
        a = np.array(x[k], copy=True)
        last: dict[int, np.ndarray] = {}
        for i in np.lexsort((np.arange(len(b)), x["frame"])):  # frame order
            t = int(x["track"][i])
            if not edge[i]:
                last[t] = a[i]
            elif t in last:
                a[i] = np.maximum(last[t], a[i]) if FIXED["edge"] == "track-max" and k == "speed" else last[t]
        out[k] = a
    return out


def _keep(x: dict, min_height: int) -> dict:
    if FIXED["edge"] in ("track", "track+appearance", "track-max"):
        x = _edge_track(x, ("speed", "appearance") if FIXED["edge"] == "track+appearance" else ("speed",))
    b = x["box"]
    m = (b[:, 3] - b[:, 1]) >= min_height
    return {k: (a[m] if np.ndim(a) and len(a) == len(m) else a) for k, a in x.items()}


_RAW: dict = {}


def _raw(data: dict, attr: str, min_height: int, place_weight: float, train: list[str], test: list[str], app_size: float = 0.0) -> tuple[np.ndarray, dict]:
    """Cross-fit raw kNN scores of the ``train`` objects (4 folds of videos, as the detector's fit)
    and raw scores of each ``test`` video's objects against all of them, for one attribute (memoised)."""
    from anomalens.video.density import attribute_vectors, knn_scores
    from anomalens.video.sources import fold_groups

    key = (attr, min_height, place_weight if attr != "appearance" else app_size, tuple(train), tuple(test), tuple(FIXED.values()))
    if key not in _RAW:
        tr = [_keep(data[("train", v)], min_height) for v in train]
        fold_of = {u: g for g, members in enumerate(fold_groups(len(tr), 4, 0)) for u in members}
        def vec(x: dict) -> np.ndarray:
            a = attribute_vectors(x["speed"], x["geometry"], x["appearance"], place_weight, FIXED["velocity"])[attr]
            w = app_size
            return np.concatenate([a, w * np.asarray(x["geometry"], np.float32)[:, :2]], 1) if attr == "appearance" and w > 0 else a

        x = np.concatenate([vec(t) for t in tr])
        folds = np.concatenate([np.full(len(t["frame"]), fold_of[u]) for u, t in enumerate(tr)])
        dens = _gmm_scores if attr == "speed" and FIXED["speed_density"].startswith("gmm") else (lambda b, q: knn_scores(b, q, 1))
        r = np.zeros(len(x), np.float32)
        for f in np.unique(folds):
            r[folds == f] = dens(x[folds != f], x[folds == f])
        _RAW[key] = (r, {v: dens(x, vec(_keep(data[("test", v)], min_height))) for v in test})
    return _RAW[key]


def _gmm_scores(bank: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Negative log-likelihood ``(Q,)`` of ``queries`` under a Gaussian mixture (FIXED speed_density
    "gmmK": K full-covariance components, AI-VAD's velocity density) fitted on ``bank``."""
    from sklearn.mixture import GaussianMixture

    if not len(queries):
        return np.zeros(0, np.float32)
    spec = FIXED["speed_density"][3:]
    if spec.endswith("v"):  # the velocity alone, without the place (AI-VAD's velocity features)
        spec, bank, queries = spec[:-1], bank[:, :-2], queries[:, :-2]
    g = GaussianMixture(n_components=int(spec or 5), covariance_type="full", reg_covar=1e-3, random_state=0).fit(bank)
    return (-g.score_samples(queries)).astype(np.float32)


def _minq(raw: np.ndarray, q: float) -> tuple[float, float]:
    """``(min, quantile q - min)``: min-max with a robust top (FIXED scale "minqQ")."""
    lo = float(np.min(raw))
    return lo, float(max(np.quantile(raw, q) - lo, 1e-6))


def _peak(f: np.ndarray, r: int) -> np.ndarray:
    """Centred max over ``2 r + 1`` frames (truncated at the ends)."""
    from scipy.ndimage import maximum_filter1d

    return maximum_filter1d(f, 2 * r + 1, mode="nearest") if r > 0 else f


def _track_smooth(o: np.ndarray, frame: np.ndarray, track: np.ndarray, sigma: float) -> np.ndarray:
    """Object scores ``(N,)`` smoothed along each track by a centred Gaussian of ``sigma`` frames
    (truncated at the track's ends and renormalised; a frame the track skipped is left out)."""
    if sigma <= 0 or not len(o):
        return o
    out = np.array(o, np.float64, copy=True)
    for t in np.unique(track):
        i = np.where(track == t)[0]
        i = i[np.argsort(frame[i])]
        f = frame[i].astype(np.float64)
        w = np.exp(-0.5 * ((f[:, None] - f[None, :]) / sigma) ** 2) * (np.abs(f[:, None] - f[None, :]) <= np.ceil(3 * sigma))
        out[i] = (w @ o[i]) / w.sum(1)
    return out


def score_setting(data: dict, s: dict, train: list[str], test: list[str]) -> tuple[dict, list[np.ndarray]]:
    """Frame scores (smoothed) of each ``test`` video and the smoothed cross-fit runs of the ``train``
    videos for setting ``s``: the detector's fit path (each attribute over its 0.99 quantile on the
    cross-fit normal objects, combined per object, the frame's most abnormal object) on cached objects."""
    from anomalens.video.density import frame_scores, scale_of
    from anomalens.video.smoothing import smooth

    raws = [_raw(data, a, s["min_height"], s["place_weight"], train, test, float(s.get("app_size", 0))) for a in s["attributes"]]
    scales = [scale_of(r, FIXED["scale"]) if not FIXED["scale"].startswith("minq") else _minq(r, float(FIXED["scale"][4:])) for r, _ in raws]
    comb = (lambda a: a.sum(1)) if s["combine"] == "sum" else (lambda a: a.max(1))  # noqa: E731
    r_peak = int(s.get("peak", 0))
    sm = (lambda f: smooth(_peak(f, r_peak), s["temporal_sigma"])) if s["temporal_sigma"] > 0 else (lambda f: _peak(f, r_peak))  # noqa: E731, F811
    obj = comb(np.stack([(r - c[0]) / c[1] for (r, _), c in zip(raws, scales)], 1))
    ts = float(s.get("track_sigma", 0))
    runs, start = [], 0
    for v in train:
        x = _keep(data[("train", v)], s["min_height"])
        n = len(x["frame"])
        o = _track_smooth(obj[start:start + n], x["frame"], x["track"], ts)
        runs.append(sm(frame_scores(o[:, None], x["frame"], int(x["n_frames"]))[0]))
        start += n
    res = {}
    for v in test:
        x = _keep(data[("test", v)], s["min_height"])
        o = _track_smooth(comb(np.stack([(t[v] - c[0]) / c[1] for (_, t), c in zip(raws, scales)], 1)), x["frame"], x["track"], ts)
        res[v] = sm(frame_scores(o[:, None], x["frame"], int(x["n_frames"]))[0])
    if FIXED["frame_unit"] == "threshold":
        from anomalens.video.alarm import ALARMS_PER_HOUR, episode_threshold

        t = max(episode_threshold(runs, 10.0, ALARMS_PER_HOUR)[0], 1e-9)
        res, runs = {v: r / t for v, r in res.items()}, [r / t for r in runs]
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
        data_h = {**data, **{("test", "h" + v): data[("train", v)] for v in held}}
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
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"change a fixed setting of {sorted(FIXED)}")
    ap.add_argument("--sigmas", default="", help="comma-separated temporal sigmas of the grid (default 1,3,6)")
    ap.add_argument("--note", default="", help="what this run tries (goes into the row's variant)")
    args = ap.parse_args()
    for kv in args.set:
        k, _, v = kv.partition("=")
        if k not in FIXED:
            ap.error(f"--set {kv}: the fixed settings are {sorted(FIXED)}")
        FIXED[k] = v
    if FIXED["peak"] != "0":
        GRID["peak"] = [int(x) for x in FIXED["peak"].split(",")]
    if FIXED["app_size"] != "0":
        GRID["app_size"] = [float(x) for x in FIXED["app_size"].split(",")]
    if FIXED["track_sigma"] != "0":
        GRID["track_sigma"] = [float(x) for x in FIXED["track_sigma"].split(",")]
    if args.sigmas:
        GRID["temporal_sigma"] = [float(x) for x in args.sigmas.split(",")]
    ped2 = os.path.join(args.data, "ucsd_ped2")
    labels = {k: np.asarray(v) for k, v in json.load(open(os.path.join(ped2, "testing", "frame_labels.json"))).items()}
    finder = "" if (FIXED["close"], FIXED["flow_near"]) == ("7", "0") else f"-close{FIXED['close']}-near{FIXED['flow_near']}"
    data = extract(ped2, args.cache + finder)
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
    s_lib = {"attributes": tuple(p["attributes"]), **{k: p.get(k, 0) for k in GRID if k != "attributes"}}
    s_def, res_def, runs_def = next((x for x in scored if x[0] == s_lib), scored[best_all])
    from anomalens.video.alarm import ALARMS_PER_HOUR, episode_threshold
    from anomalens.video.evaluate import EVENT_MARGIN, _far_from_events, false_alarm_episodes

    fps_data = 10.0
    t, alpha, cal_eps = episode_threshold(runs_def, fps_data, ALARMS_PER_HOUR)
    far = np.concatenate([_far_from_events(labels[v], EVENT_MARGIN) for v in TEST])
    flagged = np.concatenate([res_def[v] > t for v in TEST])
    y = np.concatenate([labels[v] for v in TEST])
    row = {
        "variant": "objects: LOVO over test 01-06" + (f" ({args.note})" if args.note else ""), "fixed": dict(FIXED), "fit_videos": TRAIN, "grid": {k: [list(x) if isinstance(x, tuple) else x for x in v] for k, v in GRID.items()},
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
