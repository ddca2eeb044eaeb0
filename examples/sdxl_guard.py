"""SDXL has no safety_checker: attach() guards it at its final postprocess.

    pip install "nsfw-safety[diffusers]"
    python examples/sdxl_guard.py "an astronaut riding a horse, oil painting"
"""

import sys

import torch
from diffusers import StableDiffusionXLPipeline

from nsfw_safety.diffusers import attach

MODEL_ID = "stabilityai/stable-diffusion-xl-base-1.0"
prompt = sys.argv[1] if len(sys.argv) > 1 else "an astronaut riding a horse, oil painting"
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32

pipe = StableDiffusionXLPipeline.from_pretrained(MODEL_ID, torch_dtype=dtype, use_safetensors=True).to(device)
checker = attach(pipe, thresholds={"medium": 0.5, "high": 0.3}, action="blur")

image = pipe(prompt, num_inference_steps=30).images[0]  # censored before it became a PIL image
result = checker.last_result
image.save("sdxl_guard.png")
print("sdxl_guard.png:", "blurred" if result.flagged[0] else "ok", f"({result.reasons[0]})")
