"""diffusers integration: real tiny pipelines (SD txt2img/img2img, SDXL) built offline, on the CPU."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline,
    StableDiffusionXLPipeline, UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
)

from nsfw_safety import SafetyFilter, load_detector  # noqa: E402
from nsfw_safety.censor import blur, pixelate  # noqa: E402
from nsfw_safety.diffusers import NSFWSafetyChecker, attach, detach  # noqa: E402

SIZE, STEPS = 32, 2
PROMPTS = ["a red fox in the snow", "two blue boats"]


# --- tiny pipelines --------------------------------------------------------------------------

def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary is the 256 byte symbols (no merges), loaded from its
    files as a hub tokenizer is: the constructor's arguments differ between transformers 4 and 5."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs + [256 + n for n in range(256 - len(bs))]
    bs += [b for b in range(256) if b not in bs]
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def text_encoder(cls=CLIPTextModel, hidden: int = 16, projection: int = 16):
    torch.manual_seed(0)
    return cls(CLIPTextConfig(vocab_size=514, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                              num_attention_heads=2, max_position_embeddings=77, projection_dim=projection,
                              bos_token_id=512, eos_token_id=513, pad_token_id=513))


def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                         sample_size=SIZE)


def sd_parts() -> dict:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=SIZE // 2, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, attention_head_dim=2)
    return dict(vae=vae(), text_encoder=text_encoder(), tokenizer=tiny_tokenizer(), unet=unet,
                scheduler=DDIMScheduler(clip_sample=False, steps_offset=1))


def sd_pipe(parts: dict, checker=None, feature_extractor=None, cls=StableDiffusionPipeline):
    pipe = cls(**parts, safety_checker=checker, feature_extractor=feature_extractor, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, output_type: str = "pt", steps: int = STEPS, **kwargs):
    return pipe(PROMPTS, num_inference_steps=steps, height=SIZE, width=SIZE, output_type=output_type,
                guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.fixture(scope="module")
def parts():
    return sd_parts()


@pytest.fixture(scope="module")
def baseline(parts):
    """The pipeline's own output with no checker: (2, 3, H, W) in [0, 1]."""
    return run(sd_pipe(parts)).images


def mixed_rule(detector_dir, images: torch.Tensor) -> SimpleNamespace:
    """A medium threshold halfway between the scores of a batch of two: exactly one is flagged."""
    medium = load_detector(str(detector_dir), device="cpu").predict(images).levels[:, 2]
    assert abs(float(medium[0] - medium[1])) > 0.02, medium  # the fixture must spread the two images
    flags = (medium > medium.mean()).tolist()
    return SimpleNamespace(threshold=float(medium.mean()), flags=flags, hit=flags.index(True), clean=flags.index(False))


@pytest.fixture(scope="module")
def mixed(eva_dir, baseline):
    return mixed_rule(eva_dir, baseline)


def as_nchw(images, output_type: str) -> torch.Tensor:
    if output_type == "pil":
        return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
    if output_type == "np":
        return torch.from_numpy(images).permute(0, 3, 1, 2)
    return images


# --- the drop-in ------------------------------------------------------------------------------

@pytest.mark.parametrize("output_type, action", [("pt", "black"), ("np", "blur"), ("pil", "pixelate")])
def test_dropin_censors_flagged_in_true_colours_and_keeps_the_rest(parts, baseline, eva_dir, mixed, output_type,
                                                                    action):
    checker = NSFWSafetyChecker.from_pretrained(str(eva_dir), level="medium", threshold=mixed.threshold,
                                                action=action, device="cpu")
    out = run(sd_pipe(parts, checker, checker.feature_extractor), output_type)
    assert out.nsfw_content_detected == mixed.flags
    got = as_nchw(out.images, output_type)
    hit, clean = baseline[mixed.hit : mixed.hit + 1], baseline[mixed.clean : mixed.clean + 1]
    censored = {"black": torch.zeros_like(hit), "blur": blur(hit), "pixelate": pixelate(hit)}[action]
    if output_type == "pil":  # the pipeline's own uint8 conversion of the expected pictures
        assert torch.equal(got[mixed.clean], as_nchw(VaeImageProcessor.numpy_to_pil(
            clean.permute(0, 2, 3, 1).numpy()), "pil")[0])
        assert (got[mixed.hit].float() - (censored[0] * 255).round()).abs().max() <= 1
    else:
        assert torch.equal(got[mixed.clean], clean[0])  # value for value
        assert torch.allclose(got[mixed.hit], censored[0], atol=1e-5)
    if action == "black":
        assert bool(got[mixed.hit].eq(0).all())
    result = checker.last_result
    assert result.flagged == mixed.flags and result.scores.levels.shape == (2, 4)
    assert result.actions[mixed.hit] == action and result.actions[mixed.clean] == "none"
    assert result.reasons[mixed.hit].startswith("medium ") and ">=" in result.reasons[mixed.hit]


