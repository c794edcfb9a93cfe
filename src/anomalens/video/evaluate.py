"""Frame-level evaluation of a video detector against frame labels (UCSD Ped2's ``frame_labels.json``).

Frame AUC as in the literature: the *micro* AUC over the frames of all test videos concatenated
(no per-video score normalisation, which would use the test video's own score range), plus the AUC
of each video (undefined when a video is all normal or all abnormal) and their mean (macro). Also the
threshold's behaviour: the fraction of normal frames flagged (against the target) and of abnormal
frames detected, and the speed in frames per second (reading, flow, backbone, scoring; no outputs).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DatasetError, ModelFileError
from ..metrics import image_auroc
from .base import VideoModel as VideoDetector
from .results import VideoPrediction
from .sources import iter_labelled
from .io import list_videos, video_name


def read_frame_labels(path: str | os.PathLike) -> dict[str, list[int]]:
    """``video id -> list of 0/1 per frame`` (1 = abnormal) from a JSON file.

    Raises:
        DatasetError: unreadable file or wrong structure.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read frame labels {path}: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(x in (0, 1) for x in v) for v in data.values()):
        raise DatasetError(f"{path} must map each video id to a list of 0/1 frame labels")
    return {str(k): [int(x) for x in v] for k, v in data.items()}


def frame_auc(labels, scores) -> float:
    """Frame AUC (fraction) of 0/1 ``labels`` against ``scores`` (sequences of one length); NaN
    when only one class is present."""
    labels = np.asarray(labels)
    return image_auroc(labels, np.asarray(scores)) if 0 < labels.sum() < labels.size else math.nan


def alarm_episodes(flags) -> int:
    """Number of alarm episodes in ``flags`` (``bool`` ``(T,)``, one per frame in order): runs of
    consecutive flagged frames, the alarms an operator sees (a run of 20 flagged frames is one alarm)."""
    f = np.asarray(flags, dtype=bool)
    return int(f[0]) + int(np.count_nonzero(f[1:] & ~f[:-1])) if f.size else 0


def false_alarm_episodes(flags, labels) -> int:
    """Alarm episodes (:func:`alarm_episodes`) of ``flags`` that contain no abnormal frame of ``labels``
    (0/1, same length): the alarms with nothing to find."""
    f = np.asarray(flags, dtype=bool)
    y = np.asarray(labels) == 1
    if not f.any():
        return 0
    starts = f & ~np.concatenate([[False], f[:-1]])  # first frame of each episode
    run = np.cumsum(starts)  # episode id of each flagged frame (1-based)
    return int(starts.sum()) - int(np.unique(run[f & y]).size)


#: frames between an event and the normal frames whose false alarms are counted apart (1.8 s of Ped2 at 10 fps)
EVENT_MARGIN = 18


def _far_from_events(y: np.ndarray, margin: int) -> np.ndarray:
    """``bool`` ``(T,)``: normal frames more than ``margin`` frames from every abnormal frame."""
    ab = np.flatnonzero(y == 1)
    if ab.size == 0:
        return y == 0
    idx = np.arange(y.size)
    pos = np.clip(np.searchsorted(ab, idx), 1, ab.size) - 1
    dist = np.minimum(np.abs(idx - ab[pos]), np.abs(idx - ab[np.minimum(pos + 1, ab.size - 1)]))
    return (y == 0) & (dist > margin)


def _calibration_runs(detector: VideoDetector) -> list[np.ndarray]:
    """The calibration frame scores, ``float`` ``(T_i,)`` per calibration video or part, in video order.

    Raises:
        ModelFileError: the model's record of its calibration parts does not match its scores.
    """
    scores = detector.calibration.scores  # type: ignore[union-attr]
    lengths = detector.fit_info.get("calibration_part_frames")
    if not lengths or sum(lengths) != scores.size:
        raise ModelFileError(f"the model's calibration parts ({lengths}) do not match its {scores.size} calibration scores: re-fit it")
    return np.split(scores, np.cumsum(lengths)[:-1])


