"""SDXL has no safety_checker: attach() guards it at its final postprocess.

With the ``diffusers`` extra installed (README, "Install"):

    python examples/sdxl_guard.py "an astronaut riding a horse, oil painting"
    python examples/sdxl_guard.py --model ./nsfw_image_detector --pipeline ./sdxl "an astronaut"   # offline

``--model`` is the detector (a registry name or a local checkpoint directory), ``--pipeline`` the
SDXL hub id or a local copy of it.
"""

import argparse

import torch
from diffusers import StableDiffusionXLPipeline

from nsfw_safety.diffusers import attach

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("prompt", nargs="?", default="an astronaut riding a horse, oil painting")
parser.add_argument("--model", default="eva", help="detector: registry name, hub id or local checkpoint directory")
parser.add_argument("--pipeline", default="stabilityai/stable-diffusion-xl-base-1.0",
                    help="SDXL: hub id or local directory")
parser.add_argument("--steps", type=int, default=30, help="denoising steps")
args = parser.parse_args()
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32

pipe = StableDiffusionXLPipeline.from_pretrained(args.pipeline, dtype=dtype, use_safetensors=True).to(device)
checker = attach(pipe, model=args.model, thresholds={"medium": 0.5, "high": 0.3}, action="blur")

image = pipe(args.prompt, num_inference_steps=args.steps).images[0]  # censored before it became a PIL image
result = checker.last_result
image.save("sdxl_guard.png")
print("sdxl_guard.png:", "blurred" if result.flagged[0] else "ok", f"({result.reasons[0]})")
