"""Regenerate flagged images with new seeds: real tiny pipelines and a detector whose flags
depend on the seed (it flags images brighter than a level)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from test_diffusers import PROMPTS, sd_parts, sd_pipe  # noqa: E402
from test_pipelines import SIZE, STEPS, flux  # noqa: E402

from nsfw_safety import load_detector  # noqa: E402
from nsfw_safety.diffusers import NSFWSafetyChecker, attach, detach  # noqa: E402
from nsfw_safety.regenerate import next_seed, regenerate  # noqa: E402

# P(nsfw) = sigmoid(SHARPNESS * (mean - level)): the tiny pipelines' images differ in brightness by
# about 1e-3, so the pipeline tests use a steep one (1e-4 above the level is 0.73)
SHARPNESS = 1e4
SMALL = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE)


def write_brightness_vit(path: Path, level: float, *, sharpness: float = SHARPNESS, size: int = 32,
                         patch: int = 8, hidden: int = 8) -> Path:
    """A ViT sfw/nsfw checkpoint whose P(nsfw) is ``sigmoid(sharpness * (mean pixel - level))``.

    Its weights are set by hand: feature 0 of each patch token is the patch's mean; queries
    and keys are 0, so the CLS token attends to every token alike and receives their mean; a
    LayerNorm epsilon of 1e6 makes every LayerNorm linear; the head maps the CLS feature to
    the logit, calibrated on a black and a white image.
    """
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(image_size=size, patch_size=patch, hidden_size=hidden, num_hidden_layers=1,
                       num_attention_heads=1, intermediate_size=hidden, layer_norm_eps=1e6,
                       id2label={0: "sfw", 1: "nsfw"}, label2id={"sfw": 0, "nsfw": 1})
    model = ViTForImageClassification(config).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            p.fill_(1.0 if "layernorm" in name and name.endswith("weight") else 0.0)
        model.vit.embeddings.patch_embeddings.projection.weight[0].fill_(1.0 / (3 * patch * patch))
        value = next(p for n, p in params.items() if n.endswith(("v_proj.weight", "attention.value.weight")))
        out = next(p for n, p in params.items() if n.endswith(("o_proj.weight", "attention.output.dense.weight")))
        value[0, 0] = out[0, 0] = 1.0
        cls = [model.vit(pixel_values=torch.full((1, 3, size, size), v)).last_hidden_state[0, 0, 0] for v in (-1, 1)]
        weight = sharpness / (cls[1] - cls[0])  # normalized pixels: -1 is black, 1 is white
        model.classifier.weight[1, 0] = weight
        model.classifier.bias[1] = -cls[0] * weight - sharpness * level
    model.save_pretrained(path, safe_serialization=True)
    ViTImageProcessor(size={"height": size, "width": size}, resample=2, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(path)
    return Path(path)


def brightness(images: torch.Tensor) -> list[float]:
    return images.float().mean(dim=(1, 2, 3)).tolist()


def test_the_brightness_detector_flags_by_mean(tmp_path):
    detector = load_detector(str(write_brightness_vit(tmp_path, level=0.5, sharpness=50.0)), device="cpu")
    gray = torch.tensor([0.3, 0.49, 0.51, 0.7]).view(4, 1, 1, 1).expand(4, 3, 32, 32)
    noise = (torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) - 0.5) * 0.4
    for images in (gray, (gray + noise).clamp(0, 1)):
        expected = torch.sigmoid(50.0 * (torch.tensor(brightness(images)) - 0.5))
        # the detector reads 8-bit pixels, as every image is read: up to 1/510 off in brightness
        torch.testing.assert_close(detector.predict(images).levels[:, 2], expected, atol=5e-3, rtol=0)
    steep = load_detector(str(write_brightness_vit(tmp_path / "steep", level=0.5)), device="cpu")
    levels = steep.predict(torch.tensor([127, 128]).view(2, 1, 1, 1).expand(2, 3, 32, 32) / 255).levels
    assert levels[:, 2].tolist() == pytest.approx([0.0, 1.0], abs=1e-6)


# --- the helper on real pipelines ---------------------------------------------------------------

def flux_once(pipe, kwargs: dict, seed: int) -> torch.Tensor:
    """One (3, H, W) image in [0, 1] with no guard, from its own seed."""
    one = {k: v[:1] for k, v in kwargs.items()}
    return pipe(**one, **SMALL, output_type="pt",
                generator=[torch.Generator().manual_seed(seed)]).images[0]


def expected_outcome(make, detector, seeds: list[int], attempts: int) -> tuple[list[list[int]], list[bool]]:
    """Per seed: the seeds an image goes through until the detector passes the image one makes."""
    def hit(seed):
        return float(detector.predict(make(seed)[None]).levels[0, 2]) >= 0.5

    tried, flagged = [], []
    for seed in seeds:
        chain = [seed]
        while hit(chain[-1]) and len(chain) < attempts:
            chain.append(next_seed(seed, len(chain)))
        tried.append(chain)
        flagged.append(hit(chain[-1]))
    return tried, flagged


@pytest.fixture(scope="module")
def flux_case(tmp_path_factory):
    """A tiny Flux, four seeds, and a level between their brightnesses: some flagged, some not."""
    pipe, kwargs = flux()
    pipe.set_progress_bar_config(disable=True)
    seeds = [11, 12, 13, 14]
    kwargs = {k: v[:1].expand(len(seeds), *v.shape[1:]) for k, v in kwargs.items()}  # one prompt for all
    first = torch.stack([flux_once(pipe, kwargs, s) for s in seeds])
    means = sorted(brightness(first))
    level = (means[1] + means[2]) / 2  # the two brightest are flagged at first
    assert means[2] - means[1] > 2e-4, means  # far enough from the level for the steep detector
    return pipe, kwargs, seeds, level, tmp_path_factory.mktemp("bright")


@pytest.mark.parametrize("output_type", ["pt", "pil"])
def test_regenerate_with_attach_replaces_only_the_flagged_images(flux_case, output_type):
    pipe, kwargs, seeds, level, tmp = flux_case
    if "nsfw_safety" in vars(pipe):  # the module's pipeline, attached by an earlier test
        detach(pipe)
    model = str(write_brightness_vit(tmp / output_type, level))
    make = functools.cache(lambda seed: flux_once(pipe, kwargs, seed))  # each seed's image with no guard
    tried, flagged = expected_outcome(make, load_detector(model, device="cpu"), seeds, attempts=3)
    checker = attach(pipe, model=model, threshold=0.5, action="black", device="cpu")
    assert sum(len(t) > 1 for t in tried) == 2  # two images needed another seed

    out = regenerate(pipe, seeds, max_attempts=3, output_type=output_type, **SMALL, **kwargs)
    assert out.seeds == tried and out.flagged == flagged and out.attempts == [len(t) for t in tried]
    # the first attempt ran the whole batch, the last one only the images still flagged
    assert len(checker.last_result.flagged) == sum(len(t) == max(map(len, tried)) for t in tried)
    images = out.images
    if output_type == "pil":
        assert isinstance(images, list) and len(images) == 4
        images = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
    for i, (chain, bad) in enumerate(zip(tried, flagged)):
        if bad:  # every attempt flagged: the last one, censored
            assert bool(images[i].eq(0).all()) and out.actions[i] == "black" and ">=" in out.reasons[i]
        else:  # the clean attempt: the image its last seed makes without any guard
            expected = make(chain[-1])
            if output_type == "pil":
                expected = (expected * 255).round()
                assert (images[i].float() - expected).abs().max() <= 1
            else:
                torch.testing.assert_close(images[i], expected, atol=1e-5, rtol=0)
            assert out.actions[i] == "none" and "<" in out.reasons[i]


def test_regenerate_gives_up_after_max_attempts(flux_case):
    pipe, kwargs, seeds, level, tmp = flux_case
    attach(pipe, model=str(write_brightness_vit(tmp / "dark", level=0.0)), action="pixelate", device="cpu")
    two = {k: v[:2] for k, v in kwargs.items()}
    out = regenerate(pipe, seeds[:2], max_attempts=2, output_type="np", **SMALL, **two)
    assert out.flagged == [True, True] and out.actions == ["pixelate", "pixelate"]
    assert out.seeds == [[s, s + 2**32] for s in seeds[:2]]
    assert out.images.shape == (2, SIZE, SIZE, 3) and out.images.dtype == np.float32


def test_regenerate_with_the_dropin_checker(tmp_path):
    """An SD pipeline with the checker in its safety_checker slot; a string prompt for every image."""
    pipe = sd_pipe(sd_parts())
    seeds = [5, 6, 7]

    @functools.cache
    def make(seed):
        return pipe(PROMPTS[0], **SMALL, output_type="pt", guidance_scale=1.0,
                    generator=[torch.Generator().manual_seed(seed)]).images[0]

    means = sorted(brightness(torch.stack([make(s) for s in seeds])))
    level = (means[1] + means[2]) / 2
    detector = load_detector(str(write_brightness_vit(tmp_path, level)), device="cpu")
    tried, flagged = expected_outcome(make, detector, seeds, attempts=4)
    checker = NSFWSafetyChecker(detector, action="black")
    guarded = sd_pipe(sd_parts(), checker, checker.feature_extractor)
    out = regenerate(guarded, seeds, max_attempts=4, prompt=PROMPTS[0], output_type="pt", guidance_scale=1.0,
                     **SMALL)
    assert out.seeds == tried and out.flagged == flagged and len(tried[0]) + len(tried[1]) + len(tried[2]) > 3
    for i, chain in enumerate(tried):
        if not flagged[i]:
            torch.testing.assert_close(out.images[i], make(chain[-1]), atol=1e-5, rtol=0)


def test_regenerate_refuses_what_it_cannot_do(flux_case):
    pipe, kwargs, seeds, level, tmp = flux_case
    bare, _ = flux()
    with pytest.raises(TypeError, match="is not guarded by nsfw-safety"):
        regenerate(bare, seeds, **kwargs)
    attach(pipe, model=str(write_brightness_vit(tmp / "any", level)), device="cpu")
    with pytest.raises(TypeError, match=r"regenerate sets \['generator'\] itself"):
        regenerate(pipe, seeds, generator=torch.Generator(), **kwargs)
    with pytest.raises(ValueError, match="output_type='latent' is never checked"):
        regenerate(pipe, seeds, output_type="latent", **kwargs)
    with pytest.raises(ValueError, match="max_attempts must be an int >= 1"):
        regenerate(pipe, seeds, max_attempts=0, **kwargs)
    with pytest.raises(ValueError, match="one seed per image, got none"):
        regenerate(pipe, [], **kwargs)
    with pytest.raises(ValueError, match="a seed must be an int"):
        regenerate(pipe, [1.5], **kwargs)
