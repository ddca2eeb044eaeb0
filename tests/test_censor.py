"""The censoring kernels (nsfw_safety.censor) on plain tensors: shapes, colours, and that blur
and pixelate really destroy detail at the default strength, at any image size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from nsfw_safety import censor as C

LETTERS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def text_page(n: int, seed: int) -> torch.Tensor:
    """(1, 3, n, n) in [0, 1]: lines of random dark text on light grey, the same layout for
    every seed; the letters differ."""
    rng = np.random.default_rng(seed)
    im = Image.new("L", (n, n), 230)
    draw = ImageDraw.Draw(im)
    step = 24 * n // 512
    for top in range(0, n, step):
        draw.text((4, top), "".join(rng.choice(LETTERS, 60)), fill=10, font=_font(18 * n // 512))
    g = torch.from_numpy(np.asarray(im).astype(np.float32) / 255.0)
    return g.expand(1, 3, n, n).contiguous()


def detailed(n: int) -> torch.Tensor:
    """(1, 3, n, n): the same 512 px scene at any size n: text, a 4 px checkerboard, and noise."""
    x = text_page(512, 0)
    yy, xx = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    x[:, :, :256, :256] = ((xx // 4 + yy // 4) % 2).float()
    x[:, :, 256:, 256:] = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    return x if n == 512 else F.interpolate(x, size=(n, n), mode="nearest")


def hf_energy(x: torch.Tensor, cutoff: float = 8.0) -> float:
    """Spectral energy above ``cutoff`` cycles per image (scale-free: the same scene at 512 and
    1024 px has the same spectrum in cycles per image). A Hann window keeps the jump between
    opposite borders, which the FFT sees as an edge, out of the measure."""
    n = x.shape[-1]
    w = torch.hann_window(n, periodic=False, dtype=torch.float64)
    x = x.double() - x.double().mean((-2, -1), keepdim=True)
    spec = torch.fft.fft2(x * w[:, None] * w[None, :]).abs() ** 2
    f = torch.fft.fftfreq(n, dtype=torch.float64) * n
    return float((spec * (torch.hypot(f[:, None], f[None, :]) > cutoff)).sum())


# --- shapes, dtypes, devices ------------------------------------------------------------------

@pytest.mark.parametrize("action", ["blur", "pixelate", "black", "placeholder", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size", [(1, 1), (7, 300), (64, 64), (200, 90)])
def test_censor_keeps_shape_dtype_range(action, dtype, size):
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)).to(dtype)
    before = x.clone()
    y = C.censor(x, action)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert torch.isfinite(y.float()).all() and y.min() >= 0 and y.max() <= 1
    assert torch.equal(x, before)  # never in place
    if action == "none":
        assert y is x
    else:
        assert y.data_ptr() != x.data_ptr()


def test_blur_and_pixelate_keep_flat_images_flat():
    x = torch.full((1, 3, 97, 131), 0.3)
    x[:, 1] = 0.7
    for y in (C.blur(x), C.pixelate(x), C.blur(x, 0.2)):
        assert torch.allclose(y, x, atol=1e-5)  # no dark or bright borders from padding


# --- blur and pixelate destroy detail ----------------------------------------------------------

@pytest.mark.parametrize("kernel, left", [(C.blur, 1e-4), (C.pixelate, 0.03)])
def test_default_strength_removes_high_frequencies_at_any_size(kernel, left):
    ratios = {}
    for n in (512, 1024):
        x = detailed(n)
        ratios[n] = hf_energy(kernel(x)) / hf_energy(x)
    # blur keeps < 0.01% of the energy above 8 cycles per image, pixelate < 3% (its block edges) ...
    assert ratios[512] < left and ratios[1024] < left, ratios
    # ... and the strength scales with the size: a 1024 px image is hidden as well as a 512 px one
    # (pixelate's block grid aliases the 4 px checkerboard differently at each size: factor 3)
    assert ratios[1024] == pytest.approx(ratios[512], rel=0.25 if kernel is C.blur else 2.0), ratios


@pytest.mark.parametrize("kernel", [C.blur, C.pixelate])
def test_default_strength_makes_different_texts_indistinguishable(kernel):
    for n in (512, 1024):
        a, b = text_page(n, 1), text_page(n, 2)
        before = (a - b).pow(2).mean()
        after = (kernel(a) - kernel(b)).pow(2).mean()
        assert after / before < 0.01, (n, float(after / before))  # >99% of the difference is gone


def test_weak_strengths_keep_detail():
    """The measures above can fail: strengths far below the defaults leave the text readable."""
    a, b = text_page(512, 1), text_page(512, 2)
    before = (a - b).pow(2).mean()
    assert (C.blur(a, 0.002) - C.blur(b, 0.002)).pow(2).mean() / before > 0.1
    assert (C.pixelate(a, 1 / 256) - C.pixelate(b, 1 / 256)).pow(2).mean() / before > 0.3
    x = detailed(512)
    assert hf_energy(C.blur(x, 0.002)) / hf_energy(x) > 0.2


def test_blur_sigma_is_a_fraction_of_the_longer_side():
    """A point's blur radius grows with the image: same spread in image fractions at 256 and 1024."""
    spreads = []
    for n in (256, 1024):
        x = torch.zeros(1, 3, n, n)
        x[..., n // 2, n // 2] = 1.0
        y = C.blur(x, 0.05)[0, 0]
        profile = y[n // 2] / y[n // 2].sum()
        pos = torch.arange(n, dtype=torch.float32) / n - 0.5
        spreads.append(float((profile * pos**2).sum().sqrt()))
    assert spreads[0] == pytest.approx(0.05, rel=0.15) and spreads[1] == pytest.approx(0.05, rel=0.15)


@pytest.mark.parametrize("n, side", [(512, 32), (1024, 64), (256, 16)])
def test_pixelate_blocks_scale_with_size(n, side):
    x = torch.rand(1, 3, n, n, generator=torch.Generator().manual_seed(3))
    y = C.pixelate(x, 1 / 16)
    blocks = y.unfold(2, side, side).unfold(3, side, side)  # (1, 3, n/side, n/side, side, side)
    assert torch.equal(blocks, blocks[..., :1, :1].expand_as(blocks))  # each block is one colour
    assert torch.allclose(blocks[..., 0, 0], F.avg_pool2d(x, side), atol=1e-6)  # its mean colour
    # the noise inside a block is gone: correlation with the original ~ 1/side (1.0 unpixelated)
    a, b = x.flatten() - x.mean(), y.flatten() - y.mean()
    assert float(a @ b / (a.norm() * b.norm())) < 1.5 / side


def test_pixelate_block_parameter():
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    y = C.pixelate(x, block=0.25)  # 16 px blocks
    assert torch.allclose(y[..., ::16, ::16], F.avg_pool2d(x, 16), atol=1e-6)
    assert len(torch.unique(y[0, 0])) == 16


def test_stronger_blur_is_smoother():
    x = detailed(512)
    energies = [hf_energy(C.blur(x, s), cutoff=4) for s in (0.01, 0.05, 0.1)]
    assert energies[0] > 5 * energies[1] > 25 * energies[2]


# --- fills and placeholders -------------------------------------------------------------------

def test_fill_uses_the_colour():
    x = torch.rand(3, 3, 10, 20, dtype=torch.float16)
    y = C.censor(x, "black", color=(1.0, 0.5, 0.0))
    assert y.dtype == torch.float16 and y.shape == x.shape
    assert torch.equal(y[:, 0], torch.ones(3, 10, 20, dtype=torch.float16))
    assert torch.equal(y[:, 1], torch.full((3, 10, 20), 0.5, dtype=torch.float16))
    assert torch.equal(y[:, 2], torch.zeros(3, 10, 20, dtype=torch.float16))
    assert torch.equal(C.censor(x, "black"), torch.zeros_like(x))


@pytest.mark.parametrize("color, error", [((1.5, 0, 0), ValueError), ((0, 0), ValueError),
                                          ((0, -0.1, 0), ValueError), (0.5, TypeError),
                                          ((0, 0, float("nan")), ValueError)])
def test_bad_colour(color, error):
    with pytest.raises(error, match="colour"):
        C.check_color(color)


def test_placeholder_fits_the_card_and_fills_with_its_corner_colour():
    card = torch.zeros(3, 10, 20)
    card[0] = 1.0  # red card, 2:1
    card[:, 3:7, 5:15] = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)  # blue centre
    y = C.place(torch.rand(2, 3, 40, 30), card)
    assert y.shape == (2, 3, 40, 30)
    assert torch.equal(y[0], y[1])
    # scaled by 1.5 to 15 x 30, centred vertically: rows 12..27; red corner colour everywhere else
    assert torch.allclose(y[0, :, :12], torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 12, 30))
    assert torch.allclose(y[0, :, 27:], torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 13, 30))
    assert torch.allclose(y[0, :, 19, 15], torch.tensor([0.0, 0.0, 1.0]), atol=1e-3)


def test_default_card():
    card = C.default_card()
    assert card.shape == (3, 256, 256) and card.dtype == torch.float32
    assert 0 <= card.min() and card.max() <= 1
    y = C.censor(torch.rand(1, 3, 512, 256), "placeholder")
    assert torch.allclose(y[0, :, 128:384], card, atol=1e-6)  # 256 px card centred in a 512 x 256 image
    assert torch.allclose(y[0, :, :128], card[:, :1, :1].expand(3, 128, 256))
    # a card, not a flat fill: it carries a frame and the words "content hidden"
    assert card.std() > 0.05 and (card > 0.7).any()


# --- bad arguments ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(action="smudge"), dict(action="blur", blur_strength=0),
                                    dict(action="blur", blur_strength=-1), dict(action="pixelate", block=0),
                                    dict(action="pixelate", block=1.5)])
def test_bad_action_or_strength(kwargs):
    with pytest.raises(ValueError):
        C.censor(torch.rand(1, 3, 8, 8), **kwargs)
