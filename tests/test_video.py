"""The video check on frames in memory: layouts, the one scoring path, sampling, the temporal
window, censoring in the caller's kind, and failing closed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nsfw_safety import SafetyFilter, load_detector
from nsfw_safety.video import check_video, check_videos, frame_ranges
from videos import pictures

F = 10


@pytest.fixture(scope="module")
def detector(eva_dir):
    return load_detector(str(eva_dir), device="cpu", max_batch_size=4)


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    """(F, 3, 48, 64) float in [0, 1]: ten different frames."""
    return torch.stack([torch.from_numpy(np.asarray(p).copy()).permute(2, 0, 1) for p in pictures(F)]).float() / 255


def medium(detector, frames) -> torch.Tensor:
    """The still-image path's medium score of each frame."""
    return detector.predict(frames).levels[:, 2]


def split(detector, frames) -> tuple[SafetyFilter, list[int]]:
    """A black-out filter whose threshold, the median frame score, flags about half the frames;
    and the frames the still-image path flags with it."""
    scores = medium(detector, frames)
    threshold = float(scores.median())
    expected = [i for i, s in enumerate(scores.tolist()) if s >= threshold]
    assert 0 < len(expected) < len(scores), scores  # the fixture must spread the frames
    return SafetyFilter(detector, threshold=threshold, action="black"), expected


def only_top(detector, frames) -> tuple[SafetyFilter, int]:
    """A filter that flags exactly the highest-scoring frame."""
    scores = medium(detector, frames)
    top = int(scores.argmax())
    assert float(scores.topk(2).values[1]) < float(scores[top])
    return SafetyFilter(detector, threshold=float(scores[top]), action="black"), top


def black(frames: torch.Tensor) -> list[int]:
    """Indices of all-zero frames of an (F, C, H, W) tensor."""
    return [i for i in range(len(frames)) if bool(frames[i].eq(0).all())]


# --- the one path, in every layout --------------------------------------------------------------

def test_frames_are_scored_by_the_still_image_path_and_censored_in_place(detector, clip):
    guard, expected = split(detector, clip)
    result = check_video(clip, guard, frame_rate=4)
    assert result.checked == list(range(F)) and result.total == F
    assert result.flagged and result.flagged_frames == expected and result.censored == expected
    assert torch.allclose(result.scores.levels, detector.predict(clip).levels)
    assert result.levels["medium"] == pytest.approx(float(medium(detector, clip).max()))
    assert result.times == [i / 4 for i in expected]
    assert result.frame_flags == [i in expected for i in range(F)]
    assert black(result.frames) == expected
    kept = [i for i in range(F) if i not in expected]
    assert torch.equal(result.frames[kept], clip[kept]) and not clip.eq(0).all((1, 2, 3)).any()  # input untouched
    assert result.reason.startswith(f"checked {F} of {F} frames; flagged {len(expected)}: ")
    assert result.reason.endswith(f"medium {result.levels['medium']:.2f} >= {guard.policy.threshold:.2f}")


def test_nothing_flagged_returns_the_input_itself(eva_safe_dir, clip):
    guard = SafetyFilter(load_detector(str(eva_safe_dir), device="cpu"))
    result = check_video(clip, guard)
    assert result.frames is clip and not result.flagged and result.actions == {}
    assert result.reason == f"checked {F} of {F} frames; none flagged: medium 0.00 < 0.50"


def as_fchw(frames) -> torch.Tensor:
    """Frames of any kind (PIL list, (F, C, H, W) tensor, (F, H, W, C) numpy) as an (F, C, H, W) tensor."""
    if isinstance(frames, list):
        return torch.stack([torch.from_numpy(np.asarray(p).copy()).permute(2, 0, 1) for p in frames])
    if isinstance(frames, np.ndarray):
        return torch.from_numpy(frames).permute(0, 3, 1, 2)
    return frames


