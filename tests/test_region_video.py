"""Region mode on video frames (#15, #17): a flagged frame is censored in the regions found in its own
pixels, by the still images' path (``SafetyFilter.censor``), for frames in memory, animation and
video files (``write_censored``) and ``scan``; whole when no region is found or the region detector
fails; neighbours in the temporal window in their own regions; failed frames blacked out whole.

Frames: scikit-image's colour wheel (which NudeNet's 320n model takes for BUTTOCKS_EXPOSED) at a
different place in each frame, and a gray ramp with no region; the tiny random EVA classifier flags one
of them at the default threshold (the clip fixture checks which)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from nsfw_safety import SafetyFilter, cli, load_detector
from nsfw_safety.frames import read_frames, write_censored
from nsfw_safety.regions import RegionDetector, RegionSettings
from nsfw_safety.scan.reports import read_report
from nsfw_safety.video import check_video, check_videos

H, W = 300, 400
FLAGGED = 2  # the frame the classifier flags
RAMP = 3  # the frame with no region


def frames() -> list[np.ndarray]:
    """Five (300, 400, 3) uint8 frames: the wheel at half size on gray at x = 100, 10, 55, then a
    gray ramp (no region), then the wheel at x = 190."""
    wheel = np.asarray(Image.fromarray(skimage.data.colorwheel()[..., :3]).resize((185, 185)))
    out = []
    for x in (100, 10, 55, None, 190):
        canvas = np.full((H, W, 3), 128, np.uint8)
        if x is None:
            canvas[:] = np.linspace(60, 200, W, dtype=np.uint8)[None, :, None]
        else:
            canvas[50:235, x:x + 185] = wheel
        out.append(canvas)
    return out


FRAMES = frames()


@pytest.fixture(scope="module")
def detector(eva_dir):
    return load_detector(str(eva_dir), device="cpu")


@pytest.fixture(scope="module")
def regions():
    return RegionSettings(RegionDetector(device="cpu", threads=2))


@pytest.fixture(scope="module")
def clip(detector) -> torch.Tensor:
    """(5, 3, 300, 400) uint8; the default rule (medium >= 0.5) flags frame FLAGGED only."""
    x = torch.stack([torch.from_numpy(f).permute(2, 0, 1) for f in FRAMES])
    medium = detector.predict(x).levels[:, 2]
    assert [i for i, s in enumerate(medium.tolist()) if s >= 0.5] == [FLAGGED], medium  # the fixture's premise
    return x


def still(nsfw, regions, x: torch.Tensor, action: str = "blur"):
    """The still images' answer for (N, 3, H, W) uint8 frames, every one flagged: censored images and masks."""
    out = SafetyFilter(nsfw, action=action, regions=regions)(x)
    return out.images, out.masks


def hwc(frames) -> torch.Tensor:
    """(F, 3, H, W) tensor, (F, H, W, 3) tensor or a list of PIL images -> (F, H, W, 3) uint8."""
    if isinstance(frames, list):
        return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB")).copy()) for im in frames])
    if frames.shape[-1] == 3:
        return frames if frames.dtype == torch.uint8 else (frames * 255).round().to(torch.uint8)
    return frames.permute(0, 2, 3, 1) if frames.dtype == torch.uint8 else \
        (frames.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)


#: Frame kinds: (the clip in that kind, its frames i:j as a still-image batch and the batch's layout).
KINDS = {
    "uint8 FCHW": (lambda x: x, lambda v, i, j: v[i:j], None),
    "float FHWC": (lambda x: x.permute(0, 2, 3, 1).float() / 255, lambda v, i, j: v[i:j], "BHWC"),
    "PIL list": (lambda x: [Image.fromarray(f.permute(1, 2, 0).numpy()) for f in x], lambda v, i, j: v[i:j], None),
}


