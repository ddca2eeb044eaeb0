"""Stable Diffusion 1.5 with nsfw-safety as its safety_checker.

Flagged images come back blurred (not black), and the scores of each call are on the checker.
With the ``diffusers`` extra installed (README, "Install"):

    python examples/sd15_dropin.py "a lighthouse on a cliff at dawn"
    python examples/sd15_dropin.py --model ./nsfw_image_detector --pipeline ./sd15 "a lighthouse"   # offline

``--model`` is the detector: a registry name (``eva``, fetched once into the Hugging Face cache)
or a local checkpoint directory, such as ``hf download Freepik/nsfw_image_detector --local-dir
nsfw_image_detector`` makes. ``--pipeline`` is the SD 1.5 hub id or a local copy of it.
"""

import argparse

import torch
from diffusers import StableDiffusionPipeline

from nsfw_safety.diffusers import NSFWSafetyChecker

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("prompt", nargs="?", default="a lighthouse on a cliff at dawn")
parser.add_argument("--model", default="eva", help="detector: registry name, hub id or local checkpoint directory")
parser.add_argument("--pipeline", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                    help="Stable Diffusion 1.5: hub id or local directory")
parser.add_argument("--steps", type=int, default=30, help="denoising steps")
args = parser.parse_args()
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32

checker = NSFWSafetyChecker.from_pretrained(args.model, level="medium", threshold=0.5, action="blur")
# Only safety_checker is replaced: the repo's own feature extractor stays (IP-Adapter needs it).
pipe = StableDiffusionPipeline.from_pretrained(args.pipeline, safety_checker=checker, dtype=dtype)
pipe = pipe.to(device, dtype)  # the checker follows the device, and keeps computing in bf16 on CUDA

out = pipe([args.prompt] * 2, num_inference_steps=args.steps, generator=torch.Generator(device).manual_seed(0))
result = checker.last_result
for i, (image, flagged) in enumerate(zip(out.images, out.nsfw_content_detected)):
    image.save(f"sd15_dropin_{i}.png")
    print(f"sd15_dropin_{i}.png: {'blurred' if flagged else 'ok'} ({result.reasons[i]})")