@pytest.mark.parametrize("kind", ["uint8 FHWC numpy", "float16 FCHW tensor", "PIL list"])
def test_one_video_comes_back_in_its_own_kind(detector, clip, kind):
    guard, expected = split(detector, clip)
    hwc = (clip.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    video = {"uint8 FHWC numpy": hwc, "float16 FCHW tensor": clip.half(),
             "PIL list": [Image.fromarray(a) for a in hwc]}[kind]
    result = check_video(video, guard)
    assert result.flagged_frames == expected
    out = result.frames
    assert type(out) is type(video)
    if isinstance(out, list):
        assert all(p.mode == "RGB" and p.size == (64, 48) for p in out)
    else:
        assert out.shape == video.shape and out.dtype == video.dtype
    assert black(as_fchw(out)) == expected
    kept = [i for i in range(F) if i not in expected]
    assert torch.equal(as_fchw(out)[kept], as_fchw(video)[kept])


@pytest.mark.parametrize("kind", ["BFCHW", "BFHWC numpy", "BCFHW", "PIL lists"])
def test_a_batch_of_videos_comes_back_in_its_own_kind_with_a_verdict_each(detector, clip, kind):
    """The layouts of diffusers' "pt", "np" and "pil" outputs, and of a VAE's decoded video."""
    guard, expected = split(detector, clip)
    hwc = (clip.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    pil = [Image.fromarray(a) for a in hwc]
    batch = {"BFCHW": torch.stack([clip, clip.flip(0)]), "BFHWC numpy": np.stack([hwc, hwc[::-1]]),
             "BCFHW": torch.stack([clip, clip.flip(0)]).transpose(1, 2), "PIL lists": [pil, pil[::-1]]}[kind]
    result = check_videos(batch, guard, layout="BCFHW" if kind == "BCFHW" else None)
    reversed_expected = sorted(F - 1 - i for i in expected)
    assert result.flagged == [True, True]
    assert [v.flagged_frames for v in result.videos] == [expected, reversed_expected]
    assert type(result.frames) is type(batch)
    for b, hits in enumerate([expected, reversed_expected]):
        frames = result.frames[b]
        assert result.videos[b].frames is frames or torch.equal(torch.as_tensor(result.videos[b].frames),
                                                               torch.as_tensor(frames))
        if kind == "BCFHW":
            frames = frames.transpose(0, 1)
        assert black(as_fchw(frames)) == hits
        original = batch[b].transpose(0, 1) if kind == "BCFHW" else batch[b]
        kept = [i for i in range(F) if i not in hits]
        assert torch.equal(as_fchw(frames)[kept], as_fchw(original)[kept])
    if kind != "PIL lists":
        assert result.frames.shape == batch.shape and result.frames.dtype == batch.dtype


def test_batches_of_frames_follow_max_batch_size(detector, clip, monkeypatch):
    guard, _ = split(detector, clip)
    sizes = []
    score = detector.score

    def counted(pixels, finite=None):
        sizes.append(len(pixels))
        return score(pixels, finite)

    monkeypatch.setattr(detector, "score", counted)
    check_video(clip, guard)
    assert sizes == [4, 4, 2]


def test_ambiguous_and_bad_shapes_raise(detector, clip):
    guard = SafetyFilter(detector)
    with pytest.raises(ValueError, match="cannot tell the layout"):
        check_video(torch.rand(3, 3, 8, 3), guard)
    with pytest.raises(ValueError, match="use check_videos"):
        check_video(torch.rand(2, 3, 3, 8, 8), guard)
    with pytest.raises(ValueError, match="layout must be one of"):
        check_video(clip, guard, layout="BCHW")
    with pytest.raises(ValueError, match="zero size"):
        check_video(torch.rand(0, 3, 8, 8), guard)
    with pytest.raises(ValueError, match="no frames"):
        check_video([], guard)
    with pytest.raises(TypeError, match="one video: use check_video"):
        check_videos(pictures(2), guard)
    with pytest.raises(TypeError, match="a file: use check_video"):
        check_videos("clip.mp4", guard)
    for bad in (dict(every=0), dict(max_frames=-1), dict(fps=0), dict(window=-1), dict(censor="all"),
                dict(fps=2, every=2), dict(frame_rate=0)):
        with pytest.raises(ValueError):
            check_video(clip, guard, **bad)
    with pytest.raises(ValueError, match="fps= needs frame times"):
        check_video(clip, guard, fps=2)


# --- sampling ------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, checked, said", [
    (dict(every=3), [0, 3, 6, 9], "checked 4 of 10 frames (every 3rd frame)"),
    (dict(max_frames=4), [0, 3, 6, 9], "checked 4 of 10 frames (every 3rd frame)"),
    (dict(max_frames=5, every=4), [0, 4, 8], "checked 3 of 10 frames (every 4th frame)"),
    (dict(fps=2, frame_rate=8), [0, 4, 8], "checked 3 of 10 frames (2 per second)"),
    (dict(max_frames=100), list(range(F)), "checked 10 of 10 frames;"),
])
def test_sampling_checks_the_frames_it_says(eva_safe_dir, clip, options, checked, said):
    result = check_video(clip, SafetyFilter(load_detector(str(eva_safe_dir), device="cpu")), **options)
    assert result.checked == checked and len(result.scores) == len(checked)
    assert result.reason.startswith(said)


