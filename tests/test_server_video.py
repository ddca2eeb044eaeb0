"""Animations and videos over HTTP, on a real uvicorn on 127.0.0.1: every frame checked through the
batcher, the limits enforced from the header and while decoding, the answer's frames and ranges,
censored copies in the upload's own format, and a batch of stills and moving files. Every file is
written by the test (Pillow: GIF, WebP, APNG; PyAV: MP4, MOV, WebM, MKV)."""

from __future__ import annotations

import base64
import contextlib
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
av = pytest.importorskip("av")

import nsfw_safety.frames as frames_module  # noqa: E402
import nsfw_safety.server as server_module  # noqa: E402
from nsfw_safety import SafetyFilter, load_detector  # noqa: E402
from nsfw_safety.frames import read_frames  # noqa: E402
from nsfw_safety.server import Batcher, Settings, _Job, create_app, uvicorn_config  # noqa: E402
from nsfw_safety.video import check_video, frame_ranges  # noqa: E402
from test_server import broken_detector, encode, free_socket, image, library  # noqa: E402
from videos import pictures, write_animation, write_video  # noqa: E402

ANIMATIONS = (".gif", ".webp", ".png")
VIDEOS = (".mp4", ".webm", ".mov")
MIDDLE = 3  # of 7 frames
TYPES = {".gif": "image/gif", ".webp": "image/webp", ".png": "image/png", ".mp4": "video/mp4",
         ".webm": "video/webm", ".mov": "video/quicktime"}


@pytest.fixture(scope="module")
def detector(eva_dir):
    return load_detector(str(eva_dir), device="cpu")


@contextlib.contextmanager
def serving(detector, **settings):
    """A real uvicorn on 127.0.0.1 in a thread; yields (an httpx client, the app's Service)."""
    settings = Settings(**{"max_upload_bytes": 2_000_000, "max_pixels": 100_000, "max_files": 6, **settings})
    app = create_app(settings, detector=detector)
    sock = free_socket()
    server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.01)
    try:
        with httpx.Client(base_url="http://127.0.0.1:%d" % sock.getsockname()[1], timeout=60) as client:
            yield client, app.state.service
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def served(detector):
    with serving(detector) as (client, service):
        yield client


def post(client, path: Path, query: str = "", ctype: str = "application/octet-stream"):
    return client.post(f"/compute{query}", files={"file": (path.name, path.read_bytes(), ctype)})


def write(path: Path, frames: list, rate: int = 8) -> Path:
    """An animation (100 ms a frame) or a video (``rate`` frames per second), by suffix."""
    if path.suffix in ANIMATIONS:
        return write_animation(path, frames, [100] * len(frames))
    return write_video(path, frames, rate=rate, audio=False)


def medium_scores(detector, path: Path) -> list[float]:
    """The still-image path's medium score of every frame as decoded."""
    return detector.predict([f.image for f in read_frames(path)]).levels[:, 2].tolist()


def flagged_in_the_middle(detector, path: Path) -> tuple[Path, float]:
    """Seven different frames, the one the tiny model scores highest in the middle; and a
    threshold between its score and the next highest, so that it alone is flagged."""
    pics = pictures(7)
    top = int(detector.predict(pics).levels[:, 2].argmax())
    order = [i for i in range(7) if i != top]
    order.insert(MIDDLE, top)
    write(path, [pics[i] for i in order])
    scores = medium_scores(detector, path)
    ranked = sorted(scores)
    assert scores.index(ranked[-1]) == MIDDLE, scores  # the encoding kept it on top
    return path, (ranked[-1] + ranked[-2]) / 2


def write_fragmented_mp4(path: Path, n: int, header_frames: int) -> Path:
    """An MP4 whose header (moov) lists only its first ``header_frames`` frames; the other frames
    follow in fragments (moof), which players show too."""
    with av.open(str(path), "w", options={"movflags": "frag_keyframe"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
        stream.codec_context.gop_size = header_frames
        stream.codec_context.options = {"keyint_min": str(header_frames), "sc_threshold": "0"}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), (i * 7) % 256, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 8)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.fixture
