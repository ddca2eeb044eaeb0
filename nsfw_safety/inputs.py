"""Any image input -> one device batch in [0, 1], plus the record that gives it back.

Accepted inputs:

* torch tensors, on any device: ``(B, C, H, W)``, ``(B, H, W, C)``, ``(C, H, W)``, ``(H, W, C)`` or
  ``(H, W)``; float (value range given by ``value_range``, default ``(0, 1)``; pass ``(-1, 1)``
  for a VAE's output) or uint8 (0..255); C = 1 (gray, becomes RGB), 3, or 4 (alpha dropped).
* numpy arrays, the same shapes and dtypes.
* PIL images, file paths, and lists of any of these; sizes may differ.

The layout of an array is read from its shape; where both readings are possible (e.g. a
(3, 4, 4) array) it is an error that asks for ``layout=``. The float value range is never
guessed from the data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

ValueRange = tuple[float, float]
LAYOUTS = ("BCHW", "BHWC", "CHW", "HWC", "HW")
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LUMA = (0.299, 0.587, 0.114)


def check_range(value_range: Any) -> ValueRange:
    """Validate a float value range such as ``(0, 1)`` or ``(-1, 1)``."""
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise TypeError(f"value_range must be a pair (low, high), got {value_range!r}") from None
    if not lo < hi:
        raise ValueError(f"value_range must have low < high, got {value_range!r}")
    return lo, hi


@dataclass
class Prepared:
    """Images as one batch for the model, and how to return censored ones to the caller.

    Attributes:
        pixels: (B, 3, H, W) float in [0, 1] on the device, or a list of (3, H_i, W_i) when
            sizes differ. Non-finite input values are kept (the detector reports them).
        finite: (B,) bool, False where the input holds NaN or Inf.
    """

    pixels: torch.Tensor | list[torch.Tensor]
    finite: torch.Tensor
    _restore: Callable[[list[int], list[torch.Tensor] | torch.Tensor, ValueRange | None], Any]

    def __len__(self) -> int:
        return len(self.pixels)

    def select(self, index: list[int]) -> torch.Tensor | list[torch.Tensor]:
        """The pixels of images ``index``: (N, 3, H, W), or a list when sizes differ."""
        if isinstance(self.pixels, torch.Tensor):
            return self.pixels[index]
        return [self.pixels[i] for i in index]

    def restore(self, index: list[int], censored: torch.Tensor | list[torch.Tensor],
                censored_range: ValueRange | None = None) -> Any:
        """The caller's images, with images ``index`` replaced by ``censored``.

        Args:
            index: which images to replace.
            censored: (N, 3, H, W) float in [0, 1] (or a list of (3, H, W)), in ``index`` order.
            censored_range: value range to write the censored images in (float input only);
                default: the input's own range.
        Returns:
            The same kind, layout, dtype, value range and device as the input. The input is
            never modified: images are replaced in a copy, and with nothing to replace the
            input itself is returned.
        """
        return self._restore(index, censored, censored_range)


def prepare(images: Any, *, value_range: ValueRange = (0.0, 1.0), layout: str | None = None,
            device: torch.device | str | None = None) -> Prepared:
    """Read ``images`` into a :class:`Prepared` batch on ``device``.

    Raises:
        TypeError: an unsupported kind or dtype.
        ValueError: a bad shape, an ambiguous layout, zero size, or a file that is not an image.
    """
    value_range = check_range(value_range)
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return _prepare_array(images, value_range, layout, device)
    if isinstance(images, (Image.Image, str, os.PathLike)):
        single = _prepare_list([images], value_range, layout, device)
        return Prepared(single.pixels, single.finite, lambda i, c, r: single.restore(i, c, r)[0])
    if isinstance(images, Sequence) and not isinstance(images, (bytes, str)):
        if len(images) == 0:
            raise ValueError("images is an empty list: expected at least one image")
        return _prepare_list(list(images), value_range, layout, device)
    raise TypeError(f"images must be a torch tensor, numpy array, PIL image, file path, or a list "
                    f"of these; got {type(images).__name__}")


# --- arrays (torch and numpy) -------------------------------------------------------------

def _infer_layout(shape: tuple[int, ...], layout: str | None, name: str) -> str:
    if any(s == 0 for s in shape):
        raise ValueError(f"{name} has zero size")
    rank = len(shape)
    if layout is not None:
        if len(layout) != rank:
            raise ValueError(f"{name}: layout={layout!r} needs rank {len(layout)}")
        c = shape[layout.index("C")] if "C" in layout else 1
        if c not in (1, 3, 4):
            raise ValueError(f"{name} has {c} channels in layout {layout}: expected 1, 3 or 4")
        return layout
    if rank == 2:
        return "HW"
    if rank not in (3, 4):
        raise ValueError(f"{name} has rank {rank}: expected (B,C,H,W), "
                         f"(B,H,W,C), (C,H,W), (H,W,C) or (H,W)")
    first, last = shape[-3], shape[-1]
    chw, hwc = first in (1, 3, 4), last in (1, 3, 4)
    b = "B" if rank == 4 else ""
    if chw and hwc:
        raise ValueError(f"{name} could be {b}CHW or {b}HWC: "
                         f"pass layout='{b}CHW' or layout='{b}HWC'")
    if not (chw or hwc):
        raise ValueError(f"{name} has no channel dimension of size 1, 3 or 4 "
                         f"(more than 4 channels is not an image)")
    return b + ("CHW" if chw else "HWC")


def _to_unit(x: torch.Tensor, value_range: ValueRange) -> torch.Tensor:
    """Integer or float pixels -> float in [0, 1] (clamped; NaN stays NaN)."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if x.dtype == torch.float64:
        x = x.float()
    lo, hi = value_range
    if (lo, hi) != (0.0, 1.0):
        x = (x - lo) / (hi - lo)
    return x.clamp(0.0, 1.0)


