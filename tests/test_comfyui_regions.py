"""The ComfyUI region nodes: the region detector loader and the region filter, whose MASK is the
region mask an inpainting node takes. Real NudeNet model, tiny forced classifiers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from region_images import astronaut, wheel_scene
from test_comfyui import _fake_comfy_api, load, models_dir  # noqa: F401 (a fixture)
from test_region_video import FLAGGED, FRAMES, RAMP

from comfyui_node import nodes, region_models, schema
from nsfw_safety.regions import RegionDetector
from nsfw_safety.regions.detector import default_model_path

DEFAULT = "nudenet/320n.onnx"


@pytest.fixture
def region_dir(tmp_path, monkeypatch):
    """A ComfyUI ``models/nsfw_region_detector`` folder holding a copy of the model, and a stray file."""
    root = tmp_path / "models" / region_models.FOLDER
    root.mkdir(parents=True)
    (root / "my-640m.onnx").write_bytes(default_model_path().read_bytes())
    (root / "notes.txt").write_text("not a model")
    monkeypatch.setattr(region_models, "model_roots", lambda: [str(root)])
    return root


def comfy(a: np.ndarray, n: int = 1) -> torch.Tensor:
    """(H, W, 3) uint8 -> a ComfyUI IMAGE (n, H, W, 3) float32 in [0, 1]."""
    return (torch.from_numpy(a).float() / 255)[None].repeat(n, 1, 1, 1)


def region_filter(images, region_detector, classes="exposed", region_threshold=0.25, expand=0.0, shape="rectangle",
                  feather=0.0, action="blur", **optional):
    return nodes.NSFWRegionFilter().filter(images, region_detector, classes, region_threshold, expand, shape,
                                           feather, action, **optional)


def test_loader_offers_the_installed_model_then_local_files(region_dir):
    choices = nodes.NSFWRegionDetectorLoader.INPUT_TYPES()["required"]["model"][0]
    assert choices == [DEFAULT, "my-640m.onnx"]
    (det,) = nodes.NSFWRegionDetectorLoader().load(DEFAULT)
    assert isinstance(det, RegionDetector) and det.path == default_model_path()
    assert nodes.NSFWRegionDetectorLoader().load(DEFAULT)[0] is det  # cached
    (mine,) = nodes.NSFWRegionDetectorLoader().load("my-640m.onnx")
    assert mine.path == region_dir / "my-640m.onnx" and mine is not det
    with pytest.raises(ValueError, match="unknown region detector 'notes.txt'"):
        nodes.NSFWRegionDetectorLoader().load("notes.txt")


def test_schema_has_optional_classifier_inputs():
    spec = nodes.NSFWRegionFilter.INPUT_TYPES()
    assert list(spec["required"]) == ["images", "region_detector", "classes", "region_threshold", "expand", "shape",
                                      "feather", "action"]
    assert list(spec["optional"]) == ["detector", "level", "threshold", "window"]
    assert spec["optional"]["window"][1] | {"tooltip": None} == \
        nodes.NSFWSafetyFilter.INPUT_TYPES()["optional"]["window"][1] | {"tooltip": None}  # same limits
    assert spec["required"]["classes"][0] == ["exposed", "faces", "all"]
    assert spec["required"]["shape"][0] == ["rectangle", "ellipse"]
    assert spec["required"]["region_threshold"][1]["default"] == 0.25
    assert nodes.NSFWRegionFilter.RETURN_TYPES == ("IMAGE", "BOOLEAN", "FLOAT", "STRING", "MASK")
    assert nodes.NSFWRegionDetectorLoader.RETURN_TYPES == ("NSFW_REGION_DETECTOR",)


def test_region_filter_with_a_classifier_censors_the_region_and_outputs_its_mask(models_dir):
    (region_detector,) = nodes.NSFWRegionDetectorLoader().load(DEFAULT)
    images = comfy(wheel_scene(), 2)
    out, nsfw, best, report, mask = region_filter(images, region_detector, expand=0.1, shape="ellipse",
                                                  feather=0.05, detector=load("tiny-eva-nsfw"))
    assert nsfw is True and best == 1.0
    assert out.shape == images.shape and out.dtype == torch.float32
    assert mask.shape == (2, 600, 800) and mask.dtype == torch.float32 and mask.device == images.device
    assert 0 <= mask.min() and mask.max() == 1 and 0.1 < mask.mean() < 0.35
    outside = mask == 0
    assert torch.equal(out[outside], images[outside])  # an inpaint of the mask leaves the rest as it was
    assert (out[mask == 1] - images[mask == 1]).abs().mean() > 0.02
    rows = json.loads(report)
    assert rows["regions"]["shape"] == "ellipse" and rows["model"].endswith("tiny-eva-nsfw")
    assert [[r["label"] for r in row["regions"]] for row in rows["images"]] == [["BUTTOCKS_EXPOSED"]] * 2
    assert rows["images"][0]["levels"]["high"] == 1.0 and "; regions: BUTTOCKS_EXPOSED" in rows["images"][0]["reason"]


def test_without_a_classifier_a_found_region_flags_the_image(models_dir):
    (region_detector,) = nodes.NSFWRegionDetectorLoader().load(DEFAULT)
    images = torch.cat([comfy(wheel_scene()), torch.full((1, 600, 800, 3), 0.5)])
    out, nsfw, best, report, mask = region_filter(images, region_detector, action="black")
    assert nsfw is True and 0.5 < best < 0.65
    rows = json.loads(report)
    assert [r["flagged"] for r in rows["images"]] == [True, False] and rows["model"] is None
    assert mask[1].max() == 0 and torch.equal(out[1], images[1])
    assert out[0][mask[0] == 1].max() == 0  # black inside the region
    # privacy mode: faces, nothing else
    face = comfy(astronaut())
    out, nsfw, best, report, mask = region_filter(face, region_detector, classes="faces")
    assert nsfw is True and json.loads(report)["images"][0]["regions"][0]["label"] == "FACE_FEMALE"
    assert torch.equal(out[mask == 0], face[mask == 0]) and 0 < mask.mean() < 0.1


def test_a_flagged_image_with_no_region_is_censored_whole(models_dir):
    (region_detector,) = nodes.NSFWRegionDetectorLoader().load(DEFAULT)
    face = comfy(astronaut())
    out, nsfw, _, report, mask = region_filter(face, region_detector, action="black", detector=load("tiny-eva-nsfw"))
    assert nsfw is True and torch.equal(mask, torch.ones(1, 512, 512)) and out.max() == 0
    assert json.loads(report)["images"][0]["reason"].endswith("censored whole")
    # a safe classifier: nothing flagged, nothing searched, an empty mask
    out, nsfw, _, _, mask = region_filter(face, region_detector, detector=load("tiny-eva-safe"))
    assert nsfw is False and out is face and mask.max() == 0


def test_region_detector_failure_censors_whole(models_dir, monkeypatch):
    (region_detector,) = nodes.NSFWRegionDetectorLoader().load(DEFAULT)

    class Broken:
        def run(self, *args):
            raise RuntimeError("onnxruntime went away")

    monkeypatch.setattr(region_detector, "_session", Broken())
    images = comfy(wheel_scene())
    out, nsfw, _, report, mask = region_filter(images, region_detector, action="pixelate",
                                               detector=load("tiny-eva-nsfw"))
    assert torch.equal(mask, torch.ones(1, 600, 800))
    assert "region detector failed: RuntimeError: onnxruntime went away" in json.loads(report)["images"][0]["reason"]
    out, nsfw, _, report, mask = region_filter(images, region_detector)  # region-only: blacked out
    assert nsfw is True and out.max() == 0 and json.loads(report)["images"][0]["action"] == "black"


def test_bad_inputs_are_named(models_dir):
    (region_detector,) = nodes.NSFWRegionDetectorLoader().load(DEFAULT)
    with pytest.raises(TypeError, match="Region Detector Loader"):
        region_filter(comfy(wheel_scene()), load("tiny-eva"))
    with pytest.raises(TypeError, match="ComfyUI IMAGE"):
        region_filter(torch.zeros(8, 8, 3), region_detector)


def test_optional_inputs_in_both_apis(models_dir, monkeypatch):
    node = schema.Node("N", "N", "c", "d", "go", lambda a, b=None: (a, b),
                       inputs=(schema.Input("a", "IMAGE"), schema.Input("b", "FLOAT", default=1.0, optional=True)),
                       outputs=(schema.Output("IMAGE", "a"),))
    assert schema.classic(node).INPUT_TYPES() == {"required": {"a": ("IMAGE",)},
                                                  "optional": {"b": ("FLOAT", {"default": 1.0})}}
    sockets = schema.v3(_fake_comfy_api().io, node).define_schema().inputs
    assert [s.kwargs for s in sockets] == [{}, {"optional": True, "default": 1.0}]
    # the V3 region filter runs without its optional classifier
    v3 = {n.node_id: schema.v3(_fake_comfy_api().io, n) for n in nodes.NODES}
    (det,) = v3["NSFWRegionDetectorLoader"].execute(model=DEFAULT)
    out = v3["NSFWRegionFilter"].execute(
        images=comfy(wheel_scene()), region_detector=det, classes="exposed", region_threshold=0.25, expand=0.0,
        shape="rectangle", feather=0.0, action="black")
    assert len(out) == 5 and out[1] is True and 0.1 < out[4].mean() < 0.3



def test_window_censors_the_neighbours_of_a_flagged_frame_in_their_own_regions(models_dir):
    """Five video frames (the wheel at three places, a gray ramp with no region, the wheel again);
    the classifier flags frame 2 only: with window 1, frame 1 is censored in its own region, the
    ramp (frame 3) whole, and the mask says exactly which pixels changed."""
    (region_detector,) = nodes.NSFWRegionDetectorLoader().load(DEFAULT)
    detector = load("tiny-eva")
    images = torch.stack([torch.from_numpy(f).float() / 255 for f in FRAMES])  # (5, 300, 400, 3)
    medium = detector.predict(images, layout="BHWC").levels[:, 2]
    assert int(medium.argmax()) == FLAGGED, medium  # the premise
    ranked = medium.sort().values
    threshold = float((ranked[-1] + ranked[-2]) / 2)  # only frame 2 is flagged
    out, nsfw, best, report, mask = region_filter(images, region_detector, detector=detector, level="medium",
                                                  threshold=threshold, window=1)
    assert nsfw is True and best == pytest.approx(float(medium.max()), abs=1e-6)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert mask.shape == (5, 300, 400) and mask.dtype == torch.float32 and mask.device == images.device
    assert 0 <= mask.min() and mask.max() <= 1
    # pixels under mask 0 are unchanged; those under 1 are censored
    assert torch.equal(out[mask == 0], images[mask == 0])
    assert (out[mask == 1] - images[mask == 1]).abs().mean() > 0.02
    # frames 0 and 4 are untouched; 1 and 2 in a region; the ramp whole
    assert [m.max().item() for m in mask] == [0, 1, 1, 1, 0]
    assert torch.equal(out[[0, 4]], images[[0, 4]])
    for i in (1, FLAGGED):
        assert 0.1 < mask[i].mean() < 0.5 and mask[i][0, 0] == 0  # the wheel, not the corner
    assert bool(mask[RAMP].eq(1).all())
    data = json.loads(report)
    assert data["window"] == 1 and data["flagged_frames"] == [[2, 2]] and data["censored_frames"] == [[1, 3]]
    rows = data["images"]
    assert [r["flagged"] for r in rows] == [False, False, True, False, False]
    assert [r["action"] for r in rows] == ["none", "blur", "blur", "blur", "none"]
    assert [[g["label"] for g in r["regions"]] for r in rows] == [[], ["BUTTOCKS_EXPOSED"], ["BUTTOCKS_EXPOSED"], [], []]
    assert "; in the window of a flagged frame; regions: BUTTOCKS_EXPOSED" in rows[1]["reason"]
    assert rows[RAMP]["reason"].endswith("in the window of a flagged frame; no region of exposed at or above "
                                         "threshold: censored whole")
    assert ">=" in rows[FLAGGED]["reason"] and "; regions: BUTTOCKS_EXPOSED" in rows[FLAGGED]["reason"]
    # window 0: the same batch as independent images, only the flagged frame censored
    out0, _, _, report0, mask0 = region_filter(images, region_detector, detector=detector, level="medium",
                                               threshold=threshold)
    assert json.loads(report0)["censored_frames"] == [[2, 2]] and json.loads(report0)["window"] == 0
    assert [m.max().item() for m in mask0] == [0, 0, 1, 0, 0] and torch.equal(mask0[FLAGGED], mask[FLAGGED])
    assert torch.equal(out0[FLAGGED], out[FLAGGED]) and torch.equal(out0[[0, 1, 3, 4]], images[[0, 1, 3, 4]])


def test_window_without_a_classifier_is_refused(models_dir):
    (region_detector,) = nodes.NSFWRegionDetectorLoader().load(DEFAULT)
    with pytest.raises(ValueError, match="window=2 needs a classifier: connect the detector input"):
        region_filter(comfy(wheel_scene(), 3), region_detector, window=2)
    _, _, _, report, _ = region_filter(comfy(wheel_scene(), 3), region_detector, window=0)
    data = json.loads(report)  # region-only reports give the frames' ranges too
    assert data["window"] == 0 and data["flagged_frames"] == data["censored_frames"] == [[0, 2]]
