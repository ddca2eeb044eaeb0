"""inputs.prepare: every accepted kind, layout and range, and clear errors for bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from nsfw_safety.inputs import OPAQUE, OVER_BLACK, OVER_WHITE, open_image, prepare, views


def _img(h=6, w=10, seed=0):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout_fn,kw", [
    (lambda x: x[None], {}),                                 # BCHW
    (lambda x: x.permute(1, 2, 0)[None], {}),                # BHWC
    (lambda x: x, {}),                                       # CHW
    (lambda x: x.permute(1, 2, 0), {}),                      # HWC
])
def test_layouts_give_the_same_pixels(layout_fn, kw):
    x = _img()
    p = prepare(layout_fn(x), **kw)
    assert p.pixels.shape == (1, 3, 6, 10)
    torch.testing.assert_close(p.pixels[0], x)


def test_value_ranges_and_uint8():
    x = _img()
    torch.testing.assert_close(prepare(x * 2 - 1, value_range=(-1, 1)).pixels[0], x)
    u8 = (x * 255).round().to(torch.uint8)
    p = prepare(u8)
    assert p.pixels.dtype == torch.uint8 and p.pixels.data_ptr() == u8.data_ptr()  # 8-bit stays 8-bit, uncopied
    # float16 VAE-like output, slightly out of range, is clamped into [0, 1]
    p = prepare(torch.full((1, 3, 4, 6), 1.2, dtype=torch.float16), value_range=(-1, 1))
    assert p.pixels.max().item() == 1.0


def test_gray_becomes_rgb_and_alpha_gives_two_views():
    gray = torch.rand(1, 1, 5, 7)
    v, kinds = views(prepare(gray).pixels)
    assert v.shape == (1, 3, 5, 7) and kinds == [OPAQUE] and v.stride(1) == 0  # expanded, not copied
    assert torch.equal(v[0, 0], gray[0, 0]) and torch.equal(v[0, 2], gray[0, 0])
    rgba = torch.rand(2, 4, 5, 7)
    p = prepare(rgba)
    assert torch.equal(p.pixels, rgba)
    v, kinds = views(p.pixels)
    assert v.shape == (4, 3, 5, 7) and kinds == [OVER_WHITE, OVER_BLACK] * 2
    color, alpha = rgba[:, :3], rgba[:, 3:]
    torch.testing.assert_close(v[0::2], color * alpha + 1 - alpha)
    torch.testing.assert_close(v[1::2], color * alpha)
    # uint8: rounded composites, in uint8
    u8 = torch.tensor([[[[200]], [[100]], [[0]], [[128]]]], dtype=torch.uint8)  # one RGBA pixel
    v, _ = views(u8)
    assert v.dtype == torch.uint8
    assert v[:, :, 0, 0].tolist() == [[227, 177, 127], [100, 50, 0]]


def test_numpy_pil_and_paths(tmp_path):
    arr = (np.random.default_rng(0).random((8, 12, 3)) * 255).astype(np.uint8)
    pil = Image.fromarray(arr)
    pil.save(tmp_path / "a.png")
    expected = torch.from_numpy(arr).permute(2, 0, 1)
    for item in (arr, pil, tmp_path / "a.png", str(tmp_path / "a.png")):
        assert torch.equal(prepare(item).pixels[0], expected)
    mixed = prepare([pil, np.zeros((20, 30, 3), np.float32)])
    assert isinstance(mixed.pixels, list) and [p.shape for p in mixed.pixels] == [(3, 8, 12), (3, 20, 30)]
    assert mixed.finite.tolist() == [True, True]


def test_non_finite_values_are_marked():
    x = torch.rand(3, 3, 8, 8)
    x[1, 0, 2, 2] = float("nan")
    x[2, 1, 0, 0] = float("inf")
    assert prepare(x).finite.tolist() == [True, False, False]


@pytest.mark.parametrize("bad,err,match", [
    (torch.rand(3, 3, 3), ValueError, "layout="),                 # CHW or HWC?
    (torch.rand(2, 3, 3, 3), ValueError, "layout="),
    (torch.rand(2, 5, 8, 8), ValueError, "channel"),
    (torch.rand(1, 2, 3, 4, 5), ValueError, "rank 5"),
    (torch.rand(7), ValueError, "rank 1"),
    (torch.rand(1, 3, 0, 8), ValueError, "zero size"),
    (torch.zeros(1, 3, 4, 4, dtype=torch.int32), TypeError, "dtype"),
    (np.zeros((4, 4, 3), np.int16), TypeError, "dtype"),
    ([], ValueError, "empty"),
    (42, TypeError, "int"),
    ([torch.rand(2, 3, 4, 4)], ValueError, "batch"),
    ([Image.new("RGB", (4, 4)), 3.0], TypeError, r"images\[1\]"),
])
def test_bad_input_is_named(bad, err, match):
    with pytest.raises(err, match=match):
        prepare(bad)


def test_explicit_layout_resolves_ambiguity_and_is_checked():
    x = torch.rand(3, 3, 3)
    assert torch.equal(prepare(x, layout="CHW").pixels[0], x)
    assert torch.equal(prepare(x, layout="HWC").pixels[0], x.permute(2, 0, 1))
    with pytest.raises(ValueError, match="needs rank 4"):
        prepare(x, layout="BCHW")
    with pytest.raises(ValueError, match="layout must be"):
        prepare(x, layout="NCHW")
    with pytest.raises(ValueError, match="low < high"):
        prepare(x, layout="CHW", value_range=(1, 0))


def test_files_that_are_not_images(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:40])
    for name in ("empty.png", "text.png", "cut.png", "missing.png"):
        with pytest.raises(ValueError, match=name):
            open_image(tmp_path / name)
        with pytest.raises(ValueError, match=name):
            prepare(tmp_path / name)


def test_restore_round_trips_every_kind():
    """Nothing censored: the input object itself. One censored: a copy in the input's kind."""
    cases = [(torch.rand(2, 3, 4, 5) * 2 - 1, {"value_range": (-1, 1)}, lambda o: o[0]),
             (torch.rand(2, 6, 5, 3), {}, lambda o: o[0].permute(2, 0, 1)),
             ((np.random.default_rng(1).random((6, 5, 3)) * 255).astype(np.uint8), {},
              lambda o: torch.from_numpy(o).permute(2, 0, 1))]
    for images, kw, first_chw in cases:
        before = images.clone() if isinstance(images, torch.Tensor) else images.copy()
        p = prepare(images, **kw)
        assert p.restore([], []) is images
        out = p.restore([0], torch.zeros(1, *p.pixels.shape[1:]))
        assert type(out) is type(images) and out.shape == images.shape and out.dtype == images.dtype
        assert (first_chw(out) == kw.get("value_range", (0, 1))[0]).all()  # black in the input's range
        if out.ndim == 4:
            assert np.array_equal(np.asarray(out[1]), np.asarray(images[1]))
        assert np.array_equal(np.asarray(images), np.asarray(before))  # the caller's data is untouched


