"""Censored copies of animations keep every frame: Pillow's GIF, WebP and APNG writers merge a frame
identical to the one before into it, so a clip censored to black, or one that holds a still for a
few frames, would come out shorter. Each copy is reopened with Pillow and compared, frame by frame,
with the source: frame count, durations, loop count and pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nsfw_safety import SafetyFilter, load_detector
from nsfw_safety.censor import blur
from nsfw_safety.frames import read_frames, write_censored
from nsfw_safety.video import check_video
from videos import pictures, write_animation, write_animation_ffmpeg

av = pytest.importorskip("av")

SUFFIXES = [".gif", ".webp", ".png"]
DURATIONS = [100, 200, 300, 150, 250, 120]  # ms


def opened(path) -> tuple[int, list[float], int | None, list[np.ndarray]]:
    """What Pillow reads back: (n_frames, each frame's duration in ms, loop, RGB frames)."""
    with Image.open(path) as im:
        durations, frames = [], []
        for i in range(im.n_frames):
            im.seek(i)
            im.load()
            durations.append(float(im.info.get("duration", 0)))
            frames.append(np.asarray(im.convert("RGB"), np.int16))
        return im.n_frames, durations, im.info.get("loop"), frames


def still_then_motion(suffix, tmp_path):
    """Six frames written by FFmpeg, with runs of identical ones: a, a, b, b, b, c (noise, which any
    blur changes)."""
    a, b, c = np.random.default_rng(0).integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)
    return write_animation_ffmpeg(tmp_path / f"ff{suffix}", [a, a, b, b, b, c], DURATIONS, loop=3)


def six_pictures(suffix, tmp_path):
    return write_animation(tmp_path / f"pil{suffix}", pictures(6), DURATIONS, loop=3)


@pytest.mark.parametrize("source", [six_pictures, still_then_motion])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_copy_censored_all_black_keeps_every_frame(eva_nsfw_dir, tmp_path, suffix, source):
    path = source(suffix, tmp_path)
    n, durations, loop, _ = opened(path)
    assert (n, loop) == (6, 3) and durations[:5] == DURATIONS[:5]  # the muxer picks the last one
    guard = SafetyFilter(load_detector(str(eva_nsfw_dir), device="cpu"), action="black")
    result = check_video(path, guard)
    assert result.flagged_frames == list(range(6))

    copy = write_censored(path, result, tmp_path / f"copy{suffix}", guard)

    n_copy, durations_copy, loop_copy, frames = opened(copy)
    assert (n_copy, durations_copy, loop_copy) == (n, durations, loop)
    assert all(frame.max() == 0 for frame in frames)


@pytest.mark.parametrize("action", ["black", "blur"])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_identical_neighbours_stay_frames_whether_censored_or_not(eva_dir, tmp_path, suffix, action):
    path = still_then_motion(suffix, tmp_path)
    n, durations, loop, before = opened(path)
    detector = load_detector(str(eva_dir), device="cpu", max_batch_size=6)
    scores = detector.predict([f.image for f in read_frames(path)]).levels[:, 2]
    threshold = float(max(scores[0], scores[2]))  # flags one run (a or b), not the other; c may go either way
    guard = SafetyFilter(detector, threshold=threshold, action=action)
    result = check_video(path, guard)
    flagged = result.flagged_frames
    assert flagged == [i for i, s in enumerate(scores.tolist()) if s >= threshold] and 0 < len(flagged) < 6

    copy = write_censored(path, result, tmp_path / f"copy{suffix}", guard)

    n_copy, durations_copy, loop_copy, after = opened(copy)
    assert (n_copy, durations_copy, loop_copy) == (n, durations, loop) == (6, durations, 3)
    for i, (old, new) in enumerate(zip(before, after)):
        if i not in flagged:
            assert np.array_equal(new, old), i  # untouched, bit for bit (GIF: the same palette colours)
        elif action == "black":
            assert new.max() == 0, i
        else:  # the library's blur of the decoded frame; GIF holds it in a 256-colour palette
            unit = torch.from_numpy(old.astype(np.uint8)).permute(2, 0, 1)[None]
            want = Image.fromarray(blur(unit)[0].permute(1, 2, 0).numpy())
            if suffix == ".gif":
                want = want.convert("P", palette=Image.Palette.ADAPTIVE).convert("RGB")
            assert np.abs(new - np.asarray(want, np.int16)).mean() <= 0.5, i
            assert np.abs(new - old).mean() > 20, i


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_transparent_pixels_stay_transparent(eva_safe_dir, tmp_path, suffix):
    """Frames are written whole, each replacing the one before: where the source shows
    transparency, the copy does too, not the frame before."""
    frames = []
    for i in range(4):
        rgba = np.zeros((48, 64, 4), np.uint8)
        rgba[..., :3], rgba[..., 3] = 60 * (i + 1), 255
        rgba[:, 32 * (i % 2) : 32 * (i % 2) + 32] = 0  # the left half, then the right half, clear
        frames.append(rgba)
    path = tmp_path / f"alpha{suffix}"
    if suffix == ".webp":  # FFmpeg blends each frame over the one before; Pillow drops WebP's alpha flag
        write_animation_ffmpeg(path, frames, DURATIONS[:4])
    else:  # GIF: each frame disposed of, so that its clear half shows nothing of the one before
        write_animation(path, [Image.fromarray(f) for f in frames], DURATIONS[:4],
                        **({"disposal": 2} if suffix == ".gif" else {}))
    guard = SafetyFilter(load_detector(str(eva_safe_dir), device="cpu"))
    copy = write_censored(path, check_video(path, guard), tmp_path / f"copy{suffix}", guard)
    before = [np.asarray(f.image.convert("RGBA")) for f in read_frames(path)]
    after = [np.asarray(f.image.convert("RGBA")) for f in read_frames(copy)]
    assert len(after) == len(before) == 4
    clear = [(old[..., 3] == 0).mean() for old in before]
    assert clear == ([0.5, 0, 0, 0] if suffix == ".webp" else [0.5] * 4)
    for old, new in zip(before, after):
        assert np.array_equal(new[..., 3], old[..., 3])
        opaque = old[..., 3] > 0
        assert np.array_equal(new[opaque], old[opaque])
