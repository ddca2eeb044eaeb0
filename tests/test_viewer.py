"""The image scored is the image a viewer sees (issue #11): every Pillow mode at its own scale,
transparency composited over white and over black, never one frame of an animation, censored
alpha, bounded censoring, and finite value ranges.

Scores come from the tiny EVA checkpoint whose head is scaled so that levels spread over (0, 1)
(see tests/checkpoints.py), so a wrongly decoded image shows up as a level difference.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from images import synthetic
from PIL import Image

from nsfw_safety import SafetyFilter, load_detector
from nsfw_safety import censor as censor_module
from nsfw_safety import filter as filter_module
from nsfw_safety.censor import censor
from nsfw_safety.inputs import MultiFrameImage, open_image, pil_to_tensor, prepare
from nsfw_safety.levels import level_matrix

BOUND = 0.02  # max |level difference| between a mode and the same picture in 8-bit RGB
H, W = 64, 80


@pytest.fixture(scope="module")
def det(eva_dir):
    return load_detector(str(eva_dir), dtype="fp32")


def levels(det, images) -> torch.Tensor:
    return det.predict(images).levels


def stricter(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The stricter of two level rows: the smaller neutral, the larger NSFW levels."""
    return torch.cat([torch.minimum(a[:, :1], b[:, :1]), torch.maximum(a[:, 1:], b[:, 1:])], 1)


def picture(i: int) -> Image.Image:
    """A picture in 8-bit RGB, softened toward grey so that 8-bit LAB can hold its colours."""
    return Image.blend(synthetic(i, (H, W)), Image.new("RGB", (W, H), (128, 128, 128)), 0.4)


def write_png16(path, a: np.ndarray, key: tuple[int, ...] | None = None) -> None:
    """A 16-bit PNG (gray (H, W) or RGB (H, W, 3) uint16), written by hand: Pillow cannot. ``key``:
    a tRNS chunk, the gray value or RGB colour that is transparent."""
    h, w = a.shape[:2]
    color = 0 if a.ndim == 2 else 2
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in a)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    trns = chunk(b"tRNS", struct.pack(f">{len(key)}H", *key)) if key is not None else b""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0))
                     + trns + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def write_tiff(path, a: np.ndarray, sample_format: int = 1) -> None:
    """An uncompressed little-endian TIFF of ``a`` ((H, W) or (H, W, 3), any integer dtype),
    written by hand: Pillow writes neither 48-bit RGB nor unsigned 32-bit gray."""
    h, w = a.shape[:2]
    spp = 1 if a.ndim == 2 else a.shape[2]
    bits = a.dtype.itemsize * 8
    data = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
    bits_at = 8 + len(data)
    extra = struct.pack(f"<{spp}H", *[bits] * spp) if spp > 1 else b""
    ifd_at = bits_at + len(extra)

    def entry(tag, kind, count, value):
        return struct.pack("<HHII", tag, kind, count, value)

    entries = [entry(256, 4, 1, w), entry(257, 4, 1, h), entry(258, 3, spp, bits_at if spp > 1 else bits),
               entry(259, 3, 1, 1), entry(262, 3, 1, 2 if spp == 3 else 1), entry(273, 4, 1, 8),
               entry(277, 3, 1, spp), entry(278, 4, 1, h), entry(279, 4, 1, len(data)), entry(284, 3, 1, 1)]
    if spp == 1:
        entries.append(entry(339, 3, 1, sample_format))
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    path.write_bytes(b"II*\0" + struct.pack("<I", ifd_at) + data + extra + ifd)


