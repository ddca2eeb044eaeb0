"""SafetyFilter end to end with tiny real checkpoints: every action on every input kind, exact
pass-through of unflagged images, kind/dtype/device/range preservation, per-level thresholds,
and the fail-closed paths."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from nsfw_safety import ACTIONS, FilterResult, SafetyFilter, load_detector
from nsfw_safety.censor import censor, default_card, place

H, W = 48, 64
LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(3, 1, 1)


@pytest.fixture(scope="module")
def mixed(eva_dir):
    return load_detector(str(eva_dir))


def base_images(n: int = 2, h: int = H, w: int = W, seed: int = 0) -> torch.Tensor:
    """(n, 3, h, w) float32 in [0, 1] on the 1/255 grid (so every kind holds them exactly):
    noise over a gradient, different per image."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, w).expand(n, 3, h, w)
    x = 0.5 * ramp + 0.5 * torch.rand(n, 3, h, w, generator=g)
    return (x * 255).round() / 255


def pil(x: torch.Tensor, mode: str = "RGB") -> Image.Image:
    """(3, h, w) in [0, 1] -> PIL image in ``mode``."""
    im = Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy(), "RGB")
    if mode == "RGBA":
        im.putalpha(Image.fromarray(np.arange(x.shape[1] * x.shape[2], dtype=np.uint8).reshape(x.shape[1:])))
        return im
    return im.convert(mode)


def unit(item: Any, value_range=(0.0, 1.0)) -> torch.Tensor:
    """One image of any kind -> (C, h, w) float64 in [0, 1] with its own channels (1, 3 or 4),
    read independently of nsfw_safety.inputs."""
    if isinstance(item, Image.Image):
        a = torch.from_numpy(np.asarray(item).copy()).double() / 255
        return a[None] if a.ndim == 2 else a.permute(2, 0, 1)
    t = torch.as_tensor(item).cpu()
    if t.dtype == torch.uint8:
        return t.double() / 255
    lo, hi = value_range
    return (t.double() - lo) / (hi - lo)


def expected(seen: torch.Tensor, action: str, **options) -> torch.Tensor:
    """What the filter should write for an input image ``seen`` (C, h, w) float64 in [0, 1]: RGBA
    is censored with its alpha (blurred or pixelated with the colour; opaque for fills)."""
    rgb = seen if seen.shape[0] != 1 else seen.expand(3, -1, -1)
    out = censor(rgb.float()[None], action, **options)[0].double()
    if seen.shape[0] == 1:
        return (out * LUMA).sum(0, keepdim=True)
    return out


@dataclass
class Kind:
    """An input kind: how to make it from base images, and how to read each image back."""

    name: str
    make: Callable[[torch.Tensor], Any]
    split: Callable[[Any], list]  # the images of an input or output, one per entry
    atol: float = 1e-5
    kwargs: dict = field(default_factory=dict)


def _bhwc(x):
    return [torch.as_tensor(i).permute(2, 0, 1) for i in x]


def _one(x):
    return [x]


def _hwc(x):
    return [torch.as_tensor(x).permute(2, 0, 1)]


def _mixed(tmp) -> list:
    """A list of four kinds and four sizes: PIL, CHW tensor, HWC uint8 numpy, PNG path."""
    a, b, c, d = (base_images(1, h, w, seed=s)[0] for s, (h, w) in enumerate([(48, 64), (40, 72), (56, 56), (30, 50)]))
    path = tmp / "d.png"
    pil(d).save(path)
    return [pil(a), b, (c * 255).round().byte().permute(1, 2, 0).numpy(), str(path)]