def _to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) with C in {1, 3, 4} -> (B, 3, H, W)."""
    c = x.shape[1]
    return x.expand(-1, 3, -1, -1) if c == 1 else x[:, :3]


def _from_rgb(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> the channels of ``like`` (N, C, H, W): gray by luma, alpha kept."""
    c = like.shape[1]
    if c == 1:
        w = torch.tensor(_LUMA, device=y.device, dtype=y.dtype).view(1, 3, 1, 1)
        return (y * w).sum(1, keepdim=True)
    if c == 4:
        return torch.cat([y, like[:, 3:].to(y.device, y.dtype)], dim=1)
    return y


def _encode(y: torch.Tensor, dtype: torch.dtype, value_range: ValueRange) -> torch.Tensor:
    """[0, 1] floats -> the caller's dtype and value range."""
    if dtype == torch.uint8:
        return (y * 255.0).round().clamp(0, 255).to(torch.uint8)
    lo, hi = value_range
    return (y * (hi - lo) + lo).to(dtype)


def _prepare_array(images, value_range, layout, device) -> Prepared:
    is_numpy = isinstance(images, np.ndarray)
    name = f"{'numpy array' if is_numpy else 'tensor'} of shape {tuple(images.shape)}"
    if is_numpy:
        if images.dtype.kind not in "uf" or (images.dtype.kind == "u" and images.dtype != np.uint8):
            raise TypeError(f"{name} has dtype {images.dtype}: expected uint8 or a float dtype")
        # read-only arrays (np.asarray of a PIL image) are copied: torch warns on wrapping them
        orig = torch.from_numpy(np.ascontiguousarray(images) if images.flags.writeable else images.copy())
    else:
        orig = images
    if orig.dtype != torch.uint8 and orig.dtype not in _FLOAT:
        raise TypeError(f"{name} has dtype {orig.dtype}: expected uint8 or a float dtype")
    lay = _infer_layout(tuple(orig.shape), layout, name)
    device = torch.device(device) if device is not None else orig.device
    # canonical (B, C, H, W) view of the caller's data, still in its dtype
    x = orig
    if lay == "HW":
        x = x[None, None]
    elif lay in ("CHW", "HWC"):
        x = x[None]
    if lay.endswith("HWC"):
        x = x.permute(0, 3, 1, 2)
    raw = x
    # a non-blocking copy to the CPU lands in pinned memory that is read before the copy ends
    moved = raw.to(device, non_blocking=device.type != "cpu")
    # checked before _to_unit, whose clamp turns +-Inf into 1 and 0
    finite = torch.isfinite(moved).flatten(1).all(1) if moved.is_floating_point() else \
        torch.ones(len(moved), dtype=torch.bool, device=device)
    pixels = _to_rgb(_to_unit(moved, value_range))

    def restore(index, censored, censored_range):
        if not index:
            return images
        if isinstance(censored, list):
            censored = torch.stack(censored)
        rng = check_range(censored_range) if censored_range is not None else value_range
        idx = torch.tensor(index, device=raw.device)
        y = _encode(_from_rgb(censored, raw[idx]), raw.dtype, rng).to(raw.device)
        out = raw.clone()
        out[idx] = y
        if lay.endswith("HWC"):
            out = out.permute(0, 2, 3, 1)
        out = out.reshape(orig.shape).contiguous()
        return out.numpy() if is_numpy else out

    return Prepared(pixels, finite, restore)


