"""``attach`` on the image pipelines people use now, built offline from tiny configs on the CPU.

None of these pipelines has a ``safety_checker`` slot: ``attach`` guards them at
``pipe.image_processor.postprocess``. Text encoders are bypassed with ``prompt_embeds``; each
pipeline runs 2 steps at 32 px on a batch of two images, and a detector threshold placed between
the two images' scores flags exactly one of them.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AuraFlowPipeline, AuraFlowTransformer2DModel, AutoencoderDC, AutoencoderKL, AutoencoderKLFlux2,
    AutoencoderKLQwenImage, ChromaPipeline, ChromaTransformer2DModel, DDIMScheduler,
    FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel, FluxPipeline, FluxTransformer2DModel,
    KandinskyV22Pipeline, PixArtSigmaPipeline, PixArtTransformer2DModel, QwenImagePipeline,
    QwenImageTransformer2DModel, SanaPipeline, SanaTransformer2DModel, SD3Transformer2DModel,
    StableDiffusion3Pipeline, UNet2DConditionModel, VQModel,
)

from test_diffusers import as_nchw  # noqa: E402

from nsfw_safety import load_detector  # noqa: E402
from nsfw_safety.censor import blur  # noqa: E402
from nsfw_safety.diffusers import attach, detach  # noqa: E402

SIZE, STEPS, TOKENS, BATCH = 32, 2, 8, 2


# --- tiny pipelines, one builder per family ----------------------------------------------------

def embeds(*shape: int) -> torch.Tensor:
    return torch.randn(BATCH, *shape, generator=torch.Generator().manual_seed(1))


def mask(dtype=torch.long) -> torch.Tensor:
    return torch.ones(BATCH, TOKENS, dtype=dtype)


def kl_vae(latent_channels: int, shift_factor: float | None = None) -> AutoencoderKL:
    """One block of 4 channels: no downsampling, so 32 px images have 32 px latents."""
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(4,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=latent_channels, norm_num_groups=4,
                         sample_size=SIZE, shift_factor=shift_factor)


def sd3():
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=SIZE, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=SIZE)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(4, 0.0), text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    return pipe, dict(prompt_embeds=embeds(TOKENS, 16), pooled_prompt_embeds=embeds(16), guidance_scale=1.0)


def flux():
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(4, 4, 8))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(1, 0.0), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    return pipe, dict(prompt_embeds=embeds(TOKENS, 16), pooled_prompt_embeds=embeds(16))


def flux2():
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4))
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(4,), down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4,
                             sample_size=SIZE)
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                         transformer=transformer)
    return pipe, dict(prompt_embeds=embeds(TOKENS, 16))


def qwenimage():
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4))
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=transformer)
    return pipe, dict(prompt_embeds=embeds(TOKENS, 16), prompt_embeds_mask=mask(), true_cfg_scale=1.0)


def sana():
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=SIZE)
    torch.manual_seed(0)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock",),
        decoder_block_types=("ResBlock",), encoder_block_out_channels=(8,), decoder_block_out_channels=(8,),
        encoder_qkv_multiscales=((),), decoder_qkv_multiscales=((),), encoder_layers_per_block=(1,),
        decoder_layers_per_block=(1,), downsample_block_type="conv", upsample_block_type="interpolate",
        scaling_factor=0.41407)
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler())
    return pipe, dict(prompt_embeds=embeds(TOKENS, 8), prompt_attention_mask=mask(), guidance_scale=1.0,
                      use_resolution_binning=False)


def pixart_sigma():
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=SIZE, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=16,
        in_channels=4, cross_attention_dim=16, out_channels=8, norm_num_groups=4)
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=kl_vae(4), transformer=transformer,
                               scheduler=DDIMScheduler())
    return pipe, dict(prompt_embeds=embeds(TOKENS, 16), prompt_attention_mask=mask(), guidance_scale=1.0,
                      use_resolution_binning=False)


def chroma():
    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 4, 8), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1)
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(1, 0.0), text_encoder=None,
                          tokenizer=None, transformer=transformer)
    return pipe, dict(prompt_embeds=embeds(TOKENS, 16), prompt_attention_mask=mask(torch.bool), guidance_scale=1.0)


def auraflow():
    torch.manual_seed(0)
    transformer = AuraFlowTransformer2DModel(
        sample_size=SIZE, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, out_channels=4,
        pos_embed_max_size=256)
    pipe = AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=kl_vae(4), transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler())
    return pipe, dict(prompt_embeds=embeds(TOKENS, 16), prompt_attention_mask=mask(), guidance_scale=1.0)


#: The covered families (listed in the README's diffusers section).
FAMILIES: dict[str, Callable] = {
    "StableDiffusion3Pipeline": sd3, "FluxPipeline": flux, "Flux2Pipeline": flux2, "QwenImagePipeline": qwenimage,
    "SanaPipeline": sana, "PixArtSigmaPipeline": pixart_sigma, "ChromaPipeline": chroma, "AuraFlowPipeline": auraflow,
}


def run(pipe, kwargs: dict, output_type: str, seed: int = 0):
    pipe.set_progress_bar_config(disable=True)
    return pipe(**kwargs, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type=output_type,
                generator=torch.Generator().manual_seed(seed)).images


def split_rule(detector_dir, images: torch.Tensor) -> SimpleNamespace:
    """A medium threshold halfway between the scores of a batch of two: exactly one is flagged."""
    medium = load_detector(str(detector_dir), device="cpu").predict(images).levels[:, 2]
    assert float((medium[0] - medium[1]).abs()) > 1e-4, medium  # two different pictures, two scores
    flags = (medium > medium.mean()).tolist()
    return SimpleNamespace(threshold=float(medium.mean()), flags=flags, hit=flags.index(True),
                           clean=flags.index(False))


# --- the guard on each family -------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_attach_censors_the_flagged_image_in_every_output_type(family, eva_dir):
    pipe, kwargs = FAMILIES[family]()
    assert type(pipe).__name__ == family and "safety_checker" not in pipe.components
    plain = {t: run(pipe, kwargs, t) for t in ("pt", "np", "pil")}
    assert plain["pt"].shape == (BATCH, 3, SIZE, SIZE)
    rule = split_rule(eva_dir, plain["pt"])
    checker = attach(pipe, model=str(eva_dir), threshold=rule.threshold, action="blur", device="cpu")
    blurred = blur(plain["pt"][rule.hit : rule.hit + 1])[0]  # in true colours: [0, 1], like the output
    for output_type, before in plain.items():
        got, before = as_nchw(run(pipe, kwargs, output_type), output_type), as_nchw(before, output_type)
        # the unflagged image: bit for bit what the pipeline makes without the guard
        assert got.dtype == before.dtype and torch.equal(got[rule.clean], before[rule.clean]), output_type
        if output_type == "pil":  # the pipeline's own uint8 conversion of the blurred picture
            assert (got[rule.hit].float() - (blurred * 255).round()).abs().max() <= 1
        else:
            torch.testing.assert_close(got[rule.hit], blurred, atol=1e-5, rtol=0)
        assert not torch.equal(got[rule.hit], before[rule.hit])
        result = checker.last_result
        assert result.flagged == rule.flags and result.actions[rule.hit] == "blur"
        assert result.actions[rule.clean] == "none" and result.scores.levels.shape == (BATCH, 4)
        assert result.reasons[rule.hit].startswith("medium ") and ">=" in result.reasons[rule.hit]
    detach(pipe)
    assert torch.equal(run(pipe, kwargs, "pt"), plain["pt"])


def test_attach_flags_everything_and_nothing(eva_nsfw_dir, eva_safe_dir):
    pipe, kwargs = flux()
    plain = run(pipe, kwargs, "np")
    checker = attach(pipe, model=str(eva_nsfw_dir), action="black", device="cpu")
    assert not run(pipe, kwargs, "np").any() and checker.last_result.flagged == [True, True]
    checker = attach(pipe, model=str(eva_safe_dir), action="black", device="cpu")  # replaces the first
    assert np.array_equal(run(pipe, kwargs, "np"), plain) and checker.last_result.flagged == [False, False]


@pytest.mark.parametrize("offload", ["model", pytest.param("sequential", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_attach_under_cpu_offload(eva_dir, offload):
    """The checker is no component of these pipelines: it follows the decoded images' device."""
    pipe, kwargs = flux()
    plain = run(pipe, kwargs, "pt")
    rule = split_rule(eva_dir, plain)
    device = "cuda" if offload == "sequential" else "cpu"  # accelerate's sequential hooks fail on the CPU
    getattr(pipe, f"enable_{offload}_cpu_offload")(device=device)
    checker = attach(pipe, model=str(eva_dir), threshold=rule.threshold, action="black", device="cpu", dtype="fp32")
    out = run(pipe, kwargs, "pt")
    assert checker.last_result.flagged == rule.flags and checker.device.type == out.device.type == device
    out = out.cpu()
    assert bool(out[rule.hit].eq(0).all())
    torch.testing.assert_close(out[rule.clean], plain[rule.clean], atol=1e-2 if device == "cuda" else 0, rtol=0)


