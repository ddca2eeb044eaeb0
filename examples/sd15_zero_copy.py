"""Stable Diffusion 1.5 in zero-copy mode: the decoded tensor goes straight to the checker.

No PIL conversion, no CLIP feature extractor, no GPU-to-CPU copy before the final postprocess.
With the ``diffusers`` extra installed (README, "Install"):

    python examples/sd15_zero_copy.py "a red bicycle against a yellow wall"
    python examples/sd15_zero_copy.py --model ./nsfw_image_detector --pipeline ./sd15 "a red bicycle"   # offline

``--model`` is the detector (a registry name or a local checkpoint directory), ``--pipeline`` the
SD 1.5 hub id or a local copy of it.
"""

import argparse

import torch
from diffusers import StableDiffusionPipeline

from nsfw_safety.diffusers import attach

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("prompt", nargs="?", default="a red bicycle against a yellow wall")
parser.add_argument("--model", default="eva", help="detector: registry name, hub id or local checkpoint directory")
parser.add_argument("--pipeline", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                    help="Stable Diffusion 1.5: hub id or local directory")
parser.add_argument("--steps", type=int, default=30, help="denoising steps")
args = parser.parse_args()
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32

pipe = StableDiffusionPipeline.from_pretrained(args.pipeline, dtype=dtype).to(device)
checker = attach(pipe, model=args.model, level="medium", threshold=0.5, action="pixelate")  # replaces the CLIP checker

# (4, 3, 512, 512) in [0, 1], on the GPU
out = pipe([args.prompt] * 4, num_inference_steps=args.steps, output_type="pt")
print("images:", tuple(out.images.shape), out.images.device)
for flagged, reason, scores in zip(out.nsfw_content_detected, checker.last_result.reasons,
                                   checker.last_result.scores.to_dicts()):
    print("pixelated" if flagged else "ok       ", reason, {k: round(v, 3) for k, v in scores["levels"].items()})