# --- PIL images, paths, lists ----------------------------------------------------------------

class ImageTooLarge(ValueError):
    """An image over a pixel limit, or one that cannot be decoded safely (a decompression bomb)."""


class MultiFrameImage(ValueError):
    """A file with more than one frame or page (an animation, a multi-page TIFF): scoring one
    frame of it would pass the others unchecked."""


def open_image(source: str | os.PathLike | IO[bytes], max_pixels: int | None = None, *,
               formats: Sequence[str] | None = None, name: str | None = None) -> Image.Image:
    """Open an image file or stream: first frame, EXIF orientation applied, fully decoded.

    Args:
        source: a path, or a binary stream (an upload's bytes in ``io.BytesIO``).
        max_pixels: refuse images with more than this many pixels (width * height), checked
            from the header before any decoding; PIL's own decompression-bomb limit
            (``Image.MAX_IMAGE_PIXELS``) applies as well.
        formats: the PIL decoders to try (e.g. ``["PNG", "JPEG"]``); default: all.
        name: how errors name the image; default: the path.
    Raises:
        ImageTooLarge: over ``max_pixels``, a decompression bomb, or out of memory.
        ValueError: missing, empty, truncated, or not an image.
    """
    name = name or repr(str(source))
    try:
        with Image.open(source, formats=formats) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise ImageTooLarge(f"{name} is {im.width}x{im.height} = {im.width * im.height:,} pixels, "
                                    f"over the limit of {max_pixels:,} (possible decompression bomb)")
            im.seek(0)
            im.load()
            out = ImageOps.exif_transpose(im)
            out.format = im.format  # the file's format, which the transposed copy does not carry
            return out
    except (Image.DecompressionBombError, MemoryError) as e:
        raise ImageTooLarge(f"{name} is too large to decode safely: {e}") from e
    except FileNotFoundError as e:
        raise ValueError(f"{name} does not exist") from e
    except ImageTooLarge:
        raise
    except Exception as e:  # decoders raise OSError, EOFError, struct.error, ... on hostile bytes
        raise ValueError(f"{name} is not a readable image ({type(e).__name__}: {e})") from e


def _pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) float in [0, 1] on the CPU."""
    if im.width == 0 or im.height == 0:
        raise ValueError(f"PIL image has zero size {im.size}")
    rgb = np.asarray(im.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0


def _tensor_to_pil(y: torch.Tensor, like: Image.Image) -> Image.Image:
    """(3, H, W) float in [0, 1] -> a PIL image in ``like``'s mode (alpha kept)."""
    rgb = (y.float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    out = Image.fromarray(rgb, "RGB")
    if like.mode in ("RGBA", "LA"):
        out = out.convert(like.mode)
        out.putalpha(like.getchannel("A"))
        return out
    return out if like.mode == "RGB" else out.convert(like.mode if like.mode != "P" else "RGB")


def _prepare_list(items: list, value_range, layout, device) -> Prepared:
    device = torch.device(device) if device is not None else torch.device("cpu")
    parts: list[Prepared] = []
    originals: list[Any] = []
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            item = open_image(item)
        if isinstance(item, Image.Image):
            parts.append(Prepared(_pil_to_tensor(item).to(device)[None],
                                  torch.ones(1, dtype=torch.bool, device=device), None))
        elif isinstance(item, (torch.Tensor, np.ndarray)):
            if item.ndim == 4:
                raise ValueError(f"images[{i}] is a batch (shape {tuple(item.shape)}): a list holds single images")
            parts.append(_prepare_array(item, value_range, layout, device))
        else:
            raise TypeError(f"images[{i}] is a {type(item).__name__}: expected a tensor, numpy array, "
                            f"PIL image or file path")
        originals.append(item)
    sizes = {tuple(p.pixels.shape[-2:]) for p in parts}
    one = [p.pixels[0] for p in parts]
    pixels = torch.stack(one) if len(sizes) == 1 else one
    finite = torch.cat([p.finite for p in parts])

    def restore(index, censored, censored_range):
        out = list(originals)
        for i, c in zip(index, censored):
            if isinstance(originals[i], Image.Image):
                out[i] = _tensor_to_pil(c, originals[i])
            else:
                out[i] = parts[i].restore([0], c[None], censored_range)
        return out

    return Prepared(pixels, finite, restore)
