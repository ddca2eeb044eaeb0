"""Before/after pictures of each censoring action, for the README.

    python examples/censor_gallery.py            # writes docs/img/censor_*.png

The pictures are made from a synthetic scene (shapes, gradients and text drawn with PIL) and
run through the real SafetyFilter. The detector is a tiny random checkpoint whose head is
biased to put every image in "high", written to a temporary folder and deleted afterwards:
it flags everything by construction and its scores mean nothing. No real model or real
content is involved.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # checkpoints.py writes the tiny test checkpoint

from checkpoints import write_eva  # noqa: E402

from nsfw_safety import SafetyFilter, load_detector  # noqa: E402

SIZE = 512  # the filter runs at this size; strengths are fractions of it, so any size looks alike
TILE = 256  # size of each picture in the strips
CAPTION = 28

#: (file name, caption, SafetyFilter keyword arguments)
ACTIONS = [
    ("blur", "blur (default)", dict(action="blur")),
    ("pixelate", "pixelate (default)", dict(action="pixelate")),
    ("black", "black", dict(action="black")),
    ("black_colour", "black, color=(0.2, 0.2, 0.3)", dict(action="black", color=(0.2, 0.2, 0.3))),
    ("placeholder", "placeholder (built-in card)", dict(action="placeholder")),
    ("blur_weak", "blur_strength=0.01 (too weak)", dict(action="blur", blur_strength=0.01)),
]


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font has no size
        return ImageFont.load_default()


def scene(n: int = SIZE) -> Image.Image:
    """A synthetic n x n RGB scene: sky gradient, sun, hills, a house, a sign with text."""
    s = n / 512
    im = Image.new("RGB", (n, n))
    draw = ImageDraw.Draw(im)
    for y in range(n):  # sky: blue to pale orange
        t = y / n
        draw.line((0, y, n, y), fill=(int(70 + 170 * t), int(130 + 80 * t), int(220 - 90 * t)))
    draw.ellipse((360 * s, 50 * s, 450 * s, 140 * s), fill=(255, 215, 80))
    draw.polygon([(0, 330 * s), (140 * s, 220 * s), (290 * s, 330 * s)], fill=(70, 120, 80))
    draw.polygon([(180 * s, 340 * s), (360 * s, 200 * s), (512 * s, 320 * s), (512 * s, 360 * s)], fill=(50, 100, 70))
    draw.rectangle((0, 330 * s, n, n), fill=(95, 160, 75))
    draw.rectangle((70 * s, 300 * s, 210 * s, 420 * s), fill=(200, 90, 70))  # house
    draw.polygon([(55 * s, 305 * s), (140 * s, 235 * s), (225 * s, 305 * s)], fill=(120, 60, 50))
    draw.rectangle((125 * s, 360 * s, 155 * s, 420 * s), fill=(80, 50, 40))
    for x0 in (85, 170):
        draw.rectangle((x0 * s, 320 * s, (x0 + 25) * s, 345 * s), fill=(250, 240, 180))
        draw.line(((x0 + 12.5) * s, 320 * s, (x0 + 12.5) * s, 345 * s), fill=(80, 50, 40), width=max(1, int(2 * s)))
    # a sign with text and a checkerboard: the fine detail a censor must remove
    draw.rectangle((260 * s, 370 * s, 490 * s, 490 * s), fill=(245, 245, 240), outline=(40, 40, 40),
                   width=max(1, int(3 * s)))
    draw.text((275 * s, 380 * s), "nsfw-safety", fill=(20, 20, 20), font=font(int(28 * s)))
    draw.text((275 * s, 418 * s), "Fine print is the first", fill=(20, 20, 20), font=font(int(15 * s)))
    draw.text((275 * s, 436 * s), "thing a censor must hide.", fill=(20, 20, 20), font=font(int(15 * s)))
    cell = 8 * s
    for i in range(6):
        for j in range(3):
            if (i + j) % 2 == 0:
                x, y = 410 * s + i * cell, 455 * s + j * cell
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(20, 20, 20))
    draw.text((16 * s, 16 * s), "synthetic test scene", fill=(255, 255, 255), font=font(int(20 * s)))
    return im


def strip(tiles: list[tuple[Image.Image, str]]) -> Image.Image:
    """Tiles side by side, each TILE px square with a caption underneath."""
    out = Image.new("RGB", (TILE * len(tiles) + 8 * (len(tiles) - 1), TILE + CAPTION), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for k, (im, caption) in enumerate(tiles):
        x = k * (TILE + 8)
        out.paste(im.resize((TILE, TILE), Image.LANCZOS), (x, 0))
        draw.text((x + TILE // 2, TILE + CAPTION // 2), caption, fill=(30, 30, 30), font=font(15), anchor="mm")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="folder for the PNG files")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    original = scene()
    with tempfile.TemporaryDirectory() as tmp:
        # flags every image by construction: this picture shows the censoring, not a score
        detector = load_detector(str(write_eva(Path(tmp) / "flag_everything", bias="nsfw")), device="cpu")
        results = {}
        for name, caption, kwargs in ACTIONS:
            result = SafetyFilter(detector, **kwargs)(original)
            assert result.flagged == [True], result.reasons
            results[name] = (result.images, caption)

    written = []
    for name, (censored, caption) in results.items():
        path = args.out / f"censor_{name}.png"
        strip([(original, "original"), (censored, caption)]).save(path, optimize=True)
        written.append(path)
    overview = args.out / "censor_overview.png"
    strip([(original, "original")] + [results[k] for k in ("blur", "pixelate", "black", "placeholder")]).save(
        overview, optimize=True)
    written.append(overview)
    for path in written:
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
