"""Region mode in the diffusers integration: the drop-in and attach censor only the region, the
rest of the picture is what the pipeline would have returned, and save/reload keeps the settings.

The tiny pipeline's VAE decode is replaced by a picture the region detector fires on (the colour
wheel scene), so that the real NudeNet model finds a region in the pipeline's own output.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import StableDiffusionPipeline  # noqa: E402
from region_images import WHEEL_BOX, wheel_scene  # noqa: E402
from test_diffusers import run, sd_parts, sd_pipe  # noqa: E402

from nsfw_safety import SafetyFilter, load_detector  # noqa: E402
from nsfw_safety.diffusers import NSFWSafetyChecker, attach  # noqa: E402
from nsfw_safety.regions import RegionDetector, RegionSettings  # noqa: E402

#: (1, 3, 600, 800) in [-1, 1], as a VAE decodes: the scene, slightly out of range at the edges.
DECODED = torch.from_numpy(wheel_scene()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
DECODED[..., :10, :] *= 1.02


@pytest.fixture(scope="module")
def parts():
    return sd_parts()


@pytest.fixture(scope="module")
def region_detector():
    return RegionDetector(device="cpu", threads=2)


def decoding_the_scene(pipe):
    """The pipeline's VAE decodes every latent to the scene."""
    pipe.vae.decode = lambda latents, return_dict=False, generator=None: (DECODED.expand(len(latents), -1, -1, -1),)
    return pipe


@pytest.fixture(scope="module")
def baseline(parts):
    """What the pipeline returns with no checker: (2, 600, 800, 3) float in [0, 1]."""
    return run(decoding_the_scene(sd_pipe(parts)), "np").images


def test_dropin_censors_the_region_and_returns_the_rest_as_the_pipeline_would(parts, baseline, eva_nsfw_dir,
                                                                              region_detector):
    regions = RegionSettings(region_detector, shape="ellipse", feather=0.02)
    checker = NSFWSafetyChecker.from_pretrained(str(eva_nsfw_dir), device="cpu", regions=regions)
    assert checker.guard.regions is regions
    out = run(decoding_the_scene(sd_pipe(parts, checker, checker.feature_extractor)), "np")
    assert out.nsfw_content_detected == [True, True]
    result = checker.last_result
    assert [[r.label for r in rs] for rs in result.regions] == [["BUTTOCKS_EXPOSED"]] * 2
    mask = result.masks
    assert mask.shape == (2, 600, 800) and 0.1 < mask.mean() < 0.3
    outside = (mask == 0)[..., None].expand_as(torch.from_numpy(baseline))
    got = torch.from_numpy(out.images)
    assert torch.equal(got[outside], torch.from_numpy(baseline)[outside])  # the pipeline's own pixels, exactly
    inside = (mask == 1)[..., None].expand_as(got)
    assert (got[inside] - torch.from_numpy(baseline)[inside]).abs().mean() > 0.02


def test_attach_takes_the_region_settings(parts, baseline, eva_nsfw_dir, region_detector):
    pipe = decoding_the_scene(sd_pipe(parts))
    checker = attach(pipe, model=str(eva_nsfw_dir), device="cpu", action="black",
                     regions={"classes": ["BUTTOCKS_EXPOSED"], "expand": 0.1})
    assert checker.guard.regions.to_dict()["expand"] == 0.1
    zero_copy = run(pipe, "np").images
    mask = checker.last_result.masks
    outside = (mask == 0)[..., None].expand_as(torch.from_numpy(zero_copy))
    assert torch.equal(torch.from_numpy(zero_copy)[outside], torch.from_numpy(baseline)[outside])
    assert not zero_copy[(mask == 1).numpy()].any()  # black inside
    (region,) = checker.last_result.regions[0]
    x1, y1, x2, y2 = WHEEL_BOX
    assert region.box[0] < x1 - 10 and region.box[2] > x2 + 10  # expanded by 10 %
    # a detector and region settings: attach builds the filter
    pipe2 = decoding_the_scene(sd_pipe(parts))
    detector = load_detector(str(eva_nsfw_dir), device="cpu")
    again = attach(pipe2, detector, action="black", regions=RegionSettings(region_detector, expand=0.1))
    assert np.array_equal(run(pipe2, "np").images, zero_copy) and again.guard.regions.detector is region_detector


def test_save_and_reload_keeps_the_region_settings(parts, eva_nsfw_dir, region_detector, tmp_path):
    regions = RegionSettings(region_detector, classes="faces", threshold={"FACE_MALE": 0.6}, expand=0.2,
                             shape="ellipse", feather=0.05)
    checker = NSFWSafetyChecker.from_pretrained(str(eva_nsfw_dir), device="cpu", regions=regions)
    pipe = sd_pipe(parts)
    attach(pipe, checker)
    pipe.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "safety_checker" / "config.json").read_text())
    assert config["regions"] == {"model": None, "min_score": 0.25, "iou": 0.45, "classes": "faces",
                                 "threshold": {"FACE_MALE": 0.6}, "expand": 0.2, "shape": "ellipse",
                                 "feather": 0.05}
    assert not list((tmp_path / "safety_checker").rglob("*.onnx"))  # a reference, never a copy
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path).safety_checker
    assert loaded.guard.regions.to_dict() == regions.to_dict()
    assert loaded.guard.regions.detector.path == region_detector.path
    off = NSFWSafetyChecker.from_pretrained(tmp_path / "safety_checker", regions=False, device="cpu")
    assert off.guard.regions is None and off.config.regions is None
    # a model file of the user's own is recorded by its path
    mine = tmp_path / "640m.onnx"
    mine.write_bytes(region_detector.path.read_bytes())
    custom = NSFWSafetyChecker.from_pretrained(str(eva_nsfw_dir), device="cpu", regions={"model": str(mine)})
    custom.save_pretrained(tmp_path / "custom")
    saved = json.loads((tmp_path / "custom" / "config.json").read_text())["regions"]
    assert saved["model"] == str(mine.resolve())
    assert NSFWSafetyChecker.from_pretrained(tmp_path / "custom").guard.regions.detector.path == mine.resolve()


def test_region_settings_are_checked(eva_nsfw_dir, region_detector):
    with pytest.raises(TypeError, match="regions must be a RegionSettings"):
        NSFWSafetyChecker.from_pretrained(str(eva_nsfw_dir), device="cpu", regions="exposed")
    with pytest.raises(ValueError, match="unknown region classes"):
        NSFWSafetyChecker.from_pretrained(str(eva_nsfw_dir), device="cpu", regions={"classes": ["TAIL"]})
    with pytest.raises(TypeError, match="needs a classifier"):
        NSFWSafetyChecker(SafetyFilter(None, regions=RegionSettings(region_detector)))
