"""The server's boundary as a hostile client meets it: the API key, the locked policy, the temp
disk a batch may spool, slow clients on a real uvicorn, and the memory of a real server process
under large uploads."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import resource
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402
from starlette import formparsers  # noqa: E402

from nsfw_safety.server import PixelBudget, ServiceError, Settings, create_app, uvicorn_config  # noqa: E402
from test_server import GOOD, LIMITS, encode, eva, free_socket, image, post  # noqa: E402,F401 (eva: a fixture)

log = logging.getLogger(__name__)


# --- access control -------------------------------------------------------------------------

def test_api_key_guards_compute_only(eva):
    key = "s3cret-key"
    settings = Settings(api_key=key, **LIMITS)
    assert key not in repr(settings)
    with TestClient(create_app(settings, detector=eva)) as c:
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": f"Basic {key}"},
                        {"Authorization": "Bearer " + key[:-1]}):
            r = c.post("/compute", files={"file": ("x.png", GOOD, "image/png")}, headers=headers)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized", headers
            assert r.headers["www-authenticate"] == "Bearer" and "X-API-Key" in r.json()["detail"]
        r = c.post("/compute/batch", files=[("files", ("x.png", GOOD, "image/png"))])
        assert r.status_code == 401
        for headers in ({"X-API-Key": key}, {"Authorization": f"Bearer {key}"}, {"authorization": f"bearer {key}"}):
            assert c.post("/compute", files={"file": ("x.png", GOOD, "image/png")}, headers=headers).status_code == 200
        r = c.post("/compute/batch", files=[("files", ("x.png", GOOD, "image/png"))], headers={"X-API-Key": key})
        assert r.status_code == 200 and r.json()["results"][0]["category"] in ("safe", "nsfw")
        for open_route in ("/health", "/ready", "/docs", "/openapi.json"):
            assert c.get(open_route).status_code == 200, open_route
        assert key not in c.get("/health").text and c.get("/health").json()["settings"]["api_key"] is True
        schemes = c.get("/openapi.json").json()["components"]["securitySchemes"]
        assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}


def test_api_key_is_checked_before_the_body_is_read(eva, monkeypatch):
    spooled = spy_on_spooling(monkeypatch)
    with TestClient(create_app(Settings(api_key="k", **LIMITS), detector=eva)) as c:
        r = c.post("/compute/batch", files=[("files", (f"{i}.png", GOOD, "image/png")) for i in range(4)])
    assert r.status_code == 401 and spooled == []


@pytest.mark.parametrize("query, status", [
    ("", 200), ("?level=medium&threshold=0.5", 200), ("?level=low", 200), ("?threshold=0.1", 200),
    ("?level=low&threshold=0", 200), ("?level=high", 403), ("?threshold=0.51", 403),
    ("?level=low&threshold=0.9", 403), ("?level=high&threshold=0", 403),
])
def test_locked_policy_only_gets_stricter(eva, query, status):
    with TestClient(create_app(Settings(lock_policy=True, **LIMITS), detector=eva)) as c:
        r = post(c, GOOD, query=query)
        assert r.status_code == status, r.text
        if status == 403:
            assert r.json()["error"] == "policy_locked" and "medium at 0.5" in r.json()["detail"]
            batch = c.post(f"/compute/batch{query}", files=[("files", ("x.png", GOOD, "image/png"))])
            assert batch.status_code == 403
    with TestClient(create_app(Settings(**LIMITS), detector=eva)) as c:  # unlocked: any policy
        assert post(c, GOOD, query=query).status_code == 200


# --- decoded pixels in flight ---------------------------------------------------------------

def test_pixel_budget_waits_in_order_then_gives_up():
    async def scenario():
        budget = PixelBudget(100)
        order = []

        async def take(name, pixels, timeout, hold):
            async with budget.reserve(pixels, timeout, name):
                order.append(name)
                await asyncio.sleep(hold)

        first = asyncio.create_task(take("a", 60, 1, 0.2))
        await asyncio.sleep(0)
        assert budget.used == 60
        # b (60) must wait for a; c (30) would fit now, but waits its turn behind b
        tasks = [asyncio.create_task(take("b", 60, 5, 0.1)), asyncio.create_task(take("c", 30, 5, 0))]
        await asyncio.sleep(0.05)
        assert order == ["a"] and budget.used == 60
        late = asyncio.create_task(take("d", 100, 0.05, 0))  # can never fit while others hold
        with pytest.raises(ServiceError) as e:
            await late
        assert (e.value.status, e.value.code, e.value.headers) == (503, "server_busy", {"Retry-After": "1"})
        assert "100 pixels" in e.value.detail
        await asyncio.gather(first, *tasks)
        assert order == ["a", "b", "c"] and budget.used == 0
        cancelled = asyncio.create_task(take("e", 100, 5, 10))
        await asyncio.sleep(0.01)
        cancelled.cancel()  # a client that went away gives its pixels back
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert budget.used == 0 and not budget._waiting

    asyncio.run(scenario())


def test_busy_server_is_503_with_retry_after(eva):
    with TestClient(create_app(Settings(busy_timeout=0.1, **LIMITS), detector=eva)) as c:
        budget = c.app.state.service.budget
        budget.used = budget.limit  # as if other requests held every pixel
        try:
            r = post(c, GOOD, "full.png")
            assert r.status_code == 503 and r.json()["error"] == "server_busy" and r.headers["retry-after"] == "1"
            assert "'full.png'" in r.json()["detail"]
            [entry] = c.post("/compute/batch", files=[("files", ("x.png", GOOD, "image/png"))]).json()["results"]
            assert (entry["error"], entry["status"]) == ("server_busy", 503)
        finally:
            budget.used = 0
        assert post(c, GOOD).status_code == 200


# --- temp disk ------------------------------------------------------------------------------

def spy_on_spooling(monkeypatch, tmp_dir=None) -> list:
    """Route starlette's upload spool files into ``tmp_dir`` and record each one's final size and
    whether it went to disk; returns the (live) list of records."""
    records = []

    class Spy(tempfile.SpooledTemporaryFile):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, dir=tmp_dir, **kwargs)
            self.record = {"bytes": 0, "on_disk": False}
            records.append(self.record)

        def write(self, data):
            n = super().write(data)
            self.record["bytes"] += len(data)
            self.record["on_disk"] = self._rolled
            return n

    monkeypatch.setattr(formparsers, "SpooledTemporaryFile", Spy)
    return records


def test_batch_spools_no_more_than_the_limits(eva, tmp_path, monkeypatch):
    """A file over --max-upload-bytes is cut at the limit as it streams in, so a batch never writes
    more than max_files * (max_upload_bytes + 1) bytes to the temp dir; one file too many is
    refused before its bytes are read."""
    limit = 1_500_000  # over starlette's 1 MiB spool threshold: files past it go to disk
    spooled = spy_on_spooling(monkeypatch, tmp_path)
    settings = Settings(max_upload_bytes=limit, max_files=2, max_pixels=100_000)
    with TestClient(create_app(settings, detector=eva)) as c:
        big = GOOD + bytes(3_000_000 - len(GOOD))  # 2x the file limit, inside the 3.1 MB batch limit
        r = c.post("/compute/batch", files=[("files", ("big.png", big, "image/png")),
                                            ("files", ("ok.png", GOOD, "image/png"))])
        assert r.status_code == 200
        assert [x.get("error") for x in r.json()["results"]] == ["upload_too_large", None]
        assert [s["bytes"] for s in spooled] == [limit + 1, len(GOOD)] and spooled[0]["on_disk"]
        assert os.listdir(tmp_path) == []  # spool files are anonymous, and gone with the request

        spooled.clear()
        r = c.post("/compute/batch", files=[("files", (f"{i}.png", GOOD, "image/png")) for i in range(3)])
        assert r.status_code == 413 and r.json()["error"] == "too_many_files"
        assert len(spooled) == 3 and sum(s["bytes"] for s in spooled) <= 2 * len(GOOD)  # not a byte of the third


# --- slow clients on a real uvicorn ---------------------------------------------------------

@pytest.fixture(params=["httptools", "h11"])
def live(request, eva):
    """A real uvicorn on 127.0.0.1 in a thread, with 1 s header and body deadlines."""
    settings = Settings(header_timeout=1, body_timeout=1, max_wait_ms=1500, **LIMITS)
    sock = free_socket()
    server = uvicorn.Server(uvicorn_config(create_app(settings, detector=eva), settings, http=request.param,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.01)
    yield sock.getsockname()
    server.should_exit = True
    thread.join(10)
    sock.close()


def trickle(address, first: bytes, drip: bytes, every: float = 0.25, give_up: float = 15.0) -> tuple[float | None, bytes]:
    """Send ``first``, then ``drip`` one byte every ``every`` s; return (seconds until the server
    closed the connection, or None if it was still open after ``give_up`` s; what it sent)."""
    received = b""
    with socket.create_connection(address) as s:
        s.settimeout(every)
        start = time.monotonic()
        s.sendall(first)
        i = 0
        while time.monotonic() - start < give_up:
            try:
                chunk = s.recv(65536)
                if not chunk:
                    return time.monotonic() - start, received
                received += chunk
            except socket.timeout:
                if not drip:
                    continue
                try:
                    s.sendall(drip[i % len(drip): i % len(drip) + 1])
                    i += 1
                except (BrokenPipeError, ConnectionResetError):
                    return time.monotonic() - start, received
            except ConnectionResetError:
                return time.monotonic() - start, received
    return None, received


def test_slow_headers_are_cut_off(live):
    closed, sent = trickle(live, b"POST /compute HTTP/1.1\r\nHost: x\r\n", b"X-Slow: aaaaaaaa\r\n")
    assert closed is not None and sent == b""  # closed, headers never finished, nothing answered
    log.info("slow headers: connection closed after %.2f s (header timeout 1 s)", closed)
    closed, sent = trickle(live, b"", b"")  # connects and says nothing
    assert closed is not None and sent == b""
    log.info("silent connection: closed after %.2f s", closed)


def test_slow_body_is_408_then_closed(live):
    head = (b"POST /compute HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\n")
    closed, sent = trickle(live, head, b"x")
    assert closed is not None, sent
    assert sent.startswith(b"HTTP/1.1 408") and b'"error":"request_timeout"' in sent
    log.info("slow body: 408 and closed after %.2f s (body timeout 1 s)", closed)


def test_streamed_body_is_cut_as_it_arrives(live, monkeypatch):
    """A chunked body with no Content-Length, one endless file: 413 once the batch limit (4 x
    264 KB here) has arrived, with only the file limit (200,001 bytes) spooled."""
    spooled = spy_on_spooling(monkeypatch)
    response = b""
    with socket.create_connection(live) as s:
        def chunk(data: bytes) -> None:
            s.sendall(b"%x\r\n%s\r\n" % (len(data), data))

        s.sendall(b"POST /compute/batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
        chunk(b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n\r\n')
        for _ in range(200):  # up to 13 MB; the server answers long before
            if select.select([s], [], [], 0.01)[0]:
                break
            chunk(bytes(65536))
        s.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            while data := s.recv(65536):
                response += data
    assert response.startswith(b"HTTP/1.1 413") and b'"error":"request_too_large"' in response, response[:300]
    assert [r["bytes"] for r in spooled] == [LIMITS["max_upload_bytes"] + 1]


def test_timeouts_spare_a_request_that_is_being_answered(live):
    """A request whose answer takes longer than the deadlines (the batcher waits 1.5 s for company
    here) is answered, and its connection is kept alive for the next request."""
    url = "http://%s:%d" % live
    with httpx.Client(base_url=url, timeout=30) as c:
        start = time.monotonic()
        r = c.post("/compute", files={"file": ("x.png", GOOD, "image/png")})
        assert r.status_code == 200 and time.monotonic() - start > 1.0
        assert c.get("/ready").status_code == 200  # the same keep-alive connection


# --- memory of a real server process --------------------------------------------------------

def _cap_memory(limit_bytes: int):
    def cap():  # a safety net for this machine: a failed bound ends in a MemoryError, not the OOM killer
        resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, limit_bytes))
    return cap


@pytest.fixture
def real_server(eva_dir, tmp_path):
    """Start ``nsfw-safety serve`` in a subprocess; yields start(**env) -> (url, pid)."""
    procs = []

    def start(**env):
        with free_socket() as sock:
            port = sock.getsockname()[1]
        full = {**os.environ, "NSFW_SAFETY_MODEL": str(eva_dir), "NSFW_SAFETY_DEVICE": "cpu",
                "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "2", **env}
        proc = subprocess.Popen([sys.executable, "-m", "nsfw_safety.cli", "serve", "--port", str(port),
                                 "--log-level", "warning"], env=full, preexec_fn=_cap_memory(8 * 2**30))
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not get ready"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/ready", timeout=5).status_code == 200:
                    return url, proc.pid
            time.sleep(0.2)

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid``, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        rows = dict(line.split(":", 1) for line in f)
    return {k: int(rows[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


@pytest.fixture(scope="module")
def solid_4096() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4096, 4096), (200, 30, 40)).save(buf, "PNG")
    return buf.getvalue()


#: Bound on the peak bytes per decoded pixel in flight along today's path (decoded RGB, the
#: library's copies and float conversion, the resize). Measured on this path: 33 (16 x 4096²,
#: see the README's Limits) and 43 (the 16,777,216 x 1 strip). Without the pixel budget, 16
#: concurrent 4096² uploads cost over 8 GB, twice this bound.
BYTES_PER_PIXEL = 64


def test_concurrent_large_uploads_stay_in_the_pixel_budget(real_server, solid_4096):
    """16 concurrent 4096² uploads (~50 KB each, 16.8 M pixels each once decoded): the server
    decodes at most max_pixels_in_flight (4 images) at a time, and its peak RSS stays within
    that budget's worth of memory above its idle RSS."""
    url, pid = real_server(NSFW_SAFETY_BUSY_TIMEOUT="300")
    httpx.post(url + "/compute", files={"file": ("warm.png", encode(image(1)), "image/png")}, timeout=60)
    idle = memory(pid)["VmRSS"]

    async def load():
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            return await asyncio.gather(*(c.post("/compute", files={"file": (f"{i}.png", solid_4096, "image/png")})
                                          for i in range(16)))

    start = time.monotonic()
    answers = asyncio.run(load())
    elapsed = time.monotonic() - start
    assert [r.status_code for r in answers] == [200] * 16, [r.text for r in answers if r.status_code != 200][:1]
    assert {(r.json()["width"], r.json()["height"]) for r in answers} == {(4096, 4096)}
    peak = memory(pid)["VmHWM"]
    budget = Settings().max_pixels_in_flight
    log.info("16 x 4096² concurrent: idle RSS %.0f MB, peak RSS %.0f MB (+%.0f MB, %.1f bytes per budget pixel), %.1f s",
             idle / 2**20, peak / 2**20, (peak - idle) / 2**20, (peak - idle) / budget, elapsed)
    assert peak - idle < budget * BYTES_PER_PIXEL  # 16 images at once would be 4x the budget


