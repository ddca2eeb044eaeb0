"""Region detector (parity with NudeNet on real photographs), region masks and the region censor."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from nudenet import NudeDetector
from nudenet.nudenet import _read_image
from PIL import Image

from nsfw_safety.censor import censor, default_card, place
from nsfw_safety.regions import (CLASS_SETS, MIN_SCORE, NUDENET_LABELS, RegionDetector, Regions,
                                 censor_regions, region_mask)
from nsfw_safety.regions import mask as mask_module

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from censor_gallery import scene  # noqa: E402


@pytest.fixture(scope="module")
def detector():
    return RegionDetector(device="cpu", threads=2)


@pytest.fixture(scope="module")
def reference():
    return NudeDetector()


def rgb(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a[..., :3])


def resized(a: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR))


ASTRONAUT, CAMERA = rgb(skimage.data.astronaut()), rgb(skimage.data.camera())
#: Real photographs shipped by scikit-image, and crops that exercise the letterbox: non-square
#: both ways, a face cut by the top-left edge (nudenet's clipping), upscaling and downscaling.
PHOTOS = {
    "astronaut": ASTRONAUT,
    "astronaut_edge": ASTRONAUT[110:, 200:],
    "astronaut_wide": ASTRONAUT[50:250],
    "astronaut_small": resized(ASTRONAUT, 150, 120),
    "camera": CAMERA,
    "camera_edge": CAMERA[110:, 200:],
    "camera_big": resized(CAMERA, 900, 700),
    "colorwheel": rgb(skimage.data.colorwheel()),  # a false positive: BUTTOCKS_EXPOSED at 0.83
    "chelsea": rgb(skimage.data.chelsea()),
    "scene": np.asarray(scene()),  # synthetic
    "noise": np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8),  # synthetic
}


def tensor(a: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) uint8."""
    return torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].contiguous()


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union


def as_nudenet_box(box) -> tuple[int, int, int, int]:
    """Our (x1, y1, x2, y2) truncated to whole pixels as nudenet truncates x, y, w, h."""
    x1, y1, x2, y2 = box
    return int(x1), int(y1), int(x1) + int(x2 - x1), int(y1) + int(y2 - y1)


def regions(boxes, image=None, classes="FEMALE_BREAST_EXPOSED", scores=None, size=(64, 80), n=1,
            problems=None) -> Regions:
    k = len(boxes)
    classes = [classes] * k if isinstance(classes, str) else classes
    return Regions(boxes=torch.tensor(boxes, dtype=torch.float32).view(k, 4),
                   scores=torch.tensor(scores if scores is not None else [0.9] * k, dtype=torch.float32),
                   classes=torch.tensor([NUDENET_LABELS.index(c) for c in classes], dtype=torch.long),
                   image=torch.tensor(image if image is not None else [0] * k, dtype=torch.long),
                   size=size, problems=tuple(problems or [None] * n))


# ---------------------------------------------------------------- the detector: parity with nudenet


def test_reads_labels_and_resolution_from_the_model(detector):
    assert detector.labels == NUDENET_LABELS and len(detector.labels) == 18
    assert detector.resolution == 320
    assert detector.path.name == "320n.onnx"


#: Synthetic sizes for the letterbox: tiny, upscaled, exact 2x (OpenCV's area path), odd, extreme.
SIZES = [(1, 1), (2, 3), (150, 120), (640, 640), (640, 480), (321, 319), (1000, 17), (3, 5000), (333, 777)]


@pytest.mark.parametrize("image", ["astronaut", "astronaut_wide", "astronaut_edge", "astronaut_small", "camera_big",
                                   *[f"{h}x{w}" for h, w in SIZES]])
