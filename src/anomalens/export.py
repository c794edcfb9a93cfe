"""ONNX export of a fitted detector's inference graph (:attr:`Detector.model
<anomalens.detectors.base.Detector.model>`, the module Python prediction runs).

The exported graph takes the model input, ``float32`` ``(B, 3, h, w)`` in [0, 1] per scale (inputs
``image``, ``image_1``, ...), with ``h`` and ``w`` any multiples of 16 (one shape per call), and
returns ``pred_score`` ``float32`` ``(B,)``, ``anomaly_map`` ``float32`` ``(B, h, w)``,
``patch_scores`` ``float32`` ``(B, h / s, w / s)`` and, for memory banks, ``patch_features``
``float32`` ``(B, h / s, w / s, D)`` (the last scale's, from which evidence finds a patch's nearest
bank row). Inside: the backbone's normalisation and reflected
border, the backbone, patch aggregation, the scoring module (:mod:`anomalens.detectors.scoring`), and
the anomaly-map upsampling and Gaussian smoothing. Outside the graph, :class:`OnnxDetector` resizes each image to its
model-input shape (short side ``image_size``, aspect ratio kept: :func:`~anomalens.common.model_input_hw`;
the ``geometry`` entry of the metadata) and the map back to the image's size, with the same functions
as the Python path, so both give the same scores and maps for images of any shape. Thresholds, calibration scores and the model's parameters travel in the
ONNX file's metadata (``anomalens`` key, JSON), so the file alone gives the same decisions, masks,
p-values and regions as the Python model (:class:`OnnxDetector`). The graph is produced by
``torch.onnx.export`` (:func:`trace_graph`) and checked against the Python path in the tests.

What a torch-free :class:`OnnxDetector` does not give: PatchCore's evidence crops (they need the
training images); a :class:`~anomalens.detectors.base.Detector` running its graph on ONNX Runtime does.
"""

from __future__ import annotations

import contextlib
import io
import json
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


#: output names of an exported graph (``patch_features`` only for memory-bank detectors)
OUTPUTS = ("pred_score", "anomaly_map", "patch_scores", "patch_features")


class _Outputs(nn.Module):
    """The model's outputs without the None ``patch_features`` of PaDiM (an ONNX graph has no None output)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, image_1: torch.Tensor | None = None, image_2: torch.Tensor | None = None):
        out = self.model(image, image_1, image_2)
        return out if out[3] is not None else out[:3]


def export_onnx(detector, path: str | os.PathLike, source_config_sha256: str | None = None, key: bytes | None = None) -> Path:
    """Write ``detector``'s inference path to an ONNX file (dynamic batch, height and width).

    The file is written atomically. ``MODEL_DIR/model.onnx`` of a model folder is written as that
    folder's cached export (:func:`export_to_model_dir`: a new folder with the current model files,
    the ONNX file and an updated manifest, swapped in whole).

    Args:
        detector: a fitted PatchCore or PaDiM (on a CNN backbone).
        path: the ``.onnx`` file to write.
        key: signing key for a model folder's manifest; None = ``ANOMALENS_MODEL_KEY`` when set.
        source_config_sha256: the ``config_sha256`` of the model directory exported from, stored so
            that a stale export (the directory was refitted since) can be recognised.

    Returns:
        ``path``.

    Raises:
        NotFittedError: the detector is not fitted.
        ConfigError: a model the graph cannot express (:func:`check_exportable`).
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
    model = onnx.load_model_from_string(trace_graph(detector))
    cal = detector.calibration
    meta = {
        "format_version": ONNX_FORMAT_VERSION,
        "anomalens_version": __version__,
        "detector": detector.name,
        "params": detector.get_params(),
        "geometry": geometry_of(detector),
        "bank_rows": int(getattr(detector.model.scorer, "bank_rows", 0)),  # bounds the images per call
        "patch_stride": int(detector.extractor.stride),
        "source_config_sha256": source_config_sha256,
    }
    fields = cal.config_fields()  # what Calibration.restore reads back, with the scores beside it
    fields["calibration"].update(scores=cal.scores.tolist(), map_maxima=cal.map_maxima.tolist())
    meta.update(fields)
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = "anomalens", json.dumps(meta)
    write_bytes(path, model.SerializeToString())  # readers never see a half-written file
    return path


def trace_graph(detector) -> bytes:
    """``detector.model`` as a serialised ONNX graph with dynamic batch and (but for PaDiM's fixed
    geometry) dynamic height and width per scale.

    Traced by torch's TorchScript exporter, which is several times faster than ``torch.export`` on
    the same graph and gives outputs equal to ~1e-6 (measured reason: docs/design/decisions.md).
    The TF "SAME" padding of the stride-2 convolutions, which the tracer computes from the input
    shape, is made constant where it is the same for every model input (:func:`constant_pads`).
    """
    from .detectors.scoring import PatchCoreScorer

    n_scales = len(detector.image_sizes)
    names = ["image"] + [f"image_{k}" for k in range(1, n_scales)]
    outputs = list(OUTPUTS[: 4 if isinstance(detector.model.scorer, PatchCoreScorer) else 3])
    examples = tuple(torch.rand(2, 3, *hw) for hw in detector.input_shapes((240, 300)))
    fixed = detector.fixed_input_hw is not None  # PaDiM: one fixed geometry
    axes = {n: ({0: "batch"} if fixed else {0: "batch", 2: f"height_{k}", 3: f"width_{k}"}) for k, n in enumerate(names)}
    axes.update({n: {0: "batch"} if fixed else {0: "batch", 1: "height", 2: "width"} for n in outputs})
    graph = _Outputs(detector.model).eval()
    old = detector.extractor.micro_batch
    detector.extractor.micro_batch = 1 << 30  # one backbone call for the whole batch: no Python loop in the graph
    buf = io.BytesIO()
    try:
        with torch.inference_mode(False), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings on shape arithmetic and the exporter's deprecation notice
            torch.onnx.export(
                graph, examples, buf, dynamo=False, input_names=names, output_names=outputs, dynamic_axes=axes,
                opset_version=OPSET, do_constant_folding=True,
            )
    finally:
        detector.extractor.micro_batch = old
    return constant_pads(buf.getvalue(), detector)


