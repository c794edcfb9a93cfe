"""The ways :meth:`~anomalens.detectors.base.Detector.fit` can learn from normal images, one small
function each.

============  ==============================================  ==========================================
mode          learns from                                     calibrates on (see :mod:`anomalens.calibration`)
============  ==============================================  ==========================================
``full``      every image (memory bank: coreset)              out-of-sample scores of the same images
``holdout``   a random part of the images                     the rest: split conformal, exact guarantee
``few-shot``  ``shots`` images and their augmented views,     leave-one-shot-out scores (rate
              every patch kept                                ``1 / (shots + 1)`` at best)
``batch``     one image (``shots=1``, or a single image)      nothing: each predicted batch sets its
                                                              own thresholds
============  ==============================================  ==========================================
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..augment import apply_view, check_augment
from ..calibration import BATCH_Z, MIN_BATCH, Calibration, supported_false_alarm_rate
from ..errors import CalibrationError, ConfigError, DatasetError
from ..inference import Progress
from ..io import to_rgb_array
from .engine import score_images


@dataclass
class FitPlan:
    """What one fit learns from and calibrates on.

    Attributes:
        mode: ``"full"``, ``"holdout"``, ``"few-shot"`` or ``"batch"`` (module docstring).
        images: the images to learn from.
        held: held-out normal images to calibrate on (``holdout`` mode).
        views: augmented views of each image in the bank (few-shot; ``("id",)`` otherwise).
        groups: few-shot: ``int64`` ``(len(images) * len(views),)``, the source image of each view.
    """

    mode: str
    images: list
    held: list
    views: tuple[str, ...] = ("id",)
    groups: torch.Tensor | None = None

    @property
    def keep_all(self) -> bool:
        """Keep every patch in the bank (no coreset): few images."""
        return self.mode in ("few-shot", "batch")

    @property
    def n_calibration(self) -> int:
        """Normal images whose out-of-sample scores set the threshold."""
        return {"holdout": len(self.held), "batch": 0}.get(self.mode, len(self.images))


def plan_fit(images: list, *, holdout: float, seed: int, shots: int | None, augment: str, few_shot_ok: bool) -> FitPlan:
    """Choose the fit mode and draw its images (arguments as in :meth:`Detector.fit`).

    Raises:
        DatasetError: no images. ConfigError: invalid ``holdout``, ``shots`` or ``augment``.
        CalibrationError: a hold-out that leaves nothing to fit on.
    """
    if not images:
        raise DatasetError("no training images given")
    if not 0.0 <= holdout < 1.0:
        raise ConfigError(f"holdout must be in [0, 1), got {holdout}")
    views = check_augment(augment)
    if shots is not None:
        return _plan_few_shot(images, shots, seed, views, holdout, few_shot_ok)
    if augment != "none":
        raise ConfigError("augment applies to few-shot fitting: give shots as well")
    if holdout > 0:
        return _plan_holdout(images, holdout, seed)
    if len(images) == 1:
        return FitPlan("batch", images, [])
    return FitPlan("full", images, [])


def _plan_few_shot(images: list, shots: int, seed: int, views: tuple[str, ...], holdout: float, few_shot_ok: bool) -> FitPlan:
    if not few_shot_ok:
        raise ConfigError("this detector has no memory bank to fit from a few shots; use PatchCore")
    if holdout:
        raise ConfigError("few-shot fitting (shots) and holdout exclude each other: calibrate later with new normal images")
    if not 1 <= shots <= len(images):
        raise ConfigError(f"shots must be in [1, {len(images)}] (the images given), got {shots}")
    pick = np.random.default_rng(seed).choice(len(images), size=shots, replace=False) if shots < len(images) else np.arange(shots)
    chosen = [images[i] for i in sorted(pick)]
    groups = torch.arange(shots).repeat_interleave(len(views))
    return FitPlan("batch" if shots == 1 else "few-shot", chosen, [], views, groups)


def _plan_holdout(images: list, holdout: float, seed: int) -> FitPlan:
    n_held = int(round(holdout * len(images)))
    if n_held < 1:
        raise CalibrationError(f"holdout {holdout} of {len(images)} images holds out no image")
    if n_held >= len(images):
        raise CalibrationError(f"holdout {holdout} of {len(images)} images leaves none to fit on")
    perm = np.random.default_rng(seed).permutation(len(images))
    held = [images[i] for i in sorted(perm[:n_held])]
    return FitPlan("holdout", [images[i] for i in sorted(perm[n_held:])], held)


def target_false_alarm_rate(plan: FitPlan, requested: float | None) -> tuple[float, str]:
    """The false-alarm rate this plan's calibration supports, and a note when it is not the one asked
    for (:func:`~anomalens.calibration.supported_false_alarm_rate`; few-shot is never strict). Checked
    before any work.

    Raises:
        CalibrationError: a rate asked for explicitly that the calibration images cannot support.
    """
    if plan.mode == "batch":
        if requested is not None and len(plan.images) == 1 and plan.groups is None:
            supported_false_alarm_rate(0, requested)  # one image and an explicit rate: say what it needs
        return float("nan"), ""
    return supported_false_alarm_rate(plan.n_calibration, requested, strict=False if plan.mode == "few-shot" else None)


def batch_calibration() -> Calibration:
    """The calibration of a one-image model: thresholds set by each predicted batch."""
    return Calibration.batch_relative(
        "one normal image gives no out-of-sample score: each predicted batch of at least "
        f"{MIN_BATCH} images sets its own thresholds (median + {BATCH_Z:g} robust SD); no false-alarm guarantee"
    )


def finish_calibration(scores: np.ndarray, maxima: np.ndarray, alpha: float, source: str, note: str) -> Calibration:
    """Conformal thresholds at ``alpha`` from out-of-sample scores; ``note`` (a relaxed rate) is kept."""
    cal = Calibration.from_scores(scores, maxima, alpha, source)
    if note:
        cal.note = f"{note} ({np.asarray(scores).size} {source} normal scores)"
    return cal


def resolve_augment(det, shots: int | None, augment: str | None) -> str:
    """The augmentation a fit uses: ``augment`` as given, or for None the detector's
    ``default_augment`` with ``shots`` and ``"none"`` without."""
    if augment is not None:
        return augment
    return det.default_augment if shots is not None else "none"


def fit_detector(det, images: list, progress: Progress, *, holdout: float, seed: int, shots: int | None, augment: str | None):
    """:meth:`Detector.fit <anomalens.detectors.base.Detector.fit>`: plan, extract, learn, calibrate.

    The false-alarm rate is settled (and an explicit one the images cannot support refused) before
    any feature is extracted. ``augment``: see :func:`resolve_augment`.
    """
    augment = resolve_augment(det, shots, augment)
    plan = plan_fit(images, holdout=holdout, seed=seed, shots=shots, augment=augment, few_shot_ok=det.supports_few_shot)
    alpha, note = target_false_alarm_rate(plan, det.requested_false_alarm_rate)
    det.train_images = [os.path.abspath(x) if isinstance(x, (str, os.PathLike)) else None for x in plan.images]
    det.train_views = list(plan.views)
    t0 = time.perf_counter()
    features = training_features(det, plan.images, plan.views, progress)
    t1 = time.perf_counter()
    with torch.inference_mode():
        det._fit_features(features, progress, keep_all=plan.keep_all, groups=plan.groups)
        t2 = time.perf_counter()
        det.calibration = fit_calibration(det, plan, features, alpha, note, progress)
    t3 = time.perf_counter()
    if not det.calibration.is_batch_relative:
        det.false_alarm_rate = alpha
    det.fit_info = {
        "mode": plan.mode,
        "n_train_images": len(plan.images),
        "n_calibration_images": int(det.calibration.scores.size),
        "calibration_source": det.calibration.source,
        "image_sizes": list(det.image_sizes),
        "feature_dim": int(features[-1][0].shape[0]),
        "grid": list(features[-1][0].shape[-2:]),
        "seconds_features": round(t1 - t0, 3),
        "seconds_fit": round(t2 - t1, 3),
        "seconds_calibration": round(t3 - t2, 3),
        "seconds_total": round(t3 - t0, 3),
    }
    if shots is not None:
        det.fit_info.update(shots=int(shots), augment=augment, seed=int(seed))
    return det


def training_features(det, images: list, views: Sequence[str], progress: Progress) -> list[list[torch.Tensor]]:
    """Features ``[scale][image * len(views) + view]`` of every view of every training image.

    Raises:
        ImageReadError: a training image cannot be read (the message names it).
    """
    feats: list[list[torch.Tensor]] = [[] for _ in det.image_sizes]
    for s in range(0, len(images), det.batch_size):
        batch = [to_rgb_array(img) for img in images[s : s + det.batch_size]]
        if s == 0:
            det._start_fit(batch[0].shape[:2])
        if len(views) > 1:
            batch = [apply_view(img, v) for img in batch for v in views]
        for k, f in enumerate(det.extract(batch)):
            feats[k].extend(f)
        progress("features", min(len(images), s + det.batch_size), len(images))
    return feats


def fit_calibration(det, plan: FitPlan, features: list, alpha: float, note: str, progress: Progress) -> Calibration:
    """The calibration of one fit mode: batch-relative, held-out, or out of sample (module docstring)."""
    if plan.mode == "batch":
        return batch_calibration()
    if plan.mode == "holdout":
        scores, maxima = calibration_scores(det, plan.held, progress)
        return finish_calibration(scores, maxima, alpha, "held-out", note)
    oos, grids = det._out_of_sample_scores(features, progress, plan.groups)
    maxima = np.array([float(det.map_head(g[None])[0].max()) for g in grids])
    source = "few-shot" if plan.mode == "few-shot" else det.calibration_source
    return finish_calibration(oos.double().numpy(), maxima, alpha, source, note)


def calibration_scores(det, images: Sequence, progress: Progress) -> tuple[np.ndarray, np.ndarray]:
    """Image scores and anomaly-map maxima (``float64`` ``(n,)`` each) of held-out normal images.

    Raises:
        ImageReadError: an image cannot be read (calibration never silently drops an image).
    """
    scores, maxima = [], []
    for s in range(0, len(images), det.batch_size):
        batch = [to_rgb_array(img) for img in images[s : s + det.batch_size]]
        sc, maps, _, _ = score_images(det, batch, open_graph=False)
        scores.extend(sc)
        maxima.extend(float(m.max()) for m in maps)
        progress("calibration", min(len(images), s + det.batch_size), len(images))
    return np.asarray(scores, dtype=np.float64), np.asarray(maxima, dtype=np.float64)


def recalibrate(det, images: list, false_alarm_rate: float | None, progress: Progress):
    """:meth:`Detector.calibrate <anomalens.detectors.base.Detector.calibrate>`: split conformal on
    held-out normal images (never ones the model was fitted on)."""
    requested = det.requested_false_alarm_rate if false_alarm_rate is None else float(false_alarm_rate)
    alpha, note = supported_false_alarm_rate(len(images), requested)
    fitted = {os.path.realpath(p) for p in det.train_images if p}
    reused = [x for x in images if isinstance(x, (str, os.PathLike)) and os.path.realpath(x) in fitted]
    if reused:
        raise CalibrationError(
            f"{len(reused)} of the {len(images)} calibration images were used to fit the model (e.g. {reused[0]}); "
            "calibrate on normal images the model has not seen, or the threshold will be too low"
        )
    scores, maxima = calibration_scores(det, images, progress)
    det.calibration = finish_calibration(scores, maxima, alpha, "held-out", note)
    det.false_alarm_rate, det.requested_false_alarm_rate = alpha, requested
    return det