def test_dropin_last_result_is_none_after_a_latent_call(parts, eva_nsfw_dir):
    checker = NSFWSafetyChecker.from_pretrained(str(eva_nsfw_dir), action="black", device="cpu")
    pipe = sd_pipe(parts, checker, checker.feature_extractor)
    assert run(pipe, steps=1).nsfw_content_detected == [True, True] and checker.last_result.flagged == [True, True]
    out = run(pipe, "latent", steps=1)
    assert out.nsfw_content_detected is None and checker.last_result is None  # not the previous call's
    run(pipe, "np", steps=1)
    assert checker.last_result.flagged == [True, True]


def test_checker_contract_without_a_pipeline(eva_nsfw_dir, eva_safe_dir):
    # numpy pipelines (T2I-Adapter, text-to-video-zero) pass (B, H, W, 3) in [0, 1]
    nsfw = NSFWSafetyChecker.from_pretrained(str(eva_nsfw_dir), action="black", device="cpu")
    arr = np.random.default_rng(0).random((2, SIZE, SIZE, 3), dtype=np.float32)
    out, flags = nsfw(images=arr.copy(), clip_input=None)
    assert flags == [True, True] and isinstance(out, np.ndarray) and out.shape == arr.shape and not out.any()
    # nothing flagged: the very same tensor comes back
    safe = NSFWSafetyChecker.from_pretrained(str(eva_safe_dir), action="black", device="cpu")
    x = torch.rand(2, 3, SIZE, SIZE) * 2.4 - 1.2  # VAE output overshoots [-1, 1]
    out, flags = safe(images=x, clip_input=torch.zeros(2, 3, 8, 8))
    assert out is x and flags == [False, False]
    # fail closed: a non-finite image is flagged and blacked out, in [0, 1], whatever the model says
    bad = x.clone()
    bad[1, 0, 3, 3] = float("nan")
    out, flags = safe(images=bad)
    assert flags == [False, True] and safe.last_result.reasons[1] == "non-finite input"
    assert torch.equal(out[0], bad[0]) and bool(out[1].eq(0).all())
    with pytest.raises(TypeError, match="numpy array"):
        safe(images=[x[0]])


def test_checker_from_a_detector_or_a_filter(eva_dir):
    detector = load_detector(str(eva_dir), device="cpu")
    plain = NSFWSafetyChecker(detector)
    assert plain.guard.detector is detector and plain.guard.policy.rules == {"medium": 0.5}
    assert plain.guard.action == "blur" and plain.config.action == "blur"
    tuned = NSFWSafetyChecker(detector, level="high", action="black", thresholds=None, color=(0.5, 0.5, 0.5))
    assert tuned.guard.policy.rules == {"high": 0.5} and tuned.guard.action == "black"
    assert tuned.guard.options["color"] == (0.5, 0.5, 0.5) and tuned.config.level == "high"
    positional = NSFWSafetyChecker(detector, "low", 0.25)
    assert positional.guard.policy.rules == {"low": 0.25}
    ready = SafetyFilter(detector, "high", 0.3, action="pixelate")
    assert NSFWSafetyChecker(ready).guard is ready
    x = torch.rand(2, 3, SIZE, SIZE)
    assert torch.equal(NSFWSafetyChecker(detector, "high", 0.3, action="pixelate").check(x).images, ready(x).images)
    with pytest.raises(TypeError, match=r"settings \['action'\] cannot be combined with a ready SafetyFilter"):
        NSFWSafetyChecker(ready, action="black")
    with pytest.raises(TypeError, match="cannot be combined"):
        NSFWSafetyChecker(ready, "low")
    with pytest.raises(ValueError, match="action must be one of"):
        NSFWSafetyChecker(detector, action="smudge")
    with pytest.raises(TypeError, match="guard must be a SafetyFilter or a Detector, got str"):
        NSFWSafetyChecker("eva")


# --- device and dtype ---------------------------------------------------------------------------

