"""The object-level video detector on a slice of UCSD Ped2 (real frames): objects and tracks, the CLI
end to end (per-object rows, boxes in the MP4), the alarm threshold in episodes per hour, model files."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from anomalens.cli import app


@pytest.fixture(scope="module")
def objects_model(ped2_slice, tmp_path_factory):
    """An object model fitted by the CLI on the training slice (4 videos x 60 frames, 4 folds)."""
    out = tmp_path_factory.mktemp("objects") / "m"
    r = CliRunner().invoke(app, ["video", "fit", str(ped2_slice["train"]), "--method", "objects", "--out", str(out), "--fps", "10"])
    assert r.exit_code == 0, r.output
    assert "episodes per hour" in " ".join(r.output.split())
    return out


def test_objects_are_found_and_tracked_on_real_frames(ped2_slice):
    """On test video 02 (slice: frames 64-123, a cyclist from slice frame 30) every frame has objects,
    boxes lie inside the frame, and a walker keeps its track id from frame to frame."""
    from anomalens.video.attributes import N_BINS, VELOCITY_DIM
    from anomalens.video.objects import IoUTracker
    from anomalens.video.pipeline import ObjectPipeline
    from anomalens.video.objects import ObjectParams

    train = sorted((ped2_slice["train"] / "frames").iterdir())
    bg = ObjectPipeline.background_of(train, every=5)
    assert bg.shape == (240, 360)
    frames = list(ObjectPipeline(bg, ObjectParams(), None).frames(ped2_slice["test"] / "frames" / "02"))
    assert len(frames) == 60 and all(len(f) >= 1 for f in frames)
    boxes = np.concatenate([f.boxes for f in frames])
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 360).all() and (boxes[:, 3] <= 240).all() and (boxes[:, 2] > boxes[:, 0]).all()
    ids = [set(f.tracks.tolist()) for f in frames]
    kept = np.mean([len(a & b) / max(1, len(b)) for a, b in zip(ids, ids[1:])])
    assert kept > 0.6, kept  # most objects continue a track of the previous frame
    assert all(f.speed.shape == (len(f), VELOCITY_DIM) and f.appearance.shape == (len(f), 0) for f in frames)
    # walkers move about a pixel per frame (their histogram's fullest direction); frame 0 has no flow yet
    speeds = np.concatenate([f.speed[:, :N_BINS].max(1) for f in frames[1:]])
    assert 0.2 < float(np.median(speeds)) < 3 and not frames[0].speed.any()
    t = IoUTracker()
    a = t.update(np.array([[10, 10, 30, 50], [100, 10, 120, 50]]))
    b = t.update(np.array([[102, 10, 122, 50], [12, 10, 32, 50], [200, 100, 220, 140]]))
    assert b.tolist() == [a[1], a[0], 2]


def test_object_model_evaluate_and_predict_end_to_end(ped2_slice, objects_model, tmp_path):
    r = CliRunner().invoke(app, ["video", "evaluate", str(objects_model), str(ped2_slice["test"]), str(ped2_slice["labels"]), "--out", str(tmp_path / "ev"), "--fps", "10"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    print({p["video"]: p["frame_auc"] for p in m["per_video"]}, m["frame_auc_micro"])
    assert m["frame_auc_micro"] >= 0.85 and all(p["frame_auc"] >= 0.8 for p in m["per_video"]), m

    r = CliRunner().invoke(app, ["video", "predict", str(objects_model), str(ped2_slice["test"] / "frames" / "02"), "--out", str(tmp_path / "p"),
                                 "--labels", str(ped2_slice["labels"])])
    assert r.exit_code == 0, r.output
    d = tmp_path / "p" / "02"
    frames = list(csv.DictReader(open(d / "scores.csv")))
    objects = list(csv.DictReader(open(d / "objects.csv")))
    assert len(frames) == 60 and len(objects) >= 60
    # the default scores speed and appearance; size is measured but not scored: its column stays empty
    assert {o["cause"] for o in objects} <= {"speed", "appearance"} and all(o["size"] == "" and o["speed"] != "" for o in objects)
    for o in objects:
        x0, y0, x1, y1 = (int(o[k]) for k in ("x0", "y0", "x1", "y1"))
        assert 0 <= x0 < x1 <= 360 and 0 <= y0 < y1 <= 240
        assert float(o["score"]) == pytest.approx(sum(float(o[a]) for a in ("speed", "appearance")), abs=3e-4)  # an object's score: the sum
    # the frame's raw score is AI-VAD's: each attribute's largest object score, summed over attributes;
    # its motion and appearance scores are those two terms, its cause the larger
    terms: dict = {}
    for o in objects:
        t = terms.setdefault(int(o["frame"]), {"speed": -np.inf, "appearance": -np.inf})
        for a in t:
            t[a] = max(t[a], float(o[a]))
    for f in frames:
        t = terms.get(int(f["frame"]))
        assert float(f["raw_score"]) == pytest.approx(sum(t.values()) if t else 0.0, abs=3e-4)
        if t:
            assert float(f["motion_score"]) == pytest.approx(t["speed"], abs=2e-4) and float(f["appearance_score"]) == pytest.approx(t["appearance"], abs=2e-4)
            assert f["cause"] == max(t, key=t.get) or abs(t["speed"] - t["appearance"]) < 1e-3
    # the cyclist's frames (labelled from slice frame 30) are flagged, and what flags them is named
    labels = json.loads(ped2_slice["labels"].read_text())["02"]
    flagged = [int(f["pred_label"]) for f in frames]
    assert sum(f for f, y in zip(flagged, labels) if y) >= 15
    assert all(f["cause"] in ("speed", "appearance") for f in frames if f["pred_label"] == "1")
    cap = cv2.VideoCapture(str(d / "annotated.mp4"))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 60
    cap.release()


def test_boxes_are_drawn_with_their_cause():
    from anomalens.video.output import draw_objects
    from anomalens.video.results import FramePrediction, ObjectScore

    img = np.zeros((60, 80, 3), np.uint8)
    objs = [ObjectScore(1, (10, 20, 30, 50), {"speed": 3.0}, 3.0, "speed"), ObjectScore(2, (50, 5, 70, 25), {"speed": 0.2}, 0.2, "speed")]
    fp = FramePrediction(0, 3.0, 3.0, 1, np.zeros((60, 80), np.float32), np.zeros((60, 80), bool), 3.0, float("nan"), "speed", objects=objs)
    out = draw_objects(img, fp, threshold=1.0)
    assert tuple(out[20, 15]) == (255, 40, 40)  # the abnormal object's red box
    assert tuple(out[5, 60]) == (170, 170, 170)  # a normal object's grey box
    assert out[25:45, 15:25].sum() == 0 and img.sum() == 0  # inside untouched, the input not modified


def test_threshold_keeps_episodes_per_hour():
    """The lowest threshold whose calibration runs show at most ``alarms_per_hour x hours`` episodes,
    and the per-frame rate that gives the same threshold conformally."""
    from anomalens.calibration import conformal_threshold
    from anomalens.video.alarm import episode_threshold

    runs = [np.array([0.0, 1.0, 5.0, 1.0, 0.0]), np.array([0.0, 2.0, 2.0, 0.0])]
    t, alpha, eps = episode_threshold(runs, fps=10, alarms_per_hour=1)  # 0.9 s of footage: no episode allowed
    assert t == 5.0 and eps == 0 and conformal_threshold(np.concatenate(runs), alpha) == 5.0
    t, alpha, eps = episode_threshold(runs, fps=10, alarms_per_hour=4000)  # 1 episode allowed
    assert t == 2.0 and eps == 1 and conformal_threshold(np.concatenate(runs), alpha) == 2.0


def test_object_model_promise_on_unseen_normal_footage_and_files(ped2_slice, objects_model, tmp_path):
    """The threshold's promise holds on normal footage the model never saw (the first 60 frames of
    training videos 05-08); the model reloads with the same scores; a video model of the format
    before is refused with a message to re-fit."""
    from conftest import PED2, link_frames, require

    from anomalens.errors import ModelFileError
    from anomalens.serialization import load_model, save_model
    from anomalens.video import ObjectVideoDetector, VideoDetector

    normal = tmp_path / "normal"
    for v in ("05", "06", "07", "08"):
        link_frames(require(PED2) / "training" / "frames" / v, normal / v, 0, 60)
    r = CliRunner().invoke(app, ["video", "evaluate", str(objects_model), str(normal), "--all-normal", "--fps", "10", "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    check = json.loads((tmp_path / "ev" / "metrics.json").read_text())["episode_promise"]
    assert check["kept"], check

    det = VideoDetector.load(objects_model)
    assert isinstance(det, ObjectVideoDetector) and det.is_video and det.fps == 10
    assert det.calibration.scores.size == 240 and 0 < det.false_alarm_rate < 0.01
    config, tensors = load_model(objects_model)
    # as the previous anomalens saved it: video format 4, with its combine option
    old = {**config, "video_format": 4, "params": {**config["params"], "combine": "sum"}}
    save_model(tmp_path / "old", old, tensors)
    with pytest.raises(ModelFileError, match="re-fit"):
        VideoDetector.load(tmp_path / "old")


def test_a_single_video_is_cut_into_folds(ped2_slice):
    """One training video (60 frames) is read once and cut into 4 consecutive parts of 15 frames, each
    part's objects scored against the other parts' (cross-fit); too short a video is refused."""
    from anomalens.errors import DatasetError
    from anomalens.video import ObjectVideoDetector

    video = ped2_slice["train"] / "frames" / "01"
    det = ObjectVideoDetector(attributes=("speed", "size")).fit([video])
    assert det.fit_info["calibration_part_frames"] == [15, 15, 15, 15] and det.calibration.scores.size == 60
    assert len(det.fit_info["train_videos"]) == 4 and det.fit_info["n_objects"] > 60
    with pytest.raises(DatasetError, match="at least"):
        ObjectVideoDetector(folds=40).fit([video])


def test_velocity_histogram_and_border_boxes_keep_their_track_speed():
    """The velocity histogram puts each pixel's speed into the sector of its flow's direction (a
    rightward 2 px per frame lands in the sector starting at angle 0, a downward one in the sector
    starting at pi / 2, the others stay 0); a cyclist beside a walker in one box keeps its own speed
    in the histogram of the box's fastest strip; a box
    that reaches the frame's border keeps the speed its track had before it touched it."""
    from anomalens.video.attributes import N_BINS, VELOCITY_DIM, object_velocity
    from anomalens.video.objects import IoUTracker, on_border

    flow = np.zeros((40, 60, 2), np.float32)
    flow[10:30, 10:20, 0] = 2.0  # object 0 moves right
    flow[10:30, 40:50, 1] = 1.0  # object 1 moves down (image rows grow downwards)
    boxes = np.array([[10, 10, 20, 30], [40, 10, 50, 30]])
    v = object_velocity(flow, boxes, np.ones((40, 60), bool))
    h = v[:, :N_BINS]  # the box's histogram (its fastest strip's follows)
    assert v.shape == (2, VELOCITY_DIM) == (2, 2 * N_BINS)
    assert h[0, N_BINS // 2] == pytest.approx(2.0) and h[0].sum() == pytest.approx(2.0)
    assert h[1, 3 * N_BINS // 4] == pytest.approx(1.0) and h[1].sum() == pytest.approx(1.0)
    # one box holding a walker (1 px per frame) and a cyclist (4 px per frame) side by side, both rightward:
    # the box's histogram averages them, its fastest person-wide strip keeps the cyclist's speed
    group = np.zeros((40, 60, 2), np.float32)
    group[10:30, 10:20, 0], group[10:30, 30:40, 0] = 1.0, 4.0
    mask = np.zeros((40, 60), bool)
    mask[10:30, 10:20] = mask[10:30, 30:40] = True
    g = object_velocity(group, np.array([[10, 10, 40, 30]]), mask)
    assert g[0, N_BINS // 2] == pytest.approx(2.5)
    assert g[0, N_BINS + N_BINS // 2] == pytest.approx(4.0) and g[0, N_BINS:].sum() == pytest.approx(4.0)
    assert on_border(np.array([[0, 5, 10, 20], [5, 5, 10, 40], [5, 5, 10, 20]]), (40, 60)).tolist() == [True, True, False]
    t = IoUTracker()
    a = t.update(np.array([[10, 10, 20, 30]]))[0]
    assert t.off_border(a, np.array([1.0]), False)[0] == 1.0
    b = t.update(np.array([[10, 12, 20, 40]]))[0]
    assert b == a and t.off_border(b, np.array([0.3]), True)[0] == 1.0  # cut by the bottom edge: the track's speed


def test_a_box_on_the_border_keeps_its_tracks_appearance(ped2_slice):
    """On test video 02's slice, a box touching the frame's border whose track was seen off it takes
    the embedding of the track's last off-border frame (half a person is not a new look); every other
    box is embedded from its own crop."""
    from anomalens.video.attributes import CropEmbedder
    from anomalens.video.objects import ObjectParams, on_border
    from anomalens.video.pipeline import ObjectPipeline

    train = sorted((ped2_slice["train"] / "frames").iterdir())
    emb = CropEmbedder(pretrained=False)
    frames = list(ObjectPipeline(ObjectPipeline.background_of(train, every=5), ObjectParams(), emb, min_height=20).frames(
        ped2_slice["test"] / "frames" / "02", keep_frames=True))
    last: dict = {}
    kept = own = 0
    for f in frames:
        edge = on_border(f.boxes, f.hw)
        mine = emb(f.image, f.boxes)
        for j, t in enumerate(f.tracks.tolist()):
            if edge[j] and t in last:
                np.testing.assert_array_equal(f.appearance[j], last[t])
                kept += 1
            else:
                np.testing.assert_allclose(f.appearance[j], mine[j], atol=1e-5)
                own += 1
            if not edge[j]:
                last[t] = f.appearance[j]
    assert kept >= 5 and own >= 60, (kept, own)


def test_frame_terms_are_each_attributes_largest_object_score():
    """AI-VAD's frame terms against a loop over frames: each attribute's largest object score, also
    when the two maxima sit on different objects or every score is negative; 0 for a frame without
    objects; frame numbers outside the video are refused."""
    from anomalens.video.density import frame_terms

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 2))
    frames = rng.integers(0, 12, 40)
    frames[frames == 5] = 6  # frame 5 has no object
    got = frame_terms(scores, frames, 12)
    for f in range(12):
        want = scores[frames == f].max(0) if (frames == f).any() else np.zeros(2)
        np.testing.assert_array_equal(got[f], want)
    assert (got[5] == 0).all() and (got.min() < 0)
    two = frame_terms(np.array([[3.0, 0.1], [0.2, 2.0], [-1.0, -2.0]]), np.array([0, 0, 1]), 2)
    assert two.tolist() == [[3.0, 2.0], [-1.0, -2.0]]  # frame 0: speed from one object, appearance from the other
    assert frame_terms(np.zeros((0, 2)), np.zeros(0, np.int64), 3).tolist() == [[0.0, 0.0]] * 3
    with pytest.raises(IndexError):
        frame_terms(np.ones((1, 2)), np.array([3]), 3)
