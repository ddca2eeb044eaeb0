"""Model-specific resize, crop and normalization, on batched tensors, on their own device.

This reproduces the reference eval transforms (timm's ``transforms_imagenet_eval`` and the
transformers ViT image processor, both of which resize with PIL) on tensors. PIL's
bicubic/bilinear downscaling is an antialiased filter, so the resize here always is too; without
antialias torch's kernels drift about 5x further from the reference.

PIL resizes in two passes and keeps each in uint8; the tensor path does the same (clamp and round
to the uint8 grid after each pass), in Pillow's order (``_height_first``), which brings it to a
mean absolute difference of about 2e-5 from the reference (0.0009 with one fp32 pass).

Memory is bounded whatever the shape. A pass's output lines each depend on one input line, so a
pass runs on bands of lines, each converted to float on its own (BAND_BYTES); the image between
the passes is uint8 and small (MAX_INTERMEDIATE). A line too long for a band (a 1 x 16M strip),
or a filter too wide for torch's kernels, goes through ``_resample_long``: the same weights, one
output pixel at a time, and only the pixels the center crop keeps. Beyond the image itself, one
image takes at most 16 MiB with a 448 model (tests/test_memory.py).

The resize runs in float32: antialiased bicubic has no bf16 kernel on the CPU, and fp32 keeps
the rounding exact. The normalized result is cast to the compute dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .device_cache import on_device

Interpolation = Literal["bicubic", "bilinear", "nearest"]
# PIL resample codes used in preprocessor_config.json
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "bicubic", 4: "bilinear", 5: "bicubic"}


@dataclass(frozen=True)
class PreprocessConfig:
    """How a model wants its pixels.

    Attributes:
        size: (h, w) of the model input.
        mode: ``"squash"`` resizes straight to ``size / crop_pct`` (aspect not kept);
            ``"crop"`` resizes the shortest edge to ``size / crop_pct`` and center-crops.
        interpolation: resize filter, applied with antialiasing like PIL.
        mean, std: per-channel normalization of [0, 1] pixels.
        crop_pct: fraction of the resized image kept by the center crop (1.0 = all).
    """

    size: tuple[int, int]
    mode: Literal["squash", "crop"]
    interpolation: Interpolation
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0

    @classmethod
    def from_timm(cls, pcfg: dict, fallback: PreprocessConfig | None) -> PreprocessConfig:
        """From a timm ``pretrained_cfg`` (as stored in a TimmWrapper ``config.json``)."""
        fb = fallback
        input_size = pcfg.get("input_size") or (3, *fb.size)
        mode = pcfg.get("crop_mode") or "center"
        interp = pcfg.get("interpolation") or (fb.interpolation if fb else "bicubic")
        return cls(
            size=(int(input_size[-2]), int(input_size[-1])),
            mode="squash" if mode == "squash" else "crop",
            interpolation=interp if interp in ("bicubic", "bilinear", "nearest") else "bicubic",
            mean=tuple(pcfg.get("mean") or fb.mean),
            std=tuple(pcfg.get("std") or fb.std),
            crop_pct=float(pcfg.get("crop_pct") or 0.875),
        )

    @classmethod
    def from_hf_processor(cls, proc: dict | None, fallback: PreprocessConfig | None) -> PreprocessConfig:
        """From a transformers ``preprocessor_config.json`` (ViTImageProcessor and kin)."""
        if proc is None:
            return fallback
        fb = fallback
        size = proc.get("size", {})
        if isinstance(size, int):
            size = {"height": size, "width": size}
        resample = _PIL_RESAMPLE.get(proc.get("resample", 2), "bilinear")
        mean = tuple(proc.get("image_mean") or (fb.mean if fb else (0.5, 0.5, 0.5)))
        std = tuple(proc.get("image_std") or (fb.std if fb else (0.5, 0.5, 0.5)))
        if not proc.get("do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if "shortest_edge" in size:
            crop = proc.get("crop_size") or {"height": size["shortest_edge"], "width": size["shortest_edge"]}
            if isinstance(crop, int):
                crop = {"height": crop, "width": crop}
            pct = crop["height"] / size["shortest_edge"] if proc.get("do_center_crop") else 1.0
            return cls((crop["height"], crop["width"]), "crop", resample, mean, std, pct)
        return cls((size["height"], size["width"]), "squash", resample, mean, std, 1.0)


#: Float working memory of one band of a resize pass, per image: its output lines, and its input
#: lines where they need converting (not float32 already).
BAND_BYTES = 1 << 20
#: Largest uint8 image between the two passes, per image, before the other order is taken.
MAX_INTERMEDIATE = 8 << 20
#: Widest filter (input pixels either side of an output) left to torch's antialiased kernels: the
#: CUDA one keeps a block's weights in 48 KB of shared memory and refuses filters wider than about
#: 188 pixels a side (fp32), i.e. downscales beyond 94x (bicubic); past this, the long route.
MAX_SUPPORT = 127


@dataclass(frozen=True)
class _Axis:
    """One axis of the resize: ``size`` pixels become ``out``, of which ``[start, stop)`` are kept."""

    size: int
    out: int
    start: int
    stop: int

    @property
    def kept(self) -> int:
        return self.stop - self.start


def _geometry(cfg: PreprocessConfig, height: int, width: int) -> tuple[_Axis, _Axis]:
    """The reference's resize and center crop of an image, per axis: (height, width)."""
    h, w = cfg.size
    if cfg.mode == "squash":
        scale = (math.floor(h / cfg.crop_pct), math.floor(w / cfg.crop_pct))
    else:  # torchvision Resize(int): the short edge to `short`, the long one truncated
        short = math.floor(min(h, w) / cfg.crop_pct)
        if height <= width:
            scale = (short, int(short * width / height))
        else:
            scale = (int(short * height / width), short)
    top = int(round((scale[0] - h) / 2.0))
    left = int(round((scale[1] - w) / 2.0))
    return (_Axis(height, scale[0], max(top, 0), min(top + h, scale[0])),
            _Axis(width, scale[1], max(left, 0), min(left + w, scale[1])))


