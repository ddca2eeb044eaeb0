"""Any image input -> one device batch as a viewer sees it, plus the record that gives it back.

Accepted inputs:

* torch tensors, on any device: ``(B, C, H, W)``, ``(B, H, W, C)``, ``(C, H, W)``, ``(H, W, C)`` or
  ``(H, W)``; float (value range given by ``value_range``, default ``(0, 1)``; pass ``(-1, 1)``
  for a VAE's output) or uint8 (0..255); C = 1 (gray), 3 (RGB) or 4 (RGBA, straight alpha).
* numpy arrays, the same shapes and dtypes.
* PIL images in any mode, file paths (single-frame files only), and lists of any of these;
  sizes may differ.

The layout of an array is read from its shape; where both readings are possible (e.g. a
(3, 4, 4) array) it is an error that asks for ``layout=``. The float value range is never
guessed from the data.

What is scored is what a viewer sees:

* **Bit depth is scaled, not clipped.** 16-bit gray (``I;16*``, and ``I``, Pillow's mode for
  16-bit data) is mapped to 8 bits by ``round(v * 255 / 65535)``; 32-bit and signed TIFFs by
  their own range; float (``F``) images are read as [0, 1]. 8-bit data stays uint8.
* **Transparency:** an image with alpha has two views, composited over white and over black
  (:func:`views`); the detector keeps the stricter levels of the two. Opaque images have one.
* **Frames:** a file with more than one frame or page is refused (:class:`MultiFrameImage`).
"""

from __future__ import annotations

import math
import re
import os
from dataclasses import dataclass
from typing import IO, Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

ValueRange = tuple[float, float]
LAYOUTS = ("BCHW", "BHWC", "CHW", "HWC", "HW")
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LUMA = (0.299, 0.587, 0.114)
#: The kinds of view of an image (see :func:`views`), and how reasons name the composites.
OPAQUE, OVER_WHITE, OVER_BLACK = 0, 1, 2
VIEW_NAMES = {OVER_WHITE: "over white", OVER_BLACK: "over black"}
#: Pixels per tile when a whole image would make a large temporary (decoding, compositing).
_TILE = 1 << 20
#: Same-size images of a list are stacked into one batch up to this many bytes.
_STACK_BYTES = 64 << 20