def mode_cases(pic: Image.Image, tmp) -> list[tuple[str, object, Image.Image]]:
    """(name, the picture in that mode (a PIL image or a file), the reference in 8-bit RGB)."""
    gray = pic.convert("L")
    g = np.asarray(gray)
    rgb = np.asarray(pic)
    opaque = pic.convert("RGBA")
    pal = pic.quantize(256)  # a palette picture is its own reference
    lab = pic.convert("LAB")
    cases = []

    def file(name, save):
        path = tmp / name
        save(path)
        return path

    cases.append(("RGB png", file("rgb.png", pic.save), pic))
    bw = gray.convert("1")
    cases.append(("1 png", file("bw.png", bw.save), bw.convert("RGB")))
    cases.append(("L png", file("l.png", gray.save), gray.convert("RGB")))
    cases.append(("LA png", file("la.png", gray.convert("LA").save), gray.convert("RGB")))
    cases.append(("P png", file("p.png", pal.save), pal.convert("RGB")))
    pal_t = pal.copy()
    pal_t.info["transparency"] = bytes([255] * 256)  # a tRNS chunk, every entry opaque
    cases.append(("P+tRNS png", file("pt.png", pal_t.save), pal.convert("RGB")))
    pa = opaque.convert("PA")  # a palette: its own reference
    cases.append(("PA", pa, pa.convert("RGB")))
    cases.append(("RGBa", opaque.convert("RGBa"), pic))
    cases.append(("CMYK tiff", file("cmyk.tiff", pic.convert("CMYK").save), pic))
    # colour spaces that 8-bit RGB cannot round-trip exactly: the picture is the one in that
    # space, and its reference is how a viewer renders it in RGB
    ycc = pic.convert("YCbCr")
    cases.append(("YCbCr tiff", file("ycc.tiff", ycc.save), ycc.convert("RGB")))
    cases.append(("LAB tiff", file("lab.tiff", lab.save), lab.convert("RGB")))
    hsv = pic.convert("HSV")
    cases.append(("HSV", hsv, hsv.convert("RGB")))
    g16 = g.astype(np.uint16) * 257
    cases.append(("I;16 png", file("g16.png", lambda p: Image.fromarray(g16).save(p)), gray.convert("RGB")))
    cases.append(("I;16B tiff", file("g16b.tiff", lambda p: Image.frombytes("I;16B", (W, H), g16.astype(">u2").tobytes()).save(p)),
                  gray.convert("RGB")))
    cases.append(("I;16L", Image.frombytes("I;16L", (W, H), g16.astype("<u2").tobytes()), gray.convert("RGB")))
    cases.append(("I", Image.frombytes("I", (W, H), g16.astype("=i4").tobytes()), gray.convert("RGB")))
    u32 = g.astype(np.uint32) * 16843009  # 255 -> 2**32 - 1
    cases.append(("32-bit unsigned tiff", file("u32.tiff", lambda p: write_tiff(p, u32)), gray.convert("RGB")))
    s32 = (u32.astype(np.int64) - 2**31).astype(np.int32)
    cases.append(("32-bit signed tiff", file("s32.tiff", lambda p: Image.fromarray(s32).save(p)), gray.convert("RGB")))
    f = (g / 255.0).astype(np.float32)
    cases.append(("F tiff", file("f.tiff", lambda p: Image.fromarray(f).save(p)), gray.convert("RGB")))
    cases.append(("RGB 48-bit png", file("rgb16.png", lambda p: write_png16(p, rgb.astype(np.uint16) * 257)), pic))
    cases.append(("RGB 48-bit tiff", file("rgb16.tiff", lambda p: write_tiff(p, rgb.astype(np.uint16) * 257)), pic))
    return cases


def test_every_mode_scores_like_the_same_picture_in_8bit_rgb(det, tmp_path):
    seen = {}
    for i in (1, 5, 7):
        cases = mode_cases(picture(i), tmp_path)
        ours = levels(det, [c[1] for c in cases])
        ref = levels(det, [c[2] for c in cases])
        assert ref[:, 2].std() > 0.05, "scores do not spread: the test would prove nothing"
        for (name, _, _), a, b in zip(cases, ours, ref):
            seen[name] = max(seen.get(name, 0.0), float((a - b).abs().max()))
    print("max level difference per mode:", {k: round(v, 4) for k, v in seen.items()})
    assert all(v <= BOUND for v in seen.values()), seen


def test_clipping_would_fail_the_bound(det):
    """What the old RGB conversion did to 16-bit and float pictures moves the levels far beyond
    the bound, so the test above can fail."""
    gray = picture(5).convert("L")
    g16 = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    f = Image.fromarray((np.asarray(gray) / 255.0).astype(np.float32))
    clipped = levels(det, [g16.convert("RGB"), f.convert("RGB")])
    ref = levels(det, [gray.convert("RGB")] * 2)
    assert (clipped - ref).abs().amax(1).min() > 5 * BOUND


def test_bit_depth_conversions_are_exact():
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    x, finite = pil_to_tensor(Image.fromarray(ramp))
    assert finite and x.dtype == torch.uint8 and x.shape == (1, 256, 256)
    assert np.array_equal(x[0].numpy(), np.rint(ramp / 257.0).astype(np.uint8))  # round(v * 255 / 65535)
    x, _ = pil_to_tensor(Image.fromarray(np.array([[-0.5, 0.25, 2.0]], np.float32)))
    assert x.dtype == torch.float32 and x.flatten().tolist() == [0.0, 0.25, 1.0]  # F: [0, 1], clamped


