"""Animations and videos from files: every frame decoded and checked, censored copies in the
original's format, and bad files that are never "safe". Every file is written by the test."""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from nsfw_safety import SafetyFilter, load_detector
from nsfw_safety.censor import default_card, pixelate, place
from nsfw_safety.frames import VideoError, VideoLimits, VideoTooLarge, probe, read_frames, write_censored
from nsfw_safety.video import check_video
from videos import SIZE, pictures, write_animation, write_audio_only, write_video

av = pytest.importorskip("av")

DURATIONS = [100, 200, 300, 150, 250, 100]  # ms


@pytest.fixture(scope="module")
def detector(eva_dir):
    return load_detector(str(eva_dir), device="cpu", max_batch_size=4)


@pytest.fixture(scope="module")
def flag_all(eva_nsfw_dir):
    return SafetyFilter(load_detector(str(eva_nsfw_dir), device="cpu", max_batch_size=4), action="black")


def decoded(path) -> list:
    return [f.image for f in read_frames(path)]


def split_on(detector, frames, action="black") -> tuple[SafetyFilter, list[int]]:
    """A filter flagging the frames scored above the median by the still-image path, and those frames."""
    scores = detector.predict(frames).levels[:, 2]
    threshold = float(scores.median())
    expected = [i for i, s in enumerate(scores.tolist()) if s >= threshold]
    assert 0 < len(expected) < len(scores), scores
    return SafetyFilter(detector, threshold=threshold, action=action), expected


