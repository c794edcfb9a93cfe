"""The FastAPI application: the models it serves, the endpoints, the error shape (see the package docstring)."""

from __future__ import annotations

import base64
import collections
import io
import math
import os
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, HTTPException, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import AnomalensError, CalibrationError, ImageReadError
from .guard import Guard

PAGE = Path(__file__).resolve().parent.parent / "web" / "index.html"
#: summary fields of a Prediction that mean nothing for an upload (the row has ``filename`` instead)
_DROPPED = ("path", "gt_label", "defect_type", "error")


class ServedModel:
    """One model behind the service: the model (:func:`anomalens.runtime.load_inference_model`, its
    ONNX Runtime graph opened at start-up), its lock, and what ``/model`` shows.

    Raises:
        ModelFileError: the directory cannot be loaded (or fails its signature check with ``key``).
        ConfigError: an unknown engine, or a model kind the service does not score (video; MuSc, whose
            scores are relative to a whole batch).
    """

    def __init__(self, name: str, model_dir: Path, engine: str, threads: int | None = None, key: Any = None):
        from ..errors import ConfigError
        from ..runtime import load_inference_model
        from ..serialization import read_config

        self.name = name
        self.dir = model_dir
        self.engine = engine
        cfg = read_config(model_dir, key=key)  # the whole folder (manifest, signature with a key, every checksum)
        self.model = load_inference_model(model_dir, engine=engine, threads=threads, key=key)
        if getattr(self.model, "is_video", False):
            raise ConfigError(f"{model_dir} is a video model: the service scores images (use anomalens video predict)")
        if getattr(self.model, "scores_whole_batch", False):
            raise ConfigError(f"{model_dir} is a {self.model.name} model: it scores a whole batch of images against each other, "
                              "not the images of one request (use anomalens zero-shot or predict)")
        #: what scores the images: ``"onnxruntime"`` or ``"torch"``
        self.runtime = self.model.engine
        cfg.pop("tensors", None)
        cfg["train_images"] = f"{len(cfg.get('train_images') or [])} images"  # never the training machine's paths
        self.config = cfg
        self.lock = threading.Lock()

    def predict(self, images: list):
        with self.lock:
            return self.model.predict(images)


