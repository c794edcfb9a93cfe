"""Load test of `anomalens serve` on loopback: latency, 5xx answers, memory, and a soak.

Starts the service in a subprocess on 127.0.0.1 (a free port), waits for ``/health``, warms it up,
then:

1. **burst**: ``--clients`` threads (8), each with its own HTTP connection per request, send
   ``--requests`` ``POST /predict`` with real images (bounded by ``--time-limit``): p50 / p95 / p99
   latency, 5xx answers, and the server's resident memory (``/proc/PID/status``) before and after.
   Clients behave as the service asks: a 503 with ``Retry-After`` (all scoring slots busy) is retried
   after that many seconds; latency counts from the first attempt. ``5xx`` counts every 5xx answer
   seen (the retried 503s are also counted apart as ``busy_503``); ``errors`` counts requests that
   finally failed.
2. **soak**: the same clients for ``--soak-seconds`` (default 180), the server's RSS sampled every
   ``--sample-seconds``; the RSS slope (least squares, MB per minute) says whether memory stays flat.
3. **malformed**: 200 bad requests (truncated files, random bytes, huge dimensions, wrong fields,
   wrong content types) must all get 4xx answers, and a valid request afterwards must succeed.

Rows are printed as Markdown and appended to ``benchmarks/results/load.jsonl`` (``--out``).

Usage::

    python benchmarks/load.py MODEL_DIR IMAGES_DIR [--clients 8] [--requests 400] [--soak-seconds 180] [--engine auto|torch|onnxruntime]

Only loopback addresses are ever contacted.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import append_jsonl, print_markdown  # noqa: E402

HOST = "127.0.0.1"
RESULTS = Path(__file__).resolve().parent / "results" / "load.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def multipart(files: list[tuple[str, str, bytes, str]]) -> tuple[bytes, str]:
    """``[(field, filename, data, content type)]`` -> (body, content-type header)."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for field, name, data, ctype in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\nContent-Type: {ctype}\r\n\r\n'.encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None, timeout: float = 120.0) -> tuple[int, bytes]:
    """One request on a fresh loopback connection: (status, body)."""
    status, _, data = request_full(port, method, path, body, headers, timeout)
    return status, data