def _resize_crop(x: torch.Tensor, cfg: PreprocessConfig, bad: torch.Tensor | None) -> torch.Tensor:
    """(N, C, H, W) uint8 or float in [0, 1] -> (N, C, h, w) uint8, resized and cropped like the
    reference. ``bad`` (N,) bool collects images whose kept pixels saw a non-finite value."""
    ah, aw = _geometry(cfg, *x.shape[-2:])
    if cfg.interpolation == "nearest":
        rows, cols = _nearest_index(ah, x.device), _nearest_index(aw, x.device)
        x = x[..., rows[:, None], cols]
    else:
        passes = [(-1, aw), (-2, ah)]
        for dim, axis in passes:  # an axis that keeps its size is only cropped
            if axis.size == axis.out:
                x = x.narrow(dim, axis.start, axis.kept)
        if _height_first(x.shape[-3], ah, aw):
            passes.reverse()
        for dim, axis in passes:
            if axis.size != axis.out:
                x = _resample(x, dim, axis, cfg.interpolation, bad)
    if x.dtype == torch.uint8:
        return x
    return _snap_(x.to(torch.float32, copy=True), bad).to(torch.uint8)  # a copy: x may be the input


def _height_first(channels: int, ah: _Axis, aw: _Axis) -> bool:
    """Pillow's pass order: width first, unless the height shrinks by more than twice as many
    pixels as the width (Pillow >= 13; older Pillow always goes width first). If that order's
    uint8 intermediate would pass MAX_INTERMEDIATE and the other's is smaller, the other is taken:
    within 16M pixels Pillow's order keeps it under 7.2 MiB (448 squash), so only larger images
    and crop-mode strips turn."""
    if ah.size == ah.out or aw.size == aw.out:
        return False
    first = ah.out < ah.size and ah.size - ah.out > 2 * (aw.size - aw.out)
    pixels = (ah.size * aw.kept, ah.kept * aw.size)  # between the passes: width first, height first
    if channels * pixels[first] > MAX_INTERMEDIATE and pixels[not first] < pixels[first]:
        return not first
    return first


