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


def export_onnx(detector, path: str | os.PathLike, source_config_sha256: str | None = None) -> Path:
    """Write ``detector``'s inference path to an ONNX file (dynamic batch, height and width).

    Args:
        detector: a fitted PatchCore (image score "max" or "mean_top1") or PaDiM.
        path: the ``.onnx`` file to write.
        source_config_sha256: the ``config_sha256`` of the model directory exported from, stored so
            that a stale export (the directory was refitted since) can be recognised.

    Returns:
        ``path``.

    Raises:
        NotFittedError: the detector is not fitted.
        ConfigError: a setting the graph cannot express (PatchCore's re-weighted image score).
    """
    import onnx

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
        path = Path(path)
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
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)  # readers never see a half-written file
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


def onnx_for_model_dir(model_dir: Path, config_sha256: str, threads: int | None = None, detector=None) -> "OnnxDetector":
    """The ONNX Runtime model of ``model_dir``: its ``model.onnx`` when exported from this very model,
    else a fresh export (into the model directory, or a temporary folder when that is read-only) of
    ``detector`` (the loaded model of ``model_dir``; loaded here when not given)."""
    import tempfile

    from .detectors import load_detector

    path = model_dir / "model.onnx"
    if path.exists():
        try:
            m = OnnxDetector(path, threads=threads)
            if m.meta.get("source_config_sha256") == config_sha256:
                return m
        except ModelFileError:
            pass  # unreadable or from another version: export again
    if not os.access(model_dir, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="anomalens-onnx-")) / "model.onnx"
    export_onnx(detector if detector is not None else load_detector(model_dir), path, source_config_sha256=config_sha256)
    return OnnxDetector(path, threads=threads)