def rgb(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else image


# --- animations ------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".gif", ".webp", ".png"])
def test_every_frame_of_an_animation_is_checked_with_its_time(detector, tmp_path, suffix):
    path = write_animation(tmp_path / f"a{suffix}", pictures(6), DURATIONS, loop=2)
    info = probe(path)
    assert (info.kind, info.frames, info.loop, info.width, info.height) == ("animation", 6, 2, SIZE[1], SIZE[0])
    frames = list(read_frames(path))
    assert [f.duration for f in frames] == pytest.approx([d / 1000 for d in DURATIONS])
    assert [f.time for f in frames] == pytest.approx(np.cumsum([0] + DURATIONS[:-1]) / 1000)
    guard, expected = split_on(detector, [f.image for f in frames])
    result = check_video(path, guard)
    assert result.checked == list(range(6)) and result.flagged_frames == expected
    assert result.times == pytest.approx([frames[i].time for i in expected])
    assert result.frame_times == pytest.approx([f.time for f in frames])
    assert result.frames is None and result.source == info
    assert result.reason.startswith(f"checked 6 of 6 frames; flagged {len(expected)}: ")


def test_an_apng_default_image_is_checked_too(detector, tmp_path):
    """Players that know APNG skip the default image; others show only it: both are displayed."""
    pics = pictures(4)
    scores = detector.predict(pics).levels[:, 2]
    hidden = int(scores.argmax())
    order = [hidden] + [i for i in range(4) if i != hidden]  # the top-scoring picture is the default image
    path = write_animation(tmp_path / "d.png", [pics[i] for i in order], [100, 100, 100], default_image=True)
    info = probe(path)
    assert info.default_image and info.frames == 4
    frames = list(read_frames(path))
    assert (frames[0].time, frames[0].duration) == (0.0, 0.0) and frames[1].time == 0.0
    guard = SafetyFilter(detector, threshold=float(scores[hidden]), action="pixelate")
    result = check_video(path, guard)
    assert result.flagged and result.flagged_frames == [0] and result.censored == [0]
    copy = write_censored(path, result, tmp_path / "copy.png", guard)
    assert (probe(copy).default_image, probe(copy).frames) == (True, 4)
    after = list(read_frames(copy))
    assert [f.duration for f in after] == pytest.approx([0, 0.1, 0.1, 0.1])
    assert not np.array_equal(rgb(after[0].image), rgb(frames[0].image))
    assert all(np.array_equal(rgb(a.image), rgb(b.image)) for a, b in zip(after[1:], frames[1:]))


@pytest.mark.parametrize("suffix", [".gif", ".webp", ".png"])
def test_a_censored_animation_keeps_frames_durations_and_loop(detector, tmp_path, suffix):
    path = write_animation(tmp_path / f"a{suffix}", pictures(6), DURATIONS, loop=3)
    before = decoded(path)
    guard, expected = split_on(detector, before, action="pixelate")
    result = check_video(path, guard)
    target = write_censored(path, result, tmp_path / f"censored{suffix}", guard)
    info = probe(target)
    assert (info.format, info.frames, info.loop) == (probe(path).format, 6, 3)
    after = list(read_frames(target))
    assert [f.duration for f in after] == pytest.approx([d / 1000 for d in DURATIONS])
    tolerance = 2 if suffix == ".gif" else 0  # GIF re-quantizes its palette
    for i, (old, new) in enumerate(zip(before, after)):
        want = rgb(old)
        if i in expected:  # the library's own pixelation of the decoded frame
            unit = torch.from_numpy(want.copy()).permute(2, 0, 1)[None].float() / 255
            want = (pixelate(unit)[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        diff = np.abs(want.astype(int) - rgb(new.image).astype(int)).mean()
        assert diff <= tolerance + 0.5 * (i in expected), (i, diff)
    assert sorted(os.listdir(tmp_path)) == sorted([path.name, target.name])  # no temporary file left


def test_an_animation_over_its_limits(detector, tmp_path):
    guard = SafetyFilter(detector)
    path = write_animation(tmp_path / "a.gif", pictures(6), [1000] * 6)
    with pytest.raises(VideoTooLarge, match="6 frames, over the limit of 5"):
        check_video(path, guard, limits=VideoLimits(max_frames=5))
    with pytest.raises(VideoTooLarge, match="3,072 pixels, over the limit of 3,000"):
        check_video(path, guard, limits=VideoLimits(max_pixels=3000))
    # the playing time of a GIF is only known while decoding: checked up to the limit, then flagged
    result = check_video(path, guard, limits=VideoLimits(max_duration=2.5))
    assert result.flagged and result.checked == [0, 1]
    assert result.reason == f"checked 2 of 6 frames, then: {str(path)!r} plays for more than 2.5 s, the limit"


def test_a_gif_whose_header_claims_an_absurd_size_is_refused_before_decoding(detector, tmp_path):
    path = write_animation(tmp_path / "a.gif", pictures(2), [100, 100])
    data = bytearray(path.read_bytes())
    data[6:10] = b"\xff\xff\xff\xff"  # logical screen 65535 x 65535
    path.write_bytes(bytes(data))
    with pytest.raises(VideoTooLarge, match="4294836225 pixels|65535x65535"):
        check_video(path, SafetyFilter(detector))


def test_a_zero_frame_gif_and_other_non_videos_raise(detector, tmp_path):
    guard = SafetyFilter(detector)
    empty = tmp_path / "empty.gif"
    empty.write_bytes(b"GIF89a" + bytes([16, 0, 16, 0, 0, 0, 0]) + b";")  # a header, then the trailer
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 20)
    for path in (empty, text, tmp_path / "missing.mp4"):
        with pytest.raises(VideoError, match=repr(str(path))):
            check_video(path, guard)


def test_a_mid_stream_decoding_error_flags_the_file(flag_all, eva_safe_dir, tmp_path):
    path = write_animation(tmp_path / "a.png", pictures(6), DURATIONS)
    data = path.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) * 2 // 3])  # the header announces 6 frames
    safe = SafetyFilter(load_detector(str(eva_safe_dir), device="cpu"))
    result = check_video(cut, safe)
    n = len(result.checked)
    assert 1 <= n < 6 and result.flagged and result.flagged_frames == []
    assert result.reason.startswith(f"checked {n} of 6 frames, then: {str(cut)!r}: frame {n} cannot be decoded")
    assert result.actions == {i: "black" for i in range(n, 6)}
    with pytest.raises(ValueError, match="not fully checked"):
        write_censored(cut, result, tmp_path / "copy.png", safe)


# --- videos ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mov"])
def test_every_frame_of_a_video_is_checked_and_the_copy_keeps_timing_and_audio(detector, tmp_path, suffix):
    pts = [0, 1, 2, 4, 5, 6, 9, 10]  # a variable frame rate, in 1/8 s
    path = write_video(tmp_path / f"v{suffix}", pictures(8), pts=pts)
    info = probe(path)
    assert (info.kind, info.frames, info.width, info.height, info.audio) == ("video", 8, SIZE[1], SIZE[0], True)
    frames = list(read_frames(path))
    assert [f.time for f in frames] == pytest.approx([p / 8 for p in pts])
    images = [f.image for f in frames]
    assert all(im.shape == (*SIZE, 3) and im.dtype == np.uint8 for im in images)
    guard, expected = split_on(detector, images)
    result = check_video(path, guard)
    assert result.flagged_frames == expected and result.times == pytest.approx([pts[i] / 8 for i in expected])
    target = write_censored(path, result, tmp_path / f"censored{suffix}", guard)
    copy = probe(target)
    assert (copy.format, copy.codec, copy.frames, copy.audio) == (info.format, info.codec, 8, True)
    after = list(read_frames(target))
    assert [f.time for f in after] == pytest.approx([p / 8 for p in pts])
    for i, (old, new) in enumerate(zip(images, after)):
        diff = np.abs(old.astype(int) - new.image.astype(int)).mean()
        assert (new.image.mean() < 3) if i in expected else (diff < 4), (i, diff)
    with av.open(str(path)) as a, av.open(str(target)) as b:
        packets = [[(p.pts, bytes(p)) for p in c.demux(c.streams.audio[0]) if p.size] for c in (a, b)]
    assert packets[0] == packets[1] and len(packets[0]) > 5  # the audio, packet for packet


def test_sampling_a_video_by_time(eva_safe_dir, tmp_path):
    path = write_video(tmp_path / "v.mp4", pictures(16), audio=False)
    safe = SafetyFilter(load_detector(str(eva_safe_dir), device="cpu"))
    result = check_video(path, safe, fps=2)
    assert result.checked == [0, 4, 8, 12] and not result.flagged
    assert result.reason == "checked 4 of 16 frames (2 per second); none flagged: medium 0.00 < 0.50"
    assert check_video(path, safe, max_frames=5).checked == [0, 4, 8, 12]


def test_a_window_in_a_video_copy(flag_all, detector, tmp_path):
    pics = pictures(8)
    path = write_video(tmp_path / "v.mp4", pics, audio=False)
    images = decoded(path)
    scores = detector.predict(images).levels[:, 2]
    top = int(scores.argmax())
    guard = SafetyFilter(detector, threshold=float(scores[top]), action="black")
    result = check_video(path, guard, window=1)
    assert result.flagged_frames == [top]
    around = [i for i in (top - 1, top, top + 1) if 0 <= i < 8]
    assert result.censored == around
    target = write_censored(path, result, tmp_path / "w.mp4", guard)
    assert (probe(target).frames, probe(target).fps) == (8, probe(path).fps) == (8, 8.0)
    assert [i for i, im in enumerate(decoded(target)) if im.mean() < 3] == around


def test_a_truncated_video(eva_safe_dir, tmp_path):
    safe = SafetyFilter(load_detector(str(eva_safe_dir), device="cpu"))
    # moov at the front: the header announces 24 frames, the data stops early
    path = write_video(tmp_path / "fast.mp4", pictures(24), audio=False, faststart=True)
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    result = check_video(cut, safe)
    n = len(result.checked)
    assert result.flagged and 0 < n < 24
    assert result.reason.startswith(f"checked {n} of 24 frames, then: {str(cut)!r}: ")
    # moov at the end, cut off: nothing can be read
    path = write_video(tmp_path / "slow.mp4", pictures(24), audio=False)
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match="not a readable animation or video"):
        check_video(cut, safe)


