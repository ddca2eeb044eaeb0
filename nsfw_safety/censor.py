"""Censoring kernels on batched tensors, on their own device.

Every function takes ``x: (N, C, H, W)``, uint8 in [0, 255] or float in [0, 1], with C = 3
(RGB) or 4 (RGBA, straight alpha), and returns a new tensor of the same shape, dtype and
device; strengths are fractions of the image size, so a 2048 px image is hidden as well as a
512 px one.

Alpha is censored too, so that a cutout does not keep its silhouette: blur and pixelate treat it
like a colour channel, and black and placeholder make the image opaque.

Memory: besides its input and output (in the input's dtype), a call holds at most one
full-size float copy at a time (blur and pixelate read uint8 input in float once; the result is
made, or converted back, in place); callers bound the size of ``x`` (``SafetyFilter`` censors
one large image, or up to 64 MB of float pixels of small ones, at a time).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .vocabulary import ACTIONS, DEFAULT_ACTION, HIDING_ACTIONS  # noqa: F401 (re-exported)
#: Gaussian sigma as a fraction of the longer side: 41 px on 512 px; shapes become colour fields.
DEFAULT_BLUR = 0.08
#: Pixelation block as a fraction of the longer side: 43 px blocks on 512 px.
DEFAULT_BLOCK = 1 / 12


def _gaussian_kernel(sigma: float, device, dtype) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """float in [0, 1] -> ``x``'s dtype and range (``y`` may be overwritten)."""
    if x.dtype == torch.uint8:
        return y.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return y.clamp_(0, 1).to(x.dtype)


