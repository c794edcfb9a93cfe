"""``anomalens fit`` and ``calibrate``: a model from normal images, and its threshold."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import AnomalensError
from .common import console, fail as _fail, fmt_threshold as _num, model_key, progress_bars, split_names


def _sizes(text: str | None) -> int | list[int] | None:
    """``"256"`` -> 256, ``"256,320"`` -> [256, 320]; None stays None (the detector's default)."""
    if text is None:
        return None
    try:
        sizes = [int(x) for x in text.replace("+", ",").split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"--image-size takes pixel sizes such as 256 or 256,320, got {text!r}") from None
    return sizes[0] if len(sizes) == 1 else sizes


def fit(
    data: Path = typer.Argument(..., help="Normal training images: an MVTec AD category folder (uses train/good), a folder, or an image file."),
    out: Path = typer.Option(..., "--out", "-o", help="Model directory to write."),
    model: str = typer.Option(
        "patchcore", "--model", "-m",
        help="Detector: patchcore, padim or anomalydino (few-shot on ViT tokens: cosine distance, top-1% score).",
    ),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", "-b",
        help="efficientnet_lite0, efficientnet_lite2, mobilenet_v2 or vit_small_focus (default: efficientnet_lite2 for patchcore, efficientnet_lite0 for padim, vit_small_focus for anomalydino).",
    ),
    layers: Optional[str] = typer.Option(None, help="Comma-separated backbone layers, e.g. blocks.4,blocks.10 (default: the backbone's)."),
    image_size: Optional[str] = typer.Option(
        None, help="Short side in pixels images are resized to, aspect ratio kept (multiple of 16; 14 for the ViT); several, "
        "comma-separated, are fused (PatchCore). Default: 256,320 for PatchCore, 256 for PaDiM, 448 for the ViT."
    ),
    squash: bool = typer.Option(False, "--squash", help="Resize every image to a square instead of keeping its aspect ratio."),
    coreset_ratio: float = typer.Option(0.01, help="PatchCore: fraction of training patches kept in the memory bank."),
    border_pad: int = typer.Option(0, help="Reflected border in pixels added before the backbone (multiple of 16; 0 = off)."),
    false_alarm_rate: Optional[float] = typer.Option(
        None, help="Target fraction of normal images flagged NG (strict: fit fails when the images cannot support it). "
        "Default: 0.01, or the smallest rate the normal images support (1/(n+1) for n images), said in the output."
    ),
    batch_size: int = typer.Option(8, help="Images per backbone forward pass."),
    holdout: float = typer.Option(
        0.0, help="Fraction of the normal images held out for split-conformal calibration (0 = calibrate out of sample on all)."
    ),
    shots: Optional[int] = typer.Option(
        None, "--shots", "-k", help="Few-shot: fit the --model (PatchCore or AnomalyDINO) on K normal images drawn at random (--seed) from DATA; every patch is kept."
    ),
    augment: Optional[str] = typer.Option(
        None, help="Few-shot views added to the bank: none, flips, rotations (90-degree turns), dihedral or rotations45 "
        "(45-degree steps). Default: rotations for patchcore, none for anomalydino; none for a product whose "
        "turned part is itself a defect."
    ),
    masking: bool = typer.Option(
        False, "--masking", help="anomalydino: score only the object (background masked by the first principal component of the tokens)."
    ),
    seed: int = typer.Option(0, help="Seed of the --shots draw and of the --holdout split."),
    key_file: Optional[Path] = typer.Option(
        None, "--key-file", help="File holding the model-signing key (default: the ANOMALENS_MODEL_KEY environment variable, if set): "
        "the saved model's manifest is signed with HMAC-SHA256, and unsigned or badly signed models are refused."
    ),
) -> None:
    """Fit a detector on normal images and calibrate its threshold on normal images it did not learn from.

    With --shots K (few-shot), the threshold is the largest leave-one-shot-out score (a false-alarm rate
    of 1/(K+1) at best); with K = 1, each predicted batch sets its own threshold. `anomalens calibrate`
    replaces either with a conformal threshold once enough normal images exist.

    The model folder is written whole and swapped in: a kill leaves the old model or the new one."""
    from ..data import training_paths
    from ..detectors import create_detector
    from ..detectors.fitting import resolve_augment
    from ..detectors.persistence import save_detector

    try:
        key = model_key(key_file)
        params = dict(
            image_size=_sizes(image_size), keep_aspect=not squash, border_pad=border_pad,
            false_alarm_rate=false_alarm_rate, batch_size=batch_size,
        )
        if backbone:
            params["backbone"] = backbone
        if layers:
            params["layers"] = split_names(layers)
        if model == "patchcore":
            params["coreset_ratio"] = coreset_ratio
        if masking:
            if model != "anomalydino":
                raise typer.BadParameter("--masking applies to --model anomalydino")
            params["masking"] = True
        det = create_detector(model, **params)
        paths = training_paths(data)
        what = f"{shots} of {len(paths)} images (few-shot, augment {resolve_augment(det, shots, augment)})" if shots else f"{len(paths)} images"
        console.print(f"fitting [bold]{model}[/] on {what} ({det.backbone_name}, {det.size_label})")
        with progress_bars() as cb:
            det.fit(paths, progress=cb, holdout=holdout, seed=seed, shots=shots, augment=augment)
        save_detector(det, out, key=key)
    except AnomalensError as exc:
        _fail(exc)
    info = det.fit_info
    console.print(
        f"saved {out}  fit {info['seconds_total']:.1f}s  threshold {_num(det.threshold)}  pixel threshold {_num(det.pixel_threshold)}"
        + (f"  image score {det.image_score}" if getattr(det, "image_score", None) else "")
    )
    if det.calibration:
        console.print(f"threshold: {det.calibration.note}")