def test_preprocessing_matches_nudenet_bit_for_bit(detector, image, tmp_path):
    """Pad, resize, BGR order and scale exactly as nudenet's OpenCV blob (uint8 fixed point)."""
    if image in PHOTOS:
        a = PHOTOS[image]
    else:
        h, w = (int(v) for v in image.split("x"))
        a = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(a).save(path)
    blob = _read_image(str(path), 320)[0]
    ours = detector.preprocess(tensor(a)).numpy()
    assert ours.shape == blob.shape == (1, 3, 320, 320)
    assert np.array_equal(np.rint(ours * 255), np.rint(blob * 255))
    assert np.abs(ours - blob).max() < 1e-7  # 1/255 is applied as a division here, a product there
    as_float = detector.preprocess(tensor(a).float() / 255).numpy()  # same taps, no uint8 rounding
    assert np.abs(as_float - blob).max() <= 1 / 255


@pytest.mark.parametrize("name", list(PHOTOS))
def test_boxes_match_nudenet(detector, reference, name, tmp_path):
    """Same classes and boxes as ``NudeDetector().detect(path)`` (the issue asks IoU >= 0.9 and
    scores within 0.02; with bit-exact preprocessing the same onnxruntime gives the same scores)."""
    path = tmp_path / f"{name}.png"
    Image.fromarray(PHOTOS[name]).save(path)
    want = reference.detect(str(path))
    got = detector(tensor(PHOTOS[name])).per_image()[0]
    assert sorted(r.label for r in got) == sorted(d["class"] for d in want)
    for d in want:
        x, y, w, h = d["box"]
        overlap = lambda r: iou(as_nudenet_box(r.box), (x, y, x + w, y + h))  # noqa: E731
        best = max((r for r in got if r.label == d["class"]), key=overlap)
        assert overlap(best) >= 0.95
        assert abs(best.score - d["score"]) <= 1e-4
    H, W = PHOTOS[name].shape[:2]
    for r in got:
        x1, y1, x2, y2 = r.box
        assert 0 <= x1 <= x2 <= W and 0 <= y1 <= y2 <= H and r.score > MIN_SCORE


def test_the_parity_photographs_have_detections(reference, tmp_path):
    """The parity test is not vacuous: faces on the photographs, and the colour wheel's false positive."""
    found = {}
    for name in ("astronaut", "camera", "colorwheel"):
        Image.fromarray(PHOTOS[name]).save(tmp_path / "x.png")
        found[name] = [d["class"] for d in reference.detect(str(tmp_path / "x.png"))]
    assert found == {"astronaut": ["FACE_FEMALE"], "camera": ["FACE_MALE"], "colorwheel": ["BUTTOCKS_EXPOSED"]}


def test_a_batch_gives_what_single_images_give(detector):
    images = [ASTRONAUT, CAMERA, np.ascontiguousarray(ASTRONAUT[:, ::-1]), rgb(skimage.data.immunohistochemistry())]
    batch = detector(torch.cat([tensor(a) for a in images]))
    assert len(batch) == 4 and batch.problems == (None,) * 4
    for i, a in enumerate(images):
        single, batched = detector(tensor(a)).per_image()[0], batch.per_image()[i]
        assert [r.label for r in single] == [r.label for r in batched]
        for s, b in zip(single, batched):
            assert s.score == pytest.approx(b.score, abs=1e-4)
            assert s.box == pytest.approx(b.box, abs=1e-2)
    assert batch.image.tolist() == sorted(batch.image.tolist())
    assert [len(r) for r in batch.per_image()][:3] == [1, 1, 1]


def test_a_fixed_batch_model_is_fed_padded_chunks(detector, monkeypatch):
    images = torch.cat([tensor(ASTRONAUT), tensor(CAMERA)] * 2)
    whole = detector(images)
    monkeypatch.setattr(detector, "_max_batch", 3)  # as a model exported with batch=3: chunks of 3, 1 (+2 black)
    chunked = detector(images)
    assert [[r.label for r in rs] for rs in chunked.per_image()] == [["FACE_FEMALE"], ["FACE_MALE"]] * 2
    torch.testing.assert_close(chunked.boxes, whole.boxes, atol=1e-2, rtol=0)
    torch.testing.assert_close(chunked.scores, whole.scores, atol=1e-4, rtol=0)


