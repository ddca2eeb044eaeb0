"""SafetyFilter's region mode with the real NudeNet model and tiny forced classifiers: censored
inside the region mask only (outside bit for bit, every input kind), whole when nothing is found
or the region detector fails, region-only mode, masks and regions in the result, and the settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from region_images import FACE_BOX, WHEEL_BOX, astronaut, wheel_scene

from nsfw_safety import SafetyFilter, load_detector
from nsfw_safety.censor import default_card, place
from nsfw_safety.regions import RegionDetector, RegionSettings, Regions
from nsfw_safety.regions import settings as settings_module


@pytest.fixture(scope="module")
def regions():
    return RegionSettings(RegionDetector(device="cpu", threads=2))


def chw(a: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 -> (C, H, W) uint8."""
    return torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous()


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix * iy / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy)


def hwc(x: torch.Tensor | np.ndarray | Image.Image) -> torch.Tensor:
    """Any one image -> (H, W, C) tensor in its own dtype, for comparing pixels exactly."""
    if isinstance(x, Image.Image):
        return torch.from_numpy(np.array(x)).reshape(x.height, x.width, -1)
    return torch.as_tensor(x)


SCENE = wheel_scene()
#: Every input kind, made from the scene; (input, kwargs, one image of the output as HWC).
KINDS = {
    "uint8 BCHW": (lambda: chw(SCENE)[None], {}, lambda o: o[0].permute(1, 2, 0)),
    "float32 BHWC": (lambda: torch.from_numpy(SCENE / 255).float()[None], {"layout": "BHWC"}, lambda o: o[0]),
    "float [-1, 1] BCHW": (lambda: chw(SCENE)[None].float() / 127.5 - 1, {"value_range": (-1, 1)},
                           lambda o: o[0].permute(1, 2, 0)),
    "float64 HWC numpy": (lambda: SCENE / 255.0, {}, lambda o: torch.from_numpy(o)),
    "float16 CHW": (lambda: chw(SCENE).half() / 255, {}, lambda o: o.permute(1, 2, 0)),
    "gray float B1HW": (lambda: chw(SCENE)[None, :1].float() / 255, {}, lambda o: o[0].permute(1, 2, 0)),
    "PIL RGB": (lambda: Image.fromarray(SCENE), {}, hwc),
    "PIL RGBA": (lambda: Image.fromarray(np.dstack([SCENE, np.full(SCENE.shape[:2], 200, np.uint8)])), {}, hwc),
}


CASES = [(kind, "blur") for kind in KINDS] + [(kind, action) for action in ("pixelate", "black", "placeholder")
                                              for kind in ("uint8 BCHW", "float [-1, 1] BCHW", "PIL RGBA")]


@pytest.mark.parametrize("kind, action", CASES)
def test_only_the_region_is_censored_and_the_rest_comes_back_bit_for_bit(nsfw, regions, kind, action):
    make, kwargs, one = KINDS[kind]
    images = make()
    out = SafetyFilter(nsfw, action=action, regions=regions)(images, **kwargs)
    assert out.flagged == [True] and out.actions == [action]
    if kind.startswith("gray"):  # the gray picture's wheel is found too, in the same place
        assert [r.label for r in out.regions[0]] == ["BUTTOCKS_EXPOSED"]
    else:
        (region,) = out.regions[0]
        assert region.label == "BUTTOCKS_EXPOSED" and 0.55 < region.score < 0.65  # 0.58; 0.63 over white
        assert iou(region.box, WHEEL_BOX) > 0.9  # 0.94 for the union of both views' boxes
    assert out.reasons[0].startswith("medium 1.00 >= 0.50") and "; regions: BUTTOCKS_EXPOSED 0." in out.reasons[0]
    mask = out.masks
    assert mask.shape == (1, 600, 800) and mask.dtype == torch.float32 and mask.device.type == "cpu"
    assert set(mask.unique().tolist()) == {0.0, 1.0} and 0.15 < mask.mean() < 0.3  # the box, nothing else
    got, given = one(out.images), one(images)
    assert got.shape == given.shape and got.dtype == given.dtype
    outside, inside = mask[0] == 0, mask[0] == 1
    assert torch.equal(got[outside], given[outside])  # bit for bit, whatever the kind
    changed = (got[inside] != given[inside]).any(-1).float().mean()
    assert changed > (0.5 if action != "pixelate" else 0.3)


