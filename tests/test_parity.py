"""The tensor path against the model authors' reference preprocessing, same weights.

EVA reference: PIL image -> timm eval transform of the checkpoint's pretrained_cfg -> the model
loaded by transformers (TimmWrapper). ViT reference: the transformers image processor -> the
transformers model. Checkpoints have scaled heads so probabilities spread over (0, 1).

Bounds (fp32): max |level difference| <= 0.01 and the same decision at 0.5 for every image not
within 0.01 of it. bf16: the measured bound is asserted at BF16_BOUND and documented.

Pixel level: each route of the resize (bands of lines, the windowed filter, the pass order)
against PIL's own passes, and bands against the whole-image resize they replaced, bit for bit.
"""

import math

import numpy as np
import PIL
import pytest
import timm
import torch
import torch.nn.functional as F
from images import synthetic
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

import nsfw_safety.preprocess as pre
from nsfw_safety import load_detector
from nsfw_safety.levels import level_matrix
from nsfw_safety.preprocess import PreprocessConfig, preprocess

N = 64
FP32_BOUND = 0.01
BF16_BOUND = 0.05  # measured: EVA 0.012, ViT 0.030 (README, "Faithful to the reference")
PIL_13 = int(PIL.__version__.split(".")[0]) >= 13  # picks the pass order (python-pillow/Pillow#9549)


@pytest.fixture(scope="module")
def images():
    return [synthetic(i) for i in range(N)]


def _as_tensors(images):
    return [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images]


@torch.no_grad()
def _eva_reference(path, images):
    model = AutoModelForImageClassification.from_pretrained(path, dtype=torch.float32).eval()
    cfg = timm.data.resolve_data_config(model.config.to_dict()["pretrained_cfg"])
    transform = timm.data.create_transform(**cfg)
    probs = model(torch.stack([transform(im) for im in images])).logits.softmax(-1)
    return probs @ level_matrix(tuple(model.config.label_names))


@torch.no_grad()
def _vit_reference(path, images):
    model = AutoModelForImageClassification.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(path, use_fast=False)
    probs = model(**processor(images, return_tensors="pt")).logits.softmax(-1)
    labels = tuple(model.config.id2label[i] for i in range(model.config.num_labels))
    return probs @ level_matrix(labels)


def _check(ours, ref, bound):
    diff = (ours - ref).abs().max().item()
    assert diff <= bound, f"max level difference {diff:.4f} > {bound}"
    assert ref[:, 1:].std() > 0.2, "scores do not spread: the parity test would prove nothing"
    clear = (ref - 0.5).abs() > bound
    assert torch.equal((ours >= 0.5)[clear], (ref >= 0.5)[clear])
    return diff


def test_eva_fp32_matches_timm_reference(eva_dir, images):
    ref = _eva_reference(eva_dir, images)
    det = load_detector(str(eva_dir), dtype="fp32")
    diff = _check(det.predict(_as_tensors(images)).levels, ref, FP32_BOUND)
    # the same from a batched float tensor in [-1, 1] (a VAE's output), one size
    same = [synthetic(i, (300, 200)) for i in range(16)]
    x = torch.stack(_as_tensors(same)).float() / 127.5 - 1
    _check(det.predict(x, value_range=(-1, 1)).levels, _eva_reference(eva_dir, same), FP32_BOUND)
    print(f"eva fp32 max level difference: {diff:.5f}")


def test_vit_fp32_matches_hf_processor(vit_dir, images):
    ref = _vit_reference(vit_dir, images)
    det = load_detector(str(vit_dir), dtype="fp32")
    diff = _check(det.predict(_as_tensors(images)).levels, ref, FP32_BOUND)
    print(f"vit fp32 max level difference: {diff:.5f}")


def test_bf16_bound(eva_dir, vit_dir, images):
    for path, reference in ((eva_dir, _eva_reference), (vit_dir, _vit_reference)):
        ref = reference(path, images)
        det = load_detector(str(path), dtype="bf16")
        diff = _check(det.predict(_as_tensors(images)).levels, ref, BF16_BOUND)
        print(f"{path.name} bf16 max level difference: {diff:.5f}")


# --- pixel level: each resize route against PIL ------------------------------------------------

def _levels(x):
    """(1, 3, h, w) model input of a (0, 1) normalization -> (h, w, 3) int levels."""
    return x[0].permute(1, 2, 0).mul(255).round().to(torch.int16)


def _ours(image, cfg):
    return _levels(preprocess(_as_tensors([image]), cfg, torch.float32))


def _pil(image, size, resample, height_first):
    """PIL's two passes in the given order, as two single-axis resizes (the same in every Pillow)."""
    (w, h), (W, H) = size, image.size
    first = image.resize((W, h), resample) if height_first else image.resize((w, H), resample)
    return torch.from_numpy(np.asarray(first.resize((w, h), resample)).astype(np.int16))


def _squash(size, interpolation):
    return PreprocessConfig((size, size), "squash", interpolation, (0, 0, 0), (1, 1, 1))


TALL = [(1000, 560), (2000, 300), (700, 450), (1024, 512)]  # (h, w): Pillow >= 13 goes height first