def test_float_input_gives_the_same_regions(detector):
    as_uint8 = detector(tensor(ASTRONAUT)).per_image()[0]
    as_float = detector(tensor(ASTRONAUT).float() / 255).per_image()[0]
    assert [r.label for r in as_float] == [r.label for r in as_uint8] == ["FACE_FEMALE"]
    assert as_float[0].score == pytest.approx(as_uint8[0].score, abs=0.01)
    assert iou(as_float[0].box, as_uint8[0].box) > 0.97


def test_an_explicit_model_path_is_loaded(detector):
    again = RegionDetector(detector.path, device="cpu")
    assert again(tensor(CAMERA)).per_image() == detector(tensor(CAMERA)).per_image()


def test_extreme_aspect_ratio_never_builds_the_padded_square(detector):
    """A 200 x 30000 image would pad to a 30000^2 square (10.8 GB in float); it is never built."""
    x = torch.full((1, 3, 200, 30000), 200, dtype=torch.uint8)
    blob = detector.preprocess(x)
    assert blob.shape == (1, 3, 320, 320)
    # rows 0 and 1 of the 320 sample the image (source rows 46 and 140), the rest the padding
    assert torch.all(blob[:, :, :2] == 200 / 255) and torch.all(blob[:, :, 2:] == 0)
    assert detector(x).problems == (None,)