@pytest.fixture(scope="module")
def strips() -> dict[str, bytes]:
    """1 x 16,777,216 and 16,777,216 x 1 PNGs (~65 KB each): within the default pixel limit."""
    out = {}
    for name, size in (("tall", (1, 4096 * 4096)), ("wide", (4096 * 4096, 1))):
        buf = io.BytesIO()
        Image.new("RGB", size, (90, 160, 220)).save(buf, "PNG")
        out[name] = buf.getvalue()
    return out


@pytest.mark.parametrize("shape", ["tall", "wide"])
def test_thin_strip_is_scored_within_memory(real_server, strips, shape):
    """A strip within max_pixels is scored (200), not refused by an allocator nor OOM-killed.
    Needs the banded resize of preprocess (#11): without it the resize allocates H x 56 floats."""
    url, pid = real_server()
    idle = memory(pid)["VmRSS"]
    r = httpx.post(url + "/compute", files={"file": (f"{shape}.png", strips[shape], "image/png")}, timeout=600)
    peak = memory(pid)["VmHWM"]
    log.info("%s strip: %d, idle RSS %.0f MB, peak RSS %.0f MB", shape, r.status_code, idle / 2**20, peak / 2**20)
    assert r.status_code in {200}, r.text
    assert peak - idle < 4096 * 4096 * BYTES_PER_PIXEL