def kandinsky22() -> KandinskyV22Pipeline:
    """Kandinsky 2.2 decodes with its MoVQ and converts the images itself, inside ``__call__``."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="image", down_block_types=("ResnetDownsampleBlock2D",
        "SimpleCrossAttnDownBlock2D"), up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(8, 16), layers_per_block=1,
        encoder_hid_dim=16, encoder_hid_dim_type="image_proj", cross_attention_dim=16, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift", class_embed_type=None, norm_num_groups=4)
    movq = VQModel(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                   up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, layers_per_block=1,
                   norm_num_groups=4, num_vq_embeddings=12, vq_embed_dim=4)
    pipe = KandinskyV22Pipeline(unet=unet, scheduler=DDIMScheduler(), movq=movq)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_pipeline_without_a_seam_is_refused_with_the_reason(eva_dir):
    pipe = kandinsky22()
    out = pipe(image_embeds=embeds(16), negative_image_embeds=embeds(16), num_inference_steps=STEPS, height=SIZE,
               width=SIZE, guidance_scale=1.0, output_type="pt").images  # a working pipeline
    assert out.shape == (BATCH, 3, SIZE, SIZE)
    with pytest.raises(TypeError) as error:
        attach(pipe, model=str(eva_dir), device="cpu")
    assert str(error.value).startswith("cannot attach to KandinskyV22Pipeline: it has no safety_checker that returns "
                                       "(images, flags), no VideoProcessor at pipe.video_processor")
    assert "it turns the output of pipe.movq into images itself" in str(error.value)
    assert "nsfw_safety" not in vars(pipe) and "maybe_free_model_hooks" not in vars(pipe)  # left as it was
