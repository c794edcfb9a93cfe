"""ONNX export of a fitted detector's whole inference path, and an ONNX Runtime inferencer.

The exported graph takes the model input, ``float32`` ``(B, 3, h, w)`` in [0, 1] with ``h`` and ``w``
any multiples of 16 (one shape per call), and returns ``pred_score`` ``float32`` ``(B,)`` and
``anomaly_map`` ``float32`` ``(B, h, w)``. Inside: the backbone's normalisation and reflected border,
the backbone, patch aggregation, the scoring (PatchCore: exact nearest-neighbour distance to the memory
bank as a matrix product and a minimum, the image score the maximum or the top-1% mean of it; PaDiM: Mahalanobis distance per position), and the anomaly-map
upsampling and Gaussian smoothing. Outside the graph, :class:`OnnxDetector` resizes each image to its
model-input shape (short side ``image_size``, aspect ratio kept: :func:`~anomalens.common.model_input_hw`;
the ``geometry`` entry of the metadata) and the map back to the image's size, with the same functions
as the Python path, so both give the same scores and maps for images of any shape. Thresholds, calibration scores and the model's parameters travel in the
ONNX file's metadata (``anomalens`` key, JSON), so the file alone gives the same decisions, masks,
p-values and regions as the Python model (:class:`OnnxDetector`). The graph is produced by
``torch.onnx.export`` (the dynamo exporter) and checked against the Python path in the tests.

What the ONNX path does not give: PatchCore's evidence crops (they need the training images) and the
re-weighted image score (export refuses it).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .errors import ConfigError, ModelFileError
from .manifest import KEY_ENV, MANIFEST_NAME, ONNX_NAME
from .runtime import ONNX_FORMAT_VERSION, OnnxDetector

OPSET = 18


class _InferenceGraph(nn.Module):
    """The detector's inference path as one traceable module (see the module docstring)."""

    def __init__(self, detector):
        super().__init__()
        self.det = detector
        self.extractor = detector.extractor
        self.head = detector.map_head

    def forward(self, image: torch.Tensor, image_1: torch.Tensor | None = None, image_2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        feats = [self.extractor(x) for x in (image, image_1, image_2) if x is not None]
        scores, grid = self.det._export_scores(feats)
        return scores, self.head(grid)


def export_onnx(detector, path: str | os.PathLike, source_config_sha256: str | None = None, key: bytes | None = None) -> Path:
    """Write ``detector``'s inference path to an ONNX file (dynamic batch, height and width).

    The file is written atomically. ``MODEL_DIR/model.onnx`` of a model folder is written as that
    folder's cached export (:func:`export_to_model_dir`: a new folder with the current model files,
    the ONNX file and an updated manifest, swapped in whole).

    Args:
        detector: a fitted PatchCore (image score "max" or "mean_top1") or PaDiM.
        path: the ``.onnx`` file to write.
        key: signing key for a model folder's manifest; None = ``ANOMALENS_MODEL_KEY`` when set.
        source_config_sha256: the ``config_sha256`` of the model directory exported from, stored so
            that a stale export (the directory was refitted since) can be recognised.

    Returns:
        ``path``.

    Raises:
        NotFittedError: the detector is not fitted.
        ConfigError: a setting the graph cannot express (PatchCore's re-weighted image score).
    """
    path = Path(path)
    if path.name == ONNX_NAME and os.path.lexists(path.parent / MANIFEST_NAME):
        export_to_model_dir(path.parent, detector, source_config_sha256, key)
        return path
    return _write_onnx(detector, path, source_config_sha256)


def _write_onnx(detector, path: Path, source_config_sha256: str | None) -> Path:
    import onnx

    from .atomic import write_bytes

    detector._check_fitted()
    check_exportable(detector)
    graph = _InferenceGraph(detector).eval()
    old = detector.extractor.micro_batch
    detector.extractor.micro_batch = 1 << 30  # one backbone call for the whole batch: no Python loop in the graph
    try:
        n_scales = len(detector.image_sizes)
        names = ["image"] + [f"image_{k}" for k in range(1, n_scales)]
        examples = tuple(torch.rand(2, 3, *hw) for hw in detector.input_shapes((240, 300)))
        batch = torch.export.Dim("batch", min=1, max=1024)
        if detector.fixed_input_hw is not None:  # PaDiM: one fixed geometry
            dims = ({0: batch},)
        else:
            dims = tuple({0: batch, 2: 16 * torch.export.Dim(f"h16_{k}", min=4, max=512), 3: 16 * torch.export.Dim(f"w16_{k}", min=4, max=512)}
                         for k in range(n_scales))
        path.parent.mkdir(parents=True, exist_ok=True)
        traced = path.with_name(f"{path.name}.trace-{os.getpid()}")
        quiet = logging.getLogger("torch.onnx")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "torchvision is not installed" notices: we use no torchvision op
        with torch.inference_mode(False), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's progress lines and deprecation chatter
            torch.onnx.export(
                graph, examples, str(traced), dynamo=True, dynamic_shapes=dims,
                input_names=names, output_names=["pred_score", "anomaly_map"], opset_version=OPSET, verbose=False,
            )
    finally:
        detector.extractor.micro_batch = old
        logging.getLogger("torch.onnx").setLevel(level if "level" in locals() else logging.NOTSET)
    model = onnx.load(str(traced))  # the exporter may put weights in a sidecar; loading pulls them in
    for f in traced.parent.glob(traced.name + "*"):
        f.unlink()  # the trace and its sidecar: the saved file below is self-contained
    cal = detector.calibration
    meta = {
        "format_version": ONNX_FORMAT_VERSION,
        "anomalens_version": __version__,
        "detector": detector.name,
        "params": detector.get_params(),
        "geometry": geometry_of(detector),
        "source_config_sha256": source_config_sha256,
        "threshold": cal.threshold,
        "pixel_threshold": cal.pixel_threshold,
        "calibration": {
            "scores": cal.scores.tolist(), "map_maxima": cal.map_maxima.tolist(), "false_alarm_rate": cal.false_alarm_rate,
            "source": cal.source, "mode": cal.mode, "note": cal.note,
        },
    }
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = "anomalens", json.dumps(meta)
    write_bytes(path, model.SerializeToString())  # readers never see a half-written file
    return path


def geometry_of(detector) -> dict:
    """How images are resized for ``detector``: ``{"image_sizes", "keep_aspect", "fixed_hw"}`` (the
    last for PaDiM, whose fitted grid fixes one model-input shape; else None)."""
    fixed = detector.fixed_input_hw
    return {"image_sizes": list(detector.image_sizes), "keep_aspect": detector.keep_aspect, "fixed_hw": list(fixed) if fixed else None}


def check_exportable(detector) -> None:
    """Raise :class:`ConfigError` when ``detector`` has a setting the ONNX graph cannot express."""
    from .backbones import get_spec

    if get_spec(detector.backbone_name).build is None:
        raise ConfigError(f"backbone {detector.backbone_name} is itself an ONNX model; its detectors are not exported (they already run on ONNX Runtime)")
    cal = getattr(detector, "calibration", None)
    if cal is not None and cal.is_batch_relative:
        raise ConfigError("a one-shot model decides relative to each predicted batch; that rule is not in the ONNX file")
    if getattr(detector, "image_score", "max") == "reweighted":
        raise ConfigError("ONNX export supports PatchCore's image scores 'max' and 'mean_top1', not 'reweighted'")


def export_to_model_dir(model_dir: str | os.PathLike, detector=None, source_config_sha256: str | None = None,
                        key: bytes | None = None) -> Path:
    """Export the model of ``model_dir`` into it as its cached ``model.onnx``: a new folder with the
    current (verified) model files, the ONNX file and a manifest listing all three (signed with a
    key) replaces the folder in one step; a kill leaves the folder as it was, or with the export.

    Args:
        detector: the loaded model of ``model_dir`` (loaded here when None).
        source_config_sha256: stored in the ONNX metadata (None: the folder's ``config_sha256``, when
            ``detector`` is loaded here).
        key: signing key; None = ``ANOMALENS_MODEL_KEY`` when set.

    Returns:
        The ``model.onnx`` path.

    Raises:
        ModelFileError: the folder does not verify, it is signed and no key is given (its manifest
            cannot be re-signed), or another writer replaced it meanwhile.
        ConfigError: a detector the ONNX graph cannot express (:func:`check_exportable`).
    """
    from .detectors.persistence import load_detector
    from .manifest import (
        CONFIG_NAME, TENSORS_NAME, config_of, manifest_digest, read_manifest, read_model_file, resolve_key, write_model_dir,
    )

    d = Path(model_dir)
    key = key if key is not None else resolve_key(None)
    digest = manifest_digest(d)
    manifest = read_manifest(d, key)
    if manifest["model_signature"] != "unsigned" and key is None:
        raise ModelFileError(f"{d} is signed: exporting into it re-signs its manifest and needs the key ({KEY_ENV} or --key-file); or export with --out elsewhere")
    config = config_of(d, manifest)
    files = {name: read_model_file(d, manifest, name) for name in (CONFIG_NAME, TENSORS_NAME)}
    if detector is None:
        detector = load_detector(d, key)
        source_config_sha256 = source_config_sha256 or config["config_sha256"]
    check_exportable(detector)
    with write_model_dir(d, key, expect_manifest=digest) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        _write_onnx(detector, tmp / ONNX_NAME, source_config_sha256)
    return d / ONNX_NAME


def onnx_for_model_dir(model_dir: Path, config_sha256: str | None = None, threads: int | None = None, detector=None,
                       key: bytes | None = None) -> "OnnxDetector":
    """The ONNX Runtime model of ``model_dir``: its ``model.onnx`` when the verified manifest lists it
    and it was exported from this very model, else a fresh export of ``detector`` (the loaded model of
    ``model_dir``; loaded here when not given) into the folder (:func:`export_to_model_dir`), or into
    a temporary folder when the model folder cannot take it (read-only; signed and no key).

    Args:
        config_sha256: the model's ``config_sha256`` as the caller read it (None: as verified here);
            a cached export of another model is not used.
        key: signing key; None = ``ANOMALENS_MODEL_KEY`` when set.

    Raises:
        ModelFileError: the folder does not verify (:func:`anomalens.manifest.verify_model_dir`).
    """
    import tempfile

    from .detectors.persistence import load_detector
    from .manifest import verify_model_dir

    model_dir = Path(model_dir)
    config = verify_model_dir(model_dir, key)  # every listed file, model.onnx included
    sha = config["config_sha256"] if config_sha256 is None else config_sha256
    path = model_dir / ONNX_NAME
    if ONNX_NAME in config["model_files"] and sha == config["config_sha256"]:
        try:
            m = OnnxDetector(path, threads=threads)
            if m.meta.get("source_config_sha256") == sha:
                return m
        except ModelFileError:
            pass  # from another version: export again
    det = detector if detector is not None else load_detector(model_dir, key)
    if os.access(model_dir, os.W_OK):
        try:
            return OnnxDetector(export_to_model_dir(model_dir, det, sha, key), threads=threads)
        except ModelFileError:
            pass  # signed without a key, or replaced meanwhile: a private export below
    path = Path(tempfile.mkdtemp(prefix="anomalens-onnx-")) / ONNX_NAME
    _write_onnx(det, path, sha)
    return OnnxDetector(path, threads=threads)