KINDS = [
    Kind("torch BCHW float32", lambda x: x, list),
    Kind("torch BCHW [-1,1]", lambda x: x * 2 - 1, list, 1e-5, dict(value_range=(-1, 1))),
    Kind("torch BHWC float32", lambda x: x.permute(0, 2, 3, 1).contiguous(), _bhwc),
    Kind("torch BCHW uint8", lambda x: (x * 255).round().byte(), list, 0.6 / 255),
    Kind("torch BHWC uint8", lambda x: (x * 255).round().byte().permute(0, 2, 3, 1).contiguous(), _bhwc, 0.6 / 255),
    Kind("torch BCHW float16", lambda x: x.half(), list, 2e-3),
    Kind("torch BCHW bfloat16", lambda x: x.bfloat16(), list, 8e-3),
    Kind("torch CHW float32", lambda x: x[0].clone(), _one),
    Kind("torch HWC uint8", lambda x: (x[0] * 255).round().byte().permute(1, 2, 0).contiguous(), _hwc, 0.6 / 255),
    Kind("torch B1HW gray", lambda x: x[:, :1].clone(), list),
    # censored in uint8 RGB, then turned to gray: two roundings
    Kind("torch HW gray uint8", lambda x: (x[0, 0] * 255).round().byte(), lambda x: [x[None]], 1.5 / 255),
    Kind("torch BCHW RGBA", lambda x: torch.cat([x, x[:, :1]], 1), list),
    Kind("numpy HWC uint8", lambda x: (x[0] * 255).round().byte().permute(1, 2, 0).numpy(), _hwc, 0.6 / 255),
    Kind("numpy BHWC float32", lambda x: x.permute(0, 2, 3, 1).numpy().copy(), _bhwc),
    Kind("numpy HWC float64", lambda x: x[0].permute(1, 2, 0).double().numpy().copy(), _hwc),
    Kind("numpy BCHW uint8", lambda x: (x * 255).round().byte().numpy(), list, 0.6 / 255),
    Kind("PIL RGB", lambda x: pil(x[0]), _one, 0.6 / 255),
    Kind("PIL RGBA", lambda x: pil(x[0], "RGBA"), _one, 0.6 / 255),
    Kind("PIL L", lambda x: pil(x[0], "L"), _one, 1.5 / 255),  # PIL rounds RGB, then truncates luma
    Kind("list of PIL", lambda x: [pil(i) for i in x], list, 0.6 / 255),
]


def snapshot(images: Any) -> Any:
    """A deep copy to prove the input was not modified (PIL images by their bytes)."""
    if isinstance(images, list):
        return [snapshot(i) for i in images]
    if isinstance(images, Image.Image):
        return (images.mode, images.size, images.tobytes())
    if isinstance(images, torch.Tensor):
        return images.clone()
    return copy.deepcopy(images)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, Image.Image):
        return (a.mode, a.size, a.tobytes()) == (b if isinstance(b, tuple) else (b.mode, b.size, b.tobytes()))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    return a == b


def assert_same_kind(out: Any, inp: Any) -> None:
    """Same kind, dtype, shape (so layout), device and PIL mode as the input."""
    if isinstance(inp, list):
        assert isinstance(out, list) and len(out) == len(inp)
        for o, i in zip(out, inp):
            assert_same_kind(o, Image.open(i) if isinstance(i, str) else i)
    elif isinstance(inp, Image.Image):
        assert isinstance(out, Image.Image) and out.mode == inp.mode and out.size == inp.size
    elif isinstance(inp, torch.Tensor):
        assert isinstance(out, torch.Tensor)
        assert (out.dtype, out.shape, out.device) == (inp.dtype, inp.shape, inp.device)
    else:
        assert isinstance(out, np.ndarray) and (out.dtype, out.shape) == (inp.dtype, inp.shape)


# --- every action on every input kind -------------------------------------------------------------

@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_action_on_each_kind(nsfw, kind, action):
    images = kind.make(base_images())
    before = snapshot(images)
    out = SafetyFilter(nsfw, level="high", threshold=0.5, action=action)(images, **kind.kwargs)
    assert isinstance(out, FilterResult)
    n = len(kind.split(images))
    assert out.flagged == [True] * n and out.any_flagged
    assert out.actions == [action] * n
    assert all(r.startswith("high 1.00 >= 0.50") for r in out.reasons), out.reasons
    assert len(out.scores) == n and out.scores.valid.all()
    assert same(images, before)  # the input object is untouched
    assert_same_kind(out.images, images)
    if action == "none":
        assert same(out.images, before)
        return
    vr = kind.kwargs.get("value_range", (0.0, 1.0))
    for o, i in zip(kind.split(out.images), kind.split(images)):
        got, want = unit(o, vr), expected(unit(i, vr), action)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=kind.atol), (got - want).abs().max()
        if action in ("blur", "pixelate"):  # really censored, not passed through
            assert (got - unit(i, vr)).abs().mean() > 0.03