# --- transparency --------------------------------------------------------------------------------

def hidden_in_alpha(pic: Image.Image, over: str) -> Image.Image:
    """An RGBA image whose colour is flat and whose picture is in the alpha channel: over a
    white page it shows ``pic`` (black colour, alpha = 255 - picture), over a black page the
    same (white colour, alpha = picture)."""
    g = np.asarray(pic.convert("L"))
    rgba = np.zeros((*g.shape, 4), np.uint8)
    if over == "white":
        rgba[..., 3] = 255 - g
    else:
        rgba[..., :3] = 255
        rgba[..., 3] = g
    return Image.fromarray(rgba)


def _revealing(det, flat: Image.Image) -> tuple[Image.Image, str, float]:
    """A gray picture, a level at which it scores well above the ``flat`` page, and a threshold
    between the two."""
    pics = [picture(i).convert("L") for i in range(40)]
    page, scores = levels(det, flat)[0], levels(det, pics)
    for col, level in ((2, "medium"), (3, "high"), (1, "low")):
        best = int(scores[:, col].argmax())
        if scores[best, col] > page[col] + 0.2:
            return pics[best], level, float(scores[best, col] + page[col]) / 2
    raise AssertionError("no synthetic picture stands out from a flat page")


@pytest.mark.parametrize("over", ["white", "black"])
def test_a_picture_hidden_in_alpha_is_scored_like_the_picture(det, tmp_path, over):
    page = Image.new("RGB", (W, H), "black" if over == "white" else "white")  # the colour channels
    pic, level, threshold = _revealing(det, page)
    rgba = hidden_in_alpha(pic, over)
    rgba.save(tmp_path / "hidden.png")
    shown = levels(det, pic.convert("RGB"))
    want = stricter(shown, levels(det, page))
    arr = np.asarray(rgba)
    for item in (rgba, tmp_path / "hidden.png", str(tmp_path / "hidden.png"), arr,
                 torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255):
        got = levels(det, item)
        assert (got - want).abs().max() <= 1e-5, (type(item), got, want)
    # the alpha-dropped reading (the colour alone) is the flat page: it would have passed
    guard = SafetyFilter(det, level=level, threshold=threshold, action="blur")
    assert guard(rgba.convert("RGB")).flagged == [False]
    out = guard(tmp_path / "hidden.png")
    assert out.flagged == [True]
    assert out.reasons[0].startswith(f"{level} ") and out.reasons[0].endswith(f"(over {over})"), out.reasons


def composite_over(im: Image.Image, color: str) -> Image.Image:
    """``im`` over a page of ``color``, by Pillow (independent of nsfw_safety)."""
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, color), rgba).convert("RGB")


