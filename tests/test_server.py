"""The HTTP service: routes, bad input, fail-closed errors, censoring, and a real uvicorn under load."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import re
import socket
import struct
import threading
import time
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402

from nsfw_safety import Detector, SafetyFilter, load_detector  # noqa: E402
from nsfw_safety.models import load_model  # noqa: E402
from nsfw_safety.server import Settings, add_arguments, create_app, run, uvicorn_config  # noqa: E402

log = logging.getLogger(__name__)

LIMITS = dict(max_upload_bytes=200_000, max_pixels=100_000, max_files=4)


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def image(seed: int, size: tuple[int, int] = (48, 48), channels: int = 3) -> np.ndarray:
    """(H, W, C) uint8: smooth colour blobs, so blur and pixelate visibly change them."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, channels), dtype=np.uint8)
    mode = "RGBA" if channels == 4 else "RGB"
    return np.asarray(Image.fromarray(small, mode).resize(size[::-1], Image.BILINEAR))


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A few hundred bytes of PNG whose header promises width x height RGB pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(4096))) + chunk(b"IEND", b"")


def library(detector: Detector, data: bytes, level: str = "medium", threshold: float = 0.5):
    """The library's own answer for an uploaded file: (category, reason, scores row)."""
    result = SafetyFilter(detector, level, threshold, action="none")([Image.open(io.BytesIO(data))])
    return ("nsfw" if result.flagged[0] else "safe"), result.reasons[0], result.scores.to_dicts()[0]


def assert_matches(answer: dict, expected: tuple, tol: float = 1e-4) -> None:
    category, reason, row = expected
    assert (answer["category"], answer["reason"]) == (category, reason)
    assert answer["flagged"] == (category == "nsfw")
    assert answer["levels"] == pytest.approx(row["levels"], abs=tol)
    assert answer["probs"] == pytest.approx(row["probs"], abs=tol)


@pytest.fixture(scope="module")
def eva(eva_dir):
    return load_detector(str(eva_dir), device="cpu")


@pytest.fixture(scope="module")
def client(eva):
    with TestClient(create_app(Settings(**LIMITS), detector=eva)) as c:
        yield c


def post(client, data: bytes, name: str = "x.png", ctype: str = "image/png", query: str = "", field: str = "file"):
    return client.post(f"/compute{query}", files={field: (name, data, ctype)})


# --- routes ---------------------------------------------------------------------------------