def test_corrupt_bytes_mid_stream(eva_safe_dir, tmp_path):
    path = write_video(tmp_path / "v.mp4", pictures(24), audio=False, faststart=True)
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    data[start : start + 400] = bytes(b ^ 0x5A for b in data[start : start + 400])
    path.write_bytes(bytes(data))
    result = check_video(path, SafetyFilter(load_detector(str(eva_safe_dir), device="cpu")))
    n = len(result.checked)
    assert result.flagged and n < 24 and result.reason.startswith(f"checked {n} of 24 frames, then: ")


def test_a_rotated_video_is_checked_and_censored_as_players_show_it(eva_nsfw_dir, detector, tmp_path):
    pics = pictures(4)
    path = write_video(tmp_path / "r.mp4", pics, rotation=90, audio=False)
    shown = decoded(path)
    assert all(im.shape == (SIZE[1], SIZE[0], 3) for im in shown)  # stored 64 wide, shown 48 wide
    gradient = np.asarray(pics[0]).astype(int)  # turned 90 degrees counterclockwise, not clockwise
    assert np.abs(shown[0] - np.rot90(gradient)).mean() < 3 < np.abs(shown[0] - np.rot90(gradient, -1)).mean()
    scores = detector.predict(shown).levels
    result = check_video(path, SafetyFilter(detector))
    assert torch.allclose(result.scores.levels, scores)
    guard = SafetyFilter(load_detector(str(eva_nsfw_dir), device="cpu"), action="placeholder")
    result = check_video(path, guard)
    copy = write_censored(path, result, tmp_path / "c.mp4", guard)
    card = (place(torch.zeros(1, 3, SIZE[1], SIZE[0]), default_card())[0].permute(1, 2, 0) * 255).numpy()
    for frame in read_frames(copy):  # the card reads upright where the video is shown
        assert frame.image.shape == card.shape and np.abs(frame.image - card).mean() < 6