def test_every_alpha_mode_keeps_the_stricter_composite(det):
    """RGBA, LA, PA, RGBa, P with a tRNS entry, RGB with a tRNS colour: the levels are the
    stricter of the picture over white and over black, as Pillow composites them."""
    pic = picture(5)
    a = np.asarray(picture(3).convert("L"))
    ramp = Image.fromarray(((a.astype(np.int32) + np.linspace(0, 255, W, dtype=np.int32)) // 2).astype(np.uint8))
    rgba = pic.copy()
    rgba.putalpha(ramp)
    la = pic.convert("L").convert("LA")
    la.putalpha(ramp)
    pal = pic.quantize(64)
    pal.info["transparency"] = bytes(range(0, 256, 4))  # palette entry k has alpha 4k
    trns = pic.copy()
    trns.info["transparency"] = tuple(int(v) for v in np.asarray(pic)[0, 0])
    images = [rgba, la, rgba.convert("PA"), rgba.convert("RGBa"), pal, trns]
    got = levels(det, images)
    want = stricter(levels(det, [composite_over(i, "white") for i in images]),
                    levels(det, [composite_over(i, "black") for i in images]))
    assert (got - want).abs().max() <= BOUND, (got - want).abs().amax(1)
    assert (got - levels(det, [i.convert("RGBA").convert("RGB") for i in images])).abs().max() > BOUND  # alpha matters


def test_a_16_bit_transparent_gray_is_applied_and_a_16_bit_rgb_key_is_refused(det, tmp_path):
    """A picture drawn only by which pixels are transparent: 16-bit values 1000 (the tRNS key)
    and 1001, the same gray in 8 bits. Over a white page it shows the picture."""
    g = np.asarray(picture(5).convert("L"))
    raw = np.where(g > 128, 1000, 1001).astype(np.uint16)
    write_png16(tmp_path / "key.png", raw, key=(1000,))
    x, _ = pil_to_tensor(open_image(tmp_path / "key.png"))
    assert x.shape == (2, H, W) and np.array_equal(x[1].numpy(), np.where(g > 128, 0, 255))
    dark = round(1001 * 255 / 65535)
    over_white = Image.fromarray(np.where(g > 128, 255, dark).astype(np.uint8))
    want = stricter(levels(det, over_white), levels(det, Image.new("L", (W, H), dark)))
    torch.testing.assert_close(levels(det, tmp_path / "key.png"), want, atol=1e-5, rtol=0)
    assert (want - levels(det, Image.new("L", (W, H), dark))).abs().max() > 0.1  # the key matters
    write_png16(tmp_path / "rgbkey.png", np.stack([raw] * 3, -1), key=(1000, 1000, 1000))
    with pytest.raises(ValueError, match="16-bit RGB PNG with a transparent colour"):
        open_image(tmp_path / "rgbkey.png")
    with pytest.raises(ValueError, match="transparent colour"):
        det.predict(Image.open(tmp_path / "rgbkey.png"))


def test_opaque_images_are_scored_once_and_transparent_ones_twice_in_one_batch(det, monkeypatch):
    rows = []
    real = det._forward
    monkeypatch.setattr(det, "_forward", lambda x: rows.append(len(x)) or real(x))
    opaque_rgba = picture(1).convert("RGBA")  # an alpha channel that is opaque everywhere
    transparent = hidden_in_alpha(picture(2), "white")
    mixed = [transparent, picture(1), opaque_rgba, hidden_in_alpha(picture(4), "black"), picture(4)]
    s = det.predict(mixed)
    assert rows == [7]  # 2 + 1 + 1 + 2 + 1 views, one forward batch
    assert s.composite is not None and s.composite[[1, 2, 4]].eq(0).all() and s.composite[[0, 3]].gt(0).all()
    # each row as if scored alone; opaque images exactly so
    alone = torch.cat([det.predict(i).levels for i in mixed])
    torch.testing.assert_close(s.levels, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.probs[[1, 2, 4]], torch.cat([det.predict(mixed[i]).probs for i in (1, 2, 4)]),
                               atol=1e-6, rtol=0)  # opaque images keep the model's own probabilities
    # the invariants of Scores hold for the kept levels
    torch.testing.assert_close(s.probs @ level_matrix(det.labels), s.levels, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.levels[:, 0], 1 - s.levels[:, 1], atol=1e-5, rtol=0)
    rows.clear()
    det.predict(torch.rand(3, 4, 40, 40))  # 4-channel tensors: two views each, one reshape
    det.predict([picture(1), picture(2)])
    assert rows == [6, 2]


def test_transparent_images_respect_the_batch_size(det, monkeypatch):
    rows = []
    real = det._forward
    monkeypatch.setattr(det, "_forward", lambda x: rows.append(len(x)) or real(x))
    x = torch.rand(5, 4, 40, 40)
    whole = det.predict(x).levels
    monkeypatch.setattr(det, "max_batch_size", 4)
    rows.clear()
    torch.testing.assert_close(det.predict(x).levels, whole)
    assert rows == [4, 4, 2]  # two images (four views) per batch


def test_non_finite_input_fails_closed_in_every_reading(det, tmp_path):
    nan = np.full((H, W), np.nan, np.float32)
    Image.fromarray(nan).save(tmp_path / "nan.tiff")
    rgba = torch.rand(1, 4, H, W)
    rgba[0, 3, 3, 3] = float("nan")  # in the alpha channel only
    guard = SafetyFilter(det, level="high", threshold=1.0, action="blur")
    for item in (Image.fromarray(nan), tmp_path / "nan.tiff", rgba):
        out = guard(item)
        assert out.flagged == [True] and out.reasons == ["non-finite input"], out.reasons
        back = out.images
        values = np.asarray(back) if isinstance(back, Image.Image) else back.numpy()
        assert np.isfinite(values).all() and (values[:, :3] if values.ndim == 4 else values).max() == 0


# --- frames ----------------------------------------------------------------------------------------

def _frames(n: int = 3) -> list[Image.Image]:
    return [synthetic(i, (32, 40)) for i in range(n)]


MULTI = {
    "animated GIF": ("GIF", dict(save_all=True, append_images=_frames()[1:], duration=100)),
    "animated WebP, first frame 1 ms": ("WEBP", dict(save_all=True, append_images=_frames()[1:], duration=[1, 500, 500])),
    "APNG": ("PNG", dict(save_all=True, append_images=_frames()[1:])),
    "APNG, default image outside the animation": ("PNG", dict(save_all=True, append_images=_frames()[1:2],
                                                              default_image=True)),
    "multi-page TIFF": ("TIFF", dict(save_all=True, append_images=_frames()[1:])),
}


@pytest.mark.parametrize("name", MULTI)
def test_multi_frame_files_are_refused(det, tmp_path, name):
    fmt, options = MULTI[name]
    path = tmp_path / f"many.{fmt.lower()}"
    _frames()[0].save(path, fmt, **options)
    assert Image.open(path).n_frames > 1  # what the test means to write
    for attempt in (lambda: open_image(path), lambda: open_image(io.BytesIO(path.read_bytes()), name="upload"),
                    lambda: det.predict(path), lambda: SafetyFilter(det)([path])):
        with pytest.raises(MultiFrameImage, match=r"(frames|pages).*check it frame by frame as a video"):
            attempt()
    assert issubclass(MultiFrameImage, ValueError)


def test_the_hidden_apng_default_image_is_named(tmp_path):
    fmt, options = MULTI["APNG, default image outside the animation"]
    _frames()[0].save(tmp_path / "a.png", fmt, **options)
    with pytest.raises(MultiFrameImage, match="2 frames .one a default image outside the animation"):
        open_image(tmp_path / "a.png")


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "TIFF"])
def test_single_frame_files_of_each_format_are_scored(det, tmp_path, fmt):
    path = tmp_path / f"one.{fmt.lower()}"
    im = _frames(1)[0]
    im.save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    ref = levels(det, Image.open(path).convert("RGB"))
    torch.testing.assert_close(levels(det, path), ref)
    if fmt != "GIF":  # GIF quantizes to a palette
        torch.testing.assert_close(ref, levels(det, im))


