"""The checker's share of a Stable Diffusion pipeline's wall time.

A ``StableDiffusionPipeline`` is built from SD-1.5-sized UNet and VAE configs with random
weights (tiny ones for CPU runs); prompts go in as random ``prompt_embeds``, so no text
encoder or tokenizer is needed. For each checker variant the pipeline runs end to end
(``output_type="pil"``, classifier-free guidance on), and ``pipe.run_safety_checker`` (which
``attach`` replaces in zero-copy mode) is timed inside it, with a synchronize on both sides.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import torch

from .measure import median, sync
from .paths import clip_checker

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
# same structure (8x VAE, cross-attention UNet), a few thousand times fewer FLOPs
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64, norm_num_groups=8,
    block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


def build_pipeline(device: torch.device, dtype: torch.dtype, tiny: bool):
    """An SD-1.5 pipeline (random weights) with no checker yet; and the text width."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):  # initialize on the device: an SD-1.5 UNet is slow to init on a CPU
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
    # SD-1.5's scheduler_config.json
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, unet.config.cross_attention_dim


def run_share(checkpoint: Path, device: torch.device, dtype: torch.dtype, *, tiny: bool, batch: int,
              steps: int, size: int, repeats: int, clip_tiny: bool) -> dict[str, Any]:
    """Time the pipeline with no checker, the default CLIP checker, the drop-in and ``attach``.

    Returns a dict with the settings and one row per variant: the pipeline's median seconds, the
    checker's median seconds inside it, and the checker's share of the pipeline (in percent).
    """
    pipe, width = build_pipeline(device, dtype, tiny)
    rows = []
    for variant in ("none", "clip_default", "drop_in", "attach"):
        try:
            setup = _install(pipe, variant, checkpoint, device, dtype, clip_tiny)
            rows.append(_time_variant(pipe, variant, device, dtype, width, batch, steps, size, repeats))
            setup()
        except ImportError as e:  # nsfw_safety.diffusers missing: report it, keep the others
            rows.append({"variant": variant, "error": f"{type(e).__name__}: {e}"})
    none = next((r for r in rows if r["variant"] == "none" and "error" not in r), None)
    for r in rows:
        if none and "error" not in r and r["variant"] != "none":
            r["added_s"] = r["pipeline_s"] - none["pipeline_s"]
    return {"unet": "tiny" if tiny else "SD-1.5", "vae": "tiny" if tiny else "SD-1.5", "batch": batch,
            "steps": steps, "size": size, "dtype": str(dtype).removeprefix("torch."), "repeats": repeats,
            "output_type": "pil", "guidance_scale": 7.5, "rows": rows}


def _install(pipe, variant: str, checkpoint: Path, device, dtype, clip_tiny: bool):
    """Put the variant's checker into ``pipe``; returns the function that takes it out again."""
    if variant == "none":
        return lambda: None
    if variant == "clip_default":
        checker, extractor = clip_checker(device, dtype, clip_tiny)
        pipe.register_modules(safety_checker=checker, feature_extractor=extractor)
        return lambda: pipe.register_modules(safety_checker=None, feature_extractor=None)
    from nsfw_safety.diffusers import NSFWSafetyChecker, attach, detach

    checker = NSFWSafetyChecker.from_pretrained(str(checkpoint), device=device, max_batch_size=64)
    if variant == "drop_in":  # as a user passes it: safety_checker= plus a feature extractor
        pipe.register_modules(safety_checker=checker, feature_extractor=checker.feature_extractor)
        return lambda: pipe.register_modules(safety_checker=None, feature_extractor=None)
    attach(pipe, checker)

    def undo():
        detach(pipe)
        pipe.register_modules(safety_checker=None, feature_extractor=None)
    return undo


def _time_variant(pipe, variant, device, dtype, width, batch, steps, size, repeats) -> dict[str, Any]:
    checker_times: list[float] = []
    inner = pipe.run_safety_checker  # attach's instance attribute, or the class's method

    @functools.wraps(inner)
    def timed(image, dev, dt):
        sync(device)
        t0 = time.perf_counter()
        out = inner(image, dev, dt)
        sync(device)
        checker_times.append(time.perf_counter() - t0)
        return out

    had_own = "run_safety_checker" in vars(pipe)
    pipe.run_safety_checker = timed
    try:
        totals, checks = [], []
        for i in range(repeats + 1):  # the first run warms up
            embeds = torch.randn(batch, 77, width, device=device, dtype=dtype)
            negative = torch.randn(batch, 77, width, device=device, dtype=dtype)
            checker_times.clear()
            sync(device)
            t0 = time.perf_counter()
            out = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, height=size, width=size,
                       num_inference_steps=steps, guidance_scale=7.5, output_type="pil")
            sync(device)
            elapsed = time.perf_counter() - t0
            if len(out.images) != batch:
                raise RuntimeError(f"{variant}: the pipeline returned {len(out.images)} images, not {batch}")
            if i:
                totals.append(elapsed)
                checks.append(sum(checker_times))
    finally:
        if had_own:
            pipe.run_safety_checker = inner
        else:
            del pipe.run_safety_checker
    flags = out.nsfw_content_detected
    pipeline_s, checker_s = median(totals), median(checks)
    return {"variant": variant, "pipeline_s": pipeline_s, "checker_s": checker_s,
            "share_pct": 100 * checker_s / pipeline_s, "pipeline_all_s": totals, "checker_all_s": checks,
            "flags": None if flags is None else [bool(f) for f in flags]}
