"""Deterministic synthetic test images: gradients, noise, sharp edges, flat colours, odd sizes."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SIZES = [(64, 64), (97, 131), (200, 300), (512, 512), (360, 640), (45, 80), (448, 448), (123, 77)]


def synthetic(i: int, size: tuple[int, int] | None = None) -> Image.Image:
    """Image number ``i`` (any int), an RGB PIL image of (h, w) ``size`` (default: cycles SIZES)."""
    rng = np.random.default_rng(i)
    h, w = size or SIZES[i % len(SIZES)]
    kind = i % 8
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # horizontal/vertical gradient
        a = np.stack([xx / w, yy / h, 1 - xx / w], -1)
    elif kind == 1:  # uniform noise
        a = rng.random((h, w, 3))
    elif kind == 2:  # checkerboard: sharp edges, the hardest case for resampling
        s = int(rng.integers(2, 9))
        a = np.repeat((((xx // s + yy // s) % 2)[..., None]), 3, -1)
    elif kind == 3:  # flat colour
        a = np.broadcast_to(rng.random(3), (h, w, 3))
    elif kind == 4:  # radial pattern
        r = np.hypot(xx - w / 2, yy - h / 2)
        a = np.stack([np.sin(r / rng.uniform(2, 12)) * 0.5 + 0.5, r / r.max(), np.cos(xx / 7) * 0.5 + 0.5], -1)
    elif kind == 5:  # smooth noise (blocky upsampled)
        small = rng.random((max(2, h // 16), max(2, w // 16), 3))
        a = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)) / 255.0
    elif kind == 6:  # stripes
        a = np.repeat(((np.sin(xx * rng.uniform(0.2, 1.5)) > 0).astype(np.float32))[..., None], 3, -1) * rng.random(3)
    else:  # shapes on a background
        im = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 255, 3)))
        d = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            d.ellipse((x0, y0, x0 + int(rng.integers(5, w)), y0 + int(rng.integers(5, h))),
                      fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        return im
    return Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8), "RGB")
