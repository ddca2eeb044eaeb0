"""Stable Diffusion 1.5 in zero-copy mode: the decoded tensor goes straight to the checker.

No PIL conversion, no CLIP feature extractor, no GPU-to-CPU copy before the final postprocess.

    pip install "nsfw-safety[diffusers]"
    python examples/sd15_zero_copy.py "a red bicycle against a yellow wall"
"""

import sys

import torch
from diffusers import StableDiffusionPipeline

from nsfw_safety.diffusers import attach

MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
prompt = sys.argv[1] if len(sys.argv) > 1 else "a red bicycle against a yellow wall"
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32

pipe = StableDiffusionPipeline.from_pretrained(MODEL_ID, torch_dtype=dtype).to(device)
checker = attach(pipe, level="medium", threshold=0.5, action="pixelate")  # replaces the CLIP checker

out = pipe([prompt] * 4, num_inference_steps=30, output_type="pt")  # (4, 3, 512, 512) in [0, 1], on the GPU
print("images:", tuple(out.images.shape), out.images.device)
for flagged, reason, scores in zip(out.nsfw_content_detected, checker.last_result.reasons,
                                   checker.last_result.scores.to_dicts()):
    print("pixelated" if flagged else "ok       ", reason, {k: round(v, 3) for k, v in scores["levels"].items()})