def test_follows_the_pipeline_device_but_keeps_its_compute_dtype(eva_dir):
    checker = NSFWSafetyChecker.from_pretrained(str(eva_dir), device="cpu")
    pipe = sd_pipe(sd_parts(), checker, checker.feature_extractor)  # own parts: this test casts them
    assert checker.dtype == checker.compute_dtype == torch.float32  # fp32 on the CPU
    pipe.to(torch.float16)
    # pipe.dtype reads safety_checker (first in name order): it reports the pipeline's dtype...
    assert pipe.unet.dtype == pipe.dtype == checker.dtype == torch.float16 and pipe.device.type == "cpu"
    # ...while the detector keeps computing in fp32
    assert checker.compute_dtype == checker.guard.detector.dtype == torch.float32 and checker.device.type == "cpu"
    pipe.to("cpu", torch.bfloat16)
    assert checker.dtype == torch.bfloat16 and checker.compute_dtype == torch.float32
    pinned = NSFWSafetyChecker.from_pretrained(str(eva_dir), device="cpu", dtype="bf16")
    pinned.to(torch.float16)
    assert pinned.compute_dtype == torch.bfloat16 and pinned.config.compute_dtype == "bfloat16"
    levels = pinned.check(torch.rand(1, 3, SIZE, SIZE)).scores.levels
    assert levels.dtype == torch.float32 and torch.isfinite(levels).all()


def test_moving_one_pipeline_leaves_another_with_the_same_checkpoint(parts, baseline, eva_dir, mixed):
    kwargs = dict(threshold=mixed.threshold, action="black", device="cpu")
    a, b = (NSFWSafetyChecker.from_pretrained(str(eva_dir), **kwargs) for _ in range(2))
    pipe_a = sd_pipe(sd_parts(), a, a.feature_extractor)  # own parts: this test moves them
    pipe_b = sd_pipe(parts, b, b.feature_extractor)
    expected = run(pipe_b).images
    assert a.guard.detector is not b.guard.detector and a.classifier is not b.classifier
    pipe_a.to("meta")  # what pipe_a.to("cuda:1") does to the weights: they leave the CPU
    a.guard.detector.to(dtype=torch.bfloat16)  # and a host casting a's detector behind its back
    assert a.device.type == "meta" and a.compute_dtype == torch.bfloat16
    assert b.device.type == "cpu" and b.compute_dtype == torch.float32 and pipe_b.device.type == "cpu"
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in b.classifier.parameters())
    out = run(pipe_b)
    assert out.nsfw_content_detected == mixed.flags and torch.equal(out.images, expected)


@pytest.mark.parametrize("zero_copy", [False, True])
def test_model_cpu_offload_leaves_the_checker_working(baseline, eva_dir, mixed, zero_copy):
    checker = NSFWSafetyChecker.from_pretrained(str(eva_dir), threshold=mixed.threshold, action="black", device="cpu")
    pipe = sd_pipe(sd_parts(), checker, checker.feature_extractor)  # own parts: offloading hooks them
    pipe.enable_model_cpu_offload(device="cpu")  # accelerate's hooks, with the CPU standing in for the GPU
    assert all(hasattr(m, "_hf_hook") for m in (pipe.text_encoder, pipe.unet, pipe.vae))
    assert not hasattr(checker, "_hf_hook")  # excluded from offloading: moved to the device, no hook
    if zero_copy:
        attach(pipe, checker)
    out = run(pipe)
    assert out.nsfw_content_detected == mixed.flags and checker.last_result.flagged == mixed.flags
    assert torch.equal(out.images[mixed.clean], baseline[mixed.clean]) and bool(out.images[mixed.hit].eq(0).all())


# --- zero-copy -----------------------------------------------------------------------------------

@pytest.fixture
def spies(monkeypatch):
    """Count feature-extractor calls and record the output_type of each image_processor.postprocess."""
    calls = SimpleNamespace(feature_extractor=0, postprocess=[])
    original = CLIPImageProcessor.__call__

    def counting(self, *args, **kwargs):
        calls.feature_extractor += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CLIPImageProcessor, "__call__", counting)

    def watch(pipe):
        postprocess = pipe.image_processor.postprocess

        def recording(image, output_type="pil", *args, **kwargs):
            calls.postprocess.append(output_type)
            return postprocess(image, output_type, *args, **kwargs)

        pipe.image_processor.postprocess = recording
        return calls

    return watch


