"""Fitting and calibrating the cell-level detector (:class:`~anomalens.video.cells.CellVideoDetector`).

Calibration (cross-fit): the normal training videos are split into groups; each group is
scored against memories built from the others, so every training frame is a calibration frame and the
final memories still hold every video. The part scales and the thresholds come from those scores:
by default the lowest threshold with at most ``alarms_per_hour`` false-alarm episodes per hour of
that footage (:func:`~anomalens.video.alarm.episode_threshold`, as the object method's); with a
per-frame ``false_alarm_rate`` given, split-conformal at it (frames of a video are correlated, so
that guarantee holds per frame only approximately).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import torch

from ..calibration import Calibration
from ..errors import DatasetError
from ..knn import NearestNeighbours
from ..sampler import greedy_coreset
from .alarm import episode_threshold
from .io import as_videos, iter_frames, video_fps, video_name
from .motion import per_cell_memory
from .smoothing import TemporalSmoother
from .sources import Progress, Rows, fold_groups, no_progress, split_units

if TYPE_CHECKING:
    from .cells import CellVideoDetector


def _memories(det: "CellVideoDetector", motion: list[torch.Tensor], feats: list[torch.Tensor], progress: Progress, stage: str = "coreset") -> tuple:
    """``(motion_bank (cells, k, bins) | None, appearance bank (M, D) | None)`` from training parts."""
    mb = per_cell_memory(torch.stack(motion), det.motion_memory) if det.motion else None
    ab = None
    if det.appearance:
        x = torch.stack(feats)
        n, d, h, w = x.shape
        flat = x.permute(0, 2, 3, 1).reshape(-1, d)
        n_sel = max(1, int(round(det.coreset_ratio * flat.shape[0])))
        idx = greedy_coreset(flat, n_sel, projection_dim=128, progress=lambda a, b: progress(stage, a, b))
        ab = flat[idx].clone()
    return mb, ab


def _squares(bank: torch.Tensor | None) -> torch.Tensor | None:
    return None if bank is None else (bank * bank).sum(-1)


def fit_cells(det: "CellVideoDetector", videos: str | os.PathLike | Sequence[str | os.PathLike], progress: Progress | None = None) -> "CellVideoDetector":
    """Learn normal appearance and motion from normal videos of one fixed camera, and calibrate.

    Every frame is read twice: once for the memories (optical flow of every frame; appearance features
    of every ``appearance_step``-th), once to score the calibration frames against the memories that
    did not see them.

    Args:
        videos: a folder (see :func:`~anomalens.video.io.list_videos`) or a list of videos.
        progress: optional ``progress(stage, done, total)``; stages ``"frames"``, ``"coreset"``,
            ``"fold j/n coreset"``, ``"calibration"``.

    Returns:
        ``det``, fitted.

    Raises:
        DatasetError: no video, or a single one too short.
        VideoReadError: a training video cannot be read to its end.
        CalibrationError: too few calibration frames for ``false_alarm_rate`` (or none).
    """
    progress = progress or no_progress
    vids = as_videos(videos)
    if not vids:
        raise DatasetError("no training videos given")
    units = split_units(vids, det.folds)
    groups = fold_groups(len(units), det.folds, det.seed)
    first = next(iter_frames(vids[0]))[1]
    det._set_work_size(*first.shape[:2])
    t0 = time.perf_counter()
    mdescs: list[list[torch.Tensor | None]] = []
    feats: list[list[torch.Tensor]] = []
    mstore, fstore = Rows(), Rows(16)
    for k, seg in enumerate(units):
        md, ft = [], []
        for i, frame, mdesc, _ in det._raw_parts(seg, with_features=False):
            md.append(None if mdesc is None else mstore.append(mdesc))
            if det.appearance and (i - seg.start) % det.appearance_step == 0:
                ft.append(fstore.append(det._features(frame)))
        mdescs.append(md)
        feats.append(ft)
        progress("frames", k + 1, len(units))
    t1 = time.perf_counter()

    def parts(ids: Iterable[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ids = list(ids)
        # (a unit's first frame is left out: its flow, if any, comes from before the unit)
        m = [d for u in ids for j, d in enumerate(mdescs[u]) if d is not None and j > 0 and j % det.motion_step == 0]
        return m, [f for u in ids for f in feats[u]]

    motion, app = parts(range(len(units)))  # the final memories hold every unit; each fold's leave one group out
    det.motion_bank, det.appearance_bank = _memories(det, motion, app, progress)
    det._motion_sq = _squares(det.motion_bank)
    det._nn = NearestNeighbours(det.appearance_bank, "faiss") if det.appearance_bank is not None else None
    t2 = time.perf_counter()
    grids: list[list] = []
    gstore = Rows()
    for gi, g in enumerate(groups):
        mb, ab = _memories(det, *parts(u for u in range(len(units)) if u not in g), progress, stage=f"fold {gi + 1}/{len(groups)} coreset")
        mem = (mb, _squares(mb), NearestNeighbours(ab, "faiss") if ab is not None else None)
        for u in g:
            rows = []
            for j, (i, frame) in enumerate(units[u].frames()):
                ft = None
                if det.appearance:  # every step-th frame's features were computed in the first pass
                    ft = feats[u][j // det.appearance_step] if j % det.appearance_step == 0 else det._features(frame)
                m, a = det._part_grids(mdescs[u][j], ft, mem)
                rows.append((gstore.append(m), gstore.append(a), frame.shape[:2]))
            grids.append(rows)
            progress("calibration", len(grids), len(units))
    det.calibration = None
    det.fps = det.fps or video_fps(vids[0])
    _calibrate(det, grids, len(units))
    t3 = time.perf_counter()
    det.fit_info = {
        "train_videos": [str(u) for u in units],
        "folds": [[video_name(units[u].video) for u in g] for g in groups],
        "n_train_frames": sum(len(m) for m in mdescs), "n_motion_frames": len(motion), "n_appearance_frames": len(app),
        "n_calibration_frames": sum(len(g) for g in grids),
        "calibration_part_frames": [len(g) for g in grids],  # in the order of calibration.scores (episodes count per part)
        "work_hw": list(det.work_hw), "grid": list(det.grid),
        "seconds_frames": round(t1 - t0, 2), "seconds_memory": round(t2 - t1, 2), "seconds_calibration": round(t3 - t2, 2),
        "seconds_total": round(t3 - t0, 2),
    }
    return det


def _calibrate(det: "CellVideoDetector", grids: list[list], n_parts: int) -> None:
    """Part scales, then split-conformal frame and pixel thresholds, from the raw part grids (per
    calibration video or part: a list of ``(motion, appearance, frame hw)``)."""
    from .cells import SCALE_QUANTILE

    allm = [float(m.max()) for g in grids for m, _, _ in g]
    alla = [float(a.max()) for g in grids for _, a, _ in g]
    det.scales = (max(float(np.quantile(allm, SCALE_QUANTILE)), 1e-3) if det.motion else 1.0,
                  max(float(np.quantile(alla, SCALE_QUANTILE)), 1e-6) if det.appearance else 1.0)
    runs, maxima = [], []
    for g in grids:
        raw = []
        for m, a, hw in g:
            total, _, _, _ = det._combine(m, a)
            raw.append(float(total.max()))
            maxima.append(float(det._map(total, hw).max()))
        sm = TemporalSmoother(det.temporal_sigma)
        runs.append(np.array([v for s in raw for _, v in sm.push(s)] + [v for _, v in sm.flush()]))
    scores = np.concatenate(runs)
    how = "each scored against memories fitted without it"
    if det.target_false_alarm_rate is None:  # the episode promise (alarm.py), as the object method's
        _, det.false_alarm_rate, episodes = episode_threshold(runs, det.fps, det.alarms_per_hour)
        det.calibration = Calibration.from_scores(scores, np.array(maxima), det.false_alarm_rate, "held-out")
        det.calibration.note = (
            f"lowest threshold with at most {det.alarms_per_hour:g} false-alarm episodes per hour on {scores.size / det.fps / 60:.1f} min "
            f"of normal footage ({scores.size} frames at {det.fps:g} fps of {n_parts} video(s) or parts, {how}): {episodes} episodes"
        )
        return
    det.calibration = Calibration.from_scores(scores, np.array(maxima), det.false_alarm_rate, "held-out")
    det.calibration.note = (
        f"conformal at false-alarm rate {det.false_alarm_rate:g} over {scores.size} frames of {n_parts} normal "
        f"video(s) or parts, {how}; frames of a video are correlated, so the rate holds per frame only approximately"
    )
