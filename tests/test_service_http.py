"""The service over real HTTP (uvicorn in a subprocess on 127.0.0.1, a free port; always stopped):
chunked uploads over the limit stopped early, 503 with Retry-After when every scoring slot is taken,
the head, body and keep-alive timeouts, the connection cap, JSON answers to malformed HTTP."""

from __future__ import annotations

import json
import select
import socket
import sys
import time

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import load  # noqa: E402  (benchmarks/load.py: the server runner and the client helpers)

KEY = "http-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
PART_HEAD = (b'--bnd\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n')


@pytest.fixture(scope="module")
def server(fitted_patchcore):
    extra = ["--max-upload-mb", "1", "--max-active", "1", "--max-queue", "1", "--queue-timeout", "20", "--header-timeout", "2", "--body-timeout", "4",
             "--keep-alive-timeout", "1", "--max-connections", "8"]
    with load.Server([str(fitted_patchcore[1])], engine="torch", extra=extra, env={"ANOMALENS_API_KEY": KEY}) as srv:
        yield srv
        assert srv.proc.poll() is None, srv.stderr()[-2000:]  # still serving after every test


@pytest.fixture(scope="module")
def png(hazelnut) -> bytes:
    return (hazelnut / "test" / "good" / "000.png").read_bytes()


def connect(port: int) -> socket.socket:
    return socket.create_connection((load.HOST, port), timeout=10)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def upload_head(length: int | None = None) -> bytes:
    """Request head of a multipart POST /predict, chunked unless ``length`` is given."""
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    return (b"POST /predict HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + KEY.encode() +
            b"\r\nContent-Type: multipart/form-data; boundary=bnd\r\n" + framing + b"\r\n\r\n")


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """One HTTP response from ``sock``: (status, lower-cased headers, body); reads until the body is complete."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed before a complete response: {buf[:200]!r}")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(body) < n:
        data = sock.recv(65536)
        if not data:
            break
        body += data
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True when the server closes ``sock`` within ``within`` seconds (whatever it sent first)."""
    deadline = time.time() + within
    try:
        while time.time() < deadline:
            sock.settimeout(max(0.05, deadline - time.time()))
            if sock.recv(65536) == b"":
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return False


def assert_json_error(status: int, body: bytes, expected: int) -> str:
    assert status == expected, body[:300]
    doc = json.loads(body)
    assert set(doc) == {"error"} and doc["error"], doc
    return doc["error"]