def calibrate(
    model_dir: Path = typer.Argument(..., help="Model directory written by `anomalens fit`."),
    images: List[Path] = typer.Argument(
        ..., help="New normal images the model was not fitted on (files/folders); with --f1, one labelled folder: an MVTec AD "
        "category (its test/ split) or good/ beside folders of defective images."
    ),
    false_alarm_rate: Optional[float] = typer.Option(
        None, help="Target fraction of normal images flagged NG (strict). Default: the model's; calibrate fails rather than raise it."
    ),
    replace: bool = typer.Option(False, "--replace", help="Discard the model's calibration scores and use the new images alone."),
    f1: bool = typer.Option(False, "--f1", help="Set the best-F1 threshold from labelled normal + defective images instead."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the re-calibrated model here (default: update MODEL_DIR)."),
    key_file: Optional[Path] = typer.Option(
        None, "--key-file", help="File holding the model-signing key (default: ANOMALENS_MODEL_KEY, if set): the model must be "
        "signed with it, and the result is signed."
    ),
) -> None:
    """Add new normal images to a model's calibration (split conformal), or set the best-F1 threshold.

    The new images' scores are ADDED to the calibration scores the model holds (all out of sample, so
    the pooled threshold keeps its false-alarm promise with more scores); --replace uses the new
    images alone. A set too small for the model's false-alarm rate is refused unless a rate is given
    with --false-alarm-rate. The model folder is replaced whole (a kill leaves the old model or the
    new one); a cached model.onnx of the old model is dropped."""
    from ..data import expand_inputs
    from ..detectors.persistence import load_detector, save_detector
    from ..errors import ModelFileError
    from ..folders import labelled_samples
    from ..manifest import manifest_digest, read_manifest

    try:
        key = model_key(key_file)
        digest = manifest_digest(model_dir)
        if read_manifest(model_dir, key)["model_signature"] != "unsigned" and key is None:
            raise ModelFileError(f"{model_dir} is signed: calibrate needs its key (--key-file or ANOMALENS_MODEL_KEY) to sign the result")
        det = load_detector(model_dir, key)
        before, n_before = det.threshold, det.calibration.scores.size
        with progress_bars() as cb:
            if f1:
                if len(images) != 1:
                    raise typer.BadParameter("--f1 takes one folder of labelled images")
                if false_alarm_rate is not None:
                    det.set_false_alarm_rate(false_alarm_rate)
                preds = [p for p in det.predict(labelled_samples(images[0]), progress=cb) if p.ok]
                det.set_f1_threshold([p.gt_label for p in preds], [p.pred_score for p in preds])
            else:
                det.calibrate(expand_inputs(images), false_alarm_rate, progress=cb, replace=replace)
        target = out or model_dir
        in_place = Path(target).resolve() == Path(model_dir).resolve()
        save_detector(det, target, key=key, expect_manifest=digest if in_place else None)
    except AnomalensError as exc:
        _fail(exc)
    console.print(f"threshold {_num(before)} -> {_num(det.threshold)}: {det.calibration.note}")
    if not f1:
        n = det.calibration.scores.size
        how = "replaced" if replace else f"{n_before} + {n - n_before} added"
        console.print(f"calibration now holds {n} normal scores ({how}); false-alarm rate {det.false_alarm_rate:g}")
    console.print(f"saved {target}")