@pytest.mark.parametrize("action", ACTIONS)
def test_action_on_files_and_mixed_size_lists(nsfw, tmp_path, action):
    images = _mixed(tmp_path)
    file_bytes = (tmp_path / "d.png").read_bytes()
    before = snapshot(images)
    out = SafetyFilter(nsfw, level="low", threshold=0.9, action=action)(images)
    assert out.flagged == [True] * 4 and out.actions == [action] * 4
    assert same(images, before) and (tmp_path / "d.png").read_bytes() == file_bytes
    assert [type(o) for o in out.images] == [Image.Image, torch.Tensor, np.ndarray, Image.Image]  # path -> PIL
    assert_same_kind(out.images, images)
    for o, i in zip(out.images, images):
        i = Image.open(i).convert("RGB") if isinstance(i, str) else i
        seen = unit(i if not isinstance(i, np.ndarray) else i.transpose(2, 0, 1))
        got = unit(o if not isinstance(o, np.ndarray) else o.transpose(2, 0, 1))
        want = seen if action == "none" else expected(seen, action)
        assert torch.allclose(got, want, atol=0.6 / 255), (action, (got - want).abs().max())


def test_a_single_path_comes_back_as_pil(nsfw, safe, tmp_path):
    x = base_images(1)[0]
    pil(x).save(tmp_path / "a.png")
    out = SafetyFilter(nsfw, action="black")(tmp_path / "a.png")
    assert isinstance(out.images, Image.Image) and out.images.size == (W, H)
    assert np.asarray(out.images).max() == 0
    out = SafetyFilter(safe, action="black")(str(tmp_path / "a.png"))
    assert isinstance(out.images, Image.Image) and out.flagged == [False]
    assert out.images.tobytes() == pil(x).tobytes()


# --- unflagged images: exactly the same values ----------------------------------------------------

@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_unflagged_images_come_back_unchanged(safe, kind):
    images = kind.make(base_images())
    before = snapshot(images)
    out = SafetyFilter(safe, level="low", threshold=0.01, action="blur")(images, **kind.kwargs)
    n = len(kind.split(images))
    assert out.flagged == [False] * n and not out.any_flagged and out.actions == ["none"] * n
    seen = " (over white and black)" if "RGBA" in kind.name else ""  # transparent: both composites passed
    assert all(r == "low 0.00 < 0.01" + seen for r in out.reasons), out.reasons
    assert same(out.images, before)
    if not isinstance(images, list):
        assert out.images is images  # nothing censored: no copy at all