# --- frames in memory ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_a_flagged_frame_is_censored_in_its_own_region_only(detector, nsfw, regions, clip, kind):
    make, frames_of, layout = KINDS[kind]
    video = make(clip)
    result = check_video(video, SafetyFilter(detector, action="blur", regions=regions))
    assert result.flagged_frames == [FLAGGED] and result.censored == [FLAGGED] and result.failed == []
    (region,) = result.regions[FLAGGED]
    assert list(result.regions) == [FLAGGED] and region.label == "BUTTOCKS_EXPOSED"
    assert 40 < region.box[0] < 70 and 40 < region.box[1] < 70  # the wheel of this frame, at x = 55
    assert result.region_reasons == {FLAGGED: f"regions: BUTTOCKS_EXPOSED {region.score:.2f}"}
    assert result.reason.endswith("; 1 of 1 frames censored in their regions")
    one = SafetyFilter(nsfw, action="blur", regions=regions)(frames_of(video, FLAGGED, FLAGGED + 1), layout=layout)
    expected, masks = one.images, one.masks
    got, given = hwc(result.frames), hwc(video)
    assert torch.equal(got[FLAGGED], hwc(expected)[0])  # the still images' answer, bit for bit
    outside, inside = masks[0] == 0, masks[0] == 1
    assert 0.15 < inside.float().mean() < 0.4
    assert torch.equal(got[FLAGGED][outside], given[FLAGGED][outside])
    assert (got[FLAGGED][inside] != given[FLAGGED][inside]).any(-1).float().mean() > 0.5
    others = [i for i in range(5) if i != FLAGGED]
    assert torch.equal(got[others], given[others])  # unflagged frames bit for bit


def test_the_window_censors_neighbours_in_their_own_regions_or_whole(detector, nsfw, regions, clip):
    result = check_video(clip, SafetyFilter(detector, action="pixelate", regions=regions), window=1)
    assert result.flagged_frames == [FLAGGED] and result.censored == [1, 2, 3]
    assert [r.label for r in result.regions[1]] == ["BUTTOCKS_EXPOSED"] and result.regions[RAMP] == []
    assert result.regions[1][0].box[0] < 25 < result.regions[FLAGGED][0].box[0]  # each frame's own wheel
    assert result.region_reasons[1].startswith("in the window of a flagged frame; regions: BUTTOCKS_EXPOSED 0.")
    assert result.region_reasons[RAMP] == ("in the window of a flagged frame; no region of exposed at or above "
                                           "threshold: censored whole")
    assert result.region_reasons[FLAGGED].startswith("regions: BUTTOCKS_EXPOSED")
    assert result.reason.endswith("; 2 of 3 frames censored in their regions; frame 3: in the window of a flagged "
                                  "frame; no region of exposed at or above threshold: censored whole")
    expected, masks = still(nsfw, regions, clip[1:4], "pixelate")  # the same batch through the still path
    assert torch.equal(result.frames[1:4], expected)
    for k, i in enumerate((1, 2)):
        outside = (masks[k] == 0)[None].expand(3, -1, -1)
        assert torch.equal(result.frames[i][outside], clip[i][outside]) and (masks[k] == 1).any()
    assert masks[2].min() == 1 and not torch.equal(result.frames[RAMP], clip[RAMP])  # censored whole
    assert torch.equal(result.frames[[0, 4]], clip[[0, 4]])


def test_a_failing_region_detector_censors_the_flagged_frame_whole(detector, regions, clip, monkeypatch):
    class Broken:
        def run(self, *args):
            raise RuntimeError("CUDA failure 700")

    monkeypatch.setattr(regions.detector, "_session", Broken())
    result = check_video(clip, SafetyFilter(detector, action="blur", regions=regions))
    assert result.flagged and result.regions == {FLAGGED: []}
    note = "region detector failed: RuntimeError: CUDA failure 700: censored whole"
    assert result.region_reasons == {FLAGGED: note}
    assert result.reason.endswith(f"; 0 of 1 frames censored in their regions; frame {FLAGGED}: {note}")
    whole = check_video(clip, SafetyFilter(detector, action="blur"))  # region mode off: the whole frame
    assert whole.regions is None and torch.equal(result.frames, whole.frames)
    assert not torch.equal(result.frames[FLAGGED], clip[FLAGGED])
    monkeypatch.setattr(RegionDetector, "preprocess", lambda *a: (_ for _ in ()).throw(MemoryError("letterbox")))
    with pytest.raises(MemoryError, match="letterbox"):  # on_error="raise": raised, as for still images
        check_video(clip, SafetyFilter(detector, regions=regions, on_error="raise"))