@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")  # it warns, then raises
def test_corrupted_bytes_never_escape_as_other_errors():
    """Hostile uploads: every corruption of a valid file decodes or raises ValueError, nothing else."""
    import io

    from nsfw_safety.inputs import open_image

    rng = np.random.default_rng(0)
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8)).save(buf, fmt)
        good = bytearray(buf.getvalue())
        for _ in range(40):
            bad = bytearray(good)
            for i in rng.integers(0, len(bad), int(rng.integers(1, 8))):
                bad[i] = int(rng.integers(0, 256))
            data = bytes(bad[: int(rng.integers(8, len(bad) + 1))])
            try:
                open_image(io.BytesIO(data), max_pixels=10_000, name=f"fuzzed.{fmt.lower()}")
            except ValueError as e:
                assert "fuzzed" in str(e)


@pytest.mark.parametrize("declared", [1, 2, 4])
def test_an_apng_that_misstates_its_frames_is_refused(tmp_path, declared):
    """An acTL that declares fewer frames than the file's fcTL chunks: Pillow would read the
    declared ones, a viewer that plays the chunks would show the rest. Refused, never scored."""
    import zlib

    from nsfw_safety.frames import VideoError, probe

    frames = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(5)]
    path = tmp_path / "a.png"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    data = path.read_bytes()
    assert probe(path).frames == 5  # the honest file is a 5-frame animation
    i = data.index(b"acTL")
    body = declared.to_bytes(4, "big") + data[i + 8:i + 12]
    path.write_bytes(data[:i + 4] + body + zlib.crc32(b"acTL" + body).to_bytes(4, "big") + data[i + 16:])
    words = f"declares {declared} frames but holds 5 frame control chunks"
    with pytest.raises(ValueError, match=words):
        open_image(path)
    with pytest.raises(VideoError, match=words):
        probe(path)
