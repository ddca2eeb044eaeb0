"""The Modular Diffusers block, inserted after the decode step of a real tiny modular Flux."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers.modular_pipelines import FluxAutoBlocks, SequentialPipelineBlocks  # noqa: E402
from test_pipelines import SIZE, STEPS, as_nchw, flux, split_rule  # noqa: E402

from nsfw_safety import load_detector  # noqa: E402
from nsfw_safety.censor import pixelate  # noqa: E402
from nsfw_safety.diffusers import NSFWSafetyChecker  # noqa: E402
from nsfw_safety.modular import NSFWSafetyBlock, insert_after_decode  # noqa: E402


def modular_flux(guarded: bool):
    """FluxAutoBlocks without its text encoder step (the tests pass embeddings), with the tiny Flux's parts."""
    reference, kwargs = flux()
    blocks = FluxAutoBlocks()
    blocks.sub_blocks.pop("text_encoder")
    if guarded:
        insert_after_decode(blocks)
    pipe = blocks.init_pipeline()
    pipe.update_components(transformer=reference.transformer, vae=reference.vae, scheduler=reference.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs


def run(pipe, kwargs: dict, output_type: str = "pt", **inputs):
    return pipe(**kwargs, **inputs, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type=output_type,
                generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def plain():
    pipe, kwargs = modular_flux(guarded=False)
    return {t: run(pipe, kwargs, t).get("images") for t in ("pt", "np", "pil")}


def test_the_block_sits_after_decode_and_declares_its_inputs():
    pipe, _ = modular_flux(guarded=True)
    steps = list(pipe.blocks.sub_blocks)
    assert steps[steps.index("decode") + 1] == "nsfw_safety" and steps[-1] == "nsfw_safety"
    names = {i.name for i in pipe.blocks.inputs}
    assert {"nsfw_level", "nsfw_threshold", "nsfw_thresholds", "nsfw_action"} <= names
    assert {"nsfw_content_detected", "nsfw_result"} <= {o.name for o in pipe.blocks.intermediate_outputs}
    assert "safety_checker" in pipe.component_names and pipe.safety_checker is None
    with pytest.raises(ValueError, match="has no 'decode' step"):
        insert_after_decode(SequentialPipelineBlocks.from_blocks_dict({"guard": NSFWSafetyBlock()}))


@pytest.mark.parametrize("output_type", ["pt", "np", "pil"])
def test_the_block_censors_the_flagged_image_and_keeps_the_other(plain, eva_dir, output_type):
    rule = split_rule(eva_dir, plain["pt"])
    pipe, kwargs = modular_flux(guarded=True)
    checker = NSFWSafetyChecker(load_detector(str(eva_dir), device="cpu"), threshold=rule.threshold,
                                action="pixelate")
    pipe.update_components(safety_checker=checker)
    state = run(pipe, kwargs, output_type)
    got, before = as_nchw(state.get("images"), output_type), as_nchw(plain[output_type], output_type)
    assert torch.equal(got[rule.clean], before[rule.clean])  # bit for bit the unguarded pipeline's
    censored = pixelate(plain["pt"][rule.hit : rule.hit + 1])[0]
    if output_type == "pil":
        assert (got[rule.hit].float() - (censored * 255).round()).abs().max() <= 1
    else:
        torch.testing.assert_close(got[rule.hit], censored, atol=1e-5, rtol=0)
    result = state.get("nsfw_result")
    assert state.get("nsfw_content_detected") == result.flagged == rule.flags
    assert result.actions[rule.hit] == "pixelate" and checker.last_result is result


def test_settings_are_block_inputs(plain, eva_dir):
    rule = split_rule(eva_dir, plain["pt"])
    pipe, kwargs = modular_flux(guarded=True)
    checker = NSFWSafetyChecker(load_detector(str(eva_dir), device="cpu"), threshold=rule.threshold, action="blur")
    pipe.update_components(safety_checker=checker)
    state = run(pipe, kwargs, nsfw_action="black")  # this call only
    assert state.get("nsfw_result").actions[rule.hit] == "black" and bool(state.get("images")[rule.hit].eq(0).all())
    state = run(pipe, kwargs, nsfw_threshold=0.0)  # everything reaches 0
    assert state.get("nsfw_content_detected") == [True, True] and state.get("nsfw_result").actions == ["blur"] * 2
    state = run(pipe, kwargs, nsfw_level="high", nsfw_threshold=1.0, nsfw_action="black")
    assert state.get("nsfw_content_detected") == [False, False]
    assert torch.equal(state.get("images"), plain["pt"])
    state = run(pipe, kwargs, nsfw_thresholds={"low": 0.0})
    assert state.get("nsfw_result").reasons[0].startswith("low ")
    state = run(pipe, kwargs)  # the checker's own settings again
    assert state.get("nsfw_content_detected") == rule.flags and checker.guard.action == "blur"
    with pytest.raises(ValueError, match="action must be one of"):
        run(pipe, kwargs, nsfw_action="smudge")


def test_the_block_fails_closed_without_a_checker_and_skips_latents(plain, eva_nsfw_dir, caplog):
    pipe, kwargs = modular_flux(guarded=True)
    with pytest.raises(ValueError, match="needs an NSFWSafetyChecker as the pipeline's safety_checker, got NoneType"):
        run(pipe, kwargs)
    pipe.update_components(safety_checker=NSFWSafetyChecker(load_detector(str(eva_nsfw_dir), device="cpu")))
    with caplog.at_level(logging.WARNING, logger="nsfw_safety.modular"):
        state = run(pipe, kwargs, "latent")
    assert state.get("nsfw_result") is None and state.get("images").shape[:2] == (2, 1)
    assert "output_type='latent' is never checked" in caplog.text
    images = run(pipe, kwargs, "np").get("images")
    assert isinstance(images, np.ndarray) and images.shape == (2, SIZE, SIZE, 3)
    assert not np.array_equal(images, plain["np"])  # all flagged: both blurred