def mixed_batch(detector, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """n noise images, and their level scores (n, 4): the tiny random model spreads "medium"
    over (0, 1) for them."""
    x = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    return x, detector.predict(x).levels


def between(values: torch.Tensor) -> float:
    """A threshold in the widest gap between ``values``, so that some are above and some below."""
    v = values.sort().values
    gap = int((v[1:] - v[:-1]).argmax())
    assert v[gap + 1] - v[gap] > 0.02, v
    return float(v[gap] + v[gap + 1]) / 2


@pytest.mark.parametrize("action", ["blur", "pixelate", "black", "placeholder"])
def test_mixed_batch_censors_only_the_flagged(mixed, action):
    x, levels = mixed_batch(mixed)
    t = between(levels[:, 2])
    want = (levels[:, 2] >= t).tolist()
    before = x.clone()
    out = SafetyFilter(mixed, level="medium", threshold=t, action=action)(x)
    assert out.flagged == want and 0 < sum(want) < len(want)
    assert out.actions == [action if f else "none" for f in want]
    for i, f in enumerate(want):
        s = float(levels[i, 2])
        assert out.reasons[i] == (f"medium {s:.2f} >= {t:.2f}" if f else f"medium {s:.2f} < {t:.2f}")
        if f:
            assert torch.allclose(out.images[i], censor(x[i : i + 1], action)[0], atol=1e-6)
        else:
            assert torch.equal(out.images[i], x[i])  # bit for bit
    assert torch.equal(x, before)


def test_mixed_size_list_censors_only_the_flagged(mixed):
    sizes = [(64, 64), (40, 72), (90, 50), (33, 33), (64, 80), (20, 100)]
    g = torch.Generator().manual_seed(6)
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    levels = mixed.predict(images).levels
    t = between(levels[:, 2])
    want = (levels[:, 2] >= t).tolist()
    out = SafetyFilter(mixed, threshold=t, action="pixelate")(images)
    assert out.flagged == want and 0 < sum(want) < len(want)
    for o, i, f in zip(out.images, images, want):
        assert o.shape == i.shape
        if f:
            assert torch.allclose(o, censor(i[None], "pixelate")[0], atol=1e-6)
        else:
            assert o is i


# --- value ranges, colours, placeholders, strengths ---------------------------------------------

def test_minus_one_one_stays_in_range(nsfw, mixed):
    x = base_images() * 2 - 1
    out = SafetyFilter(nsfw, action="black", color=(0.0, 0.5, 1.0))(x, value_range=(-1, 1))
    assert torch.equal(out.images[:, 0], torch.full((2, H, W), -1.0))
    assert torch.equal(out.images[:, 1], torch.zeros(2, H, W))
    assert torch.equal(out.images[:, 2], torch.ones(2, H, W))
    out = SafetyFilter(nsfw, action="blur")(x, value_range=(-1, 1))
    assert out.images.min() >= -1 and out.images.max() <= 1 and out.images.min() < 0
    assert float(out.images.mean()) == pytest.approx(float(x.mean()), abs=0.02)  # not shifted to [0, 1]


def test_censored_range(mixed):
    """diffusers: censored images in [0, 1] (not denormalized later), the others untouched."""
    x, levels = mixed_batch(mixed)
    x = x * 2 - 1
    t = between(levels[:, 2])
    out = SafetyFilter(mixed, threshold=t, action="blur")(x, value_range=(-1, 1), censored_range=(0, 1))
    assert 0 < sum(out.flagged) < len(x)
    for i, f in enumerate(out.flagged):
        if f:
            want = censor((x[i : i + 1] + 1) / 2, "blur")[0]
            assert torch.allclose(out.images[i], want, atol=1e-6) and out.images[i].min() >= 0
        else:
            assert torch.equal(out.images[i], x[i])


@pytest.mark.parametrize("color", [(0.0, 0.0, 0.0), (1.0, 0.5, 0.0), (0.2, 0.4, 0.6)])
def test_black_uses_the_colour(nsfw, color):
    rgb = tuple(round(c * 255) for c in color)
    x = (base_images() * 255).byte()
    out = SafetyFilter(nsfw, action="black", color=color)([pil(base_images(1)[0]), x[0]])
    assert np.unique(np.asarray(out.images[0]).reshape(-1, 3), axis=0).tolist() == [list(rgb)]
    assert (out.images[1] == torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1)).all()
    out = SafetyFilter(nsfw, action="black", color=color)(x)
    assert (out.images == torch.tensor(rgb, dtype=torch.uint8).view(1, 3, 1, 1)).all()


def test_placeholder_user_image(nsfw, tmp_path):
    card = Image.new("RGB", (100, 50), (255, 0, 0))
    card.paste((0, 0, 255), (30, 15, 70, 35))
    card.save(tmp_path / "card.png")
    x = base_images(3, 64, 64)
    for placeholder in (card, tmp_path / "card.png", np.asarray(card), torch.from_numpy(np.asarray(card).copy())):
        out = SafetyFilter(nsfw, action="placeholder", placeholder=placeholder)(x).images
        assert out.shape == x.shape
        red, blue = torch.tensor([1.0, 0, 0]).view(3, 1, 1), torch.tensor([0, 0, 1.0])
        # 100 x 50 fits as 64 x 32, centred: red bands above and below, blue in the middle
        assert torch.equal(out[:, :, :16], red.expand(3, 3, 16, 64))
        assert torch.equal(out[:, :, 48:], red.expand(3, 3, 16, 64))
        assert torch.allclose(out[:, :, 32, 32], blue.expand(3, 3), atol=1e-3)


def test_placeholder_builtin_card(nsfw):
    x = (base_images(2, 96, 160) * 255).byte()
    out = SafetyFilter(nsfw, action="placeholder")(x).images
    want = (place(x.float() / 255, default_card()) * 255).round().byte()
    assert torch.equal(out, want)
    assert out[0, :, 48].float().std() > 10  # the card's frame and text, not a flat fill