def request_full(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None, timeout: float = 120.0) -> tuple[int, dict, bytes]:
    """One request on a fresh loopback connection: (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def predict_request(port: int, name: str, data: bytes, headers: dict | None = None) -> tuple[int, bytes]:
    body, ctype = multipart([("files", name, data, "image/png")])
    return request(port, "POST", "/predict", body, {"Content-Type": ctype, **(headers or {})})


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


class Server:
    """``anomalens serve`` in a subprocess on a free loopback port (a context manager; always stopped)."""

    def __init__(self, model_dirs: list[str], engine: str = "auto", extra: list[str] | None = None, start_timeout: float = 180.0,
                 env: dict | None = None):
        self.port = free_port()
        exe = [sys.executable, "-m", "anomalens.cli", "serve", *model_dirs, "--host", HOST, "--port", str(self.port), "--engine", engine, *(extra or [])]
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server never blocks on a full pipe
        self.proc = subprocess.Popen(exe, stdout=subprocess.DEVNULL, stderr=self.log, env={**os.environ, **(env or {})})
        t0 = time.time()
        while time.time() - t0 < start_timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.stderr()[-2000:]}")
            try:
                if request(self.port, "GET", "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        self.close()
        raise RuntimeError("server did not start in time")

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _quantile_ms(lat: list[float], q: float) -> float:
    return round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else float("nan")


def run_level(port: int, images: list[tuple[str, bytes]], clients: int, n_requests: int | None, time_limit: float,
              headers: dict | None = None, max_retries: int = 30) -> dict:
    """Predictions from ``clients`` threads until ``n_requests`` are done (None: no count) or
    ``time_limit`` seconds have passed; 503s with ``Retry-After`` are retried (see the module docstring)."""
    lat: list[float] = []
    errors: list[str] = []
    counts = {"5xx": 0, "busy_503": 0}
    counter = iter(range(n_requests)) if n_requests is not None else iter(int, 1)  # iter(int, 1): endless zeros
    lock = threading.Lock()
    deadline = time.perf_counter() + time_limit

    def worker() -> None:
        k = 0
        while time.perf_counter() < deadline:
            with lock:
                k = next(counter, None)
            if k is None:
                return
            name, data = images[random.randrange(len(images))]
            t = time.perf_counter()
            for _ in range(max_retries):
                try:
                    body, ctype = multipart([("files", name, data, "image/png")])
                    status, head, out = request_full(port, "POST", "/predict", body, {"Content-Type": ctype, **(headers or {})})
                except Exception as exc:  # a refused or broken connection is an error to count, not a crash
                    status, head, out = -1, {}, str(exc).encode()
                if status >= 500:
                    with lock:
                        counts["5xx"] += 1
                        counts["busy_503"] += status == 503
                if status == 503 and "retry-after" in head and time.perf_counter() < deadline:
                    time.sleep(min(5.0, float(head["retry-after"])))
                    continue
                break
            ok = status == 200 and json.loads(out)["results"][0]["decision"] in ("OK", "NG")
            with lock:
                if ok:
                    lat.append(time.perf_counter() - t)
                else:
                    errors.append(f"{status}: {out[:200]!r}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {
        "clients": clients, "requests": len(lat) + len(errors), "errors": len(errors), **counts, "seconds": round(wall, 2),
        "throughput_rps": round(len(lat) / wall, 2) if wall else 0.0,
        "p50_ms": _quantile_ms(lat, 0.5), "p95_ms": _quantile_ms(lat, 0.95), "p99_ms": _quantile_ms(lat, 0.99),
        "mean_ms": round(1000 * statistics.fmean(lat), 1) if lat else float("nan"), "first_errors": errors[:3],
    }


def soak(port: int, pid: int, images: list[tuple[str, bytes]], clients: int, seconds: float, sample_seconds: float = 5.0,
         headers: dict | None = None) -> dict:
    """Load for ``seconds`` while sampling the server's RSS; adds ``rss_slope_mb_per_min`` (least squares)."""
    samples: list[tuple[float, float]] = []
    done = threading.Event()
    t0 = time.perf_counter()

    def sampler() -> None:
        while not done.is_set():
            samples.append((time.perf_counter() - t0, rss_mb(pid)))
            done.wait(sample_seconds)

    th = threading.Thread(target=sampler)
    th.start()
    try:
        row = run_level(port, images, clients, None, seconds, headers)
    finally:
        done.set()
        th.join()
    samples.append((time.perf_counter() - t0, rss_mb(pid)))
    ts, mb = [t / 60.0 for t, _ in samples], [m for _, m in samples]
    slope = statistics.linear_regression(ts, mb).slope if len(samples) >= 3 else float("nan")
    return {**row, "phase": "soak", "rss_start_mb": round(mb[0], 1), "rss_end_mb": round(mb[-1], 1), "rss_max_mb": round(max(mb), 1),
            "rss_slope_mb_per_min": round(slope, 2), "rss_samples": len(samples)}


