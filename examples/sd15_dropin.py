"""Stable Diffusion 1.5 with nsfw-safety as its safety_checker.

Flagged images come back blurred (not black), and the scores of each call are on the checker.

    pip install "nsfw-safety[diffusers]"
    python examples/sd15_dropin.py "a lighthouse on a cliff at dawn"
"""

import sys

import torch
from diffusers import StableDiffusionPipeline

from nsfw_safety.diffusers import NSFWSafetyChecker

MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
prompt = sys.argv[1] if len(sys.argv) > 1 else "a lighthouse on a cliff at dawn"
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32

checker = NSFWSafetyChecker.from_pretrained("eva", level="medium", threshold=0.5, action="blur")
# Only safety_checker is replaced: the repo's own feature extractor stays (IP-Adapter needs it).
pipe = StableDiffusionPipeline.from_pretrained(MODEL_ID, safety_checker=checker, torch_dtype=dtype)
pipe = pipe.to(device, dtype)  # the checker follows the device, and keeps computing in bf16 on CUDA

out = pipe([prompt] * 2, num_inference_steps=30, generator=torch.Generator(device).manual_seed(0))
result = checker.last_result
for i, (image, flagged) in enumerate(zip(out.images, out.nsfw_content_detected)):
    image.save(f"sd15_dropin_{i}.png")
    print(f"sd15_dropin_{i}.png: {'blurred' if flagged else 'ok'} ({result.reasons[i]})")