# --- temporal stability ----------------------------------------------------------------------------

def test_window_censors_the_frames_around_a_flagged_one(detector, clip):
    guard, top = only_top(detector, clip)
    result = check_video(clip, guard, window=2)
    assert result.flagged_frames == [top]
    around = [i for i in range(top - 2, top + 3) if 0 <= i < F]
    assert result.censored == around and black(result.frames) == around
    assert result.actions == {i: "black" for i in around}
    assert check_video(clip, guard, censor="clip").censored == list(range(F))


def test_a_flagged_sample_censors_the_unchecked_frames_up_to_its_neighbours(detector, clip):
    sampled = clip[::3]  # frames 0, 3, 6, 9
    guard, top = only_top(detector, sampled)
    result = check_video(clip, guard, every=3)
    hit = 3 * top
    assert result.flagged_frames == [hit]
    assert result.censored == list(range(max(0, hit - 2), min(F - 1, hit + 2) + 1))


def test_frame_ranges():
    assert frame_ranges([]) == []
    assert frame_ranges([3, 4, 5, 9, 11, 12]) == [(3, 5), (9, 9), (11, 12)]


# --- failing closed ----------------------------------------------------------------------------------

def test_a_non_finite_frame_is_flagged_and_blacked_out_whatever_the_action(eva_safe_dir, clip):
    guard = SafetyFilter(load_detector(str(eva_safe_dir), device="cpu"), action="blur")
    video = clip.clone()
    video[4, 0, 0, 0] = float("nan")
    result = check_video(video, guard, window=1)
    assert result.flagged_frames == [4] and result.frame_reasons[4] == "non-finite input"
    assert result.actions == {3: "blur", 4: "black", 5: "blur"}
    assert result.reason.endswith("flagged 1: 4; non-finite input")
    assert bool(result.frames[4].eq(0).all()) and not bool(result.frames[3].eq(0).all())


def test_a_scoring_error_flags_the_video_and_blacks_it_out(detector, clip, monkeypatch):
    guard = SafetyFilter(detector, action="blur")
    calls = []

    def fail_second(pixels, finite=None):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return type(detector).score(detector, pixels, finite)

    monkeypatch.setattr(detector, "score", fail_second)
    result = check_video(clip, guard)
    assert result.flagged and result.checked == [0, 1, 2, 3]
    assert result.error == "error: RuntimeError: device lost"
    assert result.reason == "checked 4 of 10 frames, then: error: RuntimeError: device lost"
    # the frames never checked are filled; the checked ones keep their own verdict
    assert black(result.frames) == list(range(4, F))
    assert all(result.actions[i] == "black" for i in range(4, F))
    assert all(result.actions.get(i, "none") == ("blur" if i in result.flagged_frames else "none") for i in range(4))
    calls.clear()
    with pytest.raises(RuntimeError, match="device lost"):
        check_video(clip, SafetyFilter(detector, on_error="raise"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_frames_on_cuda_come_back_on_cuda(eva_dir, clip):
    gpu = load_detector(str(eva_dir), device="cuda")
    video = clip.to("cuda", torch.float16)
    guard, expected = split(gpu, video)
    result = check_video(video, guard, window=1)
    assert result.flagged_frames == expected and result.scores.levels.device.type == "cuda"
    assert result.frames.device == video.device and result.frames.dtype == torch.float16
    around = sorted({j for i in expected for j in (i - 1, i, i + 1) if 0 <= j < F})
    assert black(result.frames) == around
