"""Tiny random checkpoints in the real on-disk formats, for tests (never committed).

* ``write_eva``: a transformers TimmWrapper checkpoint of timm's ``eva02_base_patch14_448``
  architecture with small ``model_args`` (``config.json`` with ``pretrained_cfg`` + bf16
  ``model.safetensors``), like Freepik/nsfw_image_detector.
* ``write_vit``: a ``ViTForImageClassification`` checkpoint plus ``preprocessor_config.json``,
  like the AdamCodd and Falconsai models.

``bias="nsfw"`` forces the top class (always flagged), ``bias="safe"`` the safe class (never
flagged); ``probs=`` forces the class probabilities of every image to the given ones (up to the
rounding of the stored weights); otherwise the head is scaled up so probabilities spread over (0, 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _set_head(weight: torch.Tensor, bias_param: torch.Tensor, bias: str | None, nsfw_index: int,
              safe_index: int, scale: float, logits_of=None, probs=None) -> None:
    """Scale the head up; then either force one class or the given class probabilities, or centre
    the logits of random images (``logits_of(x)``) so that every class wins for some inputs."""
    with torch.no_grad():
        weight.mul_(scale)
        if probs is not None:  # logits log(p) whatever the image: softmax gives p back
            weight.zero_()
            bias_param.copy_(torch.tensor(probs, dtype=torch.float64).log())
        elif bias is None and logits_of is not None:
            g = torch.Generator().manual_seed(1)
            bias_param.sub_(logits_of(torch.rand(16, 3, 64, 64, generator=g) * 4 - 2).mean(0))
        if bias == "nsfw":
            weight.zero_()
            bias_param.zero_()
            bias_param[nsfw_index] = 30.0
        elif bias == "safe":
            weight.zero_()
            bias_param.zero_()
            bias_param[safe_index] = 30.0


def write_eva(path: Path, *, img_size: int = 56, embed_dim: int = 32, depth: int = 2, num_heads: int = 2,
              bias: str | None = None, scale: float = 30.0, seed: int = 0, full: bool = False,
              probs: tuple[float, float, float, float] | None = None) -> Path:
    """Write a TimmWrapper EVA02 checkpoint to ``path``; ``full=True`` keeps the real B/448 size;
    ``probs``: (neutral, low, medium, high) for every image."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    torch.manual_seed(seed)
    model_args = {} if full else {"img_size": img_size, "embed_dim": embed_dim, "depth": depth,
                                  "num_heads": num_heads}
    size = 448 if full else img_size
    # id2label: every transformers with TimmWrapper model_args (4.53+) saves it as label_names
    config = TimmWrapperConfig(architecture="eva02_base_patch14_448",
                               id2label=dict(enumerate(["neutral", "low", "medium", "high"])), model_args=model_args)
    model = TimmWrapperForImageClassification(config)
    head = model.timm_model.head
    resize = lambda x: torch.nn.functional.interpolate(x, size=(size, size))  # noqa: E731
    # centring the full model's logits would cost 16 full forwards: it is only smoke-tested
    _set_head(head.weight, head.bias, bias, 3, 0, scale, None if full else lambda x: model.timm_model(resize(x)),
              probs)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    cfg_file = Path(path) / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["pretrained_cfg"] = {  # as timm writes it when pushing to the hub
        "architecture": "eva02_base_patch14_448", "input_size": [3, size, size], "fixed_input_size": True,
        "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "squash", "mean": CLIP_MEAN, "std": CLIP_STD,
        "num_classes": 4, "classifier": "head", "license": "mit",
    }
    cfg_file.write_text(json.dumps(cfg, indent=2))
    return Path(path)


def write_vit(path: Path, *, labels: tuple[str, str] = ("sfw", "nsfw"), image_size: int = 32,
              patch_size: int = 8, hidden_size: int = 32, layers: int = 2, heads: int = 2,
              bias: str | None = None, scale: float = 100.0, seed: int = 0, resample: int = 2,
              p_nsfw: float | None = None, intermediate_size: int | None = None) -> Path:
    """Write a ViTForImageClassification checkpoint and its ``preprocessor_config.json``;
    ``p_nsfw``: the nsfw probability of every image; ``intermediate_size``: the MLP width
    (default 2 * hidden_size; a real ViT-B/16 has 3072 for 768)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=intermediate_size or 2 * hidden_size,
                       id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    model = ViTForImageClassification(config)
    nsfw = [i for i, n in enumerate(labels) if n == "nsfw"][0]
    resize = lambda x: torch.nn.functional.interpolate(x, size=(image_size, image_size))  # noqa: E731
    probs = None
    if p_nsfw is not None:
        probs = [0.0, 0.0]
        probs[nsfw], probs[1 - nsfw] = p_nsfw, 1.0 - p_nsfw
    _set_head(model.classifier.weight, model.classifier.bias, bias, nsfw, 1 - nsfw, scale,
              lambda x: model(pixel_values=resize(x)).logits, probs)
    model.save_pretrained(path, safe_serialization=True)
    ViTImageProcessor(size={"height": image_size, "width": image_size}, resample=resample,
                      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(path)
    return Path(path)