def test_inside_the_mask_is_the_whole_image_censor(nsfw, regions):
    x = chw(SCENE)[None]
    for action in ("blur", "pixelate", "black"):
        region = SafetyFilter(nsfw, action=action, regions=regions)(x)
        whole = SafetyFilter(nsfw, action=action)(x)
        inside = (region.masks == 1)[:, None].expand_as(x)
        assert torch.equal(region.images[inside], whole.images[inside]), action
        assert whole.regions is None and whole.masks is None  # region mode off: nothing extra


def test_placeholder_card_is_fitted_into_the_box(nsfw, regions):
    out = SafetyFilter(nsfw, action="placeholder", regions=regions)(chw(SCENE)[None])
    x1, y1, x2, y2 = out.regions[0][0].box
    left, top, right, bottom = int(x1), int(y1), -int(-x2 // 1), -int(-y2 // 1)
    card = place(torch.zeros(1, 3, bottom - top, right - left, dtype=torch.uint8), default_card())[0]
    assert torch.equal(out.images[0, :, top:bottom, left:right], card)


def test_shape_feather_expand_and_thresholds_shape_the_mask(nsfw, regions):
    x = chw(SCENE)[None]
    ellipse = SafetyFilter(nsfw, regions=RegionSettings(regions.detector, shape="ellipse", feather=0.05))(x)
    soft = ellipse.masks[0]
    assert ((soft > 0) & (soft < 1)).any() and soft[300, 490] == 1 and soft[115, 320] < 1  # a corner of the box
    outside = (soft == 0)[None].expand_as(x)
    assert torch.equal(ellipse.images[outside], x[outside])
    grown = SafetyFilter(nsfw, regions=RegionSettings(regions.detector, expand=0.2))(x)
    assert grown.masks.sum() > 1.3 * SafetyFilter(nsfw, regions=regions)(x).masks.sum()
    strict = SafetyFilter(nsfw, regions=RegionSettings(regions.detector, threshold={"BUTTOCKS_EXPOSED": 0.9}))(x)
    assert strict.regions == [[]] and strict.masks.min() == 1  # under its threshold: censored whole
    assert strict.reasons[0].endswith("; no region of exposed at or above threshold: censored whole")


def test_a_flagged_image_with_no_region_is_censored_whole(nsfw, regions):
    x = chw(astronaut())[None]  # a face, nothing exposed
    out = SafetyFilter(nsfw, action="blur", regions=regions)(x)
    assert out.flagged == [True] and out.regions == [[]] and torch.equal(out.masks, torch.ones(1, 512, 512))
    assert torch.equal(out.images, SafetyFilter(nsfw, action="blur")(x).images)
    faces = SafetyFilter(nsfw, regions=RegionSettings(regions.detector, classes="faces"))(x)
    assert [r.label for r in faces.regions[0]] == ["FACE_FEMALE"] and iou(faces.regions[0][0].box, FACE_BOX) > 0.95


def test_passed_images_never_reach_the_region_detector(safe, regions, monkeypatch):
    calls = []
    monkeypatch.setattr(settings_module.RegionDetector, "__call__", lambda self, im: calls.append(im))
    x = chw(SCENE)[None].repeat(2, 1, 1, 1)
    out = SafetyFilter(safe, regions=regions)(x)
    assert out.flagged == [False, False] and out.images is x and calls == []
    assert out.regions == [[], []] and torch.equal(out.masks, torch.zeros(2, 600, 800))


def test_only_flagged_images_are_searched(eva_dir, regions, monkeypatch):
    """A batch the classifier splits: the region detector sees the flagged images only."""
    mixed = load_detector(str(eva_dir))
    x = torch.stack([chw(SCENE), chw(SCENE).flip(-1), chw(SCENE).flip(-2)])
    levels = mixed.predict(x).levels[:, 2].tolist()
    threshold = sorted(levels)[1]  # flags the two highest
    seen = []
    real = settings_module.RegionDetector.__call__
    monkeypatch.setattr(settings_module.RegionDetector, "__call__",
                        lambda self, im: seen.append(len(im)) or real(self, im))
    out = SafetyFilter(mixed, threshold=threshold, regions=regions)(x)
    assert out.flagged == [v >= threshold for v in levels] and sum(out.flagged) == 2
    assert seen == [2]
    for i, f in enumerate(out.flagged):
        assert (len(out.regions[i]) == 1) == f and (out.masks[i].max() == 1) == f


def test_region_detector_failure_censors_whole_and_says_so(nsfw, regions, monkeypatch):
    x = chw(SCENE)[None]

    class Broken:
        def run(self, *args):
            raise RuntimeError("CUDA failure 700")

    monkeypatch.setattr(regions.detector, "_session", Broken())
    out = SafetyFilter(nsfw, action="pixelate", regions=regions)(x)
    assert out.flagged == [True] and out.actions == ["pixelate"] and out.regions == [[]]
    assert out.reasons == ["medium 1.00 >= 0.50; region detector failed: RuntimeError: CUDA failure 700: "
                           "censored whole"]
    assert torch.equal(out.masks, torch.ones(1, 600, 800))
    assert torch.equal(out.images, SafetyFilter(nsfw, action="pixelate")(x).images)


def test_non_finite_boxes_censor_whole(nsfw, regions, monkeypatch):
    session = regions.detector._session

    class Poisoned:
        def run(self, names, feeds):
            out = session.run(names, feeds)
            out[0][0, 0, 5] = np.inf
            return out

    monkeypatch.setattr(regions.detector, "_session", Poisoned())
    out = SafetyFilter(nsfw, regions=regions)(chw(SCENE)[None])
    assert out.reasons[0].endswith("; region detector returned non-finite values: censored whole")
    assert out.masks.min() == 1


def test_any_other_error_in_region_detection_censors_whole_or_raises(nsfw, regions, monkeypatch):
    def boom(*args):
        raise MemoryError("no room for the letterbox")

    monkeypatch.setattr(settings_module.RegionDetector, "preprocess", boom)
    x = chw(SCENE)[None]
    out = SafetyFilter(nsfw, regions=regions)(x)
    assert out.reasons[0].endswith("; region detector failed: MemoryError: no room for the letterbox: censored whole")
    assert torch.equal(out.images, SafetyFilter(nsfw)(x).images)
    with pytest.raises(MemoryError):
        SafetyFilter(nsfw, regions=regions, on_error="raise")(x)


def test_a_failed_classifier_check_is_blacked_without_asking_where(safe, regions, monkeypatch):
    calls = []
    monkeypatch.setattr(settings_module.RegionDetector, "__call__", lambda self, im: calls.append(im))
    x = chw(SCENE)[None].float() / 255
    x[0, 1, 3, 3] = float("nan")
    out = SafetyFilter(safe, regions=regions)(x)
    assert out.flagged == [True] and out.actions == ["black"] and out.reasons == ["non-finite input"]
    assert calls == [] and out.masks.min() == 1 and out.images.abs().max() == 0


def test_action_none_reports_the_mask_and_changes_nothing(nsfw, regions):
    x = chw(SCENE)[None]
    out = SafetyFilter(nsfw, action="none", regions=regions)(x)
    assert out.flagged == [True] and out.actions == ["none"] and out.images is x
    assert 0.2 < out.masks.mean() < 0.3


def test_region_only_mode(regions):
    """No classifier: flagged when a chosen region is found; blacked when it could not be checked."""
    guard = SafetyFilter(None, regions=regions, action="blur")
    gray = np.full((200, 300, 3), 128, np.uint8)
    images = [Image.fromarray(SCENE), Image.fromarray(gray), chw(astronaut())]
    out = guard(images)
    assert out.flagged == [True, False, False] and out.actions == ["blur", "none", "none"]
    assert out.scores is None
    assert out.reasons[0].startswith("BUTTOCKS_EXPOSED 0.5") and out.reasons[0].endswith(" >= 0.25")
    assert out.reasons[1:] == ["no region of exposed at or above threshold"] * 2
    assert [m.shape for m in out.masks] == [(600, 800), (200, 300), (512, 512)]  # a list for a list
    assert out.masks[1].max() == 0 and 0.2 < out.masks[0].mean() < 0.3
    assert out.images[1] is images[1] and out.images[2] is images[2]
    faces = SafetyFilter(None, regions=RegionSettings(regions.detector, classes="faces", threshold=0.7))(images)
    assert faces.flagged == [False, False, True] and faces.reasons[2] == "FACE_FEMALE 0.72 >= 0.70"
    nan = torch.zeros(1, 3, 32, 32)
    nan[0, 0, 0, 0] = float("nan")
    failed = guard(nan)
    assert failed.flagged == [True] and failed.actions == ["black"] and failed.reasons == ["non-finite input"]
    with pytest.raises(ValueError, match="no classifier"):
        guard(nan, scores=object())
    with pytest.raises(TypeError, match="regions= for region-only mode"):
        SafetyFilter(None)
    with pytest.raises(TypeError, match="RegionSettings"):
        SafetyFilter(None, regions="exposed")


def test_a_large_single_image_kept_apart_gets_its_mask(nsfw, regions, monkeypatch):
    from nsfw_safety import inputs

    monkeypatch.setattr(inputs, "_STACK_BYTES", 1000)  # as for an image over 64 MB: its pixels stay a list
    out = SafetyFilter(nsfw, regions=regions)(Image.fromarray(SCENE))
    assert isinstance(out.images, Image.Image) and out.masks.shape == (1, 600, 800)
    assert torch.equal(hwc(out.images)[out.masks[0] == 0], torch.from_numpy(SCENE)[out.masks[0] == 0])


def test_transparent_images_are_searched_over_white_and_black(nsfw, regions):
    """The wheel is visible only over black (its alpha hides it over white): it is found, and censored."""
    rgba = np.dstack([SCENE, np.full(SCENE.shape[:2], 255, np.uint8)])
    rgba[100:470, 300:671, 3] = 90
    out = SafetyFilter(nsfw, regions=regions)(Image.fromarray(rgba))
    assert [r.label for r in out.regions[0]] == ["BUTTOCKS_EXPOSED"]
    got, mask = hwc(out.images), out.masks[0]
    assert torch.equal(got[mask == 0], torch.from_numpy(rgba)[mask == 0])


def test_a_region_seen_in_both_views_is_reported_once_with_the_union_of_its_boxes(regions):
    x = torch.stack([chw(SCENE), chw(SCENE)]).float() / 255
    x = torch.cat([x, torch.full_like(x[:, :1], 0.5)], 1)  # RGBA: seen over white and over black
    found = settings_module.locate(regions, x)
    assert isinstance(found, Regions) and len(found) == 2 and found.image.tolist() == [0, 1]
    views = regions.select(regions.detector(torch.stack([x[0, :3] * 0.5 + 0.5, x[0, :3] * 0.5])))
    assert views.image.tolist() == [0, 1] and not torch.equal(views.boxes[0], views.boxes[1])
    union = torch.cat([views.boxes[:, :2].min(0).values, views.boxes[:, 2:].max(0).values])
    assert torch.equal(found.boxes[0], union) and torch.equal(found.boxes[1], union)
    assert found.scores[0] == views.scores.max()
    assert found.take([1]).image.tolist() == [0] and len(found.take([1])) == 1


# --- settings -----------------------------------------------------------------------------------

def test_settings_are_validated_and_named(regions):
    det = regions.detector
    s = RegionSettings(det, classes=["FACE_FEMALE", "FACE_MALE"], threshold={"FACE_MALE": 0.6}, expand=0.1,
                       shape="ellipse", feather=0.02)
    assert s.classes == ("FACE_FEMALE", "FACE_MALE") and s.labels == s.classes
    assert s.threshold_for("FACE_MALE") == 0.6 and s.threshold_for("FACE_FEMALE") == 0.25
    assert RegionSettings(det).labels[0] == "FEMALE_GENITALIA_EXPOSED"
    for kwargs, error, words in [
        (dict(classes="nudity"), ValueError, "classes must be one of"),
        (dict(classes=["FACE_ALIEN"]), ValueError, "FACE_ALIEN"),
        (dict(classes=[]), ValueError, "non-empty"),
        (dict(threshold=1.5), ValueError, "threshold for"),
        (dict(threshold={"FACE_MALE": 0.5}), ValueError, "not selected"),
        (dict(threshold="high"), TypeError, "threshold must be a number"),
        (dict(expand=-1), ValueError, "expand"),
        (dict(shape="star"), ValueError, "shape"),
        (dict(feather=2), ValueError, "feather"),
        (dict(feather=True), ValueError, "feather"),
    ]:
        with pytest.raises(error, match=words):
            RegionSettings(det, **kwargs)
    with pytest.raises(TypeError, match="RegionDetector"):
        RegionSettings(42)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        RegionSettings("missing.onnx")


def test_settings_round_trip_through_a_dict(regions, tmp_path):
    s = RegionSettings(regions.detector, classes=["BUTTOCKS_EXPOSED"], threshold={"BUTTOCKS_EXPOSED": 0.4},
                       expand=0.2, shape="ellipse", feather=0.05)
    d = s.to_dict()
    assert d == {"model": None, "min_score": 0.25, "iou": 0.45, "classes": ["BUTTOCKS_EXPOSED"],
                 "threshold": {"BUTTOCKS_EXPOSED": 0.4}, "expand": 0.2, "shape": "ellipse", "feather": 0.05}
    again = RegionSettings.from_dict(d, device="cpu")
    assert again.to_dict() == d and again.detector.path == regions.detector.path
    copy = tmp_path / "mine.onnx"
    copy.write_bytes(regions.detector.path.read_bytes())
    mine = RegionSettings(str(copy)).to_dict()
    assert mine["model"] == str(copy.resolve()) and RegionSettings.from_dict(mine).detector.path == copy
    with pytest.raises(ValueError, match="unknown region settings"):
        RegionSettings.from_dict({"colour": "red"})


def test_command_line_values_parse():
    from nsfw_safety import options

    assert options.parse_per_class("0.4", "threshold") == 0.4
    assert options.parse_per_class("FACE_MALE=0.5, FACE_FEMALE=0.6", "threshold") == {
        "FACE_MALE": 0.5, "FACE_FEMALE": 0.6}
    with pytest.raises(ValueError, match="threshold"):
        options.parse_per_class("high", "threshold")
    with pytest.raises(ValueError, match="'FACE_MALE=x' is not CLASS=NUMBER"):
        options.parse_per_class("FACE_MALE=x", "threshold")
    assert options.parse_classes("faces") == "faces"
    assert options.parse_classes("FACE_MALE, FACE_FEMALE") == ("FACE_MALE", "FACE_FEMALE")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_input_keeps_its_masks_on_cuda(eva_nsfw_dir):
    det = load_detector(str(eva_nsfw_dir), device="cuda")
    x = chw(SCENE)[None].cuda().half() / 255
    out = SafetyFilter(det, regions=RegionSettings())(x)
    assert out.images.device.type == out.masks.device.type == "cuda" and out.images.dtype == torch.float16
    assert [r.label for r in out.regions[0]] == ["BUTTOCKS_EXPOSED"]
    outside = (out.masks == 0)[:, None].expand_as(x)
    assert torch.equal(out.images[outside], x[outside])