def test_a_video_with_two_video_streams_is_refused(detector, tmp_path):
    path = write_video(tmp_path / "two.mp4", pictures(3), audio=False, streams=2)
    with pytest.raises(VideoError, match="has 2 video streams"):
        check_video(path, SafetyFilter(detector))


def test_a_video_without_a_video_stream(detector, tmp_path):
    with pytest.raises(VideoError, match="has no video stream \\(streams: audio\\)"):
        check_video(write_audio_only(tmp_path / "a.mp4"), SafetyFilter(detector))


def test_video_limits_are_read_from_the_header(detector, tmp_path):
    guard = SafetyFilter(detector)
    mp4 = write_video(tmp_path / "v.mp4", pictures(12), audio=False)
    webm = write_video(tmp_path / "v.webm", pictures(12), audio=False)
    with pytest.raises(VideoTooLarge, match="has 12 frames, over the limit of 10"):
        check_video(mp4, guard, limits=VideoLimits(max_frames=10))
    with pytest.raises(VideoTooLarge, match="has more than 11 frames, over the limit of 10"):  # WebM: packets counted
        check_video(webm, guard, limits=VideoLimits(max_frames=10))
    with pytest.raises(VideoTooLarge, match="3,072 pixels"):
        check_video(webm, guard, limits=VideoLimits(max_pixels=64 * 47))
    with pytest.raises(VideoTooLarge, match="plays for 1.5 s, over the limit of 1 s"):
        check_video(mp4, guard, limits=VideoLimits(max_duration=1))


def test_a_long_video_is_decoded_and_scored_in_chunks(eva_safe_dir, tmp_path):
    n, side = 64, 128
    frames = [np.full((side, side, 3), (i * 37) % 256, np.uint8) for i in range(n)]
    frames = [f ^ np.random.default_rng(i).integers(0, 64, f.shape, dtype=np.uint8) for i, f in enumerate(frames)]
    path = write_video(tmp_path / "long.mp4", frames, audio=False)
    guard = SafetyFilter(load_detector(str(eva_safe_dir), device="cpu", max_batch_size=4))
    check_video(path, guard, max_frames=2)  # first-call imports and caches are not the video's
    tracemalloc.start()
    try:
        result = check_video(path, guard)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    everything = n * side * side * 3
    assert len(result.checked) == n and not result.flagged
    assert peak < everything / 4, (peak, everything)  # a chunk of 4 frames at a time, never the whole video


# --- censored copies never lose anything ---------------------------------------------------------------

def test_write_censored_never_overwrites_and_refuses_a_stale_result(flag_all, tmp_path):
    path = write_video(tmp_path / "v.mp4", pictures(4), audio=False)
    original = path.read_bytes()
    result = check_video(path, flag_all)
    with pytest.raises(ValueError, match="never replaces its input"):
        write_censored(path, result, path, flag_all)
    (tmp_path / "link.mp4").symlink_to(path)
    with pytest.raises(ValueError, match="never replaces its input"):
        write_censored(path, result, tmp_path / "link.mp4", flag_all, overwrite=True)
    taken = tmp_path / "taken.mp4"
    taken.write_bytes(b"someone else's file")
    with pytest.raises(FileExistsError):
        write_censored(path, result, taken, flag_all)
    assert taken.read_bytes() == b"someone else's file"
    with pytest.raises(ValueError, match="must keep the source's suffix"):
        write_censored(path, result, tmp_path / "v.webm", flag_all)
    other = write_video(tmp_path / "other.mp4", pictures(4), audio=False)
    with pytest.raises(ValueError, match="the result is not for"):
        write_censored(other, result, tmp_path / "o.mp4", flag_all)
    write_censored(path, result, taken, flag_all, overwrite=True)
    assert probe(taken).frames == 4 and all(im.mean() < 3 for im in decoded(taken))
    os.utime(path, ns=(1, 1))  # the file changed since it was checked
    with pytest.raises(ValueError, match="changed since it was checked"):
        write_censored(path, result, tmp_path / "late.mp4", flag_all)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.mp4", "other.mp4", "taken.mp4", "v.mp4"]