@pytest.mark.parametrize("interpolation, resample", [("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)])
def test_pass_order_follows_pillow(interpolation, resample):
    """Pillow resizes height first when the height shrinks by more than twice as many pixels as
    the width (Pillow >= 13), width first otherwise; the two orders round differently."""
    cfg, worst, apart = _squash(448, interpolation), 0, 0
    for i, (h, w) in enumerate(TALL + [(w, h) for h, w in TALL]):
        image = synthetic(i, (h, w))
        ours, tall = _ours(image, cfg), h > w
        worst = max(worst, (ours - _pil(image, (448, 448), resample, height_first=tall)).abs().max().item())
        apart = max(apart, (ours - _pil(image, (448, 448), resample, height_first=not tall)).abs().max().item())
        if PIL_13:
            reference = torch.from_numpy(np.asarray(image.resize((448, 448), resample)).astype(np.int16))
            assert (ours - reference).abs().max() <= 2
    assert worst <= 2
    assert apart >= (8 if interpolation == "bicubic" else 1)  # so the test tells the orders apart


@pytest.mark.parametrize("route", ["bands", "long"])
@pytest.mark.parametrize("shape", [(3, 4000), (4000, 3), (1, 3000), (3000, 1)])
def test_bounded_routes_match_pil(shape, route, monkeypatch):
    """Strips through both routes: torch's kernel on bands of lines, and the windowed filter for
    lines too long to hold as floats; the tall ones go height first, as in Pillow."""
    if route == "long":
        monkeypatch.setattr(pre, "MAX_SUPPORT", 0)  # every pass takes the long route
    for i in range(7):  # synthetic's kinds but the shapes, which need 6 pixels a side
        image = synthetic(i, shape)
        ours = _ours(image, _squash(448, "bicubic"))
        reference = _pil(image, (448, 448), Image.BICUBIC, height_first=shape[0] > shape[1])
        assert (ours - reference).abs().max() <= 1, (shape, i)


@pytest.mark.parametrize("route", ["bands", "long"])
def test_crop_window_matches_pil(route, monkeypatch):
    """Shortest edge then center crop, of a strip: the long side becomes 9,600 pixels of which 384
    are kept; the windowed route computes only those."""
    if route == "long":
        monkeypatch.setattr(pre, "MAX_SUPPORT", 0)
    cfg = PreprocessConfig.from_hf_processor({"size": {"shortest_edge": 384}, "do_center_crop": True,
                                              "crop_size": 384, "resample": 2, "image_mean": [0, 0, 0],
                                              "image_std": [1, 1, 1]}, None)
    for i, shape in enumerate([(8, 200), (200, 8), (5, 64)] * 2):
        image = synthetic(i, shape)
        h, w = shape
        full = (384, int(384 * w / h)) if h <= w else (int(384 * h / w), 384)
        resized = np.asarray(image.resize(full[::-1], Image.BILINEAR)).astype(np.int16)
        top, left = round((full[0] - 384) / 2), round((full[1] - 384) / 2)
        reference = torch.from_numpy(resized[top : top + 384, left : left + 384])
        assert (_ours(image, cfg) - reference).abs().max() <= 1, (shape, i)


def _whole_image(x, cfg):
    """Preprocessing without bands: one antialiased pass per axis on the whole float image, width
    first, rounded to the uint8 grid after each (the unbounded code this replaced)."""
    def snap(y):
        return y.clamp(0, 1).mul(255).round().div(255)

    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    h, w = (math.floor(s / cfg.crop_pct) for s in cfg.size)
    if cfg.mode == "crop":
        short, (H, W) = math.floor(min(cfg.size) / cfg.crop_pct), x.shape[-2:]
        h, w = (short, int(short * W / H)) if H <= W else (int(short * H / W), short)
    if x.shape[-1] != w:
        x = snap(F.interpolate(x, size=(x.shape[-2], w), mode=cfg.interpolation, antialias=True))
    if x.shape[-2] != h:
        x = snap(F.interpolate(x, size=(h, w), mode=cfg.interpolation, antialias=True))
    top, left = int(round((h - cfg.size[0]) / 2)), int(round((w - cfg.size[1]) / 2))
    x = snap(x[..., top : top + cfg.size[0], left : left + cfg.size[1]])
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("cfg", [
    PreprocessConfig((448, 448), "squash", "bicubic", (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)),
    PreprocessConfig((384, 384), "squash", "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    PreprocessConfig((224, 224), "crop", "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), crop_pct=0.875),
], ids=["eva", "vit", "timm-crop"])
def test_bands_change_no_bit(cfg, images):
    """Ordinary images come out bit for bit as without bands: uint8 ones, one at a time (the
    1200 x 2000 one in 17 bands a pass), and a float batch of 700 x 1000 (6 bands)."""
    for image in _as_tensors(images[:16] + [synthetic(3, (1200, 2000))]):
        assert torch.equal(preprocess([image], cfg, torch.float32), _whole_image(image[None], cfg))
    batch = torch.rand(3, 3, 700, 1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(preprocess(batch, cfg, torch.float32), _whole_image(batch, cfg))


def test_non_finite_input_comes_out_nan():
    """An image with NaN or Inf in view comes out all NaN, so the model cannot score it; the
    others and the caller's tensor are untouched."""
    x = torch.rand(3, 3, 600, 500)
    x[1, 0, 300, 250], x[2, 2, 10, 10] = float("nan"), float("inf")
    before = x.clone()
    out = preprocess(x, _squash(448, "bicubic"), torch.float32)
    assert out[0].isfinite().all() and out[1].isnan().all() and out[2].isnan().all()
    assert torch.equal(x.nan_to_num(), before.nan_to_num()) and x[1].isnan().sum() == 1