def test_strength_parameters(nsfw):
    x = base_images(1, 64, 64)
    weak = SafetyFilter(nsfw, action="blur", blur_strength=0.01)(x).images
    default = SafetyFilter(nsfw, action="blur")(x).images
    strong = SafetyFilter(nsfw, action="blur", blur_strength=0.2)(x).images
    assert torch.allclose(weak, censor(x, "blur", blur_strength=0.01), atol=1e-6)
    assert torch.allclose(strong, censor(x, "blur", blur_strength=0.2), atol=1e-6)
    assert weak.std() > default.std() > strong.std()
    blocks = SafetyFilter(nsfw, action="pixelate", block=0.25)(x).images
    assert [len(torch.unique(blocks[0, c])) for c in range(3)] == [16, 16, 16]  # 4 x 4 blocks of 16 px


# --- per-level thresholds -------------------------------------------------------------------------

def test_per_level_thresholds(mixed):
    x, levels = mixed_batch(mixed)
    med, high = levels[:, 2], levels[:, 3]
    t_med = between(med)
    by_med = med >= t_med
    # the image that "high" alone flags: the highest "high" among those "medium" lets through
    j = int(torch.where(by_med, -1.0, high).argmax())
    t_high = float(high[j])  # exactly its score: >= flags it
    want = by_med | (high >= t_high)
    assert not by_med[j] and want[j] and not want.all()
    out = SafetyFilter(mixed, thresholds={"high": t_high, "medium": t_med}, action="black")(x)
    assert out.flagged == want.tolist()
    assert out.reasons[j] == f"high {t_high:.2f} >= {t_high:.2f}"
    for i in range(len(x)):
        m, h = float(med[i]), float(high[i])
        if by_med[i]:
            assert out.reasons[i] == f"medium {m:.2f} >= {t_med:.2f}"  # the first level that fires
        elif not want[i]:
            assert out.reasons[i] == f"medium {m:.2f} < {t_med:.2f}, high {h:.2f} < {t_high:.2f}"
        assert out.images[i].abs().sum() == 0 if want[i] else torch.equal(out.images[i], x[i])
    # a single rule flags fewer
    assert SafetyFilter(mixed, thresholds={"medium": t_med})(x).flagged == by_med.tolist()


@pytest.mark.parametrize("kwargs, error", [
    (dict(level="neutral"), ValueError), (dict(level="extreme"), ValueError), (dict(level=2), ValueError),
    (dict(threshold=1.5), ValueError), (dict(threshold=-0.1), ValueError),
    (dict(threshold=float("nan")), ValueError), (dict(threshold="0.5"), TypeError), (dict(threshold=True), TypeError),
    (dict(thresholds={}), ValueError), (dict(thresholds={"neutral": 0.5}), ValueError),
    (dict(thresholds={"hi": 0.5}), ValueError), (dict(thresholds={"high": 2}), ValueError),
    (dict(thresholds={"high": None}), TypeError), (dict(thresholds=[("high", 0.5)]), ValueError),
    (dict(action="smudge"), ValueError), (dict(on_error="ignore"), ValueError),
    (dict(blur_strength=0), ValueError), (dict(action="pixelate", block=0), ValueError),
    (dict(action="pixelate", block=2), ValueError),
    (dict(color=(2, 0, 0)), ValueError), (dict(color=5), TypeError),
    (dict(placeholder="/nonexistent/card.png"), ValueError),
])
def test_bad_settings_raise(safe, kwargs, error):
    with pytest.raises(error):
        SafetyFilter(safe, **kwargs)


# --- failing closed -------------------------------------------------------------------------------

def _boom(x):
    raise RuntimeError("boom")


@pytest.mark.parametrize("action", ACTIONS)
def test_model_error_blocks_everything(safe, monkeypatch, action):
    monkeypatch.setattr(safe, "_forward", _boom)
    x = base_images(3)
    out = SafetyFilter(safe, action=action, color=(0.0, 0.0, 1.0))(x)
    assert out.flagged == [True] * 3 and out.actions == ["black"] * 3 and out.scores is None
    assert out.reasons == ["error: RuntimeError: boom"] * 3
    assert torch.equal(out.images, torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(3, 3, H, W))
    # lists and PIL too
    out = SafetyFilter(safe, action=action)([pil(x[0]), x[1, :, :20]])
    assert out.flagged == [True, True] and all(r.startswith("error:") for r in out.reasons)
    assert np.asarray(out.images[0]).max() == 0 and out.images[1].abs().max() == 0