@dataclass(frozen=True)
class EpisodePromise:
    """What a video threshold promises on new normal footage of the camera, counted in alarm episodes.

    Frames of one video are correlated: a passer-by who looks unusual is flagged for several frames
    in a row, so a per-frame false-alarm rate is kept only approximately on new video (the flagged
    frames come in runs). What an operator sees, and what is promised instead, is the number of
    alarm episodes (runs of flagged frames, :func:`alarm_episodes`) per 1000 frames of normal
    footage: the count on the calibration frames (normal video, each frame scored against memories
    that did not see it) at the model's threshold, with a one-sided exact Poisson upper confidence
    bound for the few episodes it rests on (Garwood 1936). :meth:`check` tests observed footage
    against it.

    Attributes:
        episodes: alarm episodes in the calibration frames (counted per calibration video or part).
        frames: calibration frames.
    """

    episodes: int
    frames: int

    @classmethod
    def of(cls, detector: VideoDetector) -> "EpisodePromise":
        """The promise of a fitted detector (its calibration scores at its threshold).

        Raises:
            NotFittedError: the detector is not fitted.
            ModelFileError: its record of calibration parts does not match its calibration scores.
        """
        detector.threshold  # raises NotFittedError when not fitted
        runs = _calibration_runs(detector)
        return cls(sum(alarm_episodes(r > detector.threshold) for r in runs), int(sum(r.size for r in runs)))

    @property
    def per_1000(self) -> float:
        """Expected alarm episodes per 1000 frames of normal footage (the calibration rate)."""
        return 1000 * self.episodes / max(1, self.frames)

    def upper_per_1000(self, confidence: float = 0.95) -> float:
        """One-sided upper ``confidence`` bound of the episode rate, per 1000 frames (exact Poisson:
        ``chi2.ppf(confidence, 2 (episodes + 1)) / 2`` episodes; 3.0 for none seen at 95%)."""
        from scipy.stats import chi2

        return 1000 * float(chi2.ppf(confidence, 2 * (self.episodes + 1))) / 2 / max(1, self.frames)

    def per_hour(self, fps: float) -> float:
        """:attr:`per_1000` in episodes per hour of footage at ``fps`` frames per second."""
        return self.per_1000 * fps * 3.6

    def check(self, observed: int, n_frames: int, confidence: float = 0.95) -> dict:
        """Does footage with ``observed`` alarm episodes in ``n_frames`` normal frames keep the promise?

        The exact conditional test of two Poisson rates (Przyborowski & Wilenski 1940): if the
        footage had the calibration's episode rate, then of the ``observed + episodes`` episodes in
        both, the footage's number is binomial with ``p = n_frames / (n_frames + frames)``. ``p_value``
        is the chance of ``observed`` or more; the promise is broken when it is below
        ``1 - confidence`` (the footage alarms more often than the calibration video did, beyond
        what its few episodes explain: normal behaviour the training video did not show).

        Returns:
            ``{"observed", "n_frames", "observed_per_1000", "expected" (episodes at the calibration
            rate), "per_1000", "upper_per_1000", "p_value", "kept" (bool)}``.
        """
        from scipy.stats import binom

        total = observed + self.episodes
        share = n_frames / max(1, n_frames + self.frames)
        p = float(binom.sf(observed - 1, total, share)) if observed > 0 else 1.0
        return {
            "observed": int(observed), "n_frames": int(n_frames), "observed_per_1000": 1000 * observed / max(1, n_frames),
            "expected": self.per_1000 * n_frames / 1000, "per_1000": self.per_1000, "upper_per_1000": self.upper_per_1000(confidence),
            "calibration_episodes": self.episodes, "calibration_frames": self.frames, "p_value": p, "kept": p >= 1 - confidence,
        }


def calibration_episode_rate(detector: VideoDetector) -> float:
    """Alarm episodes per 1000 frames of the detector's calibration frames (normal video, each scored
    against memories that did not see it) at its threshold: :attr:`EpisodePromise.per_1000`."""
    return EpisodePromise.of(detector).per_1000


