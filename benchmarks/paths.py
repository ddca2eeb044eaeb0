"""The measured paths, each built from random weights of a real architecture.

Every path is a :class:`Path`: ``make_input(batch)`` makes fresh random images in the form the
path starts from (outside the timed region), ``run(inputs)`` does the whole check up to scores
or flags on the device.

* (a)/(b) ``lib``: this library, from decoded tensors ``(B, 3, S, S)`` in [-1, 1] on the device,
  ``Detector.predict(x, value_range=(-1, 1))``; eager or ``torch.compile``.
* (c) ``freepik``: the EVA authors' own package, ``nsfw-image-detector`` from the index (the
  ``bench`` extra): its ``NSFWDetector`` built from the checkpoint directory (transformers loads a
  local folder, so nothing is downloaded), scoring PIL images with ``predict_proba``: timm's eval
  transform per image, stack, the transformers TimmWrapper model; bf16 by default, on any device.
* (d) ``hf_pipeline``: ``transformers.pipeline("image-classification")`` on PIL images.
* (e) ``clip_checker``: diffusers' ``StableDiffusionSafetyChecker`` fed exactly as
  ``StableDiffusionPipeline.run_safety_checker`` feeds it (decoded tensor -> PIL ->
  ``CLIPImageProcessor`` -> checker).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path as FsPath
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from nsfw_safety import LEVELS, load_detector
from nsfw_safety.detector import resolve_dtype


@dataclass
class Path:
    key: str  # short id in the JSON, e.g. "a_eager"
    label: str  # row name in the table
    dtype: torch.dtype
    make_input: Callable[[int], Any]
    run: Callable[[Any], Any]
    module: torch.nn.Module | None = None  # the weights the path holds on the device
    default: bool = False  # the path as its users get it: the dtype it picks by itself


def decoded(batch: int, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Fresh random "VAE output": (B, 3, size, size) in [-1, 1] on ``device``."""
    return torch.rand(batch, 3, size, size, device=device, dtype=dtype) * 2 - 1


def pil_images(batch: int, size: int) -> list[Image.Image]:
    """Fresh random RGB images, size x size, as decoded images become PIL."""
    rng = np.random.default_rng()
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB") for _ in range(batch)]


def lib_path(key: str, label: str, checkpoint: FsPath, device: torch.device, dtype: torch.dtype, size: int,
             max_batch: int, compile: bool | str = False) -> Path:
    """(a)/(b): the library's tensor path; inputs are decoded tensors in the compute dtype."""
    det = load_detector(str(checkpoint), device=device, dtype=dtype, compile=compile, max_batch_size=max_batch)
    default = dtype == resolve_dtype("auto", device) and not compile
    return Path(key, label + (" (default)" if default else ""), dtype, lambda b: decoded(b, size, device, dtype),
                lambda x: det.predict(x, value_range=(-1.0, 1.0)).probs, det.model, default)


def freepik_detector(checkpoint: FsPath, device: torch.device, dtype: torch.dtype | None):
    """Freepik's ``NSFWDetector`` on the checkpoint directory; ``dtype=None`` keeps its default."""
    from nsfw_image_detector import NSFWDetector

    kwargs = {} if dtype is None else {"dtype": dtype}
    return NSFWDetector(model_name=str(checkpoint), device=str(device), **kwargs)


def freepik_path(checkpoint: FsPath, device: torch.device, dtype: torch.dtype | None, size: int) -> Path:
    """(c): Freepik's package, on its defaults (``dtype=None``) or in ``dtype``."""
    from importlib.metadata import version

    det = freepik_detector(checkpoint, device, dtype)
    label = f"(c) Freepik nsfw-image-detector {version('nsfw-image-detector')}, {_name(det.dtype)}"
    return Path("c_freepik", label + (" (its default)" if dtype is None else ""), det.dtype,
                lambda b: pil_images(b, size), det.predict_proba, det.model, dtype is None)


def freepik_levels(scores: list[dict]) -> torch.Tensor:
    """``predict_proba``'s dicts (keyed by its ``NSFWLevel``) -> (B, 4) levels in ``LEVELS`` order."""
    return torch.tensor([[{k.value: v for k, v in d.items()}[level] for level in LEVELS] for d in scores])


def hf_pipeline_path(checkpoint: FsPath, device: torch.device, dtype: torch.dtype, size: int) -> Path:
    """(d): transformers' image-classification pipeline (TimmWrapper + TimmWrapperImageProcessor)."""
    from transformers import pipeline

    pipe = pipeline("image-classification", model=str(checkpoint), device=device, dtype=dtype)
    labels = len(pipe.model.config.label_names)
    return Path("d_hf_pipeline", f"(d) transformers pipeline, {_name(dtype)}", dtype,
                lambda b: pil_images(b, size), lambda ims: pipe(ims, batch_size=len(ims), top_k=labels), pipe.model)


def clip_checker_config(tiny: bool):
    """SD's safety checker: CLIP ViT-L/14 at 224 and a 768-d projection; or a tiny one."""
    from transformers import CLIPConfig

    if tiny:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      patch_size=8, image_size=32)
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        return CLIPConfig(vision_config=vision, text_config=text, projection_dim=16), 32
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  patch_size=14, image_size=224)
    return CLIPConfig(vision_config=vision, text_config={}, projection_dim=768), 224


def clip_checker(device: torch.device, dtype: torch.dtype, tiny: bool):
    """diffusers' default checker with random weights, and its feature extractor."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    config, res = clip_checker_config(tiny)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config).to(device, dtype).eval()
    # SD's preprocessor_config.json: shortest edge to `res` (bicubic), center crop, CLIP mean/std
    extractor = CLIPImageProcessor(size={"shortest_edge": res}, crop_size={"height": res, "width": res})
    return checker, extractor


def clip_checker_path(device: torch.device, dtype: torch.dtype, size: int, tiny: bool) -> Path:
    """(e): run_safety_checker's own code, on a stand-in holding the three components it reads."""
    from diffusers import StableDiffusionPipeline
    from diffusers.image_processor import VaeImageProcessor

    checker, extractor = clip_checker(device, dtype, tiny)
    host = SimpleNamespace(safety_checker=checker, feature_extractor=extractor,
                           image_processor=VaeImageProcessor(vae_scale_factor=8))

    def run(x: torch.Tensor):
        with torch.inference_mode():
            return StableDiffusionPipeline.run_safety_checker(host, x, device, dtype)

    return Path("e_clip_checker", f"(e) diffusers CLIP checker, {_name(dtype)}", dtype,
                lambda b: decoded(b, size, device, dtype), run, checker)


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