def malformed_requests(port: int, valid: bytes, n: int = 200, seed: int = 0, headers: dict | None = None) -> dict:
    """``n`` bad requests of many kinds; returns counts by status class and the kinds that got a 5xx."""
    from PIL import Image

    rng = random.Random(seed)
    buf = io.BytesIO()
    Image.new("L", (10000, 5000)).save(buf, format="PNG")  # 50 MP: over the default 40 MP limit, a few KB on disk
    huge = buf.getvalue()
    auth = headers or {}

    def kind(k: int) -> tuple[str, bytes, dict]:
        choice = k % 8
        if choice == 0:
            body, ct = multipart([("files", "cut.png", valid[: rng.randint(1, len(valid) - 1)], "image/png")])
            return "truncated", body, {"Content-Type": ct}
        if choice == 1:
            body, ct = multipart([("files", "noise.png", os.urandom(rng.randint(1, 5000)), "image/png")])
            return "random bytes", body, {"Content-Type": ct}
        if choice == 2:
            body, ct = multipart([("files", "huge.png", huge, "image/png")])
            return "huge dimensions", body, {"Content-Type": ct}
        if choice == 3:
            body, ct = multipart([("image", "a.png", valid, "image/png")])
            return "wrong field", body, {"Content-Type": ct}
        if choice == 4:
            return "json body", json.dumps({"files": "a.png"}).encode(), {"Content-Type": "application/json"}
        if choice == 5:
            return "no content type", valid, {}
        if choice == 6:
            body, ct = multipart([("files", "empty.png", b"", "image/png")])
            return "empty file", body, {"Content-Type": ct}
        body, ct = multipart([("files", "a.png", valid, "image/png")])
        return "broken multipart", body[: len(body) // 2], {"Content-Type": ct}

    counts: dict[str, int] = {"2xx": 0, "4xx": 0, "5xx": 0, "other": 0}
    server_errors: list[str] = []
    for k in range(n):
        name, body, hdrs = kind(k)
        try:
            status, _ = request(port, "POST", "/predict", body, {**hdrs, **auth})
        except OSError as exc:
            status = -1
            server_errors.append(f"{name}: {exc}")
        cls = f"{status // 100}xx" if 200 <= status < 600 else "other"
        counts[cls if cls in counts else "other"] += 1
        if status >= 500 or status < 0:
            server_errors.append(f"{name}: {status}")
    status, body = predict_request(port, "after.png", valid, auth)
    return {"malformed": n, **counts, "server_errors": server_errors[:5], "valid_after": status == 200}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("images", help="folder of test images (searched recursively)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients")
    ap.add_argument("--requests", type=int, default=400, help="requests in the burst")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds for the burst at most")
    ap.add_argument("--warmup", type=int, default=40, help="requests before memory is first read")
    ap.add_argument("--soak-seconds", type=float, default=180.0, help="duration of the soak (0: none)")
    ap.add_argument("--sample-seconds", type=float, default=5.0, help="RSS sampling period in the soak")
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--serve-args", default="", help="extra `anomalens serve` options, space-separated")
    ap.add_argument("--out", default=str(RESULTS), help="append the rows as JSON lines ('' for none)")
    args = ap.parse_args()

    paths = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    images = [(p.name, p.read_bytes()) for p in paths]
    key = uuid.uuid4().hex  # the service runs with authentication on, as it would on a plant network
    auth = {"Authorization": f"Bearer {key}"}
    common = {"engine": args.engine, "model": Path(args.model_dir).name, "cpus": os.cpu_count(), "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d")}
    with Server([args.model_dir], engine=args.engine, extra=args.serve_args.split(), env={"ANOMALENS_API_KEY": key}) as srv:
        run_level(srv.port, images, args.clients, args.warmup, args.time_limit, auth)
        rss0 = rss_mb(srv.proc.pid)
        burst = run_level(srv.port, images, args.clients, args.requests, args.time_limit, auth)
        rss1 = rss_mb(srv.proc.pid)
        rows = [{**common, "phase": "burst", **burst, "rss_start_mb": round(rss0, 1), "rss_end_mb": round(rss1, 1)}]
        if args.soak_seconds > 0:
            rows.append({**common, **soak(srv.port, srv.proc.pid, images, args.clients, args.soak_seconds, args.sample_seconds, auth)})
        bad = malformed_requests(srv.port, images[0][1], headers=auth)
        rows.append({**common, "phase": "malformed", **bad})
    print_markdown(["phase", "clients", "requests", "errors", "5xx (503 busy)", "req/s", "p50 ms", "p95 ms", "p99 ms", "RSS start -> end MB", "RSS slope MB/min"],
                   [[r["phase"], r["clients"], r["requests"], r["errors"], f"{r['5xx']} ({r['busy_503']})", r["throughput_rps"], r["p50_ms"],
                     r["p95_ms"], r["p99_ms"], f"{r['rss_start_mb']} -> {r['rss_end_mb']}", r.get("rss_slope_mb_per_min", "-")]
                    for r in rows if r["phase"] != "malformed"])
    print(f"malformed: {bad}")
    append_jsonl(args.out or None, rows)


if __name__ == "__main__":
    main()