# --- censoring transparent images ------------------------------------------------------------------

def cutout(size: int = 64) -> Image.Image:
    """An RGBA picture whose alpha is a sharp-edged disc: a silhouette."""
    yy, xx = np.mgrid[:size, :size]
    alpha = (np.hypot(yy - size / 2, xx - size / 3) < size / 4).astype(np.uint8) * 255
    im = synthetic(7, (size, size)).convert("RGBA")
    im.putalpha(Image.fromarray(alpha))
    return im


def edge(alpha: np.ndarray) -> float:
    """The largest step between neighbouring alpha values, in [0, 1]."""
    a = alpha.astype(np.float64) / 255 if alpha.dtype == np.uint8 else alpha.astype(np.float64)
    return max(np.abs(np.diff(a, axis=0)).max(), np.abs(np.diff(a, axis=1)).max())


@pytest.mark.parametrize("action", ["blur", "pixelate", "black", "placeholder"])
def test_censoring_hides_the_silhouette(nsfw, action):
    im = cutout()
    alpha = np.asarray(im)[..., 3]
    assert edge(alpha) == 1.0
    arr = np.asarray(im).copy()
    inputs = {"PIL RGBA": im, "PIL LA": im.convert("LA"), "numpy RGBA uint8": arr,
              "tensor RGBA float": torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 255}
    for kind, item in inputs.items():
        out = SafetyFilter(nsfw, action=action)(item).images
        if isinstance(out, Image.Image):
            assert out.mode == item.mode
            got = np.asarray(out)[..., -1]
        elif isinstance(out, np.ndarray):
            got = out[..., 3]
        else:
            got = out[0, 3].numpy()
        if action in ("black", "placeholder"):  # opaque: no silhouette at all
            assert got.min() == got.max() == (1.0 if got.dtype != np.uint8 else 255), kind
        else:  # the same kernel as the colour: soft (blur) or blocky (pixelate), never the cutout
            unit = got.astype(np.float64) / (255 if got.dtype == np.uint8 else 1)
            assert np.abs(unit - alpha / 255).mean() > 0.02, kind
            assert len(np.unique(got)) > 10, kind  # graded, not a two-level mask
            if action == "blur":
                assert edge(got) < 0.35, (kind, edge(got))