def test_zero_copy_skips_pil_and_the_feature_extractor(parts, eva_dir, mixed, spies):
    checker = NSFWSafetyChecker.from_pretrained(str(eva_dir), threshold=mixed.threshold, action="blur", device="cpu")
    pipe = sd_pipe(parts, checker, checker.feature_extractor)
    calls = spies(pipe)
    dropin = run(pipe)
    assert calls.feature_extractor == 1 and calls.postprocess == ["pil", "pt"]  # the default path
    calls.feature_extractor, calls.postprocess = 0, []
    assert attach(pipe, checker) is checker and pipe.nsfw_safety is checker
    zero = run(pipe)
    assert calls.feature_extractor == 0 and calls.postprocess == ["pt"]  # only the final one
    assert zero.nsfw_content_detected == dropin.nsfw_content_detected == mixed.flags
    assert torch.equal(zero.images, dropin.images)
    assert checker.last_result.flagged == mixed.flags
    detach(pipe)
    assert "run_safety_checker" not in vars(pipe) and pipe.safety_checker is checker
    with pytest.raises(ValueError, match="no nsfw-safety checker"):
        detach(pipe)


def test_img2img_zero_copy_flags_everything_with_a_biased_detector(parts, eva_nsfw_dir, spies):
    pipe = sd_pipe(parts, cls=StableDiffusionImg2ImgPipeline)  # built with neither checker nor extractor
    calls = spies(pipe)
    checker = attach(pipe, model=str(eva_nsfw_dir), action="black", device="cpu")
    assert pipe.safety_checker is checker and isinstance(pipe.feature_extractor, CLIPImageProcessor)
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    out = run(pipe, "np", steps=3, image=[init, init], strength=0.7)
    assert out.nsfw_content_detected == [True, True] and out.images.shape == (2, SIZE, SIZE, 3)
    assert not out.images.any()  # black, exactly 0
    assert calls.feature_extractor == 0 and calls.postprocess == ["np"]
    assert [r.startswith("medium 1.00 >=") for r in checker.last_result.reasons] == [True, True]


# --- pipelines without a safety_checker ---------------------------------------------------------