def jsonable(v: Any) -> Any:
    """``v`` with NaN and infinities as None, recursively (JSON has neither)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def header_pixels(data: bytes, name: str, max_pixels: int) -> int:
    """Width x height of an image file from its header (no pixel is decoded).

    Raises:
        ImageReadError: empty, not an image, or over ``max_pixels``.
    """
    from PIL import Image

    if not data:
        raise ImageReadError(name, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Image.DecompressionBombError as exc:
        raise ImageReadError(name, f"exceeds the limit of {max_pixels} pixels ({exc})") from None
    except Exception:  # Pillow raises many types for a file it cannot identify
        raise ImageReadError(name, "not a recognised image format (corrupt or not an image)") from None
    if w * h > max_pixels:
        raise ImageReadError(name, f"{w}x{h} exceeds the limit of {max_pixels} pixels")
    return w * h


def _overlay_png(img, pred, pixel_threshold: float) -> str:
    import cv2

    from ..visualize import prediction_overlay

    ov = prediction_overlay(pred, img, pixel_threshold)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(ov, cv2.COLOR_RGB2BGR))
    return base64.b64encode(buf.tobytes()).decode() if ok else ""


def _docs_assets() -> Path | None:
    """The folder of Swagger UI's JavaScript and CSS shipped by ``fastapi-offline``, or None."""
    try:
        folder = Path(str(resources.files("fastapi_offline") / "static"))
    except ModuleNotFoundError:
        return None
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def create_app(
    model_dirs: dict[str, str | os.PathLike],
    *,
    engine: str = "auto",
    threads: int | None = None,
    key: Any = None,
    api_key: str | None = None,
    max_upload_mb: float = 20.0,
    max_pixels: int = 40_000_000,
    max_request_pixels: int = 50_000_000,
    max_files: int = 16,
    max_active: int = 4,
    max_queue: int = 16,
    queue_timeout: float = 10.0,
    body_timeout: float = 60.0,
    recent: int = 0,
    docs: bool = True,
) -> FastAPI:
    """Build the FastAPI application serving ``model_dirs`` (name -> model directory).

    Args:
        engine: ``"auto"`` (default: each detector's graph on ONNX Runtime, exported into its folder
            at start-up when missing or stale, with evidence; torch where it cannot be exported),
            ``"onnxruntime"`` (as auto) or ``"torch"`` (:func:`anomalens.load_detector`). Without
            torch: each folder's exported ``model.onnx``.
        threads: ONNX Runtime intra-op threads of an exported ``model.onnx`` run without torch
            (None: its default); a detector's graph uses torch's thread count.
        key: the signing key the loader checks each model against (None: ``ANOMALENS_MODEL_KEY`` when set, else no check).
        api_key: bearer token required on every path but ``/health``, the page and the docs; None: open.
        max_upload_mb: largest request body, in MB (declared or streamed).
        max_pixels: largest image, in pixels (width x height), checked from its header.
        max_request_pixels: largest sum of pixels over one request's images, checked from their
            headers before any is decoded.
        max_files: most images per request.
        max_active: scoring requests at once; more wait in line.
        max_queue, queue_timeout: requests that may wait for a slot, and for how many seconds; past
            either the answer is 503 with ``Retry-After``.
        body_timeout: seconds a request body may take to arrive.
        recent: how many recent results ``GET /recent`` keeps; 0 (the default) turns it off.
        docs: serve the API docs at ``/docs`` (from the assets of ``fastapi-offline``: no CDN; off
            when that package is missing). ``/openapi.json`` is always served.

    Raises:
        ModelFileError: a model directory cannot be loaded.
        AnomalensError: no model. ConfigError: an unknown engine (``"onnx"`` included: say ``"onnxruntime"``).
    """
    if not model_dirs:
        raise AnomalensError("serve needs at least one model directory")
    models = {name: ServedModel(name, Path(d), engine, threads, key) for name, d in model_dirs.items()}
    default = next(iter(models))
    history: collections.deque = collections.deque(maxlen=max(1, recent))
    assets = _docs_assets() if docs else None

    app = FastAPI(
        title="anomalens",
        description="Visual anomaly detection: score images, get OK/NG decisions, heatmaps and regions.",
        version=str(models[default].config.get("anomalens_version", "")),
        docs_url=None, redoc_url=None,
    )
    app.state.docs = assets is not None
    bearer = [Security(HTTPBearer(auto_error=False, description="the service's API key (when it has one)"))]
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=int(max_upload_mb * 2**20), max_active=max_active, body_timeout=body_timeout,
                       max_queue=max_queue, queue_timeout=queue_timeout)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)}, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        msgs = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', []))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse(status_code=422, content={"error": f"invalid request ({msgs})"})

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        return JSONResponse(status_code=500, content={"error": f"internal error ({type(exc).__name__}); the service keeps running"})

    def _model(name: str | None) -> ServedModel:
        key_ = name or default
        if key_ not in models:
            raise HTTPException(404, f"no model named {key_!r}; served: {sorted(models)}")
        return models[key_]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    if assets is not None:
        from fastapi.openapi.docs import get_swagger_ui_html

        files = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}

        @app.get("/docs", include_in_schema=False)
        def api_docs() -> HTMLResponse:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="anomalens API", swagger_js_url="/docs/swagger-ui-bundle.js",
                                       swagger_css_url="/docs/swagger-ui.css", swagger_favicon_url="/docs/favicon.png",
                                       swagger_ui_parameters={"validatorUrl": None})

        @app.get("/docs/{name}", include_in_schema=False)
        def api_docs_asset(name: str) -> FileResponse:
            if name not in files:
                raise HTTPException(404, f"no docs asset {name!r}")
            return FileResponse(assets / name, media_type=files[name])

    @app.get("/health")
    def health() -> dict:
        """Liveness: ``{"status": "ok", "models": [...], "engine": ...}`` (open even with an API key)."""
        return {"status": "ok", "models": sorted(models), "engine": engine}

    @app.get("/models", dependencies=bearer)
    def list_models() -> dict:
        """The served models with their detector, backbone, thresholds and runtime."""
        return jsonable({
            "default": default,
            "models": [
                {"name": m.name, "detector": m.config.get("detector"), "backbone": m.config.get("params", {}).get("backbone"),
                 "threshold": m.model.threshold, "pixel_threshold": m.model.pixel_threshold, "runtime": m.runtime}
                for m in models.values()
            ],
        })

    @app.get("/model", dependencies=bearer)
    def model_info(name: str | None = Query(None, description="model name (default: the first)")) -> dict:
        """A model's configuration, calibration and fit statistics; ``threshold_note`` says how the
        threshold was set (and when the normal images supported only a higher false-alarm rate than asked)."""
        m = _model(name)
        cal = m.config.get("calibration") or {}
        return jsonable({"name": m.name, "engine": m.engine, "runtime": m.runtime, "threshold_note": cal.get("note", ""),
                         "false_alarm_rate": cal.get("false_alarm_rate"), **m.config})

    if recent > 0:
        @app.get("/recent", dependencies=bearer)
        def recent_results() -> dict:
            """The most recent results, newest first (no heatmaps). Only with ``serve --recent``: it shows
            every client's file names."""
            return {"results": list(reversed(history))}

    @app.post("/predict", dependencies=bearer)
    def predict(
        files: list[UploadFile] = File(..., description="one or more image files (PNG, JPEG, BMP, TIFF, ...)"),
        model: str | None = Query(None, description="model name (default: the first served)"),
        heatmap: bool = Query(False, description="add the heatmap overlay as a base64 PNG"),
    ) -> dict:
        """Score images: per image the score, normalized score, OK/NG decision, p-value, regions (and the overlay)."""
        from ..io import decode_image

        m = _model(model)
        if len(files) > max_files:
            raise HTTPException(400, f"{len(files)} files in one request; the limit is {max_files}")
        blobs, pixels = [], 0
        for f in files:  # sizes from the headers first: nothing is decoded for a request over budget
            name, data = f.filename or "upload", f.file.read()
            try:
                pixels += header_pixels(data, name, max_pixels)
            except ImageReadError as exc:
                raise HTTPException(422, str(exc)) from None
            blobs.append((name, data))
        if pixels > max_request_pixels:
            raise HTTPException(413, f"the images total {pixels} pixels; the limit per request is {max_request_pixels}: send fewer or smaller images")
        images = []
        for name, data in blobs:
            try:
                images.append(decode_image(data, name, max_pixels))
            except ImageReadError as exc:
                raise HTTPException(422, str(exc)) from None
        del blobs
        t0 = time.perf_counter()
        try:
            preds = m.predict(images)
        except CalibrationError as exc:  # a one-shot model given too few images to decide relative to
            raise HTTPException(409, str(exc)) from None
        ms = 1000.0 * (time.perf_counter() - t0) / max(1, len(images))
        results = []
        for f, img, p in zip(files, images, preds):
            summary = {k: v for k, v in p.summary().items() if k not in _DROPPED}
            row: dict[str, Any] = {
                "filename": f.filename or "upload", "width": int(img.shape[1]), "height": int(img.shape[0]), **summary,
                "regions": [r.to_dict() for r in p.regions], "ms": round(ms, 1), "model": m.name,
            }
            if recent > 0:
                history.append({**row, "regions": len(p.regions), "time": time.strftime("%H:%M:%S")})
            if heatmap:
                row["heatmap_png"] = _overlay_png(img, p, m.model.pixel_threshold)
            results.append(row)
        return jsonable({"model": m.name, "results": results})

    return app
