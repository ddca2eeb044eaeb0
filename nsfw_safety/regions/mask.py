"""Region masks from detected boxes, and censoring inside a mask with the existing kernels.

The mask is what to censor: (N, H, W) float in [0, 1], 1 inside every selected box (rectangle
or inscribed ellipse), optionally with a soft edge outside it. ``censor_regions`` applies a
``nsfw_safety.censor`` action and blends: ``out = x * (1 - m) + censored * m``, exactly ``x``
where ``m == 0``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..censor import DEFAULT_BLOCK, DEFAULT_BLUR, censor, default_card, fill, place
from ..vocabulary import SHAPES
from .detector import Regions

#: Elements of one (boxes, H, W) intermediate: boxes are drawn this many pixels at a time, so
#: many boxes on a large image cost a bounded amount of memory.
_CHUNK = 1 << 22


def region_mask(regions: Regions, *, shape: str = "rectangle", feather: float = 0.0) -> torch.Tensor:
    """The censoring mask of every box in ``regions`` (use ``Regions.select`` first).

    A pixel is inside a rectangle when it overlaps the box; inside an ellipse when its centre
    lies in the ellipse inscribed in the box. Feathering never weakens the inside: the mask is
    1 there and falls off outside as a Gaussian of the distance to the shape, with sigma =
    ``feather`` times the box's longer side, cut to 0 beyond 3 sigma (where it is < 0.012).
    An image with a ``problems`` entry could not be checked: its mask is 1 everywhere.

    Args:
        regions: boxes for N images of H x W.
        shape: ``"rectangle"`` or ``"ellipse"``.
        feather: soft edge, a fraction of each box's longer side, in [0, 1]; 0 for a hard edge.
    Returns:
        (N, H, W) float32 in [0, 1], on the boxes' device.
    """
    if not isinstance(regions, Regions):
        raise TypeError(f"regions must be a Regions, got {type(regions).__name__}")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if not 0 <= feather <= 1:
        raise ValueError(f"feather must be in [0, 1], got {feather}")
    H, W = regions.size
    dev = regions.boxes.device
    mask = torch.zeros(len(regions), H, W, device=dev)
    step = max(1, _CHUNK // (H * W))
    # a box with a non-finite corner (only a hand-made Regions can have one) covers its whole image
    whole = torch.tensor([0.0, 0.0, W, H], device=dev)
    boxes = torch.where(torch.isfinite(regions.boxes).all(1, keepdim=True), regions.boxes.float(), whole)
    for start in range(0, len(boxes), step):
        part = _box_masks(boxes[start:start + step], H, W, shape, feather)
        mask.scatter_reduce_(0, regions.image[start:start + step, None, None].expand_as(part), part, "amax")
    failed = [i for i, p in enumerate(regions.problems) if p]
    if failed:
        mask[failed] = 1.0
    return mask


def _box_masks(boxes: torch.Tensor, H: int, W: int, shape: str, feather: float) -> torch.Tensor:
    """boxes: (k, 4) x1, y1, x2, y2 -> (k, H, W) float32 in [0, 1]."""
    x1, y1, x2, y2 = (v[:, None, None].float() for v in boxes.unbind(1))
    xs = torch.arange(W, device=boxes.device, dtype=torch.float32).view(1, 1, W) + 0.5  # pixel centres
    ys = torch.arange(H, device=boxes.device, dtype=torch.float32).view(1, H, 1) + 0.5
    if shape == "rectangle":
        # distance of the pixel centre outside the box, less half a pixel: 0 where they overlap
        dx = torch.maximum(x1 - xs, xs - x2) - 0.5
        dy = torch.maximum(y1 - ys, ys - y2) - 0.5
        inside = (dx < 0) & (dy < 0)
        dist = torch.hypot(dx.clamp(min=0), dy.clamp(min=0))  # rounded corners when feathered
    else:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        rho = torch.hypot((xs - cx) / ((x2 - x1) / 2 + 0.5), (ys - cy) / ((y2 - y1) / 2 + 0.5))
        inside = rho <= 1
        # distance from the ellipse along the ray from its centre (0 inside, never NaN)
        dist = (1 - 1 / rho).clamp(min=0) * torch.hypot(xs - cx, ys - cy)
    if feather == 0:
        return inside.float()
    sigma = (feather * torch.maximum(x2 - x1, y2 - y1)).clamp(min=1e-3)
    soft = torch.exp(-0.5 * (dist / sigma) ** 2) * (dist <= 3 * sigma)
    return torch.where(inside, 1.0, soft)


def censor_regions(x: torch.Tensor, mask: torch.Tensor, action: str, *, regions: Regions | None = None,
                   blur_strength: float = DEFAULT_BLUR, block: float = DEFAULT_BLOCK,
                   color: Sequence[float] = (0.0, 0.0, 0.0), placeholder: torch.Tensor | None = None) -> torch.Tensor:
    """Censor ``x`` inside ``mask`` with one of ``nsfw_safety.censor.ACTIONS``.

    blur, pixelate and black are the whole-image kernels (strengths relative to the image, so a
    small box is hidden at least as well as the whole picture), blended in by the mask. The
    placeholder card is scaled into each box of ``regions`` on a fill of the card's background
    colour (an image with a ``problems`` entry gets the card over the whole image). Alpha is
    censored inside the mask as the whole-image kernels censor it (blurred or pixelated; opaque
    under black and the card).

    Args:
        x: (N, C, H, W), C = 3 (RGB) or 4 (RGBA, straight alpha), float in [0, 1] or uint8 in
            [0, 255] (blended in float one image at a time, so uint8 input costs one image's
            float copies).
        mask: (N, H, W) float in [0, 1], e.g. from :func:`region_mask` (NaN counts as 1).
        action: ``"blur"``, ``"pixelate"``, ``"black"``, ``"placeholder"`` or ``"none"``.
        regions: the boxes the mask was made from; required for ``"placeholder"``.
        blur_strength, block, color, placeholder: as for ``nsfw_safety.censor.censor``.
    Returns:
        (N, C, H, W), same dtype and device as ``x``; bit for bit ``x`` where ``mask == 0``.
    """
    if (not isinstance(x, torch.Tensor) or not (x.is_floating_point() or x.dtype == torch.uint8) or x.dim() != 4
            or x.shape[1] not in (3, 4)):
        raise TypeError(f"x must be a float or uint8 tensor (N, 3 or 4, H, W), got "
                        f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    N, _, H, W = x.shape
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (N, H, W):
        raise ValueError(f"mask must be a tensor of shape {(N, H, W)}, got {tuple(getattr(mask, 'shape', ()))}")
    if action == "none":
        return x
    if action == "placeholder":
        if not isinstance(regions, Regions) or regions.size != (H, W) or len(regions) != N:
            raise ValueError(f"placeholder needs regions= (the Regions of these {N} images of {H}x{W}) "
                             "to scale the card into each box")
        censored = _cards(x, regions, placeholder if placeholder is not None else default_card())
    else:
        censored = censor(x, action, blur_strength=blur_strength, block=block, color=color)
    m = mask.to(x.device).nan_to_num(1.0).clamp(0, 1)[:, None]  # a NaN in a mask censors, never passes
    if x.is_floating_point():
        return torch.where(m > 0, torch.lerp(x, censored, m.to(x.dtype)), x)
    out = torch.empty_like(x)
    for i in range(N):  # lerp(a, b, 1) is b exactly, so a hard mask gives the censored pixels as they are
        blend = torch.lerp(x[i].float(), censored[i].float(), m[i]).round_().to(torch.uint8)
        out[i] = torch.where(m[i] > 0, blend, x[i])
    return out


def _cards(x: torch.Tensor, regions: Regions, card: torch.Tensor) -> torch.Tensor:
    """The card's background colour everywhere, the card fitted into each box (one host read
    of the boxes), and over the whole of each image the detector could not check."""
    out = fill(x, card[:, 0, 0].tolist())
    H, W = x.shape[-2:]
    for i, (x1, y1, x2, y2) in zip(regions.image.tolist(), regions.boxes.tolist()):
        left, top = max(0, math.floor(x1)), max(0, math.floor(y1))
        right, bottom = min(W, math.ceil(x2)), min(H, math.ceil(y2))
        if right > left and bottom > top:
            out[i:i + 1, :, top:bottom, left:right] = place(out[i:i + 1, :, top:bottom, left:right], card)
    for i, problem in enumerate(regions.problems):
        if problem:
            out[i:i + 1] = place(x[i:i + 1], card)
    return out
