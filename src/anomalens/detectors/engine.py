"""Which engine runs a detector's inference graph, and the scoring of a batch of images on it.

The graph is :attr:`Detector.model <anomalens.detectors.base.Detector.model>`. Torch runs it as a
module; ONNX Runtime runs the same module exported (:func:`anomalens.export.trace_graph`) into the
model folder as ``model.onnx``, covered by the folder's manifest. ``engine="auto"`` (the default)
takes ONNX Runtime when the detector was loaded from or saved to a folder, ``onnxruntime`` is
installed and the model can be exported; the graph is exported there on first use (a few seconds)
unless a current one is cached. Both engines get the same model input (:mod:`anomalens.resampling`) and
return the same four outputs, so scores, maps, decisions and evidence are the same to float
rounding (~1e-6 relative).
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from typing import Sequence

import numpy as np
import torch

from ..common import group_by_shape, to_model_inputs
from ..errors import AnomalensError, ConfigError
from ..geometry import images_per_call
from ..resampling import resize_map

_LOCK = threading.Lock()


def onnxruntime_available() -> bool:
    """True when ``onnxruntime`` can be imported here."""
    return importlib.util.find_spec("onnxruntime") is not None


class GraphSession:
    """A detector's exported graph on an ONNX Runtime session (:class:`~anomalens.runtime.OnnxDetector`'s).

    Called as the module is: with the model input per scale, ``float32`` ``(B, 3, h_k, w_k)`` tensors, and
    returns what :class:`~anomalens.detectors.scoring.AnomalyModel` returns: ``pred_score``
    ``(B,)``, ``anomaly_map`` ``(B, h, w)``, patch scores ``(B, h / s, w / s)`` and the last
    scale's patch features (``(B, h / s, w / s, D)``, or None without a bank), as torch tensors.
    """

    def __init__(self, onnx_detector):
        self.session = onnx_detector.session
        self.path = onnx_detector.path
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, *inputs: torch.Tensor):
        out = self.session.run(None, {name: x.numpy() for name, x in zip(self.inputs, inputs)})
        score, amap, grid = (torch.from_numpy(np.ascontiguousarray(o)) for o in out[:3])
        return score, amap, grid, torch.from_numpy(out[3]) if len(out) > 3 else None


def wanted_engine(det) -> str:
    """The engine :meth:`Detector.predict` runs (or will run on first use): ``"onnxruntime"`` or ``"torch"``."""
    if det._graph is not None:
        return "onnxruntime"
    if det.engine_preference == "torch" or det._graph_failed or det.model_dir is None or not onnxruntime_available():
        return "torch"
    from ..export import check_exportable

    try:
        check_exportable(det)
    except ConfigError:
        return "torch"
    return "onnxruntime"


def graph_session(det) -> GraphSession | None:
    """The ONNX Runtime session of ``det``'s folder graph (exported there first when missing or
    stale), or None when ``det`` runs on torch. A failed export is reported once as a warning and
    leaves the detector on torch."""
    if det._graph is not None or wanted_engine(det) != "onnxruntime":
        return det._graph
    with _LOCK:
        if det._graph is None and not det._graph_failed:
            try:
                det._graph = _open(det)
            except (AnomalensError, RuntimeError, OSError) as exc:
                det._graph_failed = True
                warnings.warn(f"running {det.name} on torch: its graph could not be run on ONNX Runtime ({str(exc)[:300]})", stacklevel=5)
    return det._graph


def _open(det) -> GraphSession:
    """The session of the folder's current graph; an export of an older format is replaced (in the
    folder, or privately when the folder cannot take it: :func:`~anomalens.export.onnx_for_model_dir`)."""
    from ..export import onnx_for_model_dir
    from ..serialization import read_config

    sha = read_config(det.model_dir)["config_sha256"]
    threads = det.graph_threads or torch.get_num_threads()
    return GraphSession(onnx_for_model_dir(det.model_dir, sha, threads, det, det._model_key))


@torch.inference_mode()
def score_images(det, images: Sequence[np.ndarray], open_graph: bool = True) -> tuple[list[float], list[np.ndarray], list[torch.Tensor], list[torch.Tensor | None]]:
    """Score ``uint8`` RGB images ``(H_i, W_i, 3)`` on ``det``'s engine, one graph call per model-input shape.

    Images of one shape go through one call, or several when their patch-to-bank distances would
    exceed :data:`~anomalens.geometry.DISTANCE_BUDGET` (large few-shot banks). ``open_graph=False`` (calibration, which
    rewrites the model folder itself): the ONNX Runtime
    session only when it is open already, else torch; the folder is never exported into.

    Returns:
        Per image: its score, its ``float32`` ``(H_i, W_i)`` anomaly map, its ``float32`` ``(h, w)``
        patch-score grid and its ``float32`` ``(h, w, D)`` last-scale patch features (None without a bank).
    """
    run = (graph_session(det) if open_graph else det._graph) or det.model
    return _score(det, run, images)


def _score(det, run, images: Sequence[np.ndarray]):
    n = len(images)
    scores: list[float] = [0.0] * n
    maps: list[np.ndarray] = [None] * n  # type: ignore[list-item]
    grids: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
    features: list[torch.Tensor | None] = [None] * n
    rows = getattr(det.model.scorer, "bank_rows", 0)
    for shapes, group in group_by_shape([det.input_shapes(img.shape[:2]) for img in images]).items():
        per_call = images_per_call(shapes, det.extractor.stride, rows)
        for s in range(0, len(group), per_call):
            idx = group[s : s + per_call]
            sc, mp, gr, pf = run(*to_model_inputs([images[i] for i in idx], shapes))
            for k, i in enumerate(idx):
                scores[i], grids[i] = float(sc[k]), gr[k]
                maps[i] = resize_map(mp[k], images[i].shape[:2])
                features[i] = None if pf is None else pf[k]
    return scores, maps, grids, features