def test_censor_kernels_treat_alpha_like_colour():
    x = torch.rand(2, 4, 30, 50, generator=torch.Generator().manual_seed(0))
    for action in ("blur", "pixelate"):
        y = censor(x, action)
        assert y.shape == x.shape
        torch.testing.assert_close(y[:, 3:], censor(x[:, 3:].expand(-1, 3, -1, -1), action)[:, :1])
        torch.testing.assert_close(y[:, :3], censor(x[:, :3], action))
    u8 = (x * 255).round().byte()
    for action in ("blur", "pixelate", "black", "placeholder"):
        y = censor(u8, action)
        assert y.dtype == torch.uint8 and y.shape == u8.shape
        assert (y.float() / 255 - censor(u8.float() / 255, action)).abs().max() <= 0.5 / 255 + 1e-6
    assert (censor(u8, "black")[:, 3] == 255).all() and (censor(x, "placeholder")[:, 3] == 1).all()


def test_censoring_runs_in_bounded_chunks(nsfw, monkeypatch):
    """Censoring works on at most CENSOR_CHUNK_BYTES of float pixels at a time (at least one
    image), with the same result as one batch."""
    x = (torch.rand(6, 3, 48, 64, generator=torch.Generator().manual_seed(2)) * 255).round().byte()
    guard = SafetyFilter(nsfw, action="blur")
    whole = guard(x).images
    seen = []
    real = censor_module.censor  # what CensorSettings.apply calls
    monkeypatch.setattr(censor_module, "censor", lambda p, *a, **k: seen.append(len(p)) or real(p, *a, **k))
    monkeypatch.setattr(filter_module, "CENSOR_CHUNK_BYTES", 2 * 4 * 3 * 48 * 64)  # two images
    assert torch.equal(guard(x).images, whole)
    assert seen == [2, 2, 2]
    monkeypatch.setattr(filter_module, "CENSOR_CHUNK_BYTES", 1)  # smaller than one image: one each
    seen.clear()
    assert torch.equal(guard(x).images, whole)
    assert seen == [1] * 6


# --- value ranges ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [(0, float("inf")), (float("nan"), 1), (float("-inf"), 0), (1, 1)])
def test_value_range_must_be_finite_with_low_below_high(det, bad):
    x = torch.rand(1, 3, 8, 8)
    for call in (lambda: prepare(x, value_range=bad), lambda: det.predict(x, value_range=bad),
                 lambda: SafetyFilter(det)(x, value_range=bad),
                 lambda: SafetyFilter(det)(x, censored_range=bad)):
        with pytest.raises(ValueError, match="value_range must be finite with low < high"):
            call()


# --- on the GPU ----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_views_are_reduced_on_the_device_without_a_sync(eva_dir):
    cpu = load_detector(str(eva_dir), dtype="fp32", device="cpu")
    gpu = load_detector(str(eva_dir), dtype="fp32", device="cuda")
    pil = [hidden_in_alpha(picture(2), "white"), picture(1), picture(4).convert("RGBA"),
           hidden_in_alpha(picture(4), "black")]
    got = gpu.predict(pil)
    assert got.levels.device.type == "cuda" and got.composite.device.type == "cuda"
    torch.testing.assert_close(got.levels.cpu(), cpu.predict(pil).levels, atol=2e-3, rtol=0)
    x = torch.rand(4, 4, H, W, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    u8 = (x * 255).round().byte()
    mixed = [u8[0], x[1, :3], u8[2], x[3]]  # one list: transparent and opaque, uint8 and float
    gpu.score(u8), gpu.score(mixed)  # warm-up: kernels, constants, pinned memory
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        batch, listed = gpu.score(u8), gpu.score(mixed)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(batch.levels.cpu(), cpu.score(u8.cpu()).levels, atol=2e-3, rtol=0)
    torch.testing.assert_close(listed.levels.cpu(), cpu.score([p.cpu() for p in mixed]).levels, atol=2e-3, rtol=0)
    assert listed.composite.cpu()[[0, 2, 3]].gt(0).all() and listed.composite.cpu()[1].eq(0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_censoring_of_transparent_images(eva_nsfw_dir):
    arr = torch.from_numpy(np.asarray(cutout()).copy()).permute(2, 0, 1)[None]
    for action in ("blur", "pixelate", "black"):
        out = SafetyFilter(load_detector(str(eva_nsfw_dir), device="cuda"), action=action)(arr.cuda()).images
        ref = SafetyFilter(load_detector(str(eva_nsfw_dir), device="cpu"), action=action)(arr).images
        assert out.device.type == "cuda" and out.dtype == torch.uint8 and out.shape == arr.shape
        assert (out.cpu().int() - ref.int()).abs().max() <= 1, action
        assert not torch.equal(out[0, 3].cpu(), arr[0, 3])
