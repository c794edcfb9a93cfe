"""anomalens: offline-first visual anomaly detection and localization on CPU.

Quick start::

    from anomalens import PatchCore
    model = PatchCore().fit("path/to/category/train/good")
    for p in model.predict(["a.png", "b.png"]):
        print(p.image_path, p.pred_score, p.pred_label)
"""

__version__ = "0.1.0"

from .detectors import DETECTORS, AnomalyDINO, Detector, PaDiM, PatchCore, create_detector, load_detector  # noqa: E402
from .prediction import Prediction  # noqa: E402

__all__ = ["AnomalyDINO", "DETECTORS", "Detector", "PaDiM", "PatchCore", "Prediction", "create_detector", "load_detector", "__version__"]