def decoded_frames(monkeypatch) -> list[int]:
    """Counts the frames the animation and video decoders hand out (a live list, one entry per file)."""
    counts: list[int] = []

    def counting(decoder):
        def run(*args, **kwargs):
            counts.append(0)
            for frame in decoder(*args, **kwargs):
                counts[-1] += 1
                yield frame
        return run

    monkeypatch.setattr(frames_module, "_pillow_frames", counting(frames_module._pillow_frames))
    monkeypatch.setattr(frames_module, "_pyav_frames", counting(frames_module._pyav_frames))
    return counts


# --- every frame checked ------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ANIMATIONS + VIDEOS)
def test_a_flagged_frame_in_the_middle_is_found(served, detector, tmp_path, suffix):
    path, threshold = flagged_in_the_middle(detector, tmp_path / f"clip{suffix}")
    r = post(served, path, f"?threshold={threshold!r}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["category"], body["flagged"], body["level"]) == ("nsfw", True, "medium")
    assert body["frames"] == {"checked": 7, "total": 7, "worst": MIDDLE}
    assert body["flagged_frames"] == [[MIDDLE, MIDDLE]]
    shown = MIDDLE * (0.1 if suffix in ANIMATIONS else 1 / 8)
    assert body["flagged_times"] == [[pytest.approx(shown, abs=1e-3)] * 2]
    assert (body["filename"], body["width"], body["height"], body["regions"]) == (path.name, 64, 48, None)
    # the library's answer for the file: the same reason, and levels the maximum over the frames
    expected = check_video(path, SafetyFilter(detector, threshold=threshold))
    assert body["reason"] == expected.reason and body["reason"].startswith("checked 7 of 7 frames; flagged 1: 3 (")
    assert body["levels"] == pytest.approx(expected.levels, abs=1e-4)
    assert body["levels"]["medium"] == pytest.approx(max(medium_scores(detector, path)), abs=1e-4)
    assert sum(body["probs"].values()) == pytest.approx(1.0, abs=1e-4)  # the worst frame's probabilities


def test_a_second_opinion_checks_every_frame_too(forced_dirs, tmp_path):
    """A cascade is a detector to the video check: each frame re-checked, each model's part given."""
    from nsfw_safety.cascade import Cascade

    first, second = load_detector(forced_dirs["eva60"], device="cpu"), load_detector(forced_dirs["vit20"], device="cpu")
    cascade = Cascade(first, second)
    path = write(tmp_path / "a.webm", pictures(5))
    with serving(cascade) as (client, _):
        body = post(client, path).json()
    assert (body["category"], body["frames"]) == ("safe", {"checked": 5, "total": 5, "worst": 0})
    assert body["reason"] == (  # the library's video verdict, naming the model that decided
        "checked 5 of 5 frames; none flagged: vit20 medium 0.20 < 0.50 (second opinion on eva60 0.60)")
    assert [(p["model"], p["scored"]) for p in body["parts"]] == [("eva60", True), ("vit20", True)]
    assert body["levels"]["medium"] == pytest.approx(0.2, abs=1e-5)


def test_frames_are_scored_in_chunks_charged_to_the_pixel_budget(detector, tmp_path):
    """A 12-frame 64x48 video, batches of 4 and room for 5 frames in flight: chunks of 3 frames
    (5 less the decoder's 2), each reserved with the decoder's frames before it is decoded."""
    path = write(tmp_path / "v.mp4", pictures(12))
    frame = 64 * 48
    with serving(detector, max_batch_size=4, max_pixels=6000, max_pixels_in_flight=5 * frame) as (client, service):
        real = service.batcher.detector.score
        seen = []

        def score(pixels, finite=None):
            seen.append((len(pixels), service.budget.used))
            return real(pixels, finite)

        service.batcher.detector = type("Spy", (), {"score": staticmethod(score), "device": real.__self__.device})()
        assert post(client, path).status_code == 200
        assert seen == [(3, 5 * frame)] * 4  # 3 frames a chunk, while 3 + 2 frames are held
        assert service.budget.used == 0
        health = client.get("/health").json()
        assert health["frame_chunks"] == {"count": 4, "frames": 12} and health["batches"]["count"] == 0
        big = write(tmp_path / "big.mp4", [np.zeros((60, 90, 3), np.uint8)] * 2)  # 3 frames of 5,400 > 5 x 3,072
        r = client.post("/compute", files={"file": ("big.mp4", big.read_bytes(), "video/mp4")})
    assert r.status_code == 413 and r.json()["error"] == "too_many_pixels"
    assert "'big.mp4' has frames of 90x60: checking it holds 3 frames at once, 16,200 pixels" in r.json()["detail"]


def test_a_long_video_does_not_starve_still_images(detector, tmp_path):
    """Chunks of a video and still images share the one scoring thread in arrival order: a still
    image sent while the video is being checked is scored before the video's next chunk."""
    path = write(tmp_path / "long.webm", pictures(10))
    # a still image waits up to 2 s for a second one, or until the video's next chunk queues behind it
    with serving(detector, max_batch_size=2, max_wait_ms=2000) as (client, service):
        batcher: Batcher = service.batcher
        real = batcher.detector
        order, started = [], threading.Event()

        class Recorder:
            device = real.device

            def predict(self, images, **kwargs):
                order.append(("stills", len(images)))
                return real.predict(images, **kwargs)

            def score(self, pixels, finite=None):
                order.append(("frames", len(pixels)))
                if len(order) == 1:  # hold the first chunk until a still image waits in the queue
                    started.set()
                    deadline = time.monotonic() + 30
                    while not any(isinstance(job, _Job) for job in list(batcher._pending)):
                        assert time.monotonic() < deadline
                        time.sleep(0.01)
                return real.score(pixels, finite)

        batcher.detector = Recorder()
        answers = {}

        def send_video():
            with httpx.Client(base_url=client.base_url, timeout=60) as own:
                answers["video"] = post(own, path)

        video = threading.Thread(target=send_video)
        video.start()
        assert started.wait(30)
        still = client.post("/compute", files={"file": ("x.png", encode(image(3)), "image/png")})
        video.join(60)
    assert still.status_code == 200 and answers["video"].status_code == 200
    assert answers["video"].json()["frames"]["checked"] == 10
    assert order == [("frames", 2), ("stills", 1)] + [("frames", 2)] * 4


def test_animations_and_videos_checked_at_once_are_bounded(detector, tmp_path, monkeypatch):
    """Each holds a worker thread of its own while it is checked: past the limit, a 503 after
    --busy-timeout, not a thread taken from the pool still images are decoded in."""
    monkeypatch.setattr(server_module, "MOVING_AT_ONCE", 1)
    path = write(tmp_path / "a.gif", pictures(3))
    with serving(detector, busy_timeout=0.2) as (client, service):
        real, started, gate = service.batcher.detector, threading.Event(), threading.Event()

        class Held:
            device = real.device

            def score(self, pixels, finite=None):
                started.set()
                assert gate.wait(30)
                return real.score(pixels, finite)

        service.batcher.detector = Held()
        answers = {}

        def send():
            with httpx.Client(base_url=client.base_url, timeout=60) as own:
                answers["first"] = post(own, path)

        first = threading.Thread(target=send)
        first.start()
        assert started.wait(30)
        r = post(client, path)
        gate.set()
        first.join(60)
    assert (r.status_code, r.json()["error"], r.headers["retry-after"]) == (503, "server_busy", "1")
    assert "checks 1 animations or videos at once" in r.json()["detail"]
    assert answers["first"].status_code == 200 and answers["first"].json()["frames"]["checked"] == 3


# --- limits ----------------------------------------------------------------------------------------

def test_each_limit_is_enforced_before_any_frame_is_decoded(detector, tmp_path, decoded_frames, monkeypatch):
    temp = tmp_path / "server-temp"  # where the server copies uploads for their decoders
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    gif6 = write(tmp_path / "six.gif", pictures(6))  # 6 frames, 0.6 s, 64x48
    mp4_6 = write(tmp_path / "six.mp4", pictures(6))  # 6 frames, 0.75 s
    mp4_long = write(tmp_path / "long.mp4", pictures(4), rate=2)  # 4 frames, 2 s
    webm_long = write(tmp_path / "long.webm", pictures(4), rate=2)
    big_gif = write(tmp_path / "big.gif", pictures(2, (100, 120)))  # 12,000 pixels a frame
    big_mp4 = write(tmp_path / "big.mp4", pictures(2, (100, 120)))
    cases = [(gif6, "too_many_frames", "has 6 frames, over the limit of 5"),
             (mp4_6, "too_many_frames", "has 6 frames, over the limit of 5"),
             (mp4_long, "too_long", "plays for 2.0 s, over the limit of 1.5 s"),
             (webm_long, "too_long", "plays for 2.0 s, over the limit of 1.5 s"),
             (big_gif, "too_many_pixels", "is 120x100 = 12,000 pixels, over the limit of 10,000"),
             (big_mp4, "too_many_pixels", "has frames of 120x100 = 12,000 pixels, over the limit of 10,000")]
    with serving(detector, max_frames=5, max_duration=1.5, max_pixels=10_000) as (client, service):
        for path, code, words in cases:
            r = post(client, path)
            assert (r.status_code, r.json()["error"]) == (413, code), (path.name, r.text)
            assert r.json()["detail"].startswith(repr(path.name)) and words in r.json()["detail"], r.json()
            assert "upload" not in r.json()["detail"]  # the upload's name, not the server's copy
        data = gif6.read_bytes()
        r = client.post("/compute", files={"file": ("six.gif", data + bytes(2_000_001 - len(data)), "image/gif")})
        assert (r.status_code, r.json()["error"]) == (413, "upload_too_large")
        assert post(client, write(tmp_path / "ok.gif", pictures(5))).status_code == 200  # within every limit
        assert service.budget.used == 0
    assert decoded_frames == [5]  # only the file within the limits was decoded
    assert list(temp.iterdir()) == []  # every copy removed, refused or answered


def test_a_header_that_lies_is_stopped_while_decoding(safe, tmp_path, decoded_frames):
    """An MP4 whose header lists 10 frames and that holds 100, and a GIF whose playing time is
    only known frame by frame: refused at the limit, never answered "safe" on the frames before."""
    lying = write_fragmented_mp4(tmp_path / "lying.mp4", 100, header_frames=10)
    assert frames_module.probe(lying).frames == 10
    slow = write_animation(tmp_path / "slow.gif", pictures(6), [1000] * 6)  # 6 s
    with serving(safe, max_frames=20, max_duration=30) as (client, _):
        r = post(client, lying)
        assert (r.status_code, r.json()["error"]) == (413, "too_many_frames"), r.text
        assert r.json()["detail"] == ("checked 20 of 20 frames, then: 'lying.mp4' has more than 20 frames, the limit; "
                                      "refused while decoding (its header was within the limits, or did not say)")
        r = client.post("/compute/batch", files=[("files", ("lying.mp4", lying.read_bytes(), "video/mp4"))])
        assert [(x["error"], x["status"]) for x in r.json()["results"]] == [("too_many_frames", 413)]
    assert decoded_frames == [20, 20]  # stopped at the limit, not at the end of the file
    with serving(safe, max_duration=2.5) as (client, _):
        r = post(client, slow)
    assert (r.status_code, r.json()["error"]) == (413, "too_long")
    assert r.json()["detail"].startswith("checked 2 of 6 frames, then: 'slow.gif' plays for more than 2.5 s")


def test_settings_for_moving_uploads():
    s = Settings.from_env({"NSFW_SAFETY_MAX_FRAMES": "10", "NSFW_SAFETY_MAX_DURATION": "2.5"})
    assert (s.max_frames, s.max_duration) == (10, 2.5)
    assert (Settings().max_frames, Settings().max_duration) == (1000, 60.0)
    assert "video/mp4" in Settings().content_types and "image/gif" in Settings().content_types
    for bad in ({"max_frames": 0}, {"max_duration": 0}, {"max_duration": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Settings(**bad)


# --- bad files -------------------------------------------------------------------------------------

def test_a_truncated_video_is_flagged_with_the_reason(safe, tmp_path):
    whole = write_video(tmp_path / "fast.mp4", pictures(24), audio=False, faststart=True)  # index first
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with serving(safe) as (client, _):
        r = post(client, cut)
        assert r.status_code == 200, r.text
        body = r.json()
        n = body["frames"]["checked"]
        assert 0 < n < 24 and body["frames"]["total"] == 24
        assert (body["category"], body["flagged"], body["flagged_frames"]) == ("nsfw", True, [])
        assert body["reason"].startswith(f"checked {n} of 24 frames, then: 'cut.mp4': ")
        assert "upload.mp4" not in body["reason"]  # named as uploaded, not as the server's copy
        r = post(client, cut, "?censor=blur")  # no censored copy of frames never checked
        assert (r.status_code, r.json()["error"]) == (422, "incomplete_check")
        assert r.json()["detail"].startswith(f"checked {n} of 24 frames, then: 'cut.mp4'")
        slow = write_video(tmp_path / "slow.mp4", pictures(24), audio=False)  # index last: cut off
        cut.write_bytes(slow.read_bytes()[: slow.stat().st_size // 2])
        r = post(client, cut)
        assert (r.status_code, r.json()["error"]) == (400, "unreadable_video")
        assert r.json()["detail"].startswith("'cut.mp4' is not a readable animation or video")


def test_formats_not_accepted_are_415(detector, tmp_path):
    gif = write(tmp_path / "a.gif", pictures(3))
    mp4 = write(tmp_path / "a.mp4", pictures(3))
    mkv = tmp_path / "a.mkv"
    with av.open(str(mkv), "w") as container:  # Matroska, not WebM: not an accepted format
        stream = container.add_stream("libx264", rate=8)
        stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
        for pic in pictures(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(pic), format="rgb24")))
        container.mux(stream.encode())
    with serving(detector, content_types=("image/png", "image/webp", "video/webm")) as (client, _):
        for path, words in ((gif, "is a GIF image"), (mp4, "is a MP4 video"), (mkv, "is a MKV video")):
            r = post(client, path, ctype=TYPES[".webm"])  # whatever it says it is
            assert (r.status_code, r.json()["error"]) == (415, "unsupported_format")
            assert r.json()["detail"] == f"{path.name!r} {words} (read from its bytes); accepted: PNG, WEBP, WEBM"


def test_a_scoring_failure_is_503_never_safe(eva_dir, tmp_path):
    path = write(tmp_path / "a.webp", pictures(3))
    with serving(broken_detector(eva_dir, "raise")) as (client, _):
        r = post(client, path)
        assert r.status_code == 503 and r.json() == {"error": "scoring_failed",
                                                     "detail": "scoring failed: RuntimeError: device fell over"}
        [entry] = client.post("/compute/batch", files=[("files", ("a.webp", path.read_bytes(), "x"))]).json()["results"]
        assert (entry["error"], entry["status"]) == ("scoring_failed", 503) and "category" not in entry


# --- censored copies ---------------------------------------------------------------------------------

def rgb_frames(data: bytes, suffix: str, tmp_path: Path) -> list[np.ndarray]:
    path = tmp_path / f"answer{suffix}"
    path.write_bytes(data)
    return [np.asarray(f.image.convert("RGB")) if isinstance(f.image, Image.Image) else f.image
            for f in read_frames(path)]


@pytest.mark.parametrize("suffix", [".webp", ".mp4"])
def test_censor_returns_the_file_in_its_own_format(served, detector, tmp_path, suffix):
    path, threshold = flagged_in_the_middle(detector, tmp_path / f"clip{suffix}")
    before = rgb_frames(path.read_bytes(), suffix, tmp_path)
    r = post(served, path, f"?censor=black&threshold={threshold!r}")
    assert r.status_code == 200 and r.headers["content-type"] == TYPES[suffix]
    h = r.headers
    assert (h["x-nsfw-action"], h["x-nsfw-frames"], h["x-nsfw-flagged-frames"]) == ("black", "7/7", "3")
    after = rgb_frames(r.content, suffix, tmp_path)
    assert len(after) == 7 and after[MIDDLE].mean() < 3 and before[MIDDLE].mean() > 30
    tolerance = 0 if suffix == ".webp" else 4  # lossless WebP in and out; H.264 re-encoded
    for i in set(range(7)) - {MIDDLE}:
        assert np.abs(after[i].astype(int) - before[i]).mean() <= tolerance, i
    r = post(served, path, "?censor=blur&threshold=1")  # passed: the upload comes back as it was
    assert r.status_code == 200 and r.content == path.read_bytes() and r.headers["x-nsfw-action"] == "none"


def test_censor_too_large_for_the_pixels_in_flight(detector, tmp_path):
    """Writing a censored video costs 24 frames; here there is room for 20 (enough to check it)."""
    path = write(tmp_path / "v.mp4", pictures(4))
    with serving(detector, max_pixels=64 * 48, max_pixels_in_flight=20 * 64 * 48) as (client, _):
        assert post(client, path, "?threshold=0").json()["flagged"] is True
        r = post(client, path, "?censor=blur&threshold=0")
    assert (r.status_code, r.json()["error"]) == (413, "censor_too_large")
    assert "writing its censored copy costs 24 frames of 64x48 in flight, 73,728 pixels" in r.json()["detail"]


# --- batches -------------------------------------------------------------------------------------------

def test_a_batch_of_stills_and_moving_files(served, detector, tmp_path):
    still_png, still_gif = encode(image(70, (40, 48))), encode(image(71, (32, 40)), "GIF")
    gif, threshold = flagged_in_the_middle(detector, tmp_path / "clip.gif")
    mp4 = write(tmp_path / "clip.mp4", pictures(9, seed=20))
    files = [("a.png", still_png), (gif.name, gif.read_bytes()), ("empty.mp4", b""), (mp4.name, mp4.read_bytes()),
             ("still.gif", still_gif)]
    r = served.post(f"/compute/batch?threshold={threshold!r}",
                    files=[("files", (name, data, "application/octet-stream")) for name, data in files])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == [name for name, _ in files]
    for i, data in ((0, still_png), (4, still_gif)):  # a GIF of one frame is a still image
        category, reason, row = library(detector, data, "medium", threshold)
        assert (results[i]["category"], results[i]["reason"]) == (category, reason)
        assert results[i]["levels"] == pytest.approx(row["levels"], abs=1e-4)
        assert (results[i]["frames"], results[i]["flagged_frames"], results[i]["flagged_times"]) == (None, None, None)
    for i, path in ((1, gif), (3, mp4)):
        expected = check_video(path, SafetyFilter(detector, threshold=threshold))
        assert results[i]["reason"] == expected.reason
        assert results[i]["levels"] == pytest.approx(expected.levels, abs=1e-4)
        assert results[i]["flagged_frames"] == [list(r) for r in frame_ranges(expected.flagged_frames)]
        assert results[i]["frames"]["checked"] == results[i]["frames"]["total"] == expected.total
    assert results[1]["flagged_frames"] == [[MIDDLE, MIDDLE]]
    assert (results[2]["error"], results[2]["status"]) == ("empty_upload", 400)

    r = served.post(f"/compute/batch?censor=black&threshold={threshold!r}",
                    files=[("files", (gif.name, gif.read_bytes(), "image/gif")), ("files", ("a.png", still_png, "x"))])
    censored, still = r.json()["results"]
    assert (censored["action"], censored["media_type"]) == ("black", "image/gif")
    out = rgb_frames(base64.b64decode(censored["image"]), ".gif", tmp_path)
    assert len(out) == 7 and out[MIDDLE].max() <= 3 and min(f.mean() for f in out[:MIDDLE]) > 30
    assert still["frames"] is None and still["media_type"] == "image/png"