def test_bad_input_is_named(detector):
    with pytest.raises(TypeError, match="torch.Tensor"):
        detector(ASTRONAUT)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        detector(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        detector(torch.zeros(0, 3, 8, 8))
    with pytest.raises(TypeError, match="uint8 or float"):
        detector(torch.zeros(1, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        RegionDetector("nope.onnx")


# ---------------------------------------------------------------- fail closed


class _Session:
    """Wraps the real onnxruntime session: raise, or poison one image's output."""

    def __init__(self, real, *, fail=False, nan_image=None):
        self.real, self.fail, self.nan_image = real, fail, nan_image

    def run(self, names, feeds):
        if self.fail:
            raise RuntimeError("CUDA failure 700: an illegal memory access")
        out = self.real.run(names, feeds)
        out[0][self.nan_image, 0, 7] = np.nan
        return out


def test_a_failed_run_is_reported_for_every_image(detector, monkeypatch):
    monkeypatch.setattr(detector, "_session", _Session(detector._session, fail=True))
    found = detector(torch.cat([tensor(ASTRONAUT), tensor(CAMERA)]))
    assert len(found.boxes) == 0
    assert all("region detector failed: RuntimeError: CUDA failure 700" in p for p in found.problems)
    assert torch.equal(region_mask(found), torch.ones(2, 512, 512))  # censored whole


def test_non_finite_output_is_reported_for_that_image(detector, monkeypatch):
    monkeypatch.setattr(detector, "_session", _Session(detector._session, nan_image=1))
    found = detector(torch.cat([tensor(ASTRONAUT), tensor(CAMERA)]))
    assert found.problems == (None, "region detector returned non-finite values")
    assert [[r.label for r in rs] for rs in found.per_image()] == [["FACE_FEMALE"], []]
    mask = region_mask(found.select("faces"))
    assert mask[1].min() == 1 and 0 < mask[0].mean() < 0.1


def test_non_finite_input_is_reported_even_where_the_resize_skips_it(detector):
    x = torch.zeros(2, 3, 100, 1600)
    x[1, 0, 0, 0] = float("nan")  # at 1600 -> 320 the resize reads rows and columns 2, 3, 7, 8, ...
    assert torch.isfinite(detector.preprocess(x)).all()
    found = detector(x)
    assert found.problems == (None, "non-finite input")
    assert 1 not in found.image.tolist()


# ---------------------------------------------------------------- selecting regions


def test_select_by_class_set_threshold_and_expansion():
    found = regions([(10, 10, 20, 30), (40, 10, 50, 30), (0, 0, 8, 8), (60, 40, 70, 60)],
                    classes=["FEMALE_BREAST_EXPOSED", "FACE_MALE", "BUTTOCKS_EXPOSED", "BUTTOCKS_EXPOSED"],
                    scores=[0.5, 0.9, 0.3, 0.6])
    exposed = found.select()  # default: the "exposed" set at MIN_SCORE
    assert [found.labels[c] for c in exposed.classes] == ["FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED",
                                                          "BUTTOCKS_EXPOSED"]
    strict = found.select(threshold={"BUTTOCKS_EXPOSED": 0.5})
    assert strict.scores.tolist() == pytest.approx([0.5, 0.6])
    faces = found.select("faces")
    assert faces.boxes.tolist() == [[40, 10, 50, 30]]
    grown = found.select(["FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED"], expand={"FEMALE_BREAST_EXPOSED": 0.5})
    assert grown.boxes.tolist() == [[7.5, 5, 22.5, 35], [0, 0, 8, 8], [60, 40, 70, 60]]
    edge = found.select("all", expand=1.0)  # clipped to the 80 x 64 image
    assert edge.boxes.tolist()[2:] == [[0, 0, 12, 12], [55, 30, 75, 64]]
    assert set(CLASS_SETS["faces"]) == {"FACE_FEMALE", "FACE_MALE"}


def test_select_names_bad_settings():
    found = regions([(10, 10, 20, 30)])
    with pytest.raises(ValueError, match="FACE_ALIEN"):
        found.select(["FACE_ALIEN"])
    with pytest.raises(ValueError, match="classes must be one of"):
        found.select("nudity")
    with pytest.raises(ValueError, match="not selected"):
        found.select("faces", threshold={"BUTTOCKS_EXPOSED": 0.5})
    with pytest.raises(ValueError, match=r"threshold for FACE_FEMALE must be in \[0.0, 1.0\]"):
        found.select("faces", threshold=1.5)
    with pytest.raises(ValueError, match="expand"):
        found.select(expand=-0.1)


# ---------------------------------------------------------------- the mask


def test_rectangle_mask_covers_exactly_the_pixels_the_box_overlaps():
    mask = region_mask(regions([(10, 20, 30, 60), (2.5, 3.5, 4.2, 5.0)]))
    assert mask.shape == (1, 64, 80) and mask.dtype == torch.float32
    want = torch.zeros(64, 80)
    want[20:60, 10:30] = 1
    want[3:5, 2:5] = 1  # fractional edges: every pixel the box touches with some area
    assert torch.equal(mask[0], want)


def test_ellipse_mask_is_inscribed_in_the_box():
    rect = region_mask(regions([(10, 20, 50, 60)]))[0]
    ell = region_mask(regions([(10, 20, 50, 60)]), shape="ellipse")[0]
    assert set(ell.unique().tolist()) == {0.0, 1.0}
    assert torch.all(ell <= rect)  # inside the box
    assert ell[40, 30] == 1 and ell[20, 10] == 0 and ell[59, 49] == 0  # centre in, corners out
    assert ell[40, 10] == 1 and ell[20, 30] == 1  # touches the middle of each side
    assert torch.equal(ell[20:60, 10:50], ell[20:60, 10:50].flip(0))
    assert torch.equal(ell[20:60, 10:50], ell[20:60, 10:50].flip(1))
    assert ell.sum().item() == pytest.approx(np.pi * 20.5 ** 2, rel=0.03)  # semi-axes reach the edge pixels


@pytest.mark.parametrize("shape", ["rectangle", "ellipse"])
def test_feathering_softens_only_outside_the_shape(shape):
    found = regions([(30, 20, 50, 40)], size=(64, 80))
    hard = region_mask(found, shape=shape)[0]
    soft = region_mask(found, shape=shape, feather=0.1)[0]  # sigma = 2 px
    assert torch.all(soft[hard == 1] == 1)  # the inside is never weakened
    row = soft[30, 50:]  # going right from the box's edge
    assert torch.all(row[:-1] >= row[1:]) and 0 < row[1] < 1
    assert row[1] == pytest.approx(np.exp(-0.5 * (1 / 2) ** 2), abs=0.02)
    assert torch.all(soft[30, 57:] == 0)  # beyond 3 sigma
    assert soft[:, :20].max() == 0


def test_mask_batch_problems_and_chunks(monkeypatch):
    found = regions([(0, 0, 10, 10), (20, 20, 30, 30), (5, 5, 15, 15)], image=[0, 0, 2], n=4,
                    problems=[None, None, None, "region detector failed: boom"])
    mask = region_mask(found, feather=0.05)
    assert mask.shape == (4, 64, 80)
    assert mask[1].max() == 0 and mask[3].min() == 1  # no boxes; could not be checked
    assert mask[0, 5, 5] == 1 and mask[0, 25, 25] == 1 and mask[2, 10, 10] == 1 and mask[2, 25, 25] == 0
    monkeypatch.setattr(mask_module, "_CHUNK", 64 * 80)  # one box at a time
    assert torch.equal(region_mask(found, feather=0.05), mask)


def test_non_finite_boxes_and_masks_fail_closed(batch):
    x, _ = batch
    found = regions([(float("nan"), 0, 10, 10), (0, 0, 10, 10)], image=[1, 0], n=2)
    mask = region_mask(found)
    assert mask[1].min() == 1 and mask[0].sum() == 100
    broken = torch.zeros(2, 64, 80)
    broken[0, 5, 5] = float("nan")
    out = censor_regions(x, broken, "black")
    assert torch.equal(out[0, :, 5, 5], torch.zeros(3)) and torch.equal(out[1], x[1])


def test_mask_names_bad_settings():
    with pytest.raises(ValueError, match="shape"):
        region_mask(regions([]), shape="star")
    with pytest.raises(ValueError, match="feather"):
        region_mask(regions([]), feather=-1)
    with pytest.raises(TypeError, match="Regions"):
        region_mask([(0, 0, 1, 1)])


# ---------------------------------------------------------------- the region censor


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 80, generator=g)
    found = regions([(10, 20, 30, 60), (50, 5, 75, 30), (0, 0, 20, 12)], image=[0, 0, 1], n=2)
    return x, found


@pytest.mark.parametrize("action", ["blur", "pixelate", "black", "placeholder"])
@pytest.mark.parametrize("feather", [0.0, 0.1])
def test_pixels_outside_the_mask_come_back_bit_for_bit(batch, action, feather):
    x, found = batch
    mask = region_mask(found, feather=feather)
    out = censor_regions(x, mask, action, regions=found)
    assert out.shape == x.shape and out.dtype == x.dtype
    outside = (mask == 0)[:, None].expand_as(x)
    assert outside.sum() > 0.3 * x.numel()
    assert torch.equal(out[outside], x[outside])
    inside = (mask == 1)[:, None].expand_as(x)
    assert (out[inside] != x[inside]).float().mean() > 0.9  # censored
    if action != "placeholder":
        assert torch.equal(out[inside], censor(x, action)[inside])
    partial = ((mask > 0) & (mask < 1))[:, None].expand_as(x)
    if feather:
        assert partial.any()
        whole = censor(x, action) if action != "placeholder" else None
        if whole is not None:
            m = mask[:, None].expand_as(x)[partial]
            assert torch.allclose(out[partial], x[partial] * (1 - m) + whole[partial] * m, atol=1e-6)


def test_placeholder_is_scaled_into_each_box(batch):
    x, found = batch
    out = censor_regions(x, region_mask(found), "placeholder", regions=found)
    card = default_card()
    assert torch.equal(out[0, :, 20:60, 10:30], place(torch.zeros(1, 3, 40, 20), card)[0])
    assert torch.equal(out[0, :, 5:30, 50:75], place(torch.zeros(1, 3, 25, 25), card)[0])
    assert torch.equal(out[1, :, 0:12, 0:20], place(torch.zeros(1, 3, 12, 20), card)[0])


def test_placeholder_covers_an_unchecked_image_whole(batch):
    x, _ = batch
    found = regions([(10, 20, 30, 60)], n=2, problems=[None, "region detector failed: boom"])
    out = censor_regions(x, region_mask(found), "placeholder", regions=found)
    assert torch.equal(out[1], place(x[1:2], default_card())[0])
    with pytest.raises(ValueError, match="placeholder needs regions"):
        censor_regions(x, region_mask(found), "placeholder")


def test_censor_regions_keeps_dtype_and_names_bad_input(batch):
    x, found = batch
    mask = region_mask(found, shape="ellipse", feather=0.1)
    xb = x.bfloat16()
    out = censor_regions(xb, mask, "blur")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[(mask == 0)[:, None].expand_as(x)], xb[(mask == 0)[:, None].expand_as(x)])
    assert censor_regions(x, mask, "none") is x
    with pytest.raises(ValueError, match="mask must be"):
        censor_regions(x, mask[:1], "blur")
    with pytest.raises(TypeError, match="float or uint8 tensor"):
        censor_regions((x * 255).int(), mask, "blur")
    with pytest.raises(TypeError, match="float or uint8 tensor"):
        censor_regions(x[:, :2], mask, "blur")


@pytest.mark.parametrize("action", ["blur", "pixelate", "black", "placeholder"])
def test_uint8_and_rgba_are_censored_inside_the_mask_only(batch, action):
    x, found = batch
    u8 = torch.cat([(x * 255).round().byte(), torch.full((2, 1, 64, 80), 128, dtype=torch.uint8)], 1)  # RGBA
    mask = region_mask(found, feather=0.1)
    out = censor_regions(u8, mask, action, regions=found)
    assert out.dtype == torch.uint8 and out.shape == u8.shape
    outside, inside = (mask == 0)[:, None].expand_as(u8), (mask == 1)[:, None].expand_as(u8)
    assert torch.equal(out[outside], u8[outside])
    if action != "placeholder":
        assert torch.equal(out[inside], censor(u8, action)[inside])  # lerp to 1 is the censored value
    if action in ("black", "placeholder"):
        assert torch.all(out[:, 3][mask == 1] == 255)  # opaque where censored
    soft = (mask > 0) & (mask < 1)
    want = torch.lerp(u8.float(), censor(u8, "black").float(), mask[:, None]).round()
    if action == "black":
        assert torch.equal(out.float()[soft[:, None].expand_as(u8)], want[soft[:, None].expand_as(u8)])
    with pytest.raises(ValueError, match="action must be one of"):
        censor_regions(x, mask, "smudge")


# ---------------------------------------------------------------- privacy mode, end to end


def test_privacy_mode_blurs_the_face_and_nothing_else(detector):
    x = tensor(ASTRONAUT).float() / 255
    found = detector(x)
    assert torch.equal(region_mask(found.select()), torch.zeros(1, 512, 512))  # no nudity here
    faces = found.select("faces", expand=0.1)
    (face,) = faces.per_image()[0]
    assert face.label == "FACE_FEMALE"
    mask = region_mask(faces, shape="ellipse", feather=0.05)
    out = censor_regions(x, mask, "blur")
    x1, y1, x2, y2 = (round(v) for v in face.box)
    centre = (slice(None), slice(None), slice((y1 + y2) // 2 - 10, (y1 + y2) // 2 + 10),
              slice((x1 + x2) // 2 - 10, (x1 + x2) // 2 + 10))
    assert (out[centre] - x[centre]).abs().mean() > 0.02
    outside = (mask == 0)[:, None].expand_as(x)
    assert torch.equal(out[outside], x[outside]) and outside.float().mean() > 0.9


# ---------------------------------------------------------------- pictures


def test_region_gallery_writes_its_pictures(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["region_gallery.py", "--out", str(tmp_path)])
    # in-process: a subprocess would import torch a second time
    runpy.run_path(str(ROOT / "examples" / "region_gallery.py"), run_name="__main__")
    assert capsys.readouterr().out.count("wrote ") == 3
    sizes = {p.name: Image.open(p).size for p in tmp_path.glob("*.png")}
    assert sizes == {"regions_masks.png": (5 * 256 + 4 * 8, 284), "regions_actions.png": (5 * 256 + 4 * 8, 284),
                     "regions_shapes.png": (4 * 256 + 3 * 8, 284)}
    committed = sorted((ROOT / "docs" / "img").glob("regions_*.png"))
    assert [p.name for p in committed] == sorted(sizes)
    assert sum(p.stat().st_size for p in committed) < 400_000
    doc = (ROOT / "docs" / "regions.md").read_text()
    assert all(f"img/{name}" in doc for name in sizes)