def _resample(x: torch.Tensor, dim: int, axis: _Axis, interpolation: Interpolation,
              bad: torch.Tensor | None) -> torch.Tensor:
    """Resize ``x`` (N, C, H, W) along ``dim`` (-1 width, -2 height), keep ``axis``'s window, and
    store it in uint8 like PIL. Each output line depends on one input line only, so the lines go
    through in bands, each converted to float on its own."""
    shape = list(x.shape)
    shape[dim] = axis.kept
    out = torch.empty(shape, dtype=torch.uint8, device=x.device)
    # the resized dim last: torch's height pass is wrong on one-pixel-wide images (CPU, 2.x), and
    # its width pass on the transposed view gives the same bits
    x, dst = x.movedim(dim, -1), out.movedim(dim, -1)  # (N, C, lines, size), (N, C, lines, kept)
    line = 4 * x.shape[-3] * (axis.out + (axis.size if x.dtype != torch.float32 else 0))  # per image
    if line > BAND_BYTES or _support(axis, interpolation) > MAX_SUPPORT:
        _resample_long(x, axis, interpolation, dst, bad)
        return out
    lines, step = x.shape[-2], max(1, BAND_BYTES // line)
    for i in range(0, lines, step):
        band = _unit(x.narrow(-2, i, min(step, lines - i)))
        y = F.interpolate(band, size=(band.shape[-2], axis.out), mode=interpolation, align_corners=False,
                          antialias=True)
        dst.narrow(-2, i, band.shape[-2]).copy_(_snap_(y.narrow(-1, axis.start, axis.kept), bad))
    return out


def _support(axis: _Axis, interpolation: Interpolation) -> float:
    """Input pixels either side of an output pixel that the antialiased filter reads."""
    return _SUPPORT[interpolation] * max(axis.size / axis.out, 1.0)


def _resample_long(x: torch.Tensor, axis: _Axis, interpolation: Interpolation, out: torch.Tensor,
                   bad: torch.Tensor | None) -> None:
    """The same filter along the last dim of ``x`` (N, C, L, size), into ``out`` (N, C, L, kept)
    uint8, for lines too long to hold as floats or filters too wide for torch's kernels: one
    output pixel at a time, its taps in blocks, with the weights of PIL's ``precompute_coeffs``
    (which torch's antialiased kernels share), made on the device."""
    scale = axis.size / axis.out
    filterscale, support = max(scale, 1.0), _support(axis, interpolation)
    # taps per block: per line a float and a product, and the weights
    block = max(1, BAND_BYTES // (8 * x[0, ..., 0].numel() + 8))
    taps = min(block, math.ceil(2 * support) + 1)
    steps = torch.arange(taps, dtype=torch.float32, device=x.device) / filterscale
    y = torch.empty(out.shape, dtype=torch.float32, device=x.device)
    for j in range(axis.start, axis.stop):
        center = (j + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), axis.size)
        acc, total = 0.0, 0.0
        for b in range(lo, hi, block):
            n = min(block, hi - b)
            # the filter's argument at taps b..b+n: (tap - center + 0.5) / filterscale
            w = _FILTERS[interpolation](steps[:n] + (b - center + 0.5) / filterscale)
            acc, total = acc + (x.narrow(-1, b, n).float() * w).sum(-1), total + w.sum()
        y[..., j - axis.start] = acc / total
    if x.dtype == torch.uint8:
        y.div_(255.0)
    out.copy_(_snap_(y, bad))


def _bicubic(t: torch.Tensor) -> torch.Tensor:
    """PIL's (and torch's antialiased) cubic kernel, a = -0.5, of ``t`` (overwritten)."""
    t = t.abs_()
    near = (1.5 * t - 2.5).mul_(t).mul_(t).add_(1.0)  # ((a + 2) t - (a + 3)) t^2 + 1
    far = (t - 5.0).mul_(t).add_(8.0).mul_(t).sub_(4.0).mul_(-0.5)  # (((t - 5) t + 8) t - 4) a
    return torch.where(t < 1.0, near, far.masked_fill_(t >= 2.0, 0.0))


def _bilinear(t: torch.Tensor) -> torch.Tensor:
    """PIL's triangle kernel of ``t`` (overwritten)."""
    return t.abs_().neg_().add_(1.0).clamp_(min=0.0)


_FILTERS = {"bicubic": _bicubic, "bilinear": _bilinear}
_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}


def _nearest_index(axis: _Axis, device: torch.device) -> torch.Tensor:
    """Source index of each kept output, torch's ``nearest-exact`` in exact integer arithmetic."""
    j = torch.arange(axis.start, axis.stop, device=device)
    return ((2 * j + 1) * axis.size // (2 * axis.out)).clamp_(max=axis.size - 1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] or float in [0, 1] -> float32 in [0, 1]."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _snap_(x: torch.Tensor, bad: torch.Tensor | None) -> torch.Tensor:
    """Clamp and round ``x`` (N, ...) to the uint8 grid in [0, 255], in place, as a uint8 PIL
    image would; images with a non-finite value are marked in ``bad``."""
    if bad is not None:  # a sum is NaN or infinite with any of its terms, and costs one pass
        bad |= ~x.sum(dim=tuple(range(1, x.dim()))).isfinite()
    return x.clamp_(0.0, 1.0).mul_(255.0).round_()


def _model_input(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """(N, C, H, W) uint8 or float -> (N, C, h, w) float32 on the 1/255 grid; an image with a
    non-finite value in view comes out all NaN, so that the model cannot score it."""
    bad = None if x.dtype == torch.uint8 else torch.zeros(len(x), dtype=torch.bool, device=x.device)
    y = _resize_crop(x, cfg, bad).float().div_(255.0)
    return y if bad is None else y.masked_fill_(bad.view(-1, 1, 1, 1), float("nan"))


def preprocess(pixels: torch.Tensor | list[torch.Tensor], cfg: PreprocessConfig, dtype: torch.dtype) -> torch.Tensor:
    """Turn images into model input.

    Args:
        pixels: (B, 3, H, W) float in [0, 1] or uint8 in [0, 255], or a list of (3, H_i, W_i)
            of mixed sizes.
        cfg: the model's preprocessing.
        dtype: the compute dtype of the result.
    Returns:
        (B, 3, h, w) normalized, in ``dtype``, on the pixels' device. An image with a non-finite
        value in view comes out all NaN, so that no score can come from it.
    """
    if isinstance(pixels, torch.Tensor):
        x = _model_input(pixels, cfg)
    else:  # mixed sizes: one resize per image, then one batch
        x = torch.cat([_model_input(p[None], cfg) for p in pixels])
    mean, std = on_device(("mean_std", cfg.mean, cfg.std), lambda: (
        torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)), x.device)
    return x.sub_(mean).div_(std).to(dtype)  # in place: x is ours
