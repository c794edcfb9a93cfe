"""What every command-line module shares: the consoles, progress bars, error exit and number formats."""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
# wide enough for the metrics table when the output is a file or a pipe (CI logs)
out_console = Console(width=None if sys.stdout.isatty() else 140)

STAGE_LABELS = {
    "features": "extracting features",
    "coreset": "selecting coreset",
    "calibration": "calibrating threshold",
    "predict": "predicting",
    "fit": "fitting models",
    "frames": "reading training videos",
    "background": "learning the empty scene",
}


@contextmanager
def progress_bars() -> Iterator:
    """A ``progress(stage, done, total)`` callback drawing one rich bar per stage."""
    with Progress(
        TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    ) as prog:
        tasks: dict[str, int] = {}

        def cb(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(STAGE_LABELS.get(stage, stage), total=total)
            prog.update(tasks[stage], completed=done, total=total)

        yield cb


#: ``--engine`` of the commands that need an image detector (evaluate)
DETECTOR_ENGINE_HELP = (
    "auto (default: the model's graph on ONNX Runtime, exported into the model folder at first use, with evidence; "
    "torch where it cannot be exported), onnxruntime (as auto), or torch."
)
#: ``--engine`` of the commands that score images with any image model (predict, serve, batch-predict)
ENGINE_HELP = DETECTOR_ENGINE_HELP + " Without torch installed: the folder's exported model.onnx."


def describe_model(det) -> str:
    """What kind of model ``det`` is, for messages: "an exported model (from patchcore)", "a video
    model", "a musc model"."""
    from ..runtime import OnnxDetector

    if isinstance(det, OnnxDetector):
        return f"an exported model (from {det.name})"
    return f"a {det.name} model"


def image_detector(model_dir: Path, key: Optional[bytes] = None, engine: str = "auto"):
    """The image detector (PatchCore, PaDiM, AnomalyDINO) of ``model_dir`` on ``engine``, for the
    commands that need one (evaluate, discover, export).

    Raises:
        ConfigError: the folder holds another kind of model (video, MuSc, an exported model).
        ModelFileError: the folder cannot be loaded.
    """
    from ..detectors import Detector
    from ..errors import ConfigError
    from ..loading import load_detector

    det = load_detector(model_dir, key=key, engine=engine)
    if not isinstance(det, Detector):
        raise ConfigError(f"{model_dir} holds {describe_model(det)}: this command needs an image detector fitted with "
                          "`anomalens fit` (and torch)")
    return det
#: ``--key-file`` of the commands that only read a model
KEY_FILE_HELP = "Model-signing key file: refuse models that are unsigned or not signed with it (default: ANOMALENS_MODEL_KEY)."


def model_key(key_file: Optional[Path]) -> Optional[bytes]:
    """The model-signing key (:func:`anomalens.manifest.resolve_key`): the contents of ``key_file``,
    else ``ANOMALENS_MODEL_KEY``, else None.

    Raises:
        ConfigError: a missing or unreadable key file, or a key shorter than 16 bytes.
    """
    from ..manifest import resolve_key

    return resolve_key(key_file)


def fail(exc: BaseException) -> None:
    console.print("[bold red]error:[/]", escape(str(exc)), soft_wrap=True)
    raise typer.Exit(code=2)


def fmt_pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def fmt_threshold(v: float) -> str:
    """A threshold for people: 4 decimals, or "set per batch" (batch-relative one-shot models)."""
    return "set per batch" if math.isnan(v) else f"{v:.4f}"


def split_names(text: str) -> list[str]:
    """The names of a comma-separated option (``"a, b,"`` -> ``["a", "b"]``): blanks dropped."""
    return [x.strip() for x in text.split(",") if x.strip()]


def metrics_table(result_dict: dict, title: str) -> Table:
    """A rich table: one row for all images, one per defect type; metrics in percent."""
    cols = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "image_ap", "false_alarm_rate", "detection_rate"]
    t = Table(title=title)
    t.add_column("subset")
    for c in cols:
        t.add_column(c.replace("_", " "), justify="right")
    t.add_row("all", *[fmt_pct(result_dict["metrics"].get(c)) for c in cols])
    for name, m in result_dict.get("per_defect", {}).items():
        t.add_row(name, *[fmt_pct(m.get(c)) for c in cols])
    return t
