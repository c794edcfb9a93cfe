"""anomalens: offline-first visual anomaly detection and localization on CPU.

Quick start::

    from anomalens import PatchCore, load_detector
    model = PatchCore().fit("path/to/category/train/good")
    model.save("model")
    for p in load_detector("model").predict(["a.png", "b.png"]):
        print(p.image_path, p.pred_score, p.pred_label)

Every kind of model (image detectors, an exported model on ONNX Runtime, zero-shot MuSc, video
detectors) follows :class:`AnomalyDetector` and is loaded by :func:`load_detector`. The detectors
(and torch) are imported on first use, so ``import anomalens`` works on a deployment install without
torch (``pip install anomalens[runtime]``), where :func:`load_detector` returns the ONNX Runtime
model of an exported folder.
"""

__version__ = "0.3.0"

import os as _os  # noqa: E402

# torch's OpenMP runtime (GNU libgomp) lets an idle worker thread spin 300,000 times before it sleeps.
# Two processes on a small machine (fit beside predict, the service beside a batch job) then burn
# each other's cores spinning. A spin of 10,000 keeps one process as fast and lets two share the
# cores (benchmarks/concurrency.py). libgomp reads it when torch loads, so it is set before any import
# of torch; a user's own GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.
if "GOMP_SPINCOUNT" not in _os.environ and "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = "10000"

from .contract import AnomalyDetector  # noqa: E402
from .loading import load_detector  # noqa: E402
from .prediction import Prediction  # noqa: E402

_FROM_DETECTORS = ("AnomalyDINO", "DETECTORS", "Detector", "PaDiM", "PatchCore", "create_detector")


def __getattr__(name: str):
    if name in _FROM_DETECTORS:
        from . import detectors

        return getattr(detectors, name)
    raise AttributeError(f"module 'anomalens' has no attribute {name!r}")


__all__ = ["AnomalyDetector", "AnomalyDINO", "DETECTORS", "Detector", "PaDiM", "PatchCore", "Prediction", "create_detector", "load_detector", "__version__"]