def test_a_failed_frame_is_blacked_whole_without_asking_where(detector, regions, clip, monkeypatch):
    """With action "black" too, a frame whose check failed is never censored in a region only."""
    x = clip.float() / 255
    x[0, 1, 3, 3] = float("nan")
    seen = []
    real = RegionDetector.__call__
    monkeypatch.setattr(RegionDetector, "__call__", lambda self, im: seen.append(len(im)) or real(self, im))
    result = check_video(x, SafetyFilter(detector, action="black", regions=regions))
    assert result.flagged_frames == [0, FLAGGED] and result.failed == [0] and result.actions == {0: "black",
                                                                                                 FLAGGED: "black"}
    assert seen == [1] and list(result.regions) == [FLAGGED]  # only the frame judged unsafe was searched
    assert result.frames[0].abs().max() == 0  # the failed frame: black, whole
    flagged = result.frames[FLAGGED]
    assert flagged.eq(0).all(0).float().mean() < 0.4 and torch.equal(flagged[:, 0], x[FLAGGED, :, 0])


def test_a_batch_of_videos_and_action_none(detector, regions, clip):
    batch = torch.stack([clip, clip.flip(0)])  # (B, F, C, H, W): the flagged frame is 2 in both
    result = check_videos(batch, SafetyFilter(detector, action="none", regions=regions))
    assert [list(v.regions) for v in result.videos] == [[FLAGGED], [FLAGGED]]
    assert torch.equal(result.frames, batch)  # action "none": the regions are found, nothing is changed
    with pytest.raises(TypeError, match="region-only"):
        check_video(clip, SafetyFilter(None, regions=regions))


# --- files ---------------------------------------------------------------------------------------

def decoded(path) -> torch.Tensor:
    """(F, H, W, 3) uint8: every frame of a file as shown."""
    return torch.stack([torch.from_numpy(np.asarray(f.image.convert("RGB") if isinstance(f.image, Image.Image)
                                                    else f.image).copy()) for f in read_frames(path)])


def apng(path):
    """FRAMES as an animated PNG (lossless), 100 ms a frame."""
    Image.fromarray(FRAMES[0]).save(path, save_all=True, append_images=[Image.fromarray(f) for f in FRAMES[1:]],
                                    duration=100, loop=0)
    return path


def test_an_apng_copy_is_censored_in_each_frames_regions(detector, nsfw, regions, clip, tmp_path):
    source = apng(tmp_path / "clip.png")
    guard = SafetyFilter(detector, action="blur", regions=regions)
    result = check_video(source, guard, window=1)
    assert result.flagged_frames == [FLAGGED] and result.censored == [1, 2, 3] and result.regions is None
    target = write_censored(source, result, tmp_path / "censored.png", guard)
    got, given = decoded(target), decoded(source)
    assert torch.equal(given, clip.permute(0, 2, 3, 1))  # lossless: the frames the tensors hold
    expected, masks = still(nsfw, regions, clip[1:4])
    assert torch.equal(got[1:4], expected.permute(0, 2, 3, 1))  # each frame in its own regions, bit for bit
    for k in (0, 1):
        outside = masks[k] == 0
        assert torch.equal(got[1 + k][outside], given[1 + k][outside])
        assert (got[1 + k][~outside] != given[1 + k][~outside]).any(-1).float().mean() > 0.5
    assert masks[2].min() == 1  # the ramp: censored whole
    assert torch.equal(got[[0, 4]], given[[0, 4]])


def test_a_failed_frame_of_a_file_is_filled_whole(detector, regions, tmp_path):
    source = apng(tmp_path / "clip.png")
    guard = SafetyFilter(detector, action="black", regions=regions)
    result = check_video(source, guard)

    def black(target) -> float:
        """The share of black pixels in the copy's flagged frame."""
        return float(decoded(target)[FLAGGED].eq(0).all(-1).float().mean())

    assert 0.15 < black(write_censored(source, result, tmp_path / "regions.png", guard)) < 0.4
    failed = dataclasses.replace(result, failed=[FLAGGED])  # as when its score was NaN
    assert black(write_censored(source, failed, tmp_path / "whole.png", guard)) == 1


