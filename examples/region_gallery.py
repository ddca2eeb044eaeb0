"""Before/after pictures of region censoring, for the docs.

    python examples/region_gallery.py            # writes docs/img/regions_*.png

The scene is synthetic (the one censor_gallery.py draws) and the regions are boxes placed by
hand around parts of it, labelled with a NudeNet class for the picture's sake: the detector is
not run (it finds nothing in drawn shapes), and no real content is involved. The masks and the
censoring are the library's own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from censor_gallery import scene, strip  # noqa: E402

from nsfw_safety.inputs import pil_to_tensor, tensor_to_pil, unit  # noqa: E402
from nsfw_safety.regions import NUDENET_LABELS, Regions, censor_regions, region_mask  # noqa: E402

#: Hand-placed boxes (x1, y1, x2, y2) on the 512 px scene: the sign, the house, the sun.
BOXES = [(255.0, 365.0, 495.0, 495.0), (60.0, 232.0, 228.0, 424.0), (352.0, 42.0, 458.0, 148.0)]


def fake_regions(size: int) -> Regions:
    """The boxes above as a Regions for one image, as the detector would return them."""
    label = NUDENET_LABELS.index("BUTTOCKS_EXPOSED")
    return Regions(boxes=torch.tensor(BOXES), scores=torch.tensor([0.9, 0.8, 0.7]),
                   classes=torch.full((3,), label), image=torch.zeros(3, dtype=torch.long),
                   size=(size, size), problems=(None,))


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1], or a (H, W) mask shown in gray -> PIL."""
    return tensor_to_pil(x if x.dim() == 3 else x.expand(3, -1, -1))


def outlined(im: Image.Image) -> Image.Image:
    im = im.copy()
    draw = ImageDraw.Draw(im)
    for box in BOXES:
        draw.rectangle(box, outline=(255, 40, 200), width=4)
    return im


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="folder for the PNG files")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    original = scene()
    x = unit(pil_to_tensor(original)[0])[None]
    regions = fake_regions(original.width)
    masks = {
        "rectangle": region_mask(regions, shape="rectangle"),
        "ellipse": region_mask(regions, shape="ellipse"),
        "ellipse, feather=0.1": region_mask(regions, shape="ellipse", feather=0.1),
    }
    expanded = regions.select("all", expand=0.2)
    masks["expand=0.2, feather=0.05"] = region_mask(expanded, feather=0.05)

    def censored(action: str, mask: torch.Tensor, found: Regions = regions) -> Image.Image:
        return to_pil(censor_regions(x, mask, action, regions=found)[0])

    pictures = {
        "masks": [(outlined(original), "regions (drawn by hand)")]
                 + [(to_pil(m[0]), name) for name, m in masks.items()],
        "actions": [(original, "original")]
                   + [(censored(a, masks["rectangle"]), a) for a in ("blur", "pixelate", "black", "placeholder")],
        "shapes": [(original, "original"),
                   (censored("blur", masks["ellipse, feather=0.1"]), "blur, ellipse, feather=0.1"),
                   (censored("pixelate", masks["ellipse"]), "pixelate, ellipse"),
                   (censored("black", masks["expand=0.2, feather=0.05"], expanded), "black, expand=0.2, feather=0.05")],
    }
    for name, tiles in pictures.items():
        path = args.out / f"regions_{name}.png"
        strip(tiles).save(path, optimize=True)
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