def blur(x: torch.Tensor, strength: float = DEFAULT_BLUR) -> torch.Tensor:
    """Gaussian blur with sigma = ``strength * max(H, W)``, alpha included.

    Large sigmas are applied at a reduced resolution (downscale so the sigma is ~4 px,
    blur, upscale bilinearly): the same look at a small fraction of the cost.

    Args:
        x: (N, C, H, W) uint8 in [0, 255] or float in [0, 1].
        strength: sigma as a fraction of the longer side, > 0.
    Returns:
        (N, C, H, W), same dtype and device.
    """
    if strength <= 0:
        raise ValueError(f"blur strength must be > 0, got {strength}")
    H, W = x.shape[-2:]
    sigma = strength * max(H, W)
    factor = max(1, int(sigma // 4))
    if factor > 1:  # the float copy of the input lives only for the downscale
        y = F.interpolate(_unit(x), size=(max(1, H // factor), max(1, W // factor)), mode="area")
        sigma /= factor
    else:
        y = _unit(x)
    k = _gaussian_kernel(sigma, y.device, y.dtype)
    r = (len(k) - 1) // 2
    c = y.shape[1]
    y = F.pad(y, (r, r, 0, 0), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.pad(y, (0, 0, r, r), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    if factor > 1:
        y = F.interpolate(y, size=(H, W), mode="bilinear", align_corners=False)
    return _like(y, x)


def pixelate(x: torch.Tensor, block: float = DEFAULT_BLOCK) -> torch.Tensor:
    """Mosaic of square blocks of side ``block * max(H, W)`` pixels (at least 2), alpha included.

    Args:
        x: (N, C, H, W) uint8 in [0, 255] or float in [0, 1].
    Returns:
        (N, C, H, W): each block filled with its mean colour, same dtype and device.
    """
    if not 0 < block <= 1:
        raise ValueError(f"pixelate block must be in (0, 1], got {block}")
    H, W = x.shape[-2:]
    side = max(2, round(block * max(H, W)))
    small = F.adaptive_avg_pool2d(_unit(x), (math.ceil(H / side), math.ceil(W / side)))
    # blocks are coloured in the output dtype: no full-size float
    return F.interpolate(_like(small, x), size=(H, W), mode="nearest")


def _opaque(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in ``x``'s dtype -> ``x``'s channels: opaque alpha added for RGBA."""
    if x.shape[1] == 3:
        return y
    return torch.cat([y, torch.full_like(y[:, :1], 255 if x.dtype == torch.uint8 else 1)], dim=1)


def fill(x: torch.Tensor, color: Sequence[float] = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """A solid fill of ``color`` (three floats in [0, 1]); opaque."""
    c = torch.tensor(check_color(color), device=x.device)
    c = (c * 255).round().to(torch.uint8) if x.dtype == torch.uint8 else c.to(x.dtype)
    n, _, H, W = x.shape
    return _opaque(c.view(1, 3, 1, 1).expand(n, 3, H, W).clone(), x)


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
    the card's top-left colour; opaque.

    Args:
        x: (N, C, H, W) uint8 or float; only its shape, dtype and device are used.
        card: (3, h, w) float in [0, 1].
    """
    H, W = x.shape[-2:]
    card = card.to(x.device, torch.float32)
    scale = min(H / card.shape[1], W / card.shape[2])
    h, w = max(1, round(card.shape[1] * scale)), max(1, round(card.shape[2] * scale))
    small = _like(F.interpolate(card[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False), x)
    out = _like(card[:, :1, :1].clone()[None], x).expand(1, 3, H, W).clone()
    top, left = (H - h) // 2, (W - w) // 2
    out[:, :, top : top + h, left : left + w] = small
    return _opaque(out.expand(x.shape[0], -1, -1, -1).clone(), x)


@functools.lru_cache(maxsize=1)
def default_card() -> torch.Tensor:
    """The built-in 'content hidden' card: (3, 256, 256) float in [0, 1] on the CPU."""
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
    from .inputs import pil_to_tensor, unit  # inputs does not import this module: no cycle

    return unit(pil_to_tensor(im)[0])


def censor(x: torch.Tensor, action: str, *, blur_strength: float = DEFAULT_BLUR,
           block: float = DEFAULT_BLOCK, color: Sequence[float] = (0.0, 0.0, 0.0),
           placeholder: torch.Tensor | None = None) -> torch.Tensor:
    """Apply ``action`` to every image of ``x``.

    Args:
        x: (N, C, H, W) uint8 in [0, 255] or float in [0, 1], C = 3 (RGB) or 4 (RGBA).
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


@dataclass(frozen=True)
class CensorSettings:
    """How flagged images are censored; validated when built.

    Attributes:
        action: one of ``ACTIONS``.
        blur_strength: Gaussian sigma as a fraction of the longer image side, > 0.
        block: pixelation block as a fraction of the longer image side, in (0, 1].
        color: fill colour for ``"black"`` and failed checks, three floats in [0, 1].
        placeholder: the card for ``"placeholder"``: any image input (PIL, path, array, tensor),
            kept as (3, h, w) float in [0, 1] as a viewer sees it (a transparent card over
            white); None: the built-in "content hidden" card.
    Raises:
        ValueError, TypeError: a bad value, naming it.
    """

    action: str = DEFAULT_ACTION
    blur_strength: float = DEFAULT_BLUR
    block: float = DEFAULT_BLOCK
    color: tuple[float, float, float] = (0.0, 0.0, 0.0)
    placeholder: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {self.action!r}")
        for name, low, high in (("blur_strength", 0.0, math.inf), ("block", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
                raise ValueError(f"{name} must be a number in ({low}, {high}], got {value!r}")
        object.__setattr__(self, "color", check_color(self.color))
        if self.placeholder is not None:
            object.__setattr__(self, "placeholder", _card(self.placeholder))

    def apply(self, x: torch.Tensor, action: str | None = None) -> torch.Tensor:
        """:func:`censor` ``x`` with these settings (``action`` overrides ``self.action``)."""
        return censor(x, action or self.action, blur_strength=self.blur_strength, block=self.block,
                      color=self.color, placeholder=self.placeholder)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly; ``placeholder`` is True when a custom card is set (saved apart)."""
        return {"action": self.action, "blur_strength": self.blur_strength, "block": self.block,
                "color": list(self.color), "placeholder": self.placeholder is not None}


def _card(image: Any) -> torch.Tensor:
    """Any image input -> (3, h, w) float in [0, 1] on the CPU, as a viewer sees it."""
    from . import inputs  # inputs does not import this module: no cycle

    if isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] == 3 and image.is_floating_point():
        return image.detach().float().cpu()  # already a card (e.g. CensorSettings rebuilt by replace())
    pixels = inputs.prepare(image).pixels
    card = inputs.views(pixels if isinstance(pixels, torch.Tensor) else [pixels[0]])[0][0]
    return inputs.unit(card)
