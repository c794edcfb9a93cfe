"""The REST service and its web page, on real images: in-process, over loopback HTTP, in Chromium."""

from __future__ import annotations

import base64
import io
import os
import shutil
import sys
import time

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

sys.path.insert(0, str(ROOT / "benchmarks"))
import load  # noqa: E402  (benchmarks/load.py: the load-test client and server runner)


@pytest.fixture(scope="module")
def client(fitted_patchcore):
    from fastapi.testclient import TestClient

    from anomalens.service import create_app

    _, model_dir = fitted_patchcore
    # the default engine (auto): the detector's graph on ONNX Runtime, as the saved detector runs it
    return TestClient(create_app({"hazelnut": model_dir, "again": model_dir}, recent=20))


def test_predict_endpoint_matches_python(client, hazelnut, fitted_patchcore):
    det, _ = fitted_patchcore
    paths = [hazelnut / "test" / "crack" / "000.png", hazelnut / "test" / "good" / "000.png"]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    r = client.post("/predict?heatmap=true", files=files)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    expected = det.predict(paths)
    assert [x["decision"] for x in res] == ["NG", "OK"]
    for x, p in zip(res, expected):
        assert x["pred_score"] == pytest.approx(p.pred_score, rel=1e-6) and x["p_value"] == p.p_value
        assert x["normalized_score"] == pytest.approx(p.normalized_score, abs=1e-5)  # Prediction.summary() passed through
        assert x["p_value_at_floor"] == p.p_value_at_floor and "path" not in x
        assert len(x["regions"]) == len(p.regions)
        heat = Image.open(io.BytesIO(base64.b64decode(x["heatmap_png"])))
        assert heat.size == (256, 256)
    assert res[0]["regions"][0]["area_px"] > 0
    # several models by name; unknown names are a 404 with a JSON error
    assert client.post("/predict?model=again", files=files[:1]).json()["model"] == "again"
    r = client.post("/predict?model=nope", files=files[:1])
    assert r.status_code == 404 and "nope" in r.json()["error"]
    assert client.get("/health").json()["models"] == ["again", "hazelnut"]
    info = client.get("/model").json()
    assert info["detector"] == "patchcore" and info["threshold"] == det.threshold
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/recent").json()["results"][0]["filename"] == "000.png"


def test_service_limits(fitted_patchcore, hazelnut):
    from fastapi.testclient import TestClient

    from anomalens.service import create_app

    c = TestClient(create_app({"m": fitted_patchcore[1]}, engine="torch", max_upload_mb=0.05, max_pixels=100 * 100, max_files=2))
    png = (hazelnut / "test" / "good" / "000.png").read_bytes()  # about 150 KB: over 0.05 MB
    r = c.post("/predict", files=[("files", ("a.png", png, "image/png"))])
    assert r.status_code == 413 and "limit" in r.json()["error"]
    small = io.BytesIO()
    Image.new("RGB", (200, 200)).save(small, format="PNG")
    r = c.post("/predict", files=[("files", ("big.png", small.getvalue(), "image/png"))])
    assert r.status_code == 422 and "exceeds the limit of 10000 pixels" in r.json()["error"]
    tiny = io.BytesIO()
    Image.new("RGB", (64, 64)).save(tiny, format="PNG")
    r = c.post("/predict", files=[("files", (f"{i}.png", tiny.getvalue(), "image/png")) for i in range(3)])
    assert r.status_code == 400 and "limit is 2" in r.json()["error"]


def test_service_over_http_survives_malformed_requests_and_concurrency(fitted_patchcore, hazelnut):
    """A real server on loopback: 200 malformed requests get only 4xx, 16 concurrent clients get no error."""
    images = [(p.name, p.read_bytes()) for p in sorted((hazelnut / "test").rglob("*.png"))]
    with load.Server([str(fitted_patchcore[1])], engine="auto") as srv:
        bad = load.malformed_requests(srv.port, images[0][1], n=200)
        assert bad["4xx"] == 200 and bad["5xx"] == 0 and bad["other"] == 0, bad
        assert bad["valid_after"]
        r = load.run_level(srv.port, images, clients=16, n_requests=48, time_limit=120)
        assert r["requests"] == 48 and r["errors"] == 0, r
        assert srv.proc.poll() is None  # still serving


