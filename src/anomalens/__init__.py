"""anomalens: offline-first visual anomaly detection and localization on CPU.

Quick start::

    from anomalens import PatchCore
    model = PatchCore().fit("path/to/category/train/good")
    for p in model.predict(["a.png", "b.png"]):
        print(p.image_path, p.pred_score, p.pred_label)
"""

__version__ = "0.1.0"

import os as _os  # noqa: E402

# torch's OpenMP runtime (GNU libgomp) lets an idle worker thread spin 300,000 times before it sleeps.
# Two processes on a small machine (fit beside predict, the service beside a batch job) then burn
# each other's cores spinning: measured on 2 cores, a video `predict` took 134 s beside another
# instead of 19 s alone. A spin of 10,000 keeps one process as fast (19 s) and two run in 41 s
# (benchmarks/concurrency.py). libgomp reads it when torch loads, so it is set before any import of
# torch here; a user's own GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.
if "GOMP_SPINCOUNT" not in _os.environ and "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = "10000"

from .detectors import DETECTORS, AnomalyDINO, Detector, PaDiM, PatchCore, create_detector, load_detector  # noqa: E402
from .prediction import Prediction  # noqa: E402

__all__ = ["AnomalyDINO", "DETECTORS", "Detector", "PaDiM", "PatchCore", "Prediction", "create_detector", "load_detector", "__version__"]
