"""attach() on video pipelines: real tiny Wan (a DiT) and AnimateDiff pipelines built offline on
the CPU, text encoders bypassed with prompt_embeds. Every frame is checked at
``video_processor.postprocess_video``; per-frame flags land in ``last_result``."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AnimateDiffPipeline, AutoencoderKL, AutoencoderKLWan, DDIMScheduler, FlowMatchEulerDiscreteScheduler,
    MotionAdapter, UNet2DConditionModel, WanPipeline, WanTransformer3DModel,
)

from nsfw_safety import load_detector  # noqa: E402
from nsfw_safety.diffusers import attach, detach  # noqa: E402
from nsfw_safety.video import VideoBatchResult  # noqa: E402

FRAMES = 9  # Wan's VAE: 4k + 1 frames


def wan_pipe() -> WanPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_wan(pipe, output_type: str = "pt", steps: int = 2):
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
    return pipe(prompt_embeds=embeds, height=32, width=32, num_frames=FRAMES, num_inference_steps=steps,
                guidance_scale=1.0, output_type=output_type, generator=torch.Generator().manual_seed(0)).frames


def animatediff_pipe() -> AnimateDiffPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    adapter = MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=1, motion_norm_num_groups=8,
                            motion_num_attention_heads=2)
    pipe = AnimateDiffPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, motion_adapter=adapter,
                               scheduler=DDIMScheduler(clip_sample=False, steps_offset=1))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_animatediff(pipe, output_type: str = "pt"):
    embeds = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(1))
    return pipe(prompt_embeds=embeds, num_frames=6, height=32, width=32, num_inference_steps=1, guidance_scale=1.0,
                output_type=output_type, generator=torch.Generator().manual_seed(0)).frames


def as_fchw(video, output_type: str) -> torch.Tensor:
    """One video of a pipeline's output as (F, 3, H, W) (uint8 for "pil")."""
    if output_type == "pil":
        return torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in video])
    if output_type == "np":
        return torch.from_numpy(video).permute(0, 3, 1, 2)
    return video


def split(eva_dir, frames: torch.Tensor) -> SimpleNamespace:
    """A medium threshold at the median frame score: the frames at or above it are flagged."""
    scores = load_detector(str(eva_dir), device="cpu").predict(frames).levels[:, 2]
    hits = [i for i, s in enumerate(scores.tolist()) if s >= float(scores.median())]
    assert 0 < len(hits) < len(scores), scores  # the fixture must spread the frames
    return SimpleNamespace(threshold=float(scores.median()), hits=hits, scores=scores)


@pytest.fixture(scope="module")
def wan():
    pipe = wan_pipe()
    return SimpleNamespace(pipe=pipe, baseline=run_wan(pipe))  # (1, F, 3, H, W) in [0, 1]


@pytest.mark.parametrize("output_type", ["pt", "np", "pil"])
def test_wan_frames_are_checked_at_postprocess_video(wan, eva_dir, output_type):
    rule = split(eva_dir, wan.baseline[0])
    checker = attach(wan.pipe, model=str(eva_dir), threshold=rule.threshold, action="black", device="cpu")
    try:
        calls = []
        original = wan.pipe.video_processor.postprocess_video
        wan.pipe.video_processor.postprocess_video = lambda video, output_type="np", **kw: (
            calls.append(video.shape) or original(video, output_type, **kw))
        frames = run_wan(wan.pipe, output_type)
    finally:
        detach(wan.pipe)
    assert calls == [(1, 3, FRAMES, 32, 32)]  # the decoded (B, C, F, H, W) video, once
    result = checker.last_result
    assert isinstance(result, VideoBatchResult) and result.flagged == [True]
    video = result.videos[0]
    assert video.flagged_frames == rule.hits and video.checked == list(range(FRAMES))
    assert video.frame_flags == [i in rule.hits for i in range(FRAMES)]
    assert torch.allclose(video.scores.levels[:, 2], rule.scores, atol=1e-5)
    got = as_fchw(frames[0], output_type)
    want = wan.baseline[0] if output_type != "pil" else (wan.baseline[0] * 255).round().to(torch.uint8)
    kept = [i for i in range(FRAMES) if i not in rule.hits]
    assert torch.equal(got[kept], want[kept])  # unflagged frames: exactly the pipeline's own
    assert bool(got[rule.hits].eq(0).all())  # flagged frames: black in every output type
    assert "postprocess_video" not in vars(wan.pipe.video_processor)


def test_wan_latents_are_not_checked_and_say_so(wan, eva_dir, caplog):
    checker = attach(wan.pipe, model=str(eva_dir), device="cpu")
    try:
        run_wan(wan.pipe, "pt", steps=1)
        assert checker.last_result is not None
        with caplog.at_level(logging.WARNING, logger="nsfw_safety.diffusers"):
            latents = run_wan(wan.pipe, "latent", steps=1)
    finally:
        detach(wan.pipe)
    assert latents.shape[1] == 16 and checker.last_result is None
    assert any("output_type='latent' is never checked" in r.message for r in caplog.records)


def test_animatediff_censors_a_window_around_a_flagged_frame(eva_dir):
    pipe = animatediff_pipe()
    baseline = run_animatediff(pipe)  # (1, 6, 3, 32, 32)
    scores = load_detector(str(eva_dir), device="cpu").predict(baseline[0]).levels[:, 2]
    top = int(scores.argmax())
    assert float(scores.topk(2).values[1]) < float(scores[top])
    checker = attach(pipe, model=str(eva_dir), threshold=float(scores[top]), action="black", device="cpu")
    checker.video_window = 1
    frames = run_animatediff(pipe)[0]
    video = checker.last_result.videos[0]
    around = [i for i in (top - 1, top, top + 1) if 0 <= i < 6]
    assert video.flagged_frames == [top] and video.censored == around
    assert [i for i in range(6) if bool(frames[i].eq(0).all())] == around
    kept = [i for i in range(6) if i not in around]
    assert torch.equal(frames[kept], baseline[0][kept])


def test_attach_names_every_seam_it_looked_for(eva_dir):
    with pytest.raises(TypeError, match="no VideoProcessor at pipe.video_processor and no VaeImageProcessor"):
        attach(SimpleNamespace(maybe_free_model_hooks=lambda: None), load_detector(str(eva_dir), device="cpu"))