def test_web_page_upload_in_chromium(fitted_patchcore, hazelnut, tmp_path):
    """Headless Chromium on a service with an API key: the page asks for the key; choose an image, see NG
    colour-coded, the part beside its overlay, the score against the threshold, the regions, the recent list."""
    driver_path = shutil.which("chromedriver")
    if driver_path is None:
        msg = "chromedriver not found (apt-get install chromium-driver)"
        if os.environ.get("ANOMALENS_REQUIRE_BROWSER") == "1":
            pytest.fail(msg + " and ANOMALENS_REQUIRE_BROWSER=1")
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1300,1000",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    with load.Server([str(fitted_patchcore[1])], engine="auto", extra=["--recent"], env={"ANOMALENS_API_KEY": "page-test-key"}) as srv:
        driver = webdriver.Chrome(service=Service(driver_path), options=opts)
        try:
            driver.get(f"http://127.0.0.1:{srv.port}/")
            WebDriverWait(driver, 30).until(ec.visibility_of_element_located((By.ID, "key")))  # 401: the page asks for the key
            driver.find_element(By.ID, "key").send_keys("page-test-key")
            driver.find_element(By.ID, "keysave").click()
            WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text)
            driver.find_element(By.ID, "file").send_keys(str(hazelnut / "test" / "hole" / "000.png"))
            WebDriverWait(driver, 60).until(ec.text_to_be_present_in_element((By.ID, "verdict"), "NG"))
            WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#recent tbody tr"))
            assert driver.find_element(By.ID, "overlay").is_displayed()
            part = driver.find_element(By.ID, "part")  # the uploaded part, beside the overlay, loaded
            WebDriverWait(driver, 10).until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", part) == 256)
            assert part.is_displayed() and part.location["y"] == driver.find_element(By.ID, "overlay").location["y"]
            red = driver.execute_script("return getComputedStyle(arguments[0]).backgroundColor", driver.find_element(By.ID, "verdict"))
            assert red == "rgb(207, 34, 46)"  # NG in red
            facts = driver.find_element(By.ID, "facts").text
            assert "against threshold" in facts and "normalized score" in facts
            rows = driver.find_elements(By.CSS_SELECTOR, "#regions tbody tr")
            assert rows and rows[0].find_elements(By.TAG_NAME, "td")[0].text == "1"
            assert "000.png" in driver.find_element(By.ID, "recent").text
            time.sleep(0.2)
            shot = tmp_path / "page.png"
            driver.save_screenshot(str(shot))
            # a non-image gives the service's error message on the page, and the page keeps working
            junk = tmp_path / "junk.png"
            junk.write_bytes(b"definitely not a png")
            driver.find_element(By.ID, "file").send_keys(str(junk))
            WebDriverWait(driver, 30).until(ec.text_to_be_present_in_element((By.ID, "error"), "not a recognised image format"))
            assert not driver.find_element(By.ID, "overlay").is_displayed()  # no stale result beside the error
            driver.find_element(By.ID, "file").send_keys(str(hazelnut / "test" / "good" / "000.png"))
            WebDriverWait(driver, 60).until(ec.text_to_be_present_in_element((By.ID, "verdict"), "OK"))
            green = driver.execute_script("return getComputedStyle(arguments[0]).backgroundColor", driver.find_element(By.ID, "verdict"))
            assert green == "rgb(26, 127, 55)"
            assert driver.find_element(By.ID, "error").text == ""
        finally:
            driver.quit()
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert len(np.unique(img.reshape(-1, 3)[::5], axis=0)) > 500  # the heatmap overlay is on the page


def test_onnx_engine_reexports_a_stale_file(fitted_patchcore, hazelnut, tmp_path):
    """The ONNX Runtime engine's graph in the model folder gives the Python model's scores, and a stale export is never used."""
    import json as _json

    from anomalens.export import export_onnx
    from anomalens.serialization import read_config
    from anomalens.export import onnx_for_model_dir

    det, model_dir = fitted_patchcore
    work = tmp_path / "m"
    shutil.copytree(model_dir, work)
    (work / "model.onnx").unlink(missing_ok=True)
    export_onnx(det, work / "model.onnx", source_config_sha256="from-an-older-fit")
    sha = read_config(work)["config_sha256"]
    m = onnx_for_model_dir(work, sha)
    assert m.meta["source_config_sha256"] == sha  # re-exported, not the stale file
    assert _json.loads(m.session.get_modelmeta().custom_metadata_map["anomalens"])["threshold"] == det.threshold
    img = hazelnut / "test" / "print" / "000.png"
    assert m.predict([img])[0].pred_score == pytest.approx(det.predict([img])[0].pred_score, rel=1e-4)