def test_compute_returns_the_library_answer(client, eva, eva_dir):
    data = encode(image(1, (40, 56)))
    r = post(client, data, "cat.png")
    assert r.status_code == 200
    body = r.json()
    assert_matches(body, library(eva, data))
    assert list(body["levels"]) == ["neutral", "low", "medium", "high"]
    assert list(body["probs"]) == ["neutral", "low", "medium", "high"]
    assert sum(body["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    assert (body["level"], body["threshold"]) == ("medium", 0.5)
    assert body["model"] == {"id": str(eva_dir), "revision": None}
    assert (body["filename"], body["width"], body["height"]) == ("cat.png", 56, 40)


def test_query_overrides_level_and_threshold(client, eva):
    data = encode(image(2))
    low = library(eva, data)[2]["levels"]["low"]
    below, above = max(0.0, low - 0.01), min(1.0, low + 0.01)
    for threshold, category in ((below, "nsfw"), (above, "safe")):
        body = post(client, data, query=f"?level=low&threshold={threshold}").json()
        assert (body["level"], body["threshold"], body["category"]) == ("low", pytest.approx(threshold), category)
        assert_matches(body, library(eva, data, "low", threshold))
    assert post(client, data, query="?threshold=0").json()["reason"].startswith("medium ")


def test_batch_answers_each_image_in_order(client, eva):
    datas = [encode(image(10 + i, (32 + 8 * i, 48))) for i in range(4)]
    r = client.post("/compute/batch?level=high&threshold=0.2",
                    files=[("files", (f"{i}.png", d, "image/png")) for i, d in enumerate(datas)])
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["0.png", "1.png", "2.png", "3.png"]
    assert [x["height"] for x in results] == [32, 40, 48, 56]
    for answer, data in zip(results, datas):
        assert_matches(answer, library(eva, data, "high", 0.2))


def test_batch_answers_each_file(client, eva):
    """A bad file gets an error entry in its slot; the good ones still get their results."""
    good = [encode(image(30 + i, (40, 48))) for i in range(2)]
    files = [("a.png", good[0]), ("empty.png", b""), ("pic.bmp", encode(image(9), "BMP")), ("b.png", good[1])]
    r = client.post("/compute/batch", files=[("files", (n, d, "image/png")) for n, d in files])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == [n for n, _ in files]
    assert_matches(results[0], library(eva, good[0]))
    assert_matches(results[3], library(eva, good[1]))
    assert [(x["error"], x["status"]) for x in results[1:3]] == [("empty_upload", 400), ("unsupported_format", 415)]
    assert "'empty.png' is empty" == results[1]["detail"]
    assert "'pic.bmp' is a BMP image" in results[2]["detail"] and "category" not in results[2]


def test_health_ready_docs(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["ready"] is True and health["error"] is None
    assert health["device"] == "cpu" and health["dtype"] == "float32"
    assert health["settings"] == {"level": "medium", "threshold": 0.5, "lock_policy": False, "api_key": False,
                                  "max_batch_size": 16, "max_wait_ms": 5.0}
    assert health["pixels_in_flight"] == {"used": 0, "limit": 400_000}
    assert client.get("/ready").json() == {"ready": True, "error": None}
    assert "swagger" in client.get("/docs").text.lower()
    assert {"/compute", "/compute/batch", "/health", "/ready"} <= set(client.get("/openapi.json").json()["paths"])


def test_docs_work_offline(client):
    """/docs and /redoc load their scripts, styles and icon from this server, not from a CDN."""
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
        assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
        assert "http://" not in html and "https://" not in html
        for url in urls:
            r = client.get(url)
            assert r.status_code == 200 and len(r.content) > 1000, url
    r = client.get(next(u for u in re.findall(r'src="([^"]+)"', client.get("/docs").text) if u.endswith(".js")))
    assert "javascript" in r.headers["content-type"] and b"SwaggerUIBundle" in r.content


def test_work_runs_off_the_event_loop(eva, monkeypatch):
    """Decoding runs in the thread pool, scoring in the batcher's worker thread."""
    import nsfw_safety.server as server

    seen = {}

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
            return True
        except RuntimeError:
            return False

    def decode(*args, **kwargs):
        seen["decode"] = on_loop()
        return real_decode(*args, **kwargs)

    def predict(*args, **kwargs):
        seen["predict"] = (on_loop(), threading.current_thread().name)
        return real_predict(*args, **kwargs)

    real_decode, real_predict = server.decode, eva.predict
    monkeypatch.setattr(server, "decode", decode)
    monkeypatch.setattr(eva, "predict", predict)
    with TestClient(create_app(Settings(), detector=eva)) as c:
        assert post(c, encode(image(3))).status_code == 200
    assert seen["decode"] is False
    assert seen["predict"][0] is False and seen["predict"][1].startswith("nsfw-safety-score")


def test_filter_applies_given_scores_without_scoring(eva, monkeypatch):
    """The core pieces the batcher relies on: Scores[index] and SafetyFilter(..., scores=)."""
    images = [Image.fromarray(image(20 + i)) for i in range(3)]
    scores = eva.predict(images)
    assert len(scores[1]) == 1 and torch.equal(scores[1].probs, scores.probs[1:2])
    assert torch.equal(scores[[2, 0]].levels, scores.levels[[2, 0]]) and scores[[2, 0]].labels == scores.labels

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored again")
    monkeypatch.setattr(eva, "score", no_scoring)
    result = SafetyFilter(eva, "low", 0.0, action="black")(images[1:], scores=scores[1:])
    assert result.flagged == [True, True] and result.scores.levels.shape == (2, 4)
    assert all(not np.asarray(im).any() for im in result.images)
    with pytest.raises(ValueError, match="scores has 3 rows for 2 images"):
        SafetyFilter(eva)(images[1:], scores=scores)


# --- censoring ------------------------------------------------------------------------------

def decoded(r) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(r.content)))


@pytest.fixture(scope="module")
def nsfw_client(eva_nsfw_dir):
    with TestClient(create_app(Settings(**LIMITS), detector=load_detector(str(eva_nsfw_dir), device="cpu"))) as c:
        yield c


def test_censor_black_png_is_all_zeros(nsfw_client):
    original = image(4, (40, 48))
    r = post(nsfw_client, encode(original), query="?censor=black")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    out = decoded(r)
    assert out.shape == original.shape and original.max() > 0 and not out.any()
    h = r.headers
    assert (h["x-nsfw-category"], h["x-nsfw-flagged"], h["x-nsfw-action"]) == ("nsfw", "true", "black")
    assert h["x-nsfw-reason"] == "medium 1.00 >= 0.50"
    levels = json.loads(h["x-nsfw-levels"])
    assert levels["high"] == pytest.approx(1.0) and levels["neutral"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("action", ["blur", "pixelate"])
def test_censor_matches_the_library(nsfw_client, eva_nsfw_dir, action):
    original = image(5, (48, 64))
    r = post(nsfw_client, encode(original), query=f"?censor={action}")
    assert r.status_code == 200 and r.headers["x-nsfw-action"] == action
    out = decoded(r)
    guard = SafetyFilter(load_detector(str(eva_nsfw_dir), device="cpu"), action=action)
    expected = np.asarray(guard(Image.fromarray(original)).images)
    assert out.shape == original.shape
    np.testing.assert_array_equal(out, expected)
    assert np.abs(out.astype(int) - original).mean() > 2  # it really changed the picture


def test_censor_jpeg_comes_back_jpeg(nsfw_client):
    r = post(nsfw_client, encode(image(6), "JPEG"), "x.jpg", "image/jpeg", "?censor=black")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).format == "JPEG"
    assert decoded(r).max() <= 2  # black, up to JPEG rounding


@pytest.mark.parametrize("action", ["black", "blur"])
def test_censored_alpha_image_is_the_library_answer(nsfw_client, eva_nsfw_dir, action):
    """An RGBA upload comes back as the library censors it, alpha included (what the library
    does with alpha is its own business, and tested there): the server adds no path of its own."""
    original = image(7, channels=4)
    r = post(nsfw_client, encode(original), query=f"?censor={action}")
    out = decoded(r)
    guard = SafetyFilter(load_detector(str(eva_nsfw_dir), device="cpu"), action=action)
    expected = np.asarray(guard(Image.open(io.BytesIO(encode(original)))).images)
    assert out.shape == (48, 48, 4) and expected.shape == out.shape
    np.testing.assert_array_equal(out, expected)
    if action == "black":
        assert not out[..., :3].any()
        assert (out[..., 3] == 255).all()  # opaque: the alpha channel no longer draws the shape


def test_batch_censor_returns_the_images_in_the_json(nsfw_client, eva_safe_dir):
    """?censor= on /compute/batch: each result carries its censored image, base64, as uploaded."""
    originals = [image(40, (40, 48)), image(41, (32, 32))]
    files = [("files", ("a.png", encode(originals[0]), "image/png")),
             ("files", ("b.jpg", encode(originals[1], "JPEG"), "image/png")),  # a JPEG, whatever it says
             ("files", ("bad.png", b"not an image at all", "image/png"))]
    results = nsfw_client.post("/compute/batch?censor=black", files=files).json()["results"]
    assert [(x.get("action"), x.get("media_type")) for x in results[:2]] == [("black", "image/png"),
                                                                           ("black", "image/jpeg")]
    for result, original in zip(results, originals):
        out = Image.open(io.BytesIO(base64.b64decode(result["image"])))
        assert out.size == (original.shape[1], original.shape[0]) and np.asarray(out).max() <= 2
    assert results[2]["error"] == "unreadable_image"
    with TestClient(create_app(Settings(**LIMITS), detector=load_detector(str(eva_safe_dir), device="cpu"))) as c:
        [passed] = c.post("/compute/batch?censor=blur", files=files[:1]).json()["results"]
    assert (passed["category"], passed["action"], passed["image"]) == ("safe", "none", None)
    assert nsfw_client.post("/compute/batch?censor=smudge", files=files[:1]).status_code == 422


def test_safe_image_comes_back_unchanged(eva_safe_dir):
    data = encode(image(8))
    with TestClient(create_app(detector=load_detector(str(eva_safe_dir), device="cpu"))) as c:
        r = post(c, data, query="?censor=blur")
    assert r.status_code == 200 and r.content == data
    assert (r.headers["x-nsfw-category"], r.headers["x-nsfw-action"]) == ("safe", "none")


# --- bad input ------------------------------------------------------------------------------

GOOD = encode(image(9))


def bad_uploads():
    return {
        "empty": (b"", "image/png", 400, "empty_upload", "is empty"),
        "truncated": (GOOD[: len(GOOD) // 2], "image/png", 400, "unreadable_image", "truncated"),
        "not an image": (b"hello, world" * 10, "image/png", 400, "unreadable_image", "not a readable"),
        "tiff posing as png": (encode(image(9), "TIFF"), "image/png", 415, "unsupported_format", "TIFF image"),
        "bmp": (encode(image(9), "BMP"), "image/png", 415, "unsupported_format", "BMP image"),
        "png signature, then garbage": (GOOD[:16] + bytes(100), "image/png", 400, "unreadable_image", "PNG"),
        "too large": (GOOD + bytes(200_001 - len(GOOD)), "image/png", 413, "upload_too_large", "200,000 bytes"),
        "bomb header": (png_bomb(), "image/png", 413, "too_many_pixels", "decode safely"),
        "just over max_pixels": (png_bomb(1000, 101), "image/png", 413, "too_many_pixels", "1000x101 = 101,000"),
        "over max_pixels": (encode(np.zeros((400, 400, 3), np.uint8)), "image/png", 413, "too_many_pixels",
                            "400x400 = 160,000 pixels"),
    }


@pytest.mark.parametrize("case", list(bad_uploads()))
def test_bad_upload_is_a_4xx_naming_it(client, case):
    data, ctype, status, code, words = bad_uploads()[case]
    r = post(client, data, "upload.bin", ctype)
    assert r.status_code == status, r.text
    assert r.json()["error"] == code
    assert "'upload.bin'" in r.json()["detail"] and words in r.json()["detail"]
    assert " object at 0x" not in r.json()["detail"]  # no Python reprs of the upload's stream
    assert post(client, GOOD).status_code == 200  # and it goes on serving


def multipart(parts: list[tuple[str, str, bytes, str | None]], boundary: str = "b0undary") -> tuple[bytes, dict]:
    """A multipart/form-data body from (field, filename, data, content type or None) parts."""
    body = b""
    for name, filename, data, ctype in parts:
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode()
        body += (f"Content-Type: {ctype}\r\n" if ctype else "").encode() + b"\r\n" + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), {"content-type": f"multipart/form-data; boundary={boundary}"}


def test_format_comes_from_the_bytes(client, nsfw_client, eva, eva_dir):
    """The declared content type is ignored: the bytes say what the upload is."""
    jpeg = encode(image(12, (40, 56)), "JPEG")
    for ctype in ("image/png", "application/octet-stream", "text/plain"):
        r = post(client, jpeg, "photo.png", ctype)
        assert r.status_code == 200 and (r.json()["width"], r.json()["height"]) == (56, 40)
        assert_matches(r.json(), library(eva, jpeg))
    body, headers = multipart([("file", "no-type", GOOD, None)])
    r = client.post("/compute", content=body, headers=headers)
    assert r.status_code == 200 and r.json()["filename"] == "no-type"
    r = post(nsfw_client, jpeg, "photo.png", "image/png", "?censor=black")  # comes back as what it is
    assert r.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(r.content)).format == "JPEG"
    with TestClient(create_app(Settings(content_types=("image/png",)), detector=eva)) as c:
        r = post(c, jpeg, "photo.png", "image/png")
        assert r.status_code == 415 and r.json()["error"] == "unsupported_format"
        assert r.json()["detail"] == "'photo.png' is a JPEG image (read from its bytes); accepted: PNG"
        assert post(c, GOOD, "x.jpg", "image/jpeg").status_code == 200


@pytest.mark.parametrize("query, words", [
    ("?threshold=1.5", "'threshold'"), ("?threshold=abc", "'threshold'"), ("?threshold=nan", "'threshold'"),
    ("?level=neutral", "'level'"), ("?level=extreme", "'level'"), ("?censor=smudge", "'censor'"),
])
def test_bad_query_is_422(client, query, words):
    r = post(client, GOOD, query=query)
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert words in r.json()["detail"]


def test_bad_requests_are_json_4xx(client):
    r = post(client, GOOD, field="image")
    assert r.status_code == 422 and "missing multipart field 'file'" in r.json()["detail"]
    r = client.post("/compute", data={"file": "not a file"})
    assert r.status_code == 422 and "'file'" in r.json()["detail"]
    r = client.post("/compute", content=GOOD, headers={"content-type": "image/png"})
    assert r.status_code == 422 and "'file'" in r.json()["detail"]
    r = client.post("/compute", content=bytes(2_000_000), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and r.json()["error"] == "request_too_large"

    def stream():  # no Content-Length: the limit is counted as the body arrives
        for _ in range(40):
            yield bytes(10_000)
    r = client.post("/compute", content=stream(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and r.json()["error"] == "request_too_large"
    r = client.post("/compute/batch", files=[("files", (f"{i}.png", GOOD, "image/png")) for i in range(5)])
    assert r.status_code == 413 and r.json() == {"error": "too_many_files", "detail": "more than 4 files; the limit is 4"}
    r = client.post("/compute", files=[("file", (f"{i}.png", GOOD, "image/png")) for i in range(2)])
    assert r.status_code == 413 and r.json()["error"] == "too_many_files"
    r = client.post("/compute/batch", content=b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n",
                    headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_multipart"
    body, headers = multipart([("file", "x" * 20_000, GOOD, "image/png")])
    r = client.post("/compute", content=body, headers=headers)
    assert r.status_code == 400 and r.json()["error"] == "invalid_multipart"  # python-multipart's header limit
    assert client.get("/compute").status_code == 405
    assert client.get("/nowhere").json()["error"] == "not_found"
    assert post(client, GOOD).status_code == 200


# --- failing closed -------------------------------------------------------------------------

class Broken(torch.nn.Module):
    """Logits that raise, or that are NaN."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.weight = torch.nn.Parameter(torch.zeros(1))  # gives the detector a device and dtype

    def forward(self, x):
        if self.mode == "raise":
            raise RuntimeError("device fell over")
        return torch.full((len(x), 4), float("nan"))


def broken_detector(eva_dir, mode: str) -> Detector:
    loaded = load_model(eva_dir, str(eva_dir), None, None)
    return Detector(replace(loaded, module=Broken(mode)))


def test_scoring_failure_is_503_and_logged(eva_dir, caplog):
    with TestClient(create_app(detector=broken_detector(eva_dir, "raise"))) as c:
        with caplog.at_level(logging.ERROR, logger="nsfw_safety.server"):
            for query in ("", "?censor=blur"):
                r = post(c, GOOD, query=query)
                assert r.status_code == 503
                assert r.json() == {"error": "scoring_failed", "detail": "scoring failed: RuntimeError: device fell over"}
                assert "image" not in r.headers["content-type"]
            r = c.post("/compute/batch", files=[("files", ("a.png", GOOD, "image/png"))] * 2)
            assert r.status_code == 200 and [x["error"] for x in r.json()["results"]] == ["scoring_failed"] * 2
            assert all(x["status"] == 503 and "category" not in x for x in r.json()["results"])
        assert c.get("/health").json()["status"] == "ok"
    assert any("scoring a batch" in rec.message and rec.exc_info for rec in caplog.records)


def test_nan_scores_are_nsfw_and_blacked(eva_dir):
    with TestClient(create_app(detector=broken_detector(eva_dir, "nan"))) as c:
        body = post(c, GOOD, query="?level=high&threshold=1").json()
        assert (body["category"], body["reason"]) == ("nsfw", "non-finite model output")
        assert body["probs"] == {"neutral": None, "low": None, "medium": None, "high": None}
        r = post(c, GOOD, query="?censor=blur")
        assert r.headers["x-nsfw-action"] == "black" and not decoded(r).any()


def test_model_loads_in_the_lifespan(eva_dir):
    with TestClient(create_app(Settings(model=str(eva_dir), device="cpu"))) as c:
        deadline = time.monotonic() + 30
        while c.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, c.get("/health").json()
            time.sleep(0.05)
        assert post(c, GOOD).json()["model"]["id"] == str(eva_dir)


def test_one_image_that_cannot_be_scored_fails_alone(eva):
    """A device batch that raises is scored again image by image: the others still get answers.
    The batch closes when full (3 images; the wait is 10 s), so the three are scored together."""
    def predict(images, **kwargs):
        if any(im.width == 13 for im in images):
            raise RuntimeError("this one")
        return real(images, **kwargs)

    real = eva.predict
    with TestClient(create_app(Settings(max_batch_size=3, max_wait_ms=10_000), detector=eva)) as c:
        c.app.state.service.batcher.detector = type("D", (), {"predict": staticmethod(predict)})()
        files = [("files", (f"{w}.png", encode(image(60 + w, (16, w))), "image/png")) for w in (12, 13, 14)]
        results = c.post("/compute/batch", files=files).json()["results"]
        assert [x.get("error") for x in results] == [None, "scoring_failed", None]
        assert results[1]["detail"] == "scoring failed: RuntimeError: this one"
        assert c.get("/health").json()["batches"]["sizes"] == {"1": 2}


def test_model_that_cannot_load_is_503(caplog):
    with TestClient(create_app(Settings(model="no-such-model"))) as c:
        deadline = time.monotonic() + 10
        while c.get("/health").json()["error"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert "no-such-model" in health.json()["error"] and health.json()["ready"] is False
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["ready"] is False and "no-such-model" in r.json()["error"]
        r = post(c, GOOD)
        assert r.status_code == 503 and r.json()["error"] == "model_unavailable"
        assert post(c, b"").status_code == 503  # nothing is answered before a model can check it


# --- configuration --------------------------------------------------------------------------

def test_settings_from_env_and_flags(monkeypatch):
    env = {"NSFW_SAFETY_MODEL": "vit", "NSFW_SAFETY_LEVEL": "low", "NSFW_SAFETY_THRESHOLD": "0.3",
           "NSFW_SAFETY_MAX_BATCH": "8", "NSFW_SAFETY_MAX_WAIT_MS": "2.5",
           "NSFW_SAFETY_CONTENT_TYPES": "image/png, image/jpeg"}
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--level", "high", "--max-pixels", "1000"])
    s = Settings.from_env(env, **{k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__})
    assert (s.model, s.level, s.threshold, s.max_batch_size, s.max_wait_ms) == ("vit", "high", 0.3, 8, 2.5)
    assert s.max_pixels == 1000 and s.content_types == ("image/png", "image/jpeg")
    assert s.max_pixels_in_flight == 4000 and (s.lock_policy, s.api_key) == (False, None)
    s = Settings.from_env({"NSFW_SAFETY_LOCK_POLICY": "yes", "NSFW_SAFETY_API_KEY": "k", "NSFW_SAFETY_BODY_TIMEOUT": "5"},
                          **vars(parser.parse_args(["--header-timeout", "2", "--max-pixels-in-flight", "99999999"])))
    assert (s.lock_policy, s.api_key, s.header_timeout, s.body_timeout, s.max_pixels_in_flight) == (True, "k", 2, 5, 99999999)
    assert Settings.from_env({}, **vars(parser.parse_args(["--lock-policy"]))).lock_policy is True
    assert Settings.from_env({}) == Settings()
    with pytest.raises(ValueError, match="NSFW_SAFETY_LOCK_POLICY='maybe'"):
        Settings.from_env({"NSFW_SAFETY_LOCK_POLICY": "maybe"})
    with pytest.raises(ValueError, match="max_pixels_in_flight"):
        Settings(max_pixels=100, max_pixels_in_flight=99)
    with pytest.raises(ValueError, match="api_key"):
        Settings(api_key=" ")
    with pytest.raises(ValueError, match="NSFW_SAFETY_THRESHOLD='lots'"):
        Settings.from_env({"NSFW_SAFETY_THRESHOLD": "lots"})
    with pytest.raises(ValueError, match="threshold"):
        Settings.from_env({"NSFW_SAFETY_THRESHOLD": "2"})
    with pytest.raises(ValueError, match="content_types"):
        Settings(content_types=("image/bmp",))
    with pytest.raises(ValueError, match="level"):
        Settings(level="neutral")
    monkeypatch.setenv("NSFW_SAFETY_MAX_BATCH", "0")
    assert run(parser.parse_args([])) == 2  # bad settings: an exit code, not a server


# --- a real uvicorn under load --------------------------------------------------------------

def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # connections wait in the backlog until uvicorn has started, instead of being refused
    return sock


def test_uvicorn_under_concurrent_load(eva_dir, eva):
    env = {"NSFW_SAFETY_MODEL": str(eva_dir), "NSFW_SAFETY_DEVICE": "cpu", "NSFW_SAFETY_MAX_BATCH": "16",
           "NSFW_SAFETY_MAX_WAIT_MS": "10"}
    sock = free_socket()
    settings = Settings.from_env(env)
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = "http://127.0.0.1:%d" % sock.getsockname()[1]
    datas = [encode(image(100 + i, (32 + 4 * (i % 3), 48))) for i in range(12)]
    queries = [("medium", 0.5), ("low", 0.4), ("high", 0.1)]
    n, concurrency = 200, 16

    async def load():
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=60,
                                     limits=httpx.Limits(max_connections=concurrency)) as c:
            deadline = time.monotonic() + 60
            while (await c.get("/ready")).status_code != 200:
                assert time.monotonic() < deadline and thread.is_alive()
                await asyncio.sleep(0.05)

            async def one(i):
                level, threshold = queries[i % 3]
                async with gate:
                    r = await c.post(f"/compute?level={level}&threshold={threshold}",
                                     files={"file": (f"{i}.png", datas[i % len(datas)], "image/png")})
                return i, r

            start = time.perf_counter()
            answers = await asyncio.gather(*(one(i) for i in range(n)))
            elapsed = time.perf_counter() - start
            return answers, elapsed, (await c.get("/health")).json()

    try:
        answers, elapsed, health = asyncio.run(load())
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
    assert not thread.is_alive()

    assert [r.status_code for _, r in answers] == [200] * n
    expected = {(d, q): library(eva, datas[d], *queries[q]) for d in range(len(datas)) for q in range(3)}
    for i, r in answers:
        assert r.json()["filename"] == f"{i}.png"
        assert_matches(r.json(), expected[(i % len(datas), i % 3)])
    batches = health["batches"]
    assert batches["images"] == n and batches["largest"] > 1, batches
    assert batches["count"] < n
    log.info("server: %d requests at %d concurrent in %.2f s = %.0f req/s; batches %s",
             n, concurrency, elapsed, n / elapsed, batches["sizes"])
