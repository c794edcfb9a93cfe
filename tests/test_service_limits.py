"""The service's limits in-process (FastAPI's TestClient), on a model fitted on hazelnut_reduced:
fuzzed uploads never get a 5xx and every error has one JSON shape; the API key; the pixel budget;
offline docs; /recent off by default."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def client(fitted_patchcore):
    from fastapi.testclient import TestClient

    from anomalens.service import create_app

    app = create_app({"hazelnut": fitted_patchcore[1]}, engine="torch", api_key=KEY, max_upload_mb=2, max_pixels=4_000_000,
                     max_request_pixels=6_000_000, max_files=4)
    return TestClient(app, raise_server_exceptions=False)  # a 500 must show as a response, not a test crash


@pytest.fixture(scope="module")
def samples(hazelnut) -> dict[str, bytes]:
    """A real PNG (downscaled, so fuzzing stays fast) and the same image as JPEG."""
    img = Image.open(hazelnut / "test" / "crack" / "000.png").convert("RGB").resize((96, 96))
    out = {}
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out[fmt] = buf.getvalue()
    return out


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels but holds almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def assert_error_shape(r, status: int | None = None) -> str:
    """The one error shape: JSON ``{"error": "<non-empty text>"}``; returns the text."""
    if status is not None:
        assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


@st.composite
def uploads(draw, samples):
    """(files, content type of the request or None for multipart) of many broken kinds."""
    kind = draw(st.sampled_from(["random", "mutated", "truncated", "huge", "part type", "request type", "field"]))
    base = samples[draw(st.sampled_from(["PNG", "JPEG"]))]
    data, part_type, field, request_type = base, "image/png", "files", None
    if kind == "random":
        data = draw(st.binary(max_size=3000))
    elif kind == "mutated":
        b = bytearray(base)
        for _ in range(draw(st.integers(1, 20))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        data = bytes(b)
    elif kind == "truncated":
        data = base[: draw(st.integers(0, len(base) - 1))]
    elif kind == "huge":
        data = png_declaring(draw(st.integers(1, 2**31 - 1)), draw(st.integers(1, 2**31 - 1)))
    elif kind == "part type":
        part_type = draw(st.sampled_from(["text/plain", "application/octet-stream", "", "image/jpeg; x=1", "../../etc"]))
    elif kind == "request type":
        request_type = draw(st.sampled_from(["application/json", "text/plain", "multipart/form-data", "multipart/form-data; boundary=zz",
                                             "image/png", "multipart/mixed; boundary=x"]))
    else:
        field = draw(st.sampled_from(["file", "image", "", "files[]"]))
    n = draw(st.integers(1, 3))
    name = draw(st.text(min_size=0, max_size=40))
    return [(field, (name or "x.png", data, part_type))] * n, request_type


def test_fuzzed_uploads_never_get_a_5xx_and_errors_have_one_shape(client, samples):
    """Random bytes, mutated and truncated PNG/JPEG, headers declaring up to 2^31 x 2^31 pixels,
    wrong content types and fields: every answer is a 200 with results or a 4xx JSON error."""
    seen: set[int] = set()

    @settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(uploads(samples))
    def check(case):
        files, request_type = case
        if request_type is None:
            r = client.post("/predict", files=files, headers=AUTH)
        else:
            r = client.post("/predict", content=files[0][1][1], headers={**AUTH, "Content-Type": request_type})
        seen.add(r.status_code)
        assert r.status_code < 500, r.text
        if r.status_code == 200:
            res = r.json()["results"]
            assert len(res) == len(files) and all(x["decision"] in ("OK", "NG") for x in res)
        else:
            assert 400 <= r.status_code < 500
            assert_error_shape(r)

    check()
    assert 200 in seen or len(seen) >= 3  # the fuzzing reached more than one outcome
    assert client.get("/health").status_code == 200  # and the service still serves


def test_every_error_has_the_same_json_shape(client, samples):
    png = [("files", ("a.png", samples["PNG"], "image/png"))]
    assert "API key" in assert_error_shape(client.get("/models"), 401)
    assert_error_shape(client.post("/predict", files=png), 401)
    assert_error_shape(client.post("/predict", files=png, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error_shape(client.post("/predict", files=png, headers={"Authorization": KEY}), 401)  # no "Bearer"
    assert_error_shape(client.get("/no-such-path", headers=AUTH), 404)
    assert_error_shape(client.get("/recent", headers=AUTH), 404)  # off unless serve --recent
    r = client.delete("/predict", headers=AUTH)
    assert "POST" in r.headers.get("allow", "") and assert_error_shape(r, 405)
    assert "files" in assert_error_shape(client.post("/predict", files=[("image", ("a.png", samples["PNG"], "image/png"))], headers=AUTH), 422)
    assert_error_shape(client.get("/model?name=nope", headers=AUTH), 404)
    assert_error_shape(client.post("/predict?heatmap=maybe", files=png, headers=AUTH), 422)
    assert_error_shape(client.post("/predict", content=b"{}", headers={**AUTH, "Content-Type": "application/json"}), 415)
    big = samples["PNG"] + b"\0" * (3 * 2**20)  # over the 2 MB body limit
    r = client.post("/predict", files=[("files", ("big.png", big, "image/png"))], headers=AUTH)
    assert "limit of 2 MB" in assert_error_shape(r, 413)
    assert_error_shape(client.post("/predict", files=png * 5, headers=AUTH), 400)


def test_api_key(client, samples):
    png = [("files", ("a.png", samples["PNG"], "image/png"))]
    assert client.get("/health").status_code == 200  # liveness stays open
    r = client.post("/predict", files=png)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = client.post("/predict", files=png, headers=AUTH)
    assert r.status_code == 200 and r.json()["results"][0]["decision"] in ("OK", "NG")
    assert client.get("/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200  # the scheme is case-insensitive
    assert client.get("/models", headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
    info = client.get("/model", headers=AUTH).json()
    assert info["train_images"] == "50 images"  # a count, never the training machine's paths
    assert "bearer" in str(client.get("/openapi.json").json()["components"]["securitySchemes"]).lower()


def test_pixel_budget_per_request(client, samples):
    """4 MP per image, 6 MP per request: checked from the headers, before any image is decoded."""
    two_mp = png_declaring(2000, 1000)
    files = [("files", (f"{i}.png", two_mp, "image/png")) for i in range(4)]  # 8 MP in all
    r = client.post("/predict", files=files, headers=AUTH)
    assert "8000000 pixels" in assert_error_shape(r, 413) and "6000000" in r.json()["error"]
    # one image over the per-image limit: 422, naming it
    r = client.post("/predict", files=[("files", ("wide.png", png_declaring(5000, 1000), "image/png"))], headers=AUTH)
    assert "wide.png" in assert_error_shape(r, 422) and "exceeds the limit of 4000000 pixels" in r.json()["error"]
    # within the budget, a header that lies about its data is a 422 from the decoder, not a 500
    r = client.post("/predict", files=files[:2], headers=AUTH)
    assert "corrupt or truncated" in assert_error_shape(r, 422)
    # real images within the budget are scored
    r = client.post("/predict", files=[("files", ("a.png", samples["PNG"], "image/png"))] * 3, headers=AUTH)
    assert r.status_code == 200 and len(r.json()["results"]) == 3


def test_docs_are_served_offline(client):
    """/docs uses only local assets (no CDN); the assets and /openapi.json are served without a key."""
    html = client.get("/docs").text
    assert "swagger-ui-bundle.js" in html and "http://" not in html and "https://" not in html
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        r = client.get(f"/docs/{asset}")
        assert r.status_code == 200 and len(r.content) > 10_000
    assert "/predict" in client.get("/openapi.json").json()["paths"]