#: image sizes whose model inputs cover every parity of ``h / 16`` and ``w / 16`` (and of ``/ 32``)
#: at the default sizes: the pads that agree on all of them are the same for every model input
_PROBE_HW = ((256, 256), (256, 368), (368, 256), (256, 304), (304, 256), (240, 300))


def constant_pads(graph: bytes, detector) -> bytes:
    """The traced graph with each ``Pad`` amount that the tracer computes from the input shape (TF
    "SAME" padding of the stride-2 convolutions) made a constant when it is the same for every
    model input of ``detector`` (probed on :data:`_PROBE_HW`; one shape for a fixed geometry).
    A zero ``Pad`` whose only consumer is a convolution is folded into the convolution's ``pads``
    (ONNX Runtime then runs it without a copy and a layout change); amounts that differ stay computed."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load_model_from_string(graph)
    g = model.graph
    known = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    pads = sorted({n.input[1] for n in g.node if n.op_type == "Pad" and len(n.input) > 1 and n.input[1] not in known})
    if not pads:
        return graph
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None) for name in pads)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    static = [tuple(i.shape[2:]) for i in session.get_inputs()]
    if all(isinstance(d, int) for hw in static for d in hw):  # one fixed geometry (PaDiM)
        geometries = {tuple(static)}
    else:
        geometries = {detector.input_shapes(hw) for hw in _PROBE_HW}
    runs = [session.run(None, {n: np.zeros((1, 3, *hw), np.float32) for n, hw in zip(names, shapes)}) for shapes in geometries]
    constant = {name: runs[0][i] for i, name in enumerate(pads) if all(np.array_equal(r[i], runs[0][i]) for r in runs)}
    consumers: dict[str, list] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    dropped = []
    for node in g.node:
        if node.op_type != "Pad" or len(node.input) < 2 or node.input[1] not in constant:
            continue
        value = constant[node.input[1]].astype(np.int64)
        users = consumers.get(node.output[0], [])
        zero_fill = len(node.input) < 3 or not node.input[2]
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
        if len(users) == 1 and users[0].op_type == "Conv" and mode == b"constant" and zero_fill and value.size == 8 \
                and not value[[0, 1, 4, 5]].any() and (value >= 0).all():
            conv = users[0]  # zero padding folded into the convolution's own pads
            attr = next((a for a in conv.attribute if a.name == "pads"), None)
            old = list(attr.ints) if attr is not None else [0, 0, 0, 0]
            new = [old[0] + int(value[2]), old[1] + int(value[3]), old[2] + int(value[6]), old[3] + int(value[7])]
            if attr is None:
                conv.attribute.append(helper.make_attribute("pads", new))
            else:
                attr.ints[:] = new
            conv.input[0] = node.input[0]
            dropped.append(node)
        else:
            node.input[1] = f"{node.name or node.output[0]}_constant_pads"
            g.initializer.append(numpy_helper.from_array(value, node.input[1]))
    for node in dropped:
        g.node.remove(node)
    prune_unused(g)
    return model.SerializeToString()


def prune_unused(graph) -> None:
    """Remove the nodes of an ONNX ``graph`` that no graph output depends on (in place): the shape
    arithmetic left behind by the pads made constant. ONNX Runtime would run it, and each ``Shape``
    of a feature map forces that map out of its blocked memory layout (a copy per stride-2 block)."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):  # ONNX nodes are topologically sorted
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    if len(keep) < len(graph.node):
        kept = list(reversed(keep))
        del graph.node[:]
        graph.node.extend(kept)


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
    if detector._patch_weights() is not None:
        raise ConfigError("AnomalyDINO's background masking (PCA of each image's tokens) is not in the ONNX graph")


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
    and it was exported from this very model by this format version, else a fresh export of ``detector`` (the loaded model of
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
            pass  # another format version (OnnxDetector reads only its own) or a damaged file: export again
    det = detector if detector is not None else load_detector(model_dir, key)
    if os.access(model_dir, os.W_OK):
        try:
            return OnnxDetector(export_to_model_dir(model_dir, det, sha, key), threads=threads)
        except ModelFileError:
            pass  # signed without a key, or replaced meanwhile: a private export below
    path = Path(tempfile.mkdtemp(prefix="anomalens-onnx-")) / ONNX_NAME
    _write_onnx(det, path, sha)
    return OnnxDetector(path, threads=threads)