def test_model_error_raises_when_asked(safe, monkeypatch):
    monkeypatch.setattr(safe, "_forward", _boom)
    with pytest.raises(RuntimeError, match="boom"):
        SafetyFilter(safe, on_error="raise")(base_images())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("action", ["blur", "none"])
def test_non_finite_input_is_flagged_and_blacked(safe, bad, action):
    x = base_images(3) * 2 - 1
    x[1, 2, 5, 7] = bad
    before = x.clone()
    out = SafetyFilter(safe, level="high", threshold=1.0, action=action)(x, value_range=(-1, 1))
    assert out.flagged == [False, True, False] and out.actions == ["none", "black", "none"]
    assert out.reasons[1] == "non-finite input"
    assert out.scores.status.tolist() == [0, 1, 0]
    assert out.scores.levels[1].tolist() == [0.0, 1.0, 1.0, 1.0]  # flagged at every level
    assert torch.equal(out.images[1], torch.full((3, H, W), -1.0))  # black in [-1, 1]
    assert torch.equal(out.images[0], x[0]) and torch.equal(out.images[2], x[2])
    assert torch.equal(x.nan_to_num(), before.nan_to_num())  # untouched


def test_non_finite_numpy_input(safe):
    a = base_images(1)[0].permute(1, 2, 0).numpy().copy()
    a[0, 0, 0] = np.nan
    out = SafetyFilter(safe, action="none")(a)
    assert out.flagged == [True] and out.reasons == ["non-finite input"]
    assert isinstance(out.images, np.ndarray) and out.images.dtype == np.float32 and not out.images.any()


def test_non_finite_model_output(safe, monkeypatch):
    forward = safe._forward

    def nan_second(x):
        y = forward(x).clone()
        y[1] = float("nan")
        return y

    monkeypatch.setattr(safe, "_forward", nan_second)
    x = base_images(3)
    out = SafetyFilter(safe, action="blur")(x)
    assert out.flagged == [False, True, False]
    assert out.reasons[1] == "non-finite model output" and out.scores.status.tolist() == [0, 2, 0]
    assert out.actions == ["none", "black", "none"]
    assert torch.equal(out.images[1], torch.zeros(3, H, W))
    assert torch.equal(out.images[0], x[0])


@pytest.mark.parametrize("images, error", [
    ("/nonexistent/x.png", ValueError), (torch.rand(2, 5, 8, 8), ValueError), (torch.rand(3, 4, 4), ValueError),
    (torch.randint(0, 9, (1, 3, 8, 8), dtype=torch.int32), TypeError), ([], ValueError), (42, TypeError),
])
def test_bad_input_raises_instead_of_passing(safe, images, error):
    with pytest.raises(error):
        SafetyFilter(safe)(images)


# --- devices --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("detector_device", ["cpu", "cuda"])
def test_cuda_input_stays_on_cuda(eva_nsfw_dir, eva_safe_dir, detector_device):
    x = (base_images() * 2 - 1).to("cuda", torch.float16)
    det = load_detector(str(eva_nsfw_dir), device=detector_device)
    out = SafetyFilter(det, action="blur")(x, value_range=(-1, 1))
    assert out.flagged == [True, True]
    assert (out.images.device.type, out.images.dtype, out.images.shape) == ("cuda", torch.float16, x.shape)
    want = censor(((x.float().cpu() + 1) / 2), "blur") * 2 - 1
    assert torch.allclose(out.images.float().cpu(), want, atol=4e-3)
    out = SafetyFilter(load_detector(str(eva_safe_dir), device=detector_device))(x, value_range=(-1, 1))
    assert out.flagged == [False, False] and out.images is x


def test_a_score_equal_to_its_threshold_is_flagged_with_a_reason():
    """float32(0.7) >= 0.7 on the device; widened to a Python float it is 0.69999998 < 0.7. The
    verdict uses the device's comparison, so the reason names the rule instead of failing."""
    from nsfw_safety.levels import Policy, Scores

    levels = torch.tensor([[0.3, 0.7, 0.7, 0.7], [0.9, 0.1, 0.1, 0.1]])
    scores = Scores(levels[:, :2].clone(), levels, ("a", "b"), torch.zeros(2, dtype=torch.int8))
    verdict = Policy("medium", 0.7).decide(scores)
    assert verdict.flagged == [True, False]
    assert verdict.reasons == ["medium 0.70 >= 0.70", "medium 0.10 < 0.70"]
    assert verdict.problems == [None, None]
