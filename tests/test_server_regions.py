"""Region mode in the HTTP service: regions in the JSON, ``?censor=`` censoring the regions only
(the library's answer, byte for byte), fail closed, and the settings from flags and variables.
Real NudeNet model; tiny forced classifiers; a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import argparse
import base64
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image
from region_images import astronaut, wheel_scene

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402
from test_server import free_socket  # noqa: E402

from nsfw_safety import SafetyFilter, load_detector  # noqa: E402
from nsfw_safety.regions import RegionDetector, RegionSettings  # noqa: E402
from nsfw_safety.server import Settings, add_arguments, create_app, run, uvicorn_config  # noqa: E402

LIMITS = dict(max_pixels=600 * 800, max_upload_bytes=4_000_000)
SCENE, FACE = wheel_scene(), astronaut()


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def post(client, data: bytes, query: str = ""):
    return client.post(f"/compute{query}", files={"file": ("x.png", data, "image/png")})


@pytest.fixture(scope="module")
def regions():
    return RegionSettings(RegionDetector(device="cpu", threads=2))


@pytest.fixture(scope="module")
def nsfw(eva_nsfw_dir):
    return load_detector(str(eva_nsfw_dir), device="cpu")


@pytest.fixture(scope="module")
def client(nsfw, regions):
    with TestClient(create_app(Settings(**LIMITS), detector=nsfw, regions=regions)) as c:
        yield c


def test_json_lists_the_regions_of_a_flagged_image(client):
    body = post(client, png(SCENE)).json()
    assert body["category"] == "nsfw" and body["reason"].startswith("medium 1.00 >= 0.50; regions: BUTTOCKS_EXPOSED")
    (region,) = body["regions"]
    assert region["label"] == "BUTTOCKS_EXPOSED" and 0.55 < region["score"] < 0.6
    x1, y1, x2, y2 = region["box"]
    assert 300 < x1 < x2 < 680 and 100 < y1 < y2 < 460
    whole = post(client, png(FACE)).json()  # flagged, nothing exposed: censored whole
    assert whole["regions"] == [] and whole["reason"].endswith("no region of exposed at or above threshold: "
                                                              "censored whole")


def test_censor_is_the_library_answer_and_leaves_the_rest(client, nsfw, regions):
    r = post(client, png(SCENE), "?censor=pixelate")
    assert r.status_code == 200 and r.headers["x-nsfw-action"] == "pixelate" and r.headers["x-nsfw-regions"] == "1"
    out = np.asarray(Image.open(io.BytesIO(r.content)))
    want = SafetyFilter(nsfw, action="pixelate", regions=regions)(Image.fromarray(SCENE))
    np.testing.assert_array_equal(out, np.asarray(want.images))
    outside = want.masks[0].numpy() == 0
    np.testing.assert_array_equal(out[outside], SCENE[outside])
    assert (out[~outside] != SCENE[~outside]).any()


def test_batch_censor_carries_regions_and_images(client):
    files = [("files", ("a.png", png(SCENE), "image/png")), ("files", ("b.png", png(FACE), "image/png"))]
    a, b = client.post("/compute/batch?censor=black", files=files).json()["results"]
    assert [r["label"] for r in a["regions"]] == ["BUTTOCKS_EXPOSED"] and b["regions"] == []
    out_a = np.asarray(Image.open(io.BytesIO(base64.b64decode(a["image"]))))
    out_b = np.asarray(Image.open(io.BytesIO(base64.b64decode(b["image"]))))
    assert (out_a == SCENE).all(-1).mean() > 0.7 and not out_b.any()  # the box only; the face picture whole


def test_a_failing_region_detector_censors_whole(nsfw, regions, monkeypatch):
    class Broken:
        def run(self, *args):
            raise RuntimeError("no GPU memory")

    monkeypatch.setattr(regions.detector, "_session", Broken())
    with TestClient(create_app(Settings(**LIMITS), detector=nsfw, regions=regions)) as c:
        r = post(c, png(SCENE), "?censor=black")
    assert r.status_code == 200 and "region detector failed: RuntimeError: no GPU memory" in r.headers["x-nsfw-reason"]
    assert not np.asarray(Image.open(io.BytesIO(r.content))).any()


def test_passed_images_and_region_mode_off(eva_safe_dir, nsfw, regions):
    data = png(SCENE)
    with TestClient(create_app(Settings(**LIMITS), detector=load_detector(str(eva_safe_dir), device="cpu"),
                               regions=regions)) as c:
        body = post(c, data).json()
        r = post(c, data, "?censor=blur")
    assert body["category"] == "safe" and body["regions"] == []
    assert r.content == data and r.headers["x-nsfw-regions"] == "0"
    with TestClient(create_app(Settings(**LIMITS), detector=nsfw)) as c:
        body = post(c, data).json()
        assert body["regions"] is None and c.get("/health").json()["regions"] is None
        assert "x-nsfw-regions" not in post(c, data, "?censor=blur").headers


def test_settings_from_flags_and_variables(monkeypatch):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    env = {"NSFW_SAFETY_REGIONS": "faces", "NSFW_SAFETY_REGION_THRESHOLD": "FACE_MALE=0.6",
           "NSFW_SAFETY_REGION_FEATHER": "0.05"}
    args = parser.parse_args(["--region-shape", "ellipse", "--region-expand", "0.2"])
    s = Settings.from_env(env, **{k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__})
    assert (s.regions, s.region_threshold, s.region_expand, s.region_shape, s.region_feather) == (
        "faces", {"FACE_MALE": 0.6}, 0.2, "ellipse", 0.05)
    built = s.region_settings()
    assert built.to_dict()["threshold"] == {"FACE_MALE": 0.6} and built.classes == "faces"
    listed = Settings.from_env({}, **vars(parser.parse_args(["--regions", "BUTTOCKS_EXPOSED,ANUS_EXPOSED"])))
    assert listed.regions == ("BUTTOCKS_EXPOSED", "ANUS_EXPOSED")
    assert Settings().region_settings() is None
    for bad, words in [({"NSFW_SAFETY_REGIONS": "TAILS"}, "unknown region classes"),
                       ({"NSFW_SAFETY_REGIONS": "faces", "NSFW_SAFETY_REGION_THRESHOLD": "BUTTOCKS_EXPOSED=0.5"},
                        "not selected"),
                       ({"NSFW_SAFETY_REGION_THRESHOLD": "high"}, "NSFW_SAFETY_REGION_THRESHOLD='high'"),
                       ({"NSFW_SAFETY_REGION_SHAPE": "star"}, "region_shape"),
                       ({"NSFW_SAFETY_REGION_FEATHER": "3"}, "region_feather")]:
        with pytest.raises(ValueError, match=words):
            Settings.from_env(bad)
    monkeypatch.setenv("NSFW_SAFETY_REGIONS", "nudity")
    assert run(parser.parse_args([])) == 2  # bad settings: an exit code, not a server


def test_region_model_that_cannot_load_is_503(nsfw, tmp_path):
    settings = Settings(**LIMITS, regions="exposed", region_model=str(tmp_path / "missing.onnx"))
    with TestClient(create_app(settings, detector=nsfw)) as c:
        deadline = time.monotonic() + 30
        while c.get("/health").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.get("/ready").status_code == 503 and "missing.onnx" in c.get("/ready").json()["error"]
        r = post(c, png(SCENE))
        assert r.status_code == 503 and r.json()["error"] == "model_unavailable"


def test_real_uvicorn_loads_both_models_and_censors_the_region(eva_nsfw_dir):
    env = {"NSFW_SAFETY_MODEL": str(eva_nsfw_dir), "NSFW_SAFETY_DEVICE": "cpu", "NSFW_SAFETY_REGIONS": "exposed",
           "NSFW_SAFETY_REGION_SHAPE": "ellipse", "NSFW_SAFETY_MAX_PIXELS": str(600 * 800)}
    settings = Settings.from_env(env)
    sock = free_socket()
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url="http://127.0.0.1:%d" % sock.getsockname()[1], timeout=60) as c:
            deadline = time.monotonic() + 60
            while c.get("/ready").status_code != 200:
                assert time.monotonic() < deadline and thread.is_alive()
                time.sleep(0.05)
            assert c.get("/health").json()["regions"]["shape"] == "ellipse"
            r = c.post("/compute?censor=blur", files={"file": ("scene.png", png(SCENE), "image/png")})
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
    assert r.status_code == 200 and r.headers["x-nsfw-regions"] == "1"
    out = np.asarray(Image.open(io.BytesIO(r.content)))
    assert (out == SCENE).all(-1).mean() > 0.75 and (out != SCENE).any()
