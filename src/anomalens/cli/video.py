"""``anomalens video fit | predict | evaluate``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import console, fail as _fail, out_console, progress_bars, split_names
from ..errors import AnomalensError, ConfigError

video_app = typer.Typer(no_args_is_help=True, help="Video anomaly detection for fixed cameras (UCSD Ped2 layout or video files).")


@video_app.command("fit")
def fit(
    train: Path = typer.Argument(..., help="Normal videos: UCSD training/ (frames/NN/*.jpg), a folder of frame folders or video files, or one video."),
    out: Path = typer.Option(..., "--out", "-o", help="Model directory to write."),
    method: Optional[str] = typer.Option(None, help="objects (default): objects from background and motion, tracked, scored by speed, size and appearance; cells: flow and appearance per grid cell."),
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", "-b", help="CNN for appearance features."),
    temporal_sigma: Optional[float] = typer.Option(None, help="Smoothing of the frame scores in frames (the stream's delay is 3x this). Default: the method's."),
    folds: int = typer.Option(4, help="Cross-fit: groups of videos (a single video is cut into this many parts)."),
    attributes: Optional[str] = typer.Option(None, help="objects: attributes that score, comma-separated (speed, size, appearance; default speed,appearance)."),
    alarms_per_hour: Optional[float] = typer.Option(None, help="False-alarm episodes per hour of normal footage the threshold allows (both methods; default 1)."),
    fps: Optional[float] = typer.Option(None, min=0.1, help="Frame rate of the footage (both methods; default: read from the videos; frame folders: 10)."),
    image_size: Optional[int] = typer.Option(None, help="cells: frames are resized to this square size for the backbone (pixels)."),
    appearance: Optional[bool] = typer.Option(None, "--appearance/--no-appearance", help="cells: score how patches look."),
    motion: Optional[bool] = typer.Option(None, "--motion/--no-motion", help="cells: score how patches move (optical flow)."),
    false_alarm_rate: Optional[float] = typer.Option(None, help="cells: a per-frame target (fraction of normal frames flagged) instead of --alarms-per-hour."),
) -> None:
    """Learn what is normal for one camera view, and set the alarm threshold."""
    from ..video.detector import DEFAULT_METHOD, make_video_detector

    method = method or DEFAULT_METHOD
    given = {"temporal_sigma": temporal_sigma, "attributes": split_names(attributes) if attributes else None,
             "alarms_per_hour": alarms_per_hour, "fps": fps, "image_size": image_size, "appearance": appearance, "motion": motion,
             "false_alarm_rate": false_alarm_rate}
    params = {"backbone": backbone, "folds": folds, **{k: v for k, v in given.items() if v is not None}}
    try:
        det = make_video_detector(method, **params)
        with progress_bars() as cb:
            det.fit(train, progress=cb)
        det.save(out)
    except AnomalensError as exc:
        _fail(exc)
    info = det.fit_info
    console.print(
        f"saved {out}  ({method})  fit {info['seconds_total']:.1f}s on {info['n_train_frames']} frames of {len(info['train_videos'])} videos  "
        f"threshold {det.threshold:.3f}"
    )
    console.print(f"threshold: {det.calibration.note}")
    from ..video.evaluate import EpisodePromise

    console.print(f"alarms to expect on new normal footage: {_promise_text(EpisodePromise.of(det), getattr(det, 'fps', None))}")


def _promise_text(promise, fps: float | None = None) -> str:
    """The episode promise in words: expected and upper bound per 1000 frames (and per hour at ``fps``)."""
    hour = f" ({promise.per_hour(fps):.0f} per hour at {fps:g} fps, at most {promise.upper_per_1000() * fps * 3.6:.0f})" if fps else ""
    return (f"{promise.per_1000:.1f} alarm episodes per 1000 frames, at most {promise.upper_per_1000():.1f} (95% upper bound){hour}; "
            f"from {promise.episodes} episodes in {promise.frames} calibration frames")


def _write_outputs(det, video: Path, out: Path, labels: list[int] | None, mp4: bool):
    """Predict one video, streaming frames into the annotated MP4; then the CSV and the plot."""
    from ..video.io import video_fps, video_name
    from ..video.output import AnnotatedVideoWriter, ObjectRowsWriter, plot_scores, write_frame_csv

    d = out / video_name(video)
    fps = video_fps(video)
    writer = AnnotatedVideoWriter(d / "annotated.mp4", fps, det.threshold, det.pixel_threshold) if mp4 else None
    rows = ObjectRowsWriter(d / "objects.csv") if det.method == "objects" else None

    def on_frame(fp) -> None:
        if writer is not None:
            writer.write(fp)
        if rows is not None:
            rows.write(fp)

    try:
        pred = det.predict(video, on_frame=on_frame, keep_frames=mp4)
    except AnomalensError:  # an unreadable rest of the video: the frames scored before it are kept
        if writer is not None:
            writer.close()
        raise
    except BaseException:  # interrupted: the previous annotated.mp4, if any, stays whole
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    if rows is not None:
        rows.close()
    write_frame_csv(pred, d / "scores.csv", labels)
    plot_scores(pred, d / "scores.png", labels, fps)
    return pred, d


@video_app.command("predict")
def predict(
    model_dir: Path = typer.Argument(..., help="Model directory written by `anomalens video fit`."),
    videos: List[Path] = typer.Argument(..., help="Videos: frame folders, video files, or folders of them."),
    out: Path = typer.Option(..., "--out", "-o", help="Results: OUT/<video>/scores.csv, objects.csv (object models: one row per object and frame), scores.png, annotated.mp4."),
    mp4: bool = typer.Option(True, "--mp4/--no-mp4", help="Write the annotated MP4."),
    labels: Optional[Path] = typer.Option(None, help="Frame labels JSON (video id -> 0/1 per frame), shaded in the plot."),
) -> None:
    """Score videos frame by frame (streamed: a long video is never held in memory)."""
    from ..video.detector import VideoDetector
    from ..video.evaluate import read_frame_labels
    from ..video.io import list_videos, video_name

    failed = []
    try:
        det = VideoDetector.load(model_dir)
        gt = read_frame_labels(labels) if labels else {}
        items = [v for p in videos for v in list_videos(p)]
    except AnomalensError as exc:
        _fail(exc)
    table = Table(title=f"{len(items)} video(s)")
    for c in ("video", "frames", "abnormal frames", "max score", "fps", "results"):
        table.add_column(c)
    for video in items:
        pred, d = _write_outputs(det, video, out, gt.get(video_name(video)), mp4)
        if pred.error:
            failed.append(pred.error)
            console.print(f"[bold red]error:[/] {escape(pred.error)} (the {pred.n_frames} frames before it are in {d})", soft_wrap=True)
        table.add_row(video_name(video), str(pred.n_frames), str(int(pred.pred_labels.sum())),
                      f"{pred.pred_scores.max():.2f}" if pred.n_frames else "-", f"{pred.fps:.1f}", str(d))
    out_console.print(table)
    if failed:
        raise typer.Exit(code=1)


@video_app.command("evaluate")
def evaluate(
    model_dir: Path = typer.Argument(..., help="Model directory written by `anomalens video fit`."),
    test_dir: Path = typer.Argument(..., help="Test videos (UCSD testing/ or testing/frames)."),
    labels: Optional[Path] = typer.Argument(None, help="Frame labels JSON: video id -> list of 0/1 per frame (1 = abnormal). Omit with --all-normal."),
    all_normal: bool = typer.Option(False, "--all-normal", help="Every frame is normal (new normal footage, no labels): checks the threshold's false-alarm promise on it."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write metrics.json and each video's CSV, plot (and MP4) here."),
    mp4: bool = typer.Option(False, "--mp4/--no-mp4", help="With --out: also the annotated MP4s (slower)."),
    fps: Optional[float] = typer.Option(None, "--fps", min=0.1, help="Frame rate of the footage, to state false-alarm episodes per hour (UCSD Ped2: 10)."),
) -> None:
    """Frame-level AUC (micro over all frames, and per video), the threshold's false alarms (per frame and in episodes, against
    what the calibration promised), and frames per second."""
    from ..video.detector import VideoDetector
    from ..video.evaluate import EpisodePromise, evaluate_videos, read_frame_labels
    from ..video.io import video_name

    if (labels is None) == (not all_normal):
        _fail(ConfigError("give the frame labels JSON, or --all-normal for footage whose every frame is normal (not both)"))
    try:
        det = VideoDetector.load(model_dir)
        gt = read_frame_labels(labels) if labels is not None else None
        predict = None
        if out is not None:  # the outputs are written while each video streams (fps then includes writing them)
            def predict(video):
                return _write_outputs(det, video, out, gt.get(video_name(video)) if gt is not None else None, mp4)[0]
        result = evaluate_videos(det, test_dir, gt, predict=predict)
    except AnomalensError as exc:
        _fail(exc)
    t = Table(title=f"frame-level evaluation, {result['n_frames']} frames")
    for c in ("video", "frames", "abnormal", "frame AUC %", "fps"):
        t.add_column(c)
    for p in result["per_video"]:
        t.add_row(p["video"], str(p["n_frames"]), str(p["n_abnormal"]), _pct(p["frame_auc"]), f"{p['fps']:.1f}")
    t.add_row("all (micro)", str(result["n_frames"]), "", _pct(result["frame_auc_micro"]), f"{result['fps']:.1f}")
    t.add_row("mean (macro)", "", "", _pct(result["frame_auc_macro"]), "")
    out_console.print(t)
    out_console.print(
        f"threshold {result['threshold']:.3f}: {_pct(result['false_alarm_rate'])}% of normal frames flagged "
        f"(target {100 * result['target_false_alarm_rate']:g}%; {_pct(result['false_alarm_rate_far_from_events'])}% of the "
        f"{result['n_normal_far_from_events']} more than {result['event_margin_frames']} frames from an event)"
        + ("" if math.isnan(result["detection_rate"]) else f", {_pct(result['detection_rate'])}% of abnormal frames detected")
    )
    per_k, check = result["false_alarm_episodes_per_1000_normal_frames"], result["episode_promise"]
    hour = f" ({per_k * fps * 3.6:.0f} per hour at {fps:g} fps)" if fps else ""
    out_console.print(
        f"false-alarm episodes (runs of flagged frames with no abnormal frame): {result['false_alarm_episodes']} in "
        f"{result['n_normal_frames']} normal frames, {per_k:.1f} per 1000{hour}"
    )
    promise = EpisodePromise(check["calibration_episodes"], check["calibration_frames"])
    verdict = ("[green]kept[/]" if check["kept"] else
               "[bold red]broken[/]: this footage alarms more often than the normal calibration video did, beyond chance: "
               "normal behaviour the training video did not show, or events (look at the flagged frames; if they are normal, "
               "fit again with this footage)")
    out_console.print(f"promised: {_promise_text(promise, fps)}; {verdict} (p = {check['p_value']:.3f}, "
                      f"{check['expected']:.1f} episodes expected in {check['n_frames']} normal frames)")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        from ..atomic import write_text

        write_text(out / "metrics.json", json.dumps(result, indent=2, default=float))
        console.print(f"wrote {out / 'metrics.json'}")
    if result["errors"]:
        for e in result["errors"]:
            console.print(f"[bold red]error:[/] {escape(e)}", soft_wrap=True)
        raise typer.Exit(code=1)


@video_app.command("synth")
def synth(
    videos: Path = typer.Argument(..., help="Normal videos of the camera (UCSD training/, a folder of frame folders or video files)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write: frames/<video>/NNN.png, frame_labels.json, events.json."),
    kinds: str = typer.Option(",".join(("fast", "cross", "object", "still")), help="Event kinds (fast, cross, object, still), taken in turn across the videos."),
    events_per_video: int = typer.Option(1, help="Events per video (each takes at most half of its share of the frames)."),
    seed: int = typer.Option(0, help="Random seed (same seed, same events)."),
    duration: int = typer.Option(40, help="Frames per event."),
    min_visible: float = typer.Option(0.3, help="A frame is abnormal when at least this fraction of the object is in view (0.01: any part of it)."),
    fade: int = typer.Option(4, help="Frames over which an object appears (unless it enters at the edge) and vanishes; 0: from one frame to the next."),
) -> None:
    """Insert synthetic abnormal events (people too fast or crossing, foreign objects) into normal video, with exact frame labels."""
    from ..video.synthetic import make_synthetic_set

    try:
        labels = make_synthetic_set(videos, out, split_names(kinds), seed=seed, duration=duration, events_per_video=events_per_video, min_visible=min_visible, fade=fade)
    except AnomalensError as exc:
        _fail(exc)
    n = sum(len(v) for v in labels.values())
    a = sum(sum(v) for v in labels.values())
    console.print(f"wrote {len(labels)} video(s), {n} frames, {a} abnormal, to {out}")
    console.print(f"evaluate with: anomalens video evaluate MODEL {out} {out / 'frame_labels.json'}")


def _pct(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{100 * v:.1f}"