def check_range(value_range: Any) -> ValueRange:
    """Validate a float value range such as ``(0, 1)`` or ``(-1, 1)``: finite, low < high."""
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise TypeError(f"value_range must be a pair (low, high), got {value_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"value_range must be finite with low < high, got {value_range!r}")
    return lo, hi


@dataclass
class Prepared:
    """Images as one batch for the model, and how to return censored ones to the caller.

    Attributes:
        pixels: (B, C, H, W) uint8 in [0, 255] or float in [0, 1] on the device, or a list of
            (C_i, H_i, W_i) when sizes, channels or dtypes differ (or a list is large). C = 1 (gray), 2 (gray +
            alpha), 3 (RGB) or 4 (RGBA); alpha is straight (not premultiplied). Non-finite
            input values are kept (the detector reports them).
        finite: (B,) bool, False where the input holds NaN or Inf.
    """

    pixels: torch.Tensor | list[torch.Tensor]
    finite: torch.Tensor
    _restore: Callable[[list[int], list[torch.Tensor] | torch.Tensor, ValueRange | None], Any]

    def __len__(self) -> int:
        return len(self.pixels)

    def select(self, index: list[int]) -> torch.Tensor | list[torch.Tensor]:
        """The pixels of images ``index``: (N, C, H, W), or a list when they differ."""
        if isinstance(self.pixels, torch.Tensor):
            return self.pixels[index]
        return [self.pixels[i] for i in index]

    def restore(self, index: list[int], censored: torch.Tensor | list[torch.Tensor],
                censored_range: ValueRange | None = None, keep: list[torch.Tensor | None] | None = None) -> Any:
        """The caller's images, with images ``index`` replaced by ``censored``.

        Args:
            index: which images to replace.
            censored: (N, 3 or 4, H, W) RGB or RGBA (or a list of (3 or 4, H, W)), in ``index``
                order, uint8 in [0, 255] or float in [0, 1]. RGBA replaces the alpha channel of
                an image that has one; RGB keeps it.
            censored_range: value range to write the censored images in (float input only);
                default: the input's own range.
            keep: per image of ``index``, None or (H, W) bool: where the caller's own pixels
                are kept exactly as they were (region censoring: outside the mask), which a
                round trip through [0, 1] would not always do (float64, ranges other than
                (0, 1), out-of-range values, gray). Used for tensors and arrays written back
                in their own range; 8-bit PIL images round-trip exactly without it.
        Returns:
            The same kind, layout, dtype, value range and device as the input. The input is
            never modified: images are replaced in a copy, and with nothing to replace the
            input itself is returned.
        """
        if keep is None:
            return self._restore(index, censored, censored_range)
        return self._restore(index, censored, censored_range, keep)


def prepare(images: Any, *, value_range: ValueRange = (0.0, 1.0), layout: str | None = None,
            device: torch.device | str | None = None) -> Prepared:
    """Read ``images`` into a :class:`Prepared` batch on ``device``.

    Raises:
        TypeError: an unsupported kind or dtype.
        ValueError: a bad shape, an ambiguous layout, zero size, or a file that is not an image
            (:class:`MultiFrameImage` for an animation or a multi-page file).
    """
    value_range = check_range(value_range)
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return _prepare_array(images, value_range, layout, device)
    if isinstance(images, (Image.Image, str, os.PathLike)):
        single = _prepare_list([images], value_range, layout, device)
        return Prepared(single.pixels, single.finite, lambda i, c, r, k=None: single.restore(i, c, r, k)[0])
    if isinstance(images, Sequence) and not isinstance(images, (bytes, str)):
        if len(images) == 0:
            raise ValueError("images is an empty list: expected at least one image")
        return _prepare_list(list(images), value_range, layout, device)
    raise TypeError(f"images must be a torch tensor, numpy array, PIL image, file path, or a list "
                    f"of these; got {type(images).__name__}")


# --- what a viewer sees ------------------------------------------------------------------------

def has_alpha(x: torch.Tensor) -> bool:
    """Whether pixels (C, H, W) or (B, C, H, W) carry alpha (C = 2 or 4); read from the shape."""
    return x.shape[-3] in (2, 4)


def views(pixels: torch.Tensor | list[torch.Tensor]) -> tuple[torch.Tensor | list[torch.Tensor], list[int]]:
    """What a viewer can see of each image: the RGB views to score.

    An opaque image has one view, itself. An image with alpha has two: composited over white,
    then over black (``round(c * a + 255 * (1 - a))`` and ``round(c * a)`` for uint8). The
    composites are made in tiles, so the temporaries stay a few MB whatever the image size.

    Args:
        pixels: (B, C, H, W) or a list of (C, H, W), as :attr:`Prepared.pixels`.
    Returns:
        The views in image order: (V, 3, H, W), or a list of (3, H_i, W_i), in the pixels' dtype
        (gray is expanded to RGB without a copy); and the kind of each view (``OPAQUE``,
        ``OVER_WHITE``, ``OVER_BLACK``).
    """
    if isinstance(pixels, torch.Tensor):
        if not has_alpha(pixels):
            return _rgb(pixels), [OPAQUE] * len(pixels)
        return _composite(pixels).flatten(0, 1), [OVER_WHITE, OVER_BLACK] * len(pixels)
    out, kinds = [], []
    for p in pixels:
        v, k = views(p[None])
        out.extend(v)
        kinds.extend(k)
    return out, kinds


def _rgb(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) with C in {1, 3} -> (N, 3, H, W); gray is expanded without a copy."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _composite(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) with alpha last (C = 2 or 4) -> (N, 2, 3, H, W): over white, over black."""
    n, c, h, w = x.shape
    out = torch.empty((n, 2, 3, h, w), dtype=x.dtype, device=x.device)
    for rows, cols in _tiles(h, w, n):
        tile = x[:, :, rows, cols].float()
        color, alpha = tile[:, : c - 1], tile[:, c - 1 :]
        if x.dtype == torch.uint8:
            alpha = alpha / 255.0
            black, white = color * alpha, color * alpha + 255.0 * (1.0 - alpha)
            black, white = black.round_(), white.round_()
        else:  # NaN stays NaN: the image is reported as non-finite input
            black, white = color * alpha, color * alpha + (1.0 - alpha)
        out[:, 0, :, rows, cols] = white  # gray (1 channel) broadcasts to RGB
        out[:, 1, :, rows, cols] = black
    return out


def _tiles(h: int, w: int, n: int = 1):
    """(rows, cols) slices covering an (h, w) image in tiles of about ``_TILE / n`` pixels."""
    budget = max(1, _TILE // n)
    if w <= budget:
        step = max(1, budget // w)
        for r in range(0, h, step):
            yield slice(r, min(h, r + step)), slice(0, w)
    else:  # a very wide image: split each row too
        for r in range(h):
            for c in range(0, w, budget):
                yield slice(r, r + 1), slice(c, min(w, c + budget))


def unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] or float in [0, 1] -> float32 in [0, 1]."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


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
    """Float pixels in ``value_range`` -> float in [0, 1] (clamped; NaN stays NaN)."""
    if x.dtype == torch.float64:
        x = x.float()
    lo, hi = value_range
    if (lo, hi) != (0.0, 1.0):
        x = (x - lo) / (hi - lo)
    return x.clamp(0.0, 1.0)


def _from_rgb(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N, 3 or 4, H, W) RGB(A) -> the channels of ``like`` (N, C, H, W): gray by luma; alpha
    from ``y`` when it has one, else kept from ``like``."""
    c = like.shape[1]
    if y.dtype == torch.uint8 and c != 3:
        y = unit(y)
    if c == 1:
        w = torch.tensor(_LUMA, device=y.device, dtype=y.dtype).view(1, 3, 1, 1)
        return (y[:, :3] * w).sum(1, keepdim=True)
    if c == 4:
        alpha = y[:, 3:] if y.shape[1] == 4 else unit(like[:, 3:].to(y.device))
        return torch.cat([y[:, :3], alpha], dim=1)
    return y


def _encode(y: torch.Tensor, dtype: torch.dtype, value_range: ValueRange) -> torch.Tensor:
    """uint8 in [0, 255] or float in [0, 1] -> the caller's dtype and value range."""
    if dtype == torch.uint8:
        return y if y.dtype == torch.uint8 else (y * 255.0).round().clamp(0, 255).to(torch.uint8)
    lo, hi = value_range
    return (unit(y) * (hi - lo) + lo).to(dtype)


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
    if moved.dtype == torch.uint8:  # stays uint8: no float copy of the whole batch
        finite, pixels = torch.ones(len(moved), dtype=torch.bool, device=device), moved
    else:  # checked before _to_unit, whose clamp turns +-Inf into 1 and 0
        finite, pixels = torch.isfinite(moved).flatten(1).all(1), _to_unit(moved, value_range)

    def restore(index, censored, censored_range, keep=None):
        if not index:
            return images
        if isinstance(censored, list):
            censored = torch.stack(censored)
        rng = check_range(censored_range) if censored_range is not None else value_range
        idx = torch.tensor(index, device=raw.device)
        y = _encode(_from_rgb(censored.to(raw.device), raw[idx]), raw.dtype, rng)
        if keep is not None and rng == value_range:
            none = torch.zeros(raw.shape[-2:], dtype=torch.bool, device=raw.device)
            kept = torch.stack([none if k is None else k.to(raw.device) for k in keep])[:, None]
            y = torch.where(kept, raw[idx], y)
        out = raw.clone()
        out[idx] = y
        if lay.endswith("HWC"):
            out = out.permute(0, 2, 3, 1)
        out = out.reshape(orig.shape).contiguous()
        return out.numpy() if is_numpy else out

    return Prepared(pixels, finite, restore)


# --- files ------------------------------------------------------------------------------------

#: ``<_io.BytesIO object at 0x7f...>``: how decoders name a stream in their errors.
_OBJECT_REPR = re.compile(r"<[^<>]* object at 0x[0-9a-fA-F]+>")


def plain(message: str, label: str) -> str:
    """``message`` with every Python object repr replaced by ``label`` (errors name inputs, not objects)."""
    return _OBJECT_REPR.sub(label, message)


class ImageTooLarge(ValueError):
    """An image over a pixel limit, or one that cannot be decoded safely (a decompression bomb)."""


class MultiFrameImage(ValueError):
    """A file with more than one frame or page (an animation, a multi-page TIFF): scoring one
    frame of it would pass the others unchecked."""


def open_image(source: str | os.PathLike | IO[bytes], max_pixels: int | None = None, *,
               formats: Sequence[str] | None = None, name: str | None = None) -> Image.Image:
    """Open a single-image file or stream: EXIF orientation applied, fully decoded.

    The mode is kept (16-bit stays 16-bit), except that 32-bit and signed-integer TIFFs become
    ``I;16``, scaled from the range their header declares.

    Args:
        source: a path, or a binary stream (an upload's bytes in ``io.BytesIO``).
        max_pixels: refuse images with more than this many pixels (width * height), checked
            from the header before any decoding; PIL's own decompression-bomb limit
            (``Image.MAX_IMAGE_PIXELS``) applies as well.
        formats: the PIL decoders to try (e.g. ``["PNG", "JPEG"]``); default: all.
        name: how errors name the image; default: the path.
    Raises:
        MultiFrameImage: an animation (GIF, WebP, APNG, including an APNG whose default image
            is not part of the animation) or a multi-page file (TIFF): never scored by one frame.
        ImageTooLarge: over ``max_pixels``, a decompression bomb, or out of memory.
        ValueError: missing, empty, truncated, or not an image.
    """
    name = name or repr(str(source))
    try:
        with Image.open(source, formats=formats) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise ImageTooLarge(f"{name} is {im.width}x{im.height} = {im.width * im.height:,} pixels, "
                                    f"over the limit of {max_pixels:,} (possible decompression bomb)")
            frames = frame_count(im)
            if frames > 1:
                hidden = " (one a default image outside the animation)" if getattr(im, "default_image", False) else ""
                what = "pages" if im.format == "TIFF" else "frames"
                raise MultiFrameImage(f"{name} is a {im.format} file with {frames} {what}{hidden}: check it "
                                      f"frame by frame as a video (nsfw_safety.video.check_video)")
            if _deep_rgb_key(im):
                raise ValueError(f"{name} is a 16-bit RGB PNG with a transparent colour (tRNS): decoded in 8 "
                                 f"bits, that colour cannot be told apart, so it cannot be checked as shown")
            im.seek(0)
            im.load()
            int_range = _int_range(im)  # from the TIFF header, which the transposed copy does not keep
            out = ImageOps.exif_transpose(im)
            if int_range is not None and int_range != _RANGE_16:
                out = _as_16bit(out, int_range)
            out.format = im.format  # the file's format, which the copy does not carry
            return out
    except (Image.DecompressionBombError, MemoryError) as e:
        raise ImageTooLarge(f"{name} is too large to decode safely: {e}") from e
    except FileNotFoundError as e:
        raise ValueError(f"{name} does not exist") from e
    except (ImageTooLarge, MultiFrameImage):
        raise
    except Exception as e:  # decoders raise OSError, EOFError, struct.error, ... on hostile bytes
        raise ValueError(f"{name} is not a readable image ({type(e).__name__}: {plain(str(e), name)})") from e


def _deep_rgb_key(im: Image.Image) -> bool:
    """A 16-bit RGB image with a transparent colour key (PNG ``tRNS``): Pillow decodes it to 8
    bits and compares the 16-bit key with 8-bit pixels, so its transparency is lost. Known from
    the key itself, or (before loading) from the decoder's raw mode."""
    key = im.info.get("transparency")
    if im.mode != "RGB" or not isinstance(key, tuple):
        return False
    return any(v > 255 for v in key) or any(str(t.args).startswith("RGB;16") for t in getattr(im, "tile", []))


def frame_count(im: Image.Image) -> int:
    """The frames or pages in an opened file, read without decoding pixels (an APNG's default
    image counts). A JPEG's extra MPF pictures (previews, HDR gain maps, the other half of a
    stereo pair) count as none: viewers show the primary image only."""
    if im.format == "PNG":
        _check_apng_frames(im)
    if im.format == "MPO" or not getattr(im, "is_animated", False):
        return 1
    return im.n_frames


def _check_apng_frames(im: Image.Image) -> None:
    """Refuse a PNG that holds more frame control chunks (``fcTL``) than the frame count its
    ``acTL`` declares: Pillow reads as many frames as declared, and a viewer that plays the
    chunks it finds would show frames that were never checked. (Fewer chunks than declared is
    a truncated file: decoding stops at the first missing frame, and that fails the check.)

    Raises:
        ValueError: naming both counts.
    """
    fp, start = im.fp, im.fp.tell()
    try:
        fp.seek(8)  # the signature
        declared, found = None, 0
        while True:
            head = fp.read(8)
            if len(head) < 8:
                break
            size, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind == b"acTL":
                declared = int.from_bytes(fp.read(4), "big")
                size -= 4
            elif kind == b"fcTL":
                found += 1
            elif kind == b"IEND":
                break
            fp.seek(size + 4, os.SEEK_CUR)  # the data and its CRC
    finally:
        fp.seek(start)
    if declared is not None and found > declared:
        raise ValueError(f"the APNG declares {declared} frames but holds {found} frame control chunks: "
                         f"a viewer could show frames that would not be checked")


# --- PIL images ---------------------------------------------------------------------------------

_RANGE_16 = (0, 65535)
#: Mode -> (numpy dtype of its raw bytes, channels), for the modes that are read as they are.
_RAW = {"L": (np.uint8, 1), "LA": (np.uint8, 2), "RGB": (np.uint8, 3), "RGBA": (np.uint8, 4),
        "I;16": ("<u2", 1), "I;16L": ("<u2", 1), "I;16B": (">u2", 1), "I;16N": ("=u2", 1),
        "I": ("=i4", 1), "F": ("=f4", 1)}
_DEEP = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _int_range(im: Image.Image) -> tuple[int, int] | None:
    """The value range of a mode ``I`` image: what its TIFF header declares (32-bit unsigned or
    signed, 16-bit signed), else Pillow's convention for ``I`` (16-bit: PGM, old PNG)."""
    if im.mode != "I":
        return None
    tags = getattr(im, "tag_v2", None)
    bits, fmt = (tags.get(258, (16,)), tags.get(339, (1,))) if tags is not None else ((16,), (1,))
    bits = bits[0] if isinstance(bits, tuple) else bits
    fmt = fmt[0] if isinstance(fmt, tuple) else fmt
    if bits == 32:
        return (-(2**31), 2**31 - 1) if fmt == 2 else (0, 2**32 - 1)
    if bits == 16 and fmt == 2:
        return (-(2**15), 2**15 - 1)
    return _RANGE_16


def _scaled(raw: np.ndarray, int_range: tuple[int, int], top: int, dtype) -> np.ndarray:
    """Integer pixels in ``int_range`` -> ``round((v - low) * top / (high - low))``, clipped."""
    lo, hi = int_range
    v = raw.astype(np.int64)
    if hi == 2**32 - 1:
        v &= 0xFFFFFFFF  # Pillow reads unsigned 32-bit into int32
    v = np.clip(v, lo, hi) - lo
    return np.rint(v * (top / (hi - lo))).astype(dtype)


def _as_16bit(im: Image.Image, int_range: tuple[int, int]) -> Image.Image:
    """A mode ``I`` image whose range is not 16-bit -> ``I;16`` scaled to 0..65535."""
    a = _read(im, "I", lambda raw: _scaled(raw, int_range, 65535, np.uint16), np.uint16, 1)
    return Image.frombytes("I;16", im.size, a.astype("<u2").tobytes())


def _read(im: Image.Image, mode: str, fn, dtype, channels: int) -> np.ndarray:
    """``im`` read tile by tile in ``mode`` (converted by Pillow per tile), each tile's raw
    array passed through ``fn``, into one writable (H, W, channels) array: no whole-image
    temporary (``np.asarray(im)`` would make two, through ``tobytes``)."""
    raw_dtype, c = _RAW[mode]
    out = np.empty((im.height, im.width, channels), dtype)
    for rows, cols in _tiles(im.height, im.width):
        tile = im.crop((cols.start, rows.start, cols.stop, rows.stop))
        if tile.mode != mode:
            tile = tile.convert(mode)
        raw = np.frombuffer(tile.tobytes(), raw_dtype).reshape(tile.height, tile.width, c)
        out[rows, cols] = fn(raw)
    return out


def _read_mode(im: Image.Image) -> str:
    """The 8-bit mode a viewer's conversion of ``im`` lands in (or a deep mode, read as is)."""
    if im.mode in _DEEP:
        return im.mode
    gray = im.mode in ("1", "L", "LA", "La")
    if im.has_transparency_data:
        return "LA" if gray else "RGBA"
    return "L" if gray else "RGB"


def pil_to_tensor(im: Image.Image) -> tuple[torch.Tensor, bool]:
    """A PIL image as a viewer sees it, in any mode.

    Palette, CMYK, YCbCr, LAB, HSV, 1-bit and premultiplied modes are converted by Pillow (tile
    by tile); transparency (an alpha channel, a palette or ``tRNS`` transparency) becomes an
    alpha channel, dropped when it is opaque everywhere; 16-bit and 32-bit gray are scaled to
    8 bits (``round(v * 255 / 65535)``, the range of ``I`` read as :func:`open_image` says);
    ``F`` is read as floats in [0, 1]. A 16-bit gray ``tRNS`` value is transparent where the
    16-bit pixel equals it.

    Returns:
        (C, H, W) on the CPU: uint8 in [0, 255], or float32 in [0, 1] for mode ``F`` (clamped;
        NaN kept); C = 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA, straight alpha). And
        whether every value is finite.
    Raises:
        ValueError: the image has zero size, or is a 16-bit RGB image with a transparent colour
            key, whose transparency 8-bit decoding has lost.
    """
    if im.width == 0 or im.height == 0:
        raise ValueError(f"PIL image has zero size {im.size}")
    if _deep_rgb_key(im):
        raise ValueError(f"PIL image has a 16-bit transparent colour {im.info['transparency']} but 8-bit "
                         f"pixels: what is transparent cannot be told, so it cannot be checked as shown")
    mode = _read_mode(im)
    if mode == "F":
        a = _read(im, "F", lambda raw: raw, np.float32, 1)
        x = torch.from_numpy(a).permute(2, 0, 1)
        finite = bool(torch.isfinite(x).all())
        return x.clamp_(0.0, 1.0), finite
    if mode in _DEEP:
        int_range = _int_range(im) or _RANGE_16
        key = im.info.get("transparency")  # a 16-bit PNG's tRNS gray: that exact value is transparent
        if isinstance(key, int):
            a = _read(im, mode, lambda raw: np.concatenate(
                [_scaled(raw, int_range, 255, np.uint8), np.where(raw == key, 0, 255).astype(np.uint8)], -1),
                np.uint8, 2)
        else:
            a = _read(im, mode, lambda raw: _scaled(raw, int_range, 255, np.uint8), np.uint8, 1)
    else:
        a = _read(im, mode, lambda raw: raw, np.uint8, _RAW[mode][1])
    if a.shape[-1] in (2, 4) and a[..., -1].min() == 255:  # opaque: one view, not two
        a = a[..., :-1]
    return torch.from_numpy(a).permute(2, 0, 1), True


def tensor_to_pil(y: torch.Tensor, like: Image.Image | None = None) -> Image.Image:
    """(3 or 4, H, W) RGB(A), uint8 in [0, 255] or float in [0, 1] -> a PIL image: RGB(A), or in
    ``like``'s mode. RGBA sets the alpha channel; RGB keeps ``like``'s. Palette modes come back as
    RGB(A) (a palette cannot hold a blur); 16-bit and float modes get the luma at their own scale."""
    y = y.cpu()
    if like is not None and like.mode in _DEEP:
        luma = (unit(y[:3]) * torch.tensor(_LUMA).view(3, 1, 1)).sum(0).clamp(0, 1).numpy()
        if like.mode == "F":
            return Image.frombytes("F", like.size, luma.astype("=f4").tobytes())
        if like.mode == "I":
            return Image.frombytes("I", like.size, np.rint(luma * 65535).astype("=i4").tobytes())
        raw = _RAW[like.mode][0]
        return Image.frombytes(like.mode, like.size, np.rint(luma * 65535).astype(raw).tobytes())
    u8 = y if y.dtype == torch.uint8 else (y.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    out = Image.fromarray(u8.permute(1, 2, 0).contiguous().numpy())
    if like is None:
        return out
    if len(y) == 3 and like.has_transparency_data:  # alpha not censored: the original's
        alpha = like.convert("RGBA" if like.mode not in ("LA", "La") else "LA").getchannel("A")
        out.putalpha(alpha)
    target = {"P": out.mode, "PA": "RGBA", "La": "LA"}.get(like.mode, like.mode)
    return out if out.mode == target else out.convert(target)


def _prepare_list(items: list, value_range, layout, device) -> Prepared:
    device = torch.device(device) if device is not None else torch.device("cpu")
    parts: list[Prepared] = []
    originals: list[Any] = []
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            item = open_image(item)
        if isinstance(item, Image.Image):
            x, finite = pil_to_tensor(item)
            parts.append(Prepared(x.to(device)[None], torch.full((1,), finite, device=device), None))
        elif isinstance(item, (torch.Tensor, np.ndarray)):
            if item.ndim == 4:
                raise ValueError(f"images[{i}] is a batch (shape {tuple(item.shape)}): a list holds single images")
            parts.append(_prepare_array(item, value_range, layout, device))
        else:
            raise TypeError(f"images[{i}] is a {type(item).__name__}: expected a tensor, numpy array, "
                            f"PIL image or file path")
        originals.append(item)
    one = [p.pixels[0] for p in parts]
    finite = torch.cat([p.finite for p in parts])
    # stacked when it is cheap; large images gain nothing from one batch, and a copy costs
    same = len({(tuple(p.shape), p.dtype) for p in one}) == 1
    pixels = torch.stack(one) if same and sum(p.nbytes for p in one) <= _STACK_BYTES else one
    # only the restore of arrays is kept: the decoded pixels of PIL images live in ``pixels``
    restorers = [None if isinstance(o, Image.Image) else p.restore for o, p in zip(originals, parts)]
    del parts, one

    def restore(index, censored, censored_range, keep=None):
        out = list(originals)
        for j, (i, c) in enumerate(zip(index, censored)):
            if restorers[i] is None:
                out[i] = tensor_to_pil(c, originals[i])
            else:
                out[i] = restorers[i]([0], c[None], censored_range, None if keep is None else [keep[j]])
        return out

    return Prepared(pixels, finite, restore)