def test_an_mp4_copy_is_censored_in_the_region_within_codec_tolerance(detector, nsfw, regions, tmp_path):
    pytest.importorskip("av")
    from videos import write_video

    source = write_video(tmp_path / "clip.mp4", FRAMES, audio=False)
    given = decoded(source)
    guard = SafetyFilter(detector, action="blur", regions=regions)
    result = check_video(source, guard)
    assert result.flagged_frames == [FLAGGED]
    target = write_censored(source, result, tmp_path / "censored.mp4", guard)
    got = decoded(target)
    _, masks = still(nsfw, regions, given[FLAGGED:FLAGGED + 1].permute(0, 3, 1, 2))
    mask = masks[0] == 1
    # H.264 re-encodes every frame, and its blocks smear the mask's edge: compare 16 px away from it
    near = torch.nn.functional.max_pool2d(mask[None, None].float(), 33, 1, 16)[0, 0] > 0
    diff = (got.float() - given.float()).abs().mean(-1)  # (F, H, W)
    assert 0.15 < mask.float().mean() < 0.4
    assert diff[FLAGGED][~near].mean() < 2 and diff[FLAGGED][mask].mean() > 10
    assert diff[[0, 1, 3, 4]].mean() < 2


def test_a_failing_region_detector_censors_the_file_frame_whole(detector, regions, clip, tmp_path, monkeypatch):
    source = apng(tmp_path / "clip.png")
    guard = SafetyFilter(detector, action="blur", regions=regions)
    result = check_video(source, guard)

    class Broken:
        def run(self, *args):
            raise RuntimeError("out of memory")

    monkeypatch.setattr(regions.detector, "_session", Broken())
    got = decoded(write_censored(source, result, tmp_path / "censored.png", guard))
    whole = check_video(clip, SafetyFilter(detector, action="blur")).frames.permute(0, 2, 3, 1)
    assert torch.equal(got, whole)


def test_scan_reports_the_regions_of_the_first_flagged_frame(eva_dir, nsfw, regions, clip, tmp_path, capsys):
    root, out, report = tmp_path / "in", tmp_path / "out", tmp_path / "r.jsonl"
    root.mkdir()
    apng(root / "clip.png")
    capsys.readouterr()
    code = cli.main(["scan", str(root), "--model", str(eva_dir), "--regions", "exposed", "--out", str(out),
                     "--report", str(report), "--workers", "2", "--json"])
    assert code == 1 and json.loads(capsys.readouterr().out)["flagged"] == 1
    (row,) = read_report(report)
    (region,) = row["regions"]
    assert region["label"] == "BUTTOCKS_EXPOSED" and 40 < region["box"][0] < 70  # frame 2's wheel
    assert row["reason"].endswith(f"; first flagged frame {FLAGGED}: regions: BUTTOCKS_EXPOSED {region['score']:.2f}")
    assert "censored whole" not in row["reason"] and row["frames"] == "5/5"
    got, given = decoded(out / "clip.png"), decoded(root / "clip.png")
    expected, masks = still(nsfw, regions, clip[FLAGGED:FLAGGED + 1])
    assert torch.equal(got[FLAGGED], expected[0].permute(1, 2, 0))
    assert torch.equal(got[FLAGGED][masks[0] == 0], given[FLAGGED][masks[0] == 0])
    assert torch.equal(got[[0, 1, 3, 4]], given[[0, 1, 3, 4]])


def test_the_diffusers_checker_censors_video_frames_in_their_regions(eva_dir, nsfw, regions, clip):
    pytest.importorskip("diffusers")
    from nsfw_safety.diffusers import NSFWSafetyChecker

    checker = NSFWSafetyChecker.from_pretrained(str(eva_dir), device="cpu", regions=regions)
    videos = (clip.float() / 255).permute(1, 0, 2, 3)[None]  # (1, C, F, H, W): as postprocess_video gets it
    given = videos.clone()
    video = checker.check_videos(videos).videos[0]  # what attach's guard at postprocess_video calls
    assert video.flagged_frames == [FLAGGED] and [r.label for r in video.regions[FLAGGED]] == ["BUTTOCKS_EXPOSED"]
    assert checker.last_result.videos[0] is video
    got = checker.last_result.frames[0, :, FLAGGED]
    mask = SafetyFilter(nsfw, regions=regions)(given[0, :, FLAGGED][None]).masks[0]
    assert torch.equal(got[:, mask == 0], given[0, :, FLAGGED][:, mask == 0])
    assert (got[:, mask == 1] != given[0, :, FLAGGED][:, mask == 1]).any(0).float().mean() > 0.5
    others = [0, 1, 3, 4]
    assert torch.equal(checker.last_result.frames[0][:, others], given[0][:, others])
