"""REST service and web page (FastAPI + uvicorn): ``anomalens serve MODEL_DIR... [--port 8000]``.

Endpoints (OpenAPI schema at ``/openapi.json``; interactive docs at ``/docs``, served from local
assets, never a CDN):

* ``POST /predict`` -- multipart form with one or more image files in the field ``files``; query
  ``model`` (name, when several are served) and ``heatmap=true`` (adds the overlay PNG, base64).
  Answers per image the fields of :meth:`anomalens.prediction.Prediction.summary` (``pred_score``,
  ``normalized_score``, decision, p-value, threshold, anomalous area, ...) with the file name, size,
  regions and milliseconds.
* ``GET /health`` -- liveness and the served model names. ``GET /models``, ``GET /model?name=`` --
  configuration, thresholds, runtime and fit statistics (training image count, never their paths).
  ``GET /recent`` -- the last results, only with ``serve --recent`` (it shows every client's file names).
* ``GET /`` -- the web page: drop or choose an image; see the part beside its heatmap, the decision,
  the score against the threshold, and the regions.

For an unattended network (:mod:`.guard`, :mod:`.server`): an optional API key (bearer token, 401
without it; ``/health``, the page and the docs stay open); a body limit checked on ``Content-Length``
and counted while a body streams, chunked too (413, nothing spooled past the limit); a body deadline
(408); a pixel budget per image and per request, read from the image headers before any decoding
(422 per image, 413 per request); a number of scoring requests at once (503 with ``Retry-After``);
a request-head timeout, a keep-alive timeout and a connection cap at the HTTP layer.

Every error is JSON ``{"error": "..."}``, whatever its source (validation, 401, 404, 405, 413, 415,
503, 500), and the service keeps serving: 400 for too many files or a malformed request, 404 for an
unknown model or path, 409 for fewer than 5 images sent to a one-shot model (it decides relative to
each batch), 422 for a missing field or an empty, corrupt, truncated or non-image file. One
inference runs at a time per model (a lock), which bounds memory and suits a small CPU. Nothing
here imports torch at module level: with ONNX Runtime and an exported ``model.onnx`` the service
runs on an install without torch.
"""

from __future__ import annotations

from .app import create_app
from .server import serve

__all__ = ["create_app", "serve"]
