"""What `anomalens video predict` writes: frame scores as CSV, per-object rows as CSV (object
detector), the score curve as PNG, and an annotated MP4 (heatmap, outline of the abnormal region,
object boxes with their cause, score and decision on every frame, and the score curve so far along
the bottom), written frame by frame as the stream is scored.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import cv2
import numpy as np

from ..atomic import publish, write_bytes, write_text
from ..errors import ConfigError
from ..visualize import overlay
from .results import FramePrediction, VideoPrediction

CSV_FIELDS = ("frame", "pred_score", "raw_score", "pred_label", "cause", "motion_score", "appearance_score", "anomalous_area_pct", "gt_label")


def write_frame_csv(pred: VideoPrediction, path: str | os.PathLike, labels: list[int] | None = None) -> Path:
    """One row per frame: ``frame, pred_score, raw_score, pred_label, cause, motion_score,
    appearance_score, anomalous_area_pct, gt_label`` (empty when unknown). Written atomically."""
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(CSV_FIELDS)
    for i in range(pred.n_frames):
        gt = labels[i] if labels is not None and i < len(labels) else ""
        w.writerow([i, f"{pred.pred_scores[i]:.5f}", f"{pred.raw_scores[i]:.5f}", int(pred.pred_labels[i]), pred.causes[i],
                    _num(pred.motion_scores[i]), _num(pred.appearance_scores[i]), f"{pred.anomalous_area_pct[i]:.3f}", gt])
    return write_text(path, f.getvalue())


class ObjectRowsWriter:
    """Per-object rows of a streamed prediction, written as one CSV (atomically) at :meth:`close`.

    Columns: ``frame, track, x0, y0, x1, y1, score, cause, pred_label`` (the frame's decision) and one
    column per attribute score (``speed``, ``size``, ``appearance``; empty when the model does not
    score it). Boxes are in the frame's pixels (``x1``, ``y1`` exclusive); scores are in units of normal
    objects (:class:`~anomalens.video.density.AttributeDensity`: by default 0 is the least and 1 the
    most unusual cross-fitted normal training object, per attribute).
    """

    FIELDS = ("frame", "track", "x0", "y0", "x1", "y1", "score", "cause", "pred_label", "speed", "size", "appearance")

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._rows: list[str] = [",".join(self.FIELDS)]

    def write(self, fp: FramePrediction) -> None:
        """Add the objects of one frame."""
        for o in fp.objects:
            att = [f"{o.scores[a]:.4f}" if a in o.scores else "" for a in ("speed", "size", "appearance")]
            self._rows.append(",".join([str(fp.index), str(o.track), *map(str, o.box), f"{o.score:.4f}", o.cause, str(fp.pred_label), *att]))

    @property
    def n_rows(self) -> int:
        return len(self._rows) - 1

    def close(self) -> Path:
        """Write the CSV (atomically); returns its path."""
        return write_text(self.path, "\n".join(self._rows) + "\n")


def draw_objects(image: np.ndarray, fp: FramePrediction, threshold: float) -> np.ndarray:
    """A copy of ``image`` (``uint8`` RGB) with the frame's object boxes: red with ``cause score`` for
    objects scoring above ``threshold``, thin grey for the others."""
    out = np.array(image, copy=True)
    for o in reversed(fp.objects):  # the most abnormal drawn last, on top
        x0, y0, x1, y1 = o.box
        if o.score > threshold:
            cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (255, 40, 40), 2)
            cv2.putText(out, f"{o.cause} {o.score:.1f}", (x0, max(10, y0 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
        else:
            cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (170, 170, 170), 1)
    return out


def _num(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.5f}"


def plot_scores(pred: VideoPrediction, path: str | os.PathLike, labels: list[int] | None = None, fps: float | None = None) -> Path:
    """Score over time: smoothed and raw frame scores, the threshold, frames flagged, and the ground
    truth's abnormal frames shaded when ``labels`` are given. Time in seconds when ``fps`` is given.
    Written atomically, in the format of ``path``'s extension (PNG by default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(pred.n_frames) / (fps or 1.0)
    fig, ax = plt.subplots(figsize=(10, 3.2), dpi=110)
    if labels is not None:
        y = np.asarray(labels[: pred.n_frames])
        ax.fill_between(t[: y.size], 0, 1, where=y == 1, transform=ax.get_xaxis_transform(), color="tab:red", alpha=0.12, label="abnormal (ground truth)")
    ax.plot(t, pred.raw_scores, color="0.7", lw=0.8, label="frame score")
    ax.plot(t, pred.pred_scores, color="tab:blue", lw=1.6, label="smoothed score")
    ax.axhline(pred.threshold, color="tab:red", ls="--", lw=1, label=f"threshold {pred.threshold:.2f}")
    flagged = pred.pred_labels == 1
    ax.plot(t[flagged], np.full(flagged.sum(), ax.get_ylim()[0]), "|", color="tab:red", ms=8, label="flagged")
    ax.set_xlabel("time (s)" if fps else "frame")
    ax.set_ylabel("score (x normal)")
    title = Path(pred.video).name + (f"  -  stopped early: {pred.error}" if pred.error else "")
    ax.set_title(title[:120], fontsize=9)
    ax.legend(fontsize=7, loc="upper left", ncol=3)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=path.suffix[1:].lower() or None)  # the format savefig(path) would pick
    finally:
        plt.close(fig)
    return write_bytes(path, buf.getvalue())