def test_chunked_upload_over_the_limit_is_stopped_early(server):
    """30 MB chunked against a 1 MB limit: 413 while the client is still sending, then the server
    closes the connection: it never reads the rest (before, the whole body was spooled to /tmp)."""
    total = 30 * 2**20
    piece = b"\0" * 65536
    sock = connect(server.port)
    sent, answer = 0, None
    try:
        sock.sendall(upload_head() + chunk(PART_HEAD))
        reset = False
        while sent < total:
            try:
                sock.sendall(chunk(piece))
            except ConnectionResetError:  # answered and closed between two pieces: the answer may be lost with it
                reset = True
                break
            sent += len(piece)
            if select.select([sock], [], [], 0)[0]:
                answer = read_response(sock)
                break
        assert sent < 20 * 2**20  # answered (or cut) while most of the body was still to come
        if not reset:
            assert answer is not None, "no answer while 30 MB were sent"
            status, headers, body = answer
            assert "limit of 1 MB" in assert_json_error(status, body, 413)
            assert headers.get("connection") == "close"
            with pytest.raises(OSError):  # and the connection is gone: the rest of the body cannot be sent
                for _ in range((total - sent) // len(piece)):
                    sock.sendall(chunk(piece))
                raise AssertionError("the server accepted the whole 30 MB body")
    finally:
        sock.close()
    # a declared Content-Length over the limit is answered before any body byte is sent
    sock = connect(server.port)
    try:
        sock.sendall(upload_head(length=total))
        status, headers, body = read_response(sock)
        assert_json_error(status, body, 413)
        assert headers.get("connection") == "close"
    finally:
        sock.close()


def test_busy_answers_503_with_retry_after(server, png):
    """One scoring slot and a line of one (--max-active 1 --max-queue 1): a slow upload holds the
    slot; a second request waits in line; a third gets 503 with Retry-After at once; when the slow
    upload completes, it and the waiting request are both scored."""
    import threading

    body, ctype = load.multipart([("files", "a.png", png, "image/png")])
    slow = connect(server.port)
    waited: dict = {}
    try:
        slow.sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + KEY.encode() +
                     b"\r\nContent-Type: " + ctype.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(body[:1000]))
        time.sleep(0.5)  # the slow request is inside the service, holding the slot
        line = threading.Thread(target=lambda: waited.update(r=load.request(server.port, "POST", "/predict", body, {"Content-Type": ctype, **AUTH})))
        line.start()
        time.sleep(0.5)  # the second request is waiting for the slot
        t0 = time.time()
        status, headers, out = load.request_full(server.port, "POST", "/predict", body, {"Content-Type": ctype, **AUTH}, timeout=10)
        assert "busy" in assert_json_error(status, out, 503) and headers["retry-after"] == "1"
        assert time.time() - t0 < 2  # answered at once: the line is full
        assert line.is_alive()  # still waiting
        slow.sendall(chunk(body[1000:]) + b"0\r\n\r\n")
        status, _, out = read_response(slow, timeout=60)
        assert status == 200 and json.loads(out)["results"][0]["decision"] == "OK"
        line.join(60)
        assert waited["r"][0] == 200  # served once the slot was free
    finally:
        slow.close()
    status, _ = load.request(server.port, "POST", "/predict", body, {"Content-Type": ctype, **AUTH})
    assert status == 200


def test_head_body_and_keep_alive_timeouts(server):
    # a connection that sends nothing, or half a request head, is answered 408 and closed after --header-timeout 2
    quiet, slow_head = connect(server.port), connect(server.port)
    try:
        slow_head.sendall(b"GET /hea")
        t0 = time.time()
        for sock in (quiet, slow_head):
            status, headers, body = read_response(sock, timeout=10)
            assert_json_error(status, body, 408)
            assert closed_by_server(sock, 2)
        assert 1.5 < time.time() - t0 < 6
    finally:
        quiet.close()
        slow_head.close()
    # a body that stalls is answered 408 after --body-timeout 4
    sock = connect(server.port)
    try:
        sock.sendall(upload_head() + chunk(PART_HEAD))
        t0 = time.time()
        status, headers, body = read_response(sock, timeout=15)
        assert "did not arrive within 4 s" in assert_json_error(status, body, 408)
        assert 3.5 < time.time() - t0 < 10 and closed_by_server(sock, 2)
    finally:
        sock.close()
    # an idle keep-alive connection is closed after --keep-alive-timeout 1
    sock = connect(server.port)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_response(sock)[0] == 200
        assert closed_by_server(sock, 4)
    finally:
        sock.close()


def test_connection_cap_and_malformed_http(server):
    # past --max-connections 8: 503 in the JSON shape, and closed
    socks = [connect(server.port) for _ in range(8)]
    try:
        time.sleep(0.3)
        extra = connect(server.port)
        try:
            status, headers, body = read_response(extra)
            assert "too many open connections" in assert_json_error(status, body, 503)
        finally:
            extra.close()
    finally:
        for s in socks:
            s.close()
    time.sleep(0.3)
    big_head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
    for pieces, expected in (([b"NOT HTTP AT ALL\r\n\r\n"], 400), ([big_head[:20_000], big_head[20_000:]], 400), ([big_head], 431)):
        sock = connect(server.port)
        try:
            for piece in pieces:  # a head in pieces meets h11's buffer limit; a whole one the service's
                sock.sendall(piece)
                time.sleep(0.2)
            status, headers, body = read_response(sock)
            assert_json_error(status, body, expected)
        finally:
            sock.close()
    assert load.request(server.port, "GET", "/health")[0] == 200