def sdxl_pipe() -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=SIZE // 2, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=2, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16)
    pipe = StableDiffusionXLPipeline(
        vae=vae(), text_encoder=text_encoder(), text_encoder_2=text_encoder(CLIPTextModelWithProjection),
        tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_guard_censors_before_postprocess_and_warns_once_on_latents(eva_dir, spies, caplog):
    pipe = sdxl_pipe()
    plain = run(pipe).images
    rule = mixed_rule(eva_dir, plain)
    checker = attach(pipe, model=str(eva_dir), threshold=rule.threshold, action="black", device="cpu")
    calls = spies(pipe)
    out = run(pipe, "np")
    assert calls.postprocess == ["np"]
    got = torch.from_numpy(out.images).permute(0, 3, 1, 2)
    assert torch.equal(got[rule.clean], plain[rule.clean]) and bool(got[rule.hit].eq(0).all())
    assert pipe.nsfw_safety is checker and checker.last_result.flagged == rule.flags
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nsfw_safety.diffusers"):
        latents = run(pipe, "latent", steps=1).images
        run(pipe, "latent", steps=1)
    assert latents.shape == (2, 4, SIZE // 2, SIZE // 2) and checker.last_result is None
    assert [r.message for r in caplog.records] == [
        "a StableDiffusionXLPipeline call was not checked by nsfw-safety: output_type='latent' is never "
        "checked (decode the latents and check the images yourself)"]  # once, for two calls
    detach(pipe)
    assert "postprocess" not in vars(pipe.image_processor) and "maybe_free_model_hooks" not in vars(pipe)


def test_attach_refuses_what_it_cannot_guard(eva_dir):
    detector = load_detector(str(eva_dir), device="cpu")
    with pytest.raises(TypeError, match="cannot attach to SimpleNamespace"):
        attach(SimpleNamespace(maybe_free_model_hooks=lambda: None), detector)
    with pytest.raises(TypeError, match="cannot be combined"):
        attach(SimpleNamespace(), SafetyFilter(detector), level="high")
    with pytest.raises(TypeError, match="checker_or_filter must be"):
        attach(SimpleNamespace(), "eva")


# --- saving --------------------------------------------------------------------------------------

def test_save_and_reload_restores_the_checker_and_its_settings(parts, eva_dir, tmp_path):
    checker = NSFWSafetyChecker.from_pretrained(str(eva_dir), level="high", threshold=0.3, action="pixelate",
                                                block=0.25, color=(0.2, 0.4, 0.6), device="cpu")
    pipe = sd_pipe(parts)
    attach(pipe, checker)  # a pipeline built without a feature extractor gets the light one
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["safety_checker"] == ["nsfw_safety.diffusers", "NSFWSafetyChecker"]
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    saved = tmp_path / "safety_checker"
    assert (saved / "detector" / "model.safetensors").read_bytes() == (eva_dir / "model.safetensors").read_bytes()
    config = json.loads((saved / "config.json").read_text())
    assert config["_class_name"] == "NSFWSafetyChecker" and config["model"] == str(eva_dir)
    assert (config["level"], config["threshold"], config["action"], config["block"]) == ("high", 0.3, "pixelate", 0.25)

    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, dtype=torch.float16)
    again = loaded.safety_checker
    assert isinstance(again, NSFWSafetyChecker) and isinstance(loaded.feature_extractor, CLIPImageProcessor)
    assert again.guard.policy.rules == {"high": 0.3} and again.guard.action == "pixelate"
    assert again.guard.censoring.block == 0.25 and again.guard.censoring.color == (0.2, 0.4, 0.6)
    assert again.guard.options["block"] == 0.25  # the 0.1 name still works
    assert loaded.unet.dtype == loaded.dtype == torch.float16 and again.compute_dtype == torch.float32
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    assert torch.equal(again.check(x).scores.levels, checker.check(x).scores.levels)
    # saved again in place, and loaded directly, with a setting overridden
    again.save_pretrained(saved)
    third = NSFWSafetyChecker.from_pretrained(saved, action="black", device="cpu")
    assert third.guard.policy.rules == {"high": 0.3} and third.guard.action == "black"
    assert third.config.model == str(eva_dir)


def test_dropin_into_a_repo_that_names_the_default_checker(parts, eva_dir, tmp_path):
    # a pipeline laid out like the SD 1.5 repo: the CLIP checker's slot and a real feature extractor
    sd_pipe(parts, feature_extractor=CLIPImageProcessor()).save_pretrained(tmp_path)
    index_file = tmp_path / "model_index.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps(index | {"safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"]}))
    checker = NSFWSafetyChecker.from_pretrained(str(eva_dir), device="cpu")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=checker)
    assert pipe.safety_checker is checker
    assert pipe.feature_extractor.crop_size == {"height": 224, "width": 224}  # the repo's own (IP-Adapter)


# --- GPU --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_pipeline_on_cuda_checks_in_bf16_and_offloads(eva_nsfw_dir):
    checker = NSFWSafetyChecker.from_pretrained(str(eva_nsfw_dir), action="black", device="cpu")
    pipe = sd_pipe(sd_parts(), checker, checker.feature_extractor).to("cuda", torch.float16)
    assert checker.device.type == "cuda" and checker.compute_dtype == torch.bfloat16 and pipe.dtype == torch.float16
    attach(pipe, checker)
    out = run(pipe)
    assert out.nsfw_content_detected == [True, True] and out.images.device.type == "cuda"
    assert checker.last_result.scores.levels.device.type == "cuda" and not out.images.any()
    detach(pipe)
    pipe.to("cpu")
    pipe.enable_model_cpu_offload()
    out = run(pipe)
    assert checker.device.type == "cuda" and out.nsfw_content_detected == [True, True]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("zero_copy", [False, True])
def test_sequential_cpu_offload_on_cuda(baseline, eva_dir, mixed, zero_copy):
    checker = NSFWSafetyChecker.from_pretrained(str(eva_dir), threshold=mixed.threshold, action="black", device="cpu",
                                                dtype="fp32")  # the precision the mixed threshold was set in
    pipe = sd_pipe(sd_parts(), checker, checker.feature_extractor)
    pipe.enable_sequential_cpu_offload()
    assert checker.device.type == "cuda" and not hasattr(checker, "_hf_hook")  # moved whole, not hooked
    if zero_copy:
        attach(pipe, checker)
    out = run(pipe)
    assert out.nsfw_content_detected == mixed.flags and checker.last_result.scores.levels.device.type == "cuda"
    images = out.images.cpu()
    assert bool(images[mixed.hit].eq(0).all())
    # the same picture as on the CPU, up to CUDA arithmetic (TF32 convolutions)
    torch.testing.assert_close(images[mixed.clean], baseline[mixed.clean], atol=1e-2, rtol=0)