def evaluate_videos(
    detector: VideoDetector,
    test_dir: str | os.PathLike,
    labels: dict[str, list[int]] | None,
    predict: Callable[[Path], VideoPrediction] | None = None,
) -> dict:
    """Predict every labelled test video and compute the frame metrics.

    Args:
        detector: a fitted detector.
        test_dir: test videos (:func:`~anomalens.video.io.list_videos` layouts, e.g. UCSD ``testing/``).
        labels: frame labels by video name (:func:`read_frame_labels`); ``None``: every frame of every
            video is normal (new normal footage, to check the threshold's promise on it).
        predict: how to predict one video (e.g. also writing its outputs); default ``detector.predict``.

    Returns:
        ``{"frame_auc_micro", "frame_auc_macro", "per_video": [...], "n_frames", "fps",
        "false_alarm_rate" (normal frames flagged), "target_false_alarm_rate", "detection_rate",
        "false_alarm_rate_far_from_events" (normal frames more than ``event_margin_frames`` =
        :data:`EVENT_MARGIN` frames, or twice the smoothing delay if more, from any abnormal frame:
        what is left once the smoothing's bleed and the labels' boundaries are set aside),
        "n_normal_frames", "false_alarm_episodes" (runs of flagged frames without an abnormal frame:
        :func:`false_alarm_episodes`), "false_alarm_episodes_per_1000_normal_frames",
        "calibration_episodes_per_1000_frames" (:func:`calibration_episode_rate`: what the normal
        calibration video showed at the same threshold), "episode_promise" (:meth:`EpisodePromise.check`
        of the false-alarm episodes in the normal frames), "errors": [...]}``; AUCs and rates are
        fractions (AUCs NaN without both classes).

    Raises:
        DatasetError: no videos, a video without labels, or labels of another length than the video.
    """
    all_s, all_y, all_far, per, errors = [], [], [], [], []
    episodes = 0
    margin = max(EVENT_MARGIN, 2 * detector.delay)
    seconds = 0.0
    videos = list_videos(test_dir)
    pairs = iter_labelled(videos, labels) if labels is not None else ((v, None) for v in videos)
    for video, y in pairs:
        pred = (predict or detector.predict)(video)
        n = pred.n_frames
        y_arr = np.asarray(y if y is not None else [0] * n, dtype=np.int64)
        if pred.error is None and n != y_arr.size:
            raise DatasetError(f"video {video_name(video)} has {n} frames but {y_arr.size} labels")
        if pred.error is not None:
            errors.append(pred.error)
        y_arr = y_arr[:n]
        seconds += pred.seconds
        all_s.append(pred.pred_scores)
        all_y.append(y_arr)
        all_far.append(_far_from_events(y_arr, margin))
        episodes += false_alarm_episodes(pred.pred_scores > detector.threshold, y_arr)
        per.append({
            "video": video_name(video), "n_frames": n, "n_abnormal": int(y_arr.sum()), "frame_auc": frame_auc(y_arr, pred.pred_scores),
            "fps": pred.fps, "error": pred.error,
        })
    s, y, far = np.concatenate(all_s), np.concatenate(all_y), np.concatenate(all_far)
    macro = [p["frame_auc"] for p in per if not math.isnan(p["frame_auc"])]
    flagged = s > detector.threshold
    n_normal = int((y == 0).sum())
    return {
        "frame_auc_micro": frame_auc(y, s),
        "frame_auc_macro": float(np.mean(macro)) if macro else math.nan,
        "per_video": per,
        "n_frames": int(s.size),
        "fps": s.size / seconds if seconds > 0 else math.nan,
        "threshold": detector.threshold,
        "target_false_alarm_rate": detector.false_alarm_rate,
        "false_alarm_rate": float(flagged[y == 0].mean()) if (y == 0).any() else math.nan,
        "detection_rate": float(flagged[y == 1].mean()) if (y == 1).any() else math.nan,
        "event_margin_frames": margin,
        "n_normal_far_from_events": int(far.sum()),
        "false_alarm_rate_far_from_events": float(flagged[far].mean()) if far.any() else math.nan,
        "n_normal_frames": n_normal,
        "false_alarm_episodes": episodes,
        "false_alarm_episodes_per_1000_normal_frames": 1000 * episodes / max(1, n_normal),
        "calibration_episodes_per_1000_frames": calibration_episode_rate(detector),
        "episode_promise": EpisodePromise.of(detector).check(episodes, n_normal),
        "errors": errors,
    }
