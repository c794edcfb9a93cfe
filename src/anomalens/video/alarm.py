"""The alarm promise: a frame threshold set for a number of false-alarm *episodes* per hour of normal
footage, not a fraction of frames.

An operator sees episodes (runs of flagged frames), not frames: a passer-by who looks unusual for a
second flags ten frames at 10 fps and is one alarm. So the threshold is the lowest one at which the
calibration footage (normal video, every frame scored by a model that did not see it: cross-fit)
shows at most ``alarms_per_hour x hours of calibration footage`` episodes. With little footage (UCSD
Ped2's sixteen training videos are 4.3 minutes at 10 fps) that allows no episode at all, and the
threshold is the highest calibration score; the promise that can then be *stated* is the exact
Poisson upper bound for zero episodes in that footage (3 episodes in 4.3 minutes at 95%: 42 per hour),
and it narrows only with more normal footage (3 hours without an episode support 1 per hour).
A per-frame target (1% of frames) would allow 360 flagged frames an hour at 10 fps, that is tens
of episodes an hour: it is what the cell detector promised before, and what a control room refused.
Both video methods use this threshold by default; the cells still take a per-frame target when one
is given (``false_alarm_rate``).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import CalibrationError, ConfigError
from .evaluate import alarm_episodes

#: default target: false-alarm episodes per hour of normal footage, per camera
ALARMS_PER_HOUR = 1.0


def episode_threshold(runs: list[np.ndarray], fps: float, alarms_per_hour: float) -> tuple[float, float, int]:
    """The lowest calibration score usable as a threshold whose episodes on ``runs`` stay within the target.

    Args:
        runs: smoothed frame scores ``(T_i,)`` of each calibration video or part, in frame order.
        fps: frames per second of the footage.
        alarms_per_hour: target false-alarm episodes per hour (> 0).

    Returns:
        ``(threshold, alpha, episodes)``: ``pred_label = score > threshold``; ``alpha`` the per-frame
        rate whose conformal threshold (:func:`anomalens.calibration.conformal_threshold`) over the
        concatenated runs is exactly ``threshold``; the episodes at it.

    Raises:
        ConfigError: ``fps`` or ``alarms_per_hour`` not positive.
        CalibrationError: no calibration frames.
    """
    if not (fps > 0 and alarms_per_hour > 0):
        raise ConfigError(f"fps and alarms_per_hour must be > 0, got {fps} and {alarms_per_hour}")
    scores = np.sort(np.concatenate(runs)) if runs else np.zeros(0)
    n = scores.size
    if n == 0:
        raise CalibrationError("no calibration frames to set the threshold on")
    allowed = math.floor(alarms_per_hour * n / fps / 3600.0)
    lo, hi = 0, n - 1  # the lowest rank whose threshold keeps the episodes within `allowed`
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(alarm_episodes(r > scores[mid]) for r in runs) <= allowed:
            hi = mid
        else:
            lo = mid + 1
    rank = lo + 1  # 1-based
    alpha = 1.0 - rank / (n + 1)
    return float(scores[lo]), alpha, int(sum(alarm_episodes(r > scores[lo]) for r in runs))
