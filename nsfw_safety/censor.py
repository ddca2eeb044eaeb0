"""Censoring kernels on batched tensors, on their own device.

Every function takes ``x: (N, 3, H, W) float in [0, 1]`` and returns a new tensor of the same
shape, dtype and device; strengths are fractions of the image size, so a 2048 px image is
hidden as well as a 512 px one.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .vocabulary import ACTIONS
#: Gaussian sigma as a fraction of the longer side: 41 px on 512 px; shapes become colour fields.
DEFAULT_BLUR = 0.08
#: Pixelation block as a fraction of the longer side: 43 px blocks on 512 px.
DEFAULT_BLOCK = 1 / 12


def _gaussian_kernel(sigma: float, device, dtype) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def blur(x: torch.Tensor, strength: float = DEFAULT_BLUR) -> torch.Tensor:
    """Gaussian blur with sigma = ``strength * max(H, W)``.

    Large sigmas are applied at a reduced resolution (downscale so the sigma is ~4 px,
    blur, upscale bilinearly): the same look at a small fraction of the cost.

    Args:
        x: (N, 3, H, W) float in [0, 1].
        strength: sigma as a fraction of the longer side, > 0.
    Returns:
        (N, 3, H, W), same dtype and device.
    """
    if strength <= 0:
        raise ValueError(f"blur strength must be > 0, got {strength}")
    H, W = x.shape[-2:]
    sigma = strength * max(H, W)
    factor = max(1, int(sigma // 4))
    y = x.float()
    if factor > 1:
        y = F.interpolate(y, size=(max(1, H // factor), max(1, W // factor)), mode="area")
        sigma /= factor
    k = _gaussian_kernel(sigma, y.device, y.dtype)
    r = (len(k) - 1) // 2
    c = y.shape[1]
    y = F.pad(y, (r, r, 0, 0), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.pad(y, (0, 0, r, r), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    if factor > 1:
        y = F.interpolate(y, size=(H, W), mode="bilinear", align_corners=False)
    return y.clamp(0, 1).to(x.dtype)


def pixelate(x: torch.Tensor, block: float = DEFAULT_BLOCK) -> torch.Tensor:
    """Mosaic of square blocks of side ``block * max(H, W)`` pixels (at least 2).

    Args:
        x: (N, 3, H, W) float in [0, 1].
    Returns:
        (N, 3, H, W): each block filled with its mean colour.
    """
    if not 0 < block <= 1:
        raise ValueError(f"pixelate block must be in (0, 1], got {block}")
    H, W = x.shape[-2:]
    side = max(2, round(block * max(H, W)))
    small = F.adaptive_avg_pool2d(x.float(), (math.ceil(H / side), math.ceil(W / side)))
    return F.interpolate(small, size=(H, W), mode="nearest").to(x.dtype)


def fill(x: torch.Tensor, color: Sequence[float] = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """A solid fill of ``color`` (three floats in [0, 1])."""
    c = check_color(color)
    return torch.tensor(c, device=x.device, dtype=x.dtype).view(1, 3, 1, 1).expand_as(x).clone()


def check_color(color: Sequence[float]) -> tuple[float, float, float]:
    try:
        c = tuple(float(v) for v in color)
    except TypeError:
        raise TypeError(f"fill colour must be three floats in [0, 1], got {color!r}") from None
    if len(c) != 3 or not all(0.0 <= v <= 1.0 for v in c):
        raise ValueError(f"fill colour must be three floats in [0, 1], got {color!r}")
    return c


def place(x: torch.Tensor, card: torch.Tensor) -> torch.Tensor:
    """Replace each image by ``card`` resized to fit inside it (aspect kept), on a background of
    the card's top-left colour.

    Args:
        x: (N, 3, H, W) float in [0, 1]; only its shape, dtype and device are used.
        card: (3, h, w) float in [0, 1].
    """
    H, W = x.shape[-2:]
    card = card.to(x.device, torch.float32)
    scale = min(H / card.shape[1], W / card.shape[2])
    h, w = max(1, round(card.shape[1] * scale)), max(1, round(card.shape[2] * scale))
    small = F.interpolate(card[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    out = card[:, :1, :1].view(1, 3, 1, 1).expand(1, 3, H, W).clone()
    top, left = (H - h) // 2, (W - w) // 2
    out[:, :, top : top + h, left : left + w] = small.clamp(0, 1)
    return out.expand(x.shape[0], -1, -1, -1).to(x.dtype).clone()


@functools.lru_cache(maxsize=1)
def default_card() -> torch.Tensor:
    """The built-in 'content hidden' card: (3, 256, 256) float in [0, 1] on the CPU."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    im = Image.new("RGB", (256, 256), (38, 38, 42))
    draw = ImageDraw.Draw(im)
    draw.rounded_rectangle((28, 28, 228, 228), radius=18, outline=(110, 110, 120), width=4)
    draw.line((78, 78, 178, 178), fill=(110, 110, 120), width=6)
    try:
        font = ImageFont.load_default(size=22)
    except TypeError:  # Pillow < 10.1: the bitmap font has no size
        font = ImageFont.load_default()
    draw.text((128, 200), "content hidden", fill=(200, 200, 210), font=font, anchor="mm")
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0


def censor(x: torch.Tensor, action: str, *, blur_strength: float = DEFAULT_BLUR,
           block: float = DEFAULT_BLOCK, color: Sequence[float] = (0.0, 0.0, 0.0),
           placeholder: torch.Tensor | None = None) -> torch.Tensor:
    """Apply ``action`` to every image of ``x``.

    Args:
        x: (N, 3, H, W) float in [0, 1].
        action: one of ``ACTIONS``; ``"none"`` returns ``x`` itself.
        placeholder: (3, h, w) float in [0, 1] for ``"placeholder"``; default: the built-in card.
    """
    if action == "blur":
        return blur(x, blur_strength)
    if action == "pixelate":
        return pixelate(x, block)
    if action == "black":
        return fill(x, color)
    if action == "placeholder":
        return place(x, placeholder if placeholder is not None else default_card())
    if action == "none":
        return x
    raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
