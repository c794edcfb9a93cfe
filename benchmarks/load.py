"""Load test of `anomalens serve` on loopback: throughput, p50/p99 latency, errors, memory.

Starts the service in a subprocess on 127.0.0.1 (a free port), waits for ``/health``, then for each
concurrency level (1, 4, 16 clients; threads with their own HTTP connection) sends a bounded number of
``POST /predict`` requests with real images, and stops at the count or the time limit, whichever comes
first. Then 200 malformed requests (truncated files, random bytes, huge dimensions, wrong fields,
wrong content types) must all get 4xx answers, and a valid request afterwards must still succeed.
The server's resident memory (``/proc/PID/status``) is read after the warm-up and at the end.

Usage::

    python benchmarks/load.py MODEL_DIR IMAGES_DIR [--requests 500] [--levels 1,4,16] [--engine torch|onnx]

Only loopback addresses are ever contacted.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

HOST = "127.0.0.1"


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
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def predict_request(port: int, name: str, data: bytes) -> tuple[int, bytes]:
    body, ctype = multipart([("files", name, data, "image/png")])
    return request(port, "POST", "/predict", body, {"Content-Type": ctype})


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


class Server:
    """``anomalens serve`` in a subprocess on a free loopback port (a context manager)."""

    def __init__(self, model_dirs: list[str], engine: str = "onnx", extra: list[str] | None = None, start_timeout: float = 120.0):
        self.port = free_port()
        exe = [sys.executable, "-m", "anomalens.cli", "serve", *model_dirs, "--host", HOST, "--port", str(self.port), "--engine", engine, *(extra or [])]
        self.proc = subprocess.Popen(exe, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t0 = time.time()
        while time.time() - t0 < start_timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if request(self.port, "GET", "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        self.close()
        raise RuntimeError("server did not start in time")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_level(port: int, images: list[tuple[str, bytes]], clients: int, n_requests: int, time_limit: float) -> dict:
    """``n_requests`` predictions from ``clients`` threads (bounded by ``time_limit`` seconds)."""
    lat: list[float] = []
    errors: list[str] = []
    counter = iter(range(n_requests))
    lock = threading.Lock()
    deadline = time.perf_counter() + time_limit

    def worker() -> None:
        while time.perf_counter() < deadline:
            with lock:
                k = next(counter, None)
            if k is None:
                return
            name, data = images[k % len(images)]
            t = time.perf_counter()
            try:
                status, body = predict_request(port, name, data)
                ok = status == 200 and json.loads(body)["results"][0]["decision"] in ("OK", "NG")
            except Exception as exc:  # a refused or broken connection is an error to count, not a crash
                status, ok, body = -1, False, str(exc).encode()
            with lock:
                if ok:
                    lat.append(time.perf_counter() - t)
                else:
                    errors.append(f"{status}: {body[:200]!r}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    lat.sort()
    q = lambda p: 1000 * lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")  # noqa: E731
    return {
        "clients": clients, "requests": len(lat) + len(errors), "errors": len(errors), "seconds": round(wall, 2),
        "throughput_rps": round(len(lat) / wall, 2) if wall else 0.0, "p50_ms": round(q(0.5), 1), "p99_ms": round(q(0.99), 1),
        "mean_ms": round(1000 * statistics.fmean(lat), 1) if lat else float("nan"), "first_errors": errors[:3],
    }


def malformed_requests(port: int, valid: bytes, n: int = 200, seed: int = 0) -> dict:
    """``n`` bad requests of many kinds; returns counts by status class and the kinds that got a 5xx."""
    from PIL import Image

    rng = random.Random(seed)
    buf = io.BytesIO()
    Image.new("L", (10000, 5000)).save(buf, format="PNG")  # 50 MP: over the default 40 MP limit, a few KB on disk
    huge = buf.getvalue()

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
        name, body, headers = kind(k)
        try:
            status, _ = request(port, "POST", "/predict", body, headers)
        except OSError as exc:
            status = -1
            server_errors.append(f"{name}: {exc}")
        cls = f"{status // 100}xx" if 200 <= status < 600 else "other"
        counts[cls if cls in counts else "other"] += 1
        if status >= 500 or status < 0:
            server_errors.append(f"{name}: {status}")
    status, body = predict_request(port, "after.png", valid)
    return {"malformed": n, **counts, "server_errors": server_errors[:5], "valid_after": status == 200}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("images", help="folder of test images (searched recursively)")
    ap.add_argument("--requests", type=int, default=500, help="requests per concurrency level")
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per level at most")
    ap.add_argument("--warmup", type=int, default=60, help="requests at the highest concurrency before memory is first read")
    ap.add_argument("--engine", default="onnx")
    ap.add_argument("--out", default=None, help="append the rows as JSON lines")
    args = ap.parse_args()

    paths = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    images = [(p.name, p.read_bytes()) for p in paths]
    rows = []
    with Server([args.model_dir], engine=args.engine) as srv:
        levels = [int(x) for x in args.levels.split(",")]
        # warm up at the highest concurrency: the worker threads' allocator arenas grow once, then stay
        run_level(srv.port, images, max(levels), args.warmup, args.time_limit)
        rss0 = rss_mb(srv.proc.pid)
        for c in levels:
            r = run_level(srv.port, images, c, args.requests, args.time_limit)
            r["engine"] = args.engine
            rows.append(r)
        rss1 = rss_mb(srv.proc.pid)
        bad = malformed_requests(srv.port, images[0][1])
    print("| engine | clients | requests | errors | throughput req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['throughput_rps']} | {r['p50_ms']} | {r['p99_ms']} |")
    growth = 100.0 * (rss1 - rss0) / rss0
    print(f"server RSS after warm-up {rss0:.0f} MB, at the end {rss1:.0f} MB ({growth:+.1f}%)")
    print(f"malformed: {bad}")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "rss_start_mb": round(rss0), "rss_end_mb": round(rss1)}) + "\n")
            f.write(json.dumps({"engine": args.engine, **bad}) + "\n")


if __name__ == "__main__":
    main()