class AnnotatedVideoWriter:
    """Write frames with their heatmap, decision and score curve to an MP4 (``mp4v``), one at a time.

    Frames go to a hidden temporary file beside ``path`` (``.NAME.partial.mp4``: same extension, so
    the encoder picks the same container), renamed onto ``path`` by :meth:`close`: a killed or
    interrupted run never leaves a truncated ``path`` (an old one stays whole; :meth:`abort`). Always
    close or abort it (as a context manager: closed, or aborted when an exception passes).

    Args:
        path: output ``.mp4``.
        fps: frame rate of the output.
        threshold, pixel_threshold: the model's (colours and the curve's threshold line).
        curve_frames: frames of history in the score strip at the bottom.

    Raises:
        ConfigError: OpenCV cannot write the file.
    """

    def __init__(self, path: str | os.PathLike, fps: float, threshold: float, pixel_threshold: float, curve_frames: int = 200):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.partial{self.path.suffix}")
        self.fps = float(fps)
        self.threshold = float(threshold)
        self.pixel_threshold = float(pixel_threshold)
        self.curve_frames = int(curve_frames)
        self._history: list[float] = []
        self._writer: cv2.VideoWriter | None = None
        self.n_frames = 0

    def write(self, fp: FramePrediction) -> None:
        """Add one frame (``fp.image`` must be set: predict with ``keep_frames=True``)."""
        if fp.image is None:
            raise ConfigError("the annotated video needs the frames: predict with keep_frames=True")
        self._history.append(fp.pred_score)
        caption = f"frame {fp.index}  {'ABNORMAL' if fp.pred_label else 'normal'}  score {fp.pred_score:.2f}"
        if fp.pred_label and fp.cause:
            caption += f"  ({fp.cause})"
        image = draw_objects(fp.image, fp, self.threshold) if fp.objects else fp.image
        top = overlay(image, fp.anomaly_map, pixel_threshold=self.pixel_threshold, mask=fp.pred_mask, caption=caption)
        frame = np.concatenate([top, self._strip(fp.image.shape[1])], axis=0)
        if self._writer is None:
            h, w = frame.shape[:2]
            self._writer = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not self._writer.isOpened():
                self._writer = None
                self._tmp.unlink(missing_ok=True)
                raise ConfigError(f"OpenCV cannot write the video {self.path}")
        self._writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        self.n_frames += 1

    def _strip(self, width: int, height: int = 60) -> np.ndarray:
        """The score curve of the last ``curve_frames`` frames, threshold in red, on a dark strip."""
        strip = np.full((height, width, 3), 24, np.uint8)
        hist = np.asarray(self._history[-self.curve_frames :])
        top = max(float(hist.max()), 1.5 * self.threshold, 1e-6)
        ys = (height - 4 - (hist / top) * (height - 8)).astype(np.int32)
        xs = (np.arange(hist.size) * (width - 1) / max(1, self.curve_frames - 1)).astype(np.int32)
        ty = int(height - 4 - self.threshold / top * (height - 8))
        cv2.line(strip, (0, ty), (width - 1, ty), (220, 60, 60), 1)
        if hist.size > 1:
            cv2.polylines(strip, [np.stack([xs, ys], 1)], False, (90, 170, 255), 1, cv2.LINE_AA)
        cv2.circle(strip, (int(xs[-1]), int(ys[-1])), 3, (255, 80, 80) if hist[-1] > self.threshold else (90, 170, 255), -1)
        return strip

    def close(self) -> Path:
        """Finish the video and rename it onto ``path`` (nothing is written when no frame was)."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
            publish(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the frames written so far: ``path`` is left as it was (absent, or an older video)."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "AnnotatedVideoWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
