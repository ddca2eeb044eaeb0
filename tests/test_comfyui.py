"""The ComfyUI node pack: schema, loader cache, filter and switch outputs, fail-closed path,
and the pack imported the way ComfyUI imports it. ComfyUI itself is not installed here."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # comfyui_node is not an installed package: ComfyUI imports it from the clone
    sys.path.insert(0, str(ROOT))

from comfyui_node import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, management, nodes, schema  # noqa: E402
from nsfw_safety import (  # noqa: E402
    ACTIONS, NSFW_LEVELS, REGISTRY, Detector, ModelSpec, SafetyFilter, load_detector, register,
)
from nsfw_safety.censor import default_card, place  # noqa: E402
from nsfw_safety.regions import CLASS_SETS, SHAPES, RegionDetector  # noqa: E402

PYTHON_KINDS = {"IMAGE": torch.Tensor, "MASK": torch.Tensor, "BOOLEAN": bool, "FLOAT": float, "STRING": str,
                "NSFW_DETECTOR": Detector, "NSFW_REGION_DETECTOR": RegionDetector}


@pytest.fixture
def models_dir(tmp_path, monkeypatch, eva_dir, eva_nsfw_dir, eva_safe_dir, vit_dir):
    """A ComfyUI ``models/nsfw_detector`` folder holding the tiny checkpoints (as symlinks)."""
    root = tmp_path / "models" / "nsfw_detector"
    root.mkdir(parents=True)
    for name, path in {"tiny-eva": eva_dir, "tiny-eva-nsfw": eva_nsfw_dir, "tiny-eva-safe": eva_safe_dir,
                       "tiny-vit": vit_dir}.items():
        (root / name).symlink_to(path, target_is_directory=True)
    (root / "not-a-checkpoint").mkdir()  # no config.json: never listed
    monkeypatch.setattr(management, "checkpoint_roots", lambda: [str(root)])
    return root


def load(name: str, dtype: str = "auto") -> Detector:
    (detector,) = nodes.NSFWDetectorLoader().load(name, dtype)
    return detector


def comfy_images(n: int = 4, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    """A ComfyUI IMAGE: (B, H, W, 3) float32 in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, h, w, 3, generator=g)


def run_filter(images, detector, level="medium", threshold=0.5, action="blur"):
    return nodes.NSFWSafetyFilter().filter(images, detector, level, threshold, action)


# --- schema ----------------------------------------------------------------------------------

def test_classic_schema():
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("NSFW ")
        assert cls.CATEGORY == "image/safety"
        assert callable(getattr(cls(), cls.FUNCTION))
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        assert all(t in PYTHON_KINDS for t in cls.RETURN_TYPES)
        if hasattr(cls, "OUTPUT_TOOLTIPS"):
            assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"} and spec["required"]
        for name, entry in {**spec["required"], **spec.get("optional", {})}.items():
            assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, name
            kind, options = entry[0], (entry[1] if len(entry) == 2 else {})
            if isinstance(kind, list):  # combo: the default must be one of the choices
                assert kind and all(isinstance(c, str) for c in kind)
                assert options.get("default", kind[0]) in kind, name
            else:
                assert kind in ("IMAGE", "FLOAT", "INT", "BOOLEAN", "NSFW_DETECTOR", "NSFW_REGION_DETECTOR"), name
            if kind in ("FLOAT", "INT"):
                assert options["min"] <= options["default"] <= options["max"]
    assert NODE_CLASS_MAPPINGS["NSFWDetectorLoader"].RETURN_TYPES == ("NSFW_DETECTOR",)
    assert nodes.NSFWSafetyFilter.RETURN_TYPES == ("IMAGE", "BOOLEAN", "FLOAT", "STRING", "MASK")
    levels = nodes.NSFWSafetyFilter.INPUT_TYPES()["required"]["level"][0]
    assert levels == ["low", "medium", "high"]
    assert nodes.NSFWSafetyFilter.INPUT_TYPES()["required"]["action"][0] == [
        "blur", "pixelate", "black", "placeholder", "none"]
    # added later, so optional: a saved API workflow without it still validates
    kind, options = nodes.NSFWSafetyFilter.INPUT_TYPES()["optional"]["stop_on_flag"]
    assert kind == "BOOLEAN" and options["default"] is False and "stop the whole workflow" in options["tooltip"]
    assert "optional" not in nodes.NSFWSafetySwitch.INPUT_TYPES()


def test_classic_classes_are_generated_from_the_table():
    assert list(NODE_CLASS_MAPPINGS) == [node.node_id for node in nodes.NODES]
    for node in nodes.NODES:
        cls = NODE_CLASS_MAPPINGS[node.node_id]
        assert cls.NODE is node and cls.__name__ == node.node_id
        assert NODE_DISPLAY_NAME_MAPPINGS[node.node_id] == node.display_name
        assert (cls.CATEGORY, cls.DESCRIPTION, cls.FUNCTION) == (node.category, node.description, node.function)
        assert cls.RETURN_TYPES == tuple(o.type for o in node.outputs)
        assert cls.RETURN_NAMES == tuple(o.name for o in node.outputs)
        assert cls.OUTPUT_TOOLTIPS == tuple(o.tooltip for o in node.outputs)
        spec = cls.INPUT_TYPES()
        assert list(spec["required"]) == [i.name for i in node.inputs if not i.optional]
        assert list(spec.get("optional", {})) == [i.name for i in node.inputs if i.optional]
        for i in node.inputs:
            kind = list(i.choices()) if i.type == schema.COMBO else i.type
            entry = spec["optional" if i.optional else "required"][i.name]
            assert entry == ((kind, i.options()) if i.options() else (kind,)), i.name


def test_choices_and_defaults_come_from_the_core(models_dir):
    for node in (nodes.NSFWSafetyFilter, nodes.NSFWSafetySwitch):
        required = node.INPUT_TYPES()["required"]
        assert required["level"][0] == list(NSFW_LEVELS) and required["action"][0] == list(ACTIONS)
        defaults = {k: required[k][1]["default"] for k in ("level", "threshold", "action")}
        assert defaults == {k: v.default for k, v in inspect.signature(SafetyFilter).parameters.items()
                            if k in defaults}
    # a model registered at run time is offered at the next prompt, before the local folders
    spec = ModelSpec("extra", "someone/extra", ("sfw", "nsfw"), REGISTRY["vit"].preprocess, "MIT")
    register(spec)
    try:
        choices = nodes.NSFWDetectorLoader.INPUT_TYPES()["required"]["model"][0]
        assert choices[: len(REGISTRY)] == list(REGISTRY) and choices[len(REGISTRY)] == "tiny-eva"
    finally:
        del REGISTRY["extra"]
    # and no vocabulary of the core is spelled out in the pack (only derived)
    for file in (ROOT / "comfyui_node").glob("*.py"):
        text = file.read_text()
        for word in {*ACTIONS, *NSFW_LEVELS, *REGISTRY, *CLASS_SETS, *SHAPES}:
            assert f'"{word}"' not in text and f"'{word}'" not in text, (file.name, word)


def test_functions_return_what_the_schema_declares(models_dir):
    detector = load("tiny-eva")
    images = comfy_images()
    for cls, args in [(nodes.NSFWDetectorLoader, ("tiny-eva", "auto")),
                      (nodes.NSFWSafetyFilter, (images, detector, "medium", 0.5, "blur")),
                      (nodes.NSFWSafetySwitch, (images, detector, "medium", 0.5, "blur"))]:
        out = getattr(cls(), cls.FUNCTION)(*args)
        assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES)
        for value, kind in zip(out, cls.RETURN_TYPES):
            assert isinstance(value, PYTHON_KINDS[kind]), (cls.__name__, kind, type(value))


# --- loader ------------------------------------------------------------------------------------

def test_loader_lists_registry_then_local_folders(models_dir, vit_safe_dir):
    choices, options = nodes.NSFWDetectorLoader.INPUT_TYPES()["required"]["model"]
    assert choices == ["eva", "vit-sd", "vit", "falconsai", "tiny-eva", "tiny-eva-nsfw", "tiny-eva-safe", "tiny-vit"]
    assert options["default"] == "eva"
    # a folder copied in while ComfyUI runs is listed at the next prompt (combos are re-validated)
    (models_dir / "later").symlink_to(vit_safe_dir, target_is_directory=True)
    assert "later" in nodes.NSFWDetectorLoader.INPUT_TYPES()["required"]["model"][0]
    assert management.resolve_model("later") == str(models_dir / "later")
    assert management.resolve_model("eva") == "eva"
    with pytest.raises(ValueError, match="unknown NSFW detector 'not-a-checkpoint'"):
        load("not-a-checkpoint")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load("tiny-eva", "int8")


def test_local_folder_wins_over_registry_name(models_dir, eva_safe_dir):
    (models_dir / "eva").symlink_to(eva_safe_dir, target_is_directory=True)
    assert management.model_choices().count("eva") == 1
    detector = load("eva")  # never the hub: the folder's checkpoint, under the folder's name
    assert detector.path == models_dir / "eva" and detector.model_id == str(models_dir / "eva")
    assert float(detector.predict(comfy_images(2), layout="BHWC").levels[:, 0].min()) > 0.99  # the safe model


def test_loader_is_cached(models_dir):
    first = load("tiny-eva")
    assert load("tiny-eva") is first  # a re-executed loader node does not reload
    assert first.device.type == "cpu" and first.dtype == torch.float32  # auto on the CPU
    bf16 = load("tiny-eva", "bf16")
    assert bf16 is not first and bf16.dtype == torch.bfloat16
    assert load("tiny-eva", "bf16") is bf16
    assert load("tiny-vit").labels == ("sfw", "nsfw")
    # ComfyUI moves a kept detector between its devices; one whose dtype was changed is not handed out
    first.to(dtype=torch.float16)
    again = load("tiny-eva")
    assert again is not first and again.dtype == torch.float32 and first.dtype == torch.float16
    assert load("tiny-eva") is again


def test_auto_dtype_follows_comfys_load_device(models_dir, monkeypatch):
    # ComfyUI on a GPU: loaded in bf16 on the offload device (CPU), moved by model management
    monkeypatch.setattr(management, "devices", lambda: (torch.device("cuda"), torch.device("cpu")))
    detector = load("tiny-eva-safe")
    assert detector.device.type == "cpu" and detector.dtype == torch.bfloat16


# --- safety filter -----------------------------------------------------------------------------

def test_filter_censors_flagged_images_only(models_dir):
    detector = load("tiny-eva")
    images = comfy_images(6)
    medium = detector.predict(images, layout="BHWC").levels[:, 2]
    ranked = medium.sort().values
    threshold = float((ranked[2] + ranked[3]) / 2)  # three above, three below
    expected = (medium >= threshold).tolist()
    assert sum(expected) == 3

    out, nsfw, top, text, mask = run_filter(images, detector, "medium", threshold, "blur")
    assert out.shape == images.shape and out.dtype == torch.float32 and out.device == images.device
    for i, flagged in enumerate(expected):
        assert torch.equal(out[i], images[i]) != flagged
    assert nsfw is True
    assert top == pytest.approx(float(medium.max()), abs=1e-6)
    assert mask.shape == (6, 40, 48) and mask.dtype == torch.float32
    assert mask.amax(dim=(1, 2)).tolist() == [float(f) for f in expected]
    assert torch.equal(mask.amin(dim=(1, 2)), mask.amax(dim=(1, 2)))  # whole images, not regions

    data = json.loads(text)
    assert data["any_flagged"] is True and data["level"] == "medium" and data["action"] == "blur"
    assert [im["flagged"] for im in data["images"]] == expected
    assert [im["action"] for im in data["images"]] == ["blur" if f else "none" for f in expected]
    for im, score in zip(data["images"], medium.tolist()):
        assert im["levels"]["medium"] == pytest.approx(score, abs=1e-6)
        assert set(im["probs"]) == {"neutral", "low", "medium", "high"}
        assert (">=" in im["reason"]) == im["flagged"]
    assert images.equal(comfy_images(6))  # the input batch is never modified


def test_filter_window_censors_the_frames_around_a_flagged_frame(models_dir):
    """A batch of video frames: one flagged frame censors its neighbours too, and the report
    gives flagged and censored frames as ranges."""
    detector = load("tiny-eva")
    images = comfy_images(7)
    medium = detector.predict(images, layout="BHWC").levels[:, 2]
    ranked = medium.sort().values
    threshold = float((ranked[-1] + ranked[-2]) / 2)  # only the top frame is flagged
    m = int(medium.argmax())
    around = list(range(max(m - 1, 0), min(m + 1, 6) + 1))

    out, nsfw, top, text, mask = nodes.NSFWSafetyFilter().filter(images, detector, "medium", threshold, "blur",
                                                                 window=1)
    assert out.shape == images.shape and out.dtype == images.dtype and nsfw is True
    assert [not torch.equal(out[i], images[i]) for i in range(7)] == [i in around for i in range(7)]
    assert top == pytest.approx(float(medium.max()), abs=1e-6)
    assert mask.amax(dim=(1, 2)).tolist() == [float(i == m) for i in range(7)]
    data = json.loads(text)
    assert data["window"] == 1 and data["flagged_frames"] == [[m, m]]
    assert data["censored_frames"] == [[around[0], around[-1]]]
    assert [im["action"] for im in data["images"]] == ["blur" if i in around else "none" for i in range(7)]
    assert [im["flagged"] for im in data["images"]] == [i == m for i in range(7)]
    for i in set(around) - {m}:
        assert data["images"][i]["reason"].endswith("within 1 frames of a flagged frame")
    for im, score in zip(data["images"], medium.tolist()):
        assert im["levels"]["medium"] == pytest.approx(score, abs=1e-6)
    # window 0: the same batch as independent images, one censored
    out0, _, _, text0, _ = run_filter(images, detector, "medium", threshold, "blur")
    assert json.loads(text0)["censored_frames"] == [[m, m]]
    assert [not torch.equal(out0[i], images[i]) for i in range(7)] == [i == m for i in range(7)]


@pytest.mark.parametrize("action", ["black", "pixelate", "placeholder", "none"])
def test_filter_actions_on_a_flagged_batch(models_dir, action):
    images = comfy_images(2)
    out, nsfw, top, text, mask = run_filter(images, load("tiny-eva-nsfw"), "high", 0.9, action)
    assert nsfw is True and top == pytest.approx(1.0) and bool(mask.eq(1).all())
    if action == "black":
        assert bool(out.eq(0).all())
    elif action == "none":
        assert torch.equal(out, images)
    elif action == "placeholder":  # the built-in card, fitted to each image
        card = place(images.permute(0, 3, 1, 2), default_card()).permute(0, 2, 3, 1)
        torch.testing.assert_close(out, card, atol=1e-6, rtol=0)
    else:  # pixelate: blocks of equal colour
        assert not torch.equal(out, images) and out[:, :2, :2].std(dim=(1, 2)).max() < 1e-6
    assert all(im["action"] == action for im in json.loads(text)["images"])


def test_filter_passes_a_safe_batch_untouched(models_dir):
    images = comfy_images(3)
    out, nsfw, top, text, mask = run_filter(images, load("tiny-eva-safe"))
    assert torch.equal(out, images) and nsfw is False and top < 0.01
    assert bool(mask.eq(0).all()) and json.loads(text)["any_flagged"] is False


def test_filter_fails_closed_when_scoring_raises(models_dir, monkeypatch, caplog):
    detector = load("tiny-eva-safe")

    def broken(x):
        raise RuntimeError("boom")

    monkeypatch.setattr(detector.model, "forward", broken)
    images = comfy_images(3)
    with caplog.at_level(logging.ERROR):
        out, nsfw, top, text, mask = run_filter(images, detector, action="none")
    assert bool(out.eq(0).all()) and out.shape == images.shape  # blocked even with action "none"
    assert nsfw is True and top == 1.0 and bool(mask.eq(1).all())
    data = json.loads(text)
    assert [im["reason"] for im in data["images"]] == ["error: RuntimeError: boom"] * 3
    assert all(im["levels"] is None and im["action"] == "black" for im in data["images"])
    assert "scoring failed" in caplog.text


def test_filter_blocks_non_finite_images(models_dir):
    images = comfy_images(2)
    images[1, 5, 5, 0] = float("nan")
    out, nsfw, _, text, mask = run_filter(images, load("tiny-eva-safe"))
    assert torch.equal(out[0], images[0]) and bool(out[1].eq(0).all())
    assert mask.amax(dim=(1, 2)).tolist() == [0.0, 1.0]
    assert json.loads(text)["images"][1]["reason"] == "non-finite input"


def test_filter_rejects_what_is_not_an_image_batch(models_dir):
    detector = load("tiny-eva")
    with pytest.raises(TypeError, match="ComfyUI IMAGE"):
        run_filter(comfy_images(1)[0], detector)
    with pytest.raises(TypeError, match="NSFW Detector Loader"):
        run_filter(comfy_images(1), "eva")
    with pytest.raises(ValueError, match="action must be one of"):
        run_filter(comfy_images(1), detector, action="smudge")
    with pytest.raises(ValueError, match="level must be one of"):
        run_filter(comfy_images(1), detector, level="neutral")


def test_filter_stops_the_workflow_on_a_flag(models_dir):
    images = comfy_images(3)
    detector = load("tiny-eva")
    medium = detector.predict(images, layout="BHWC").levels[:, 2]
    threshold = float(medium.median())  # the middle one and the highest are flagged
    hits = [i for i in range(3) if medium[i] >= threshold]
    # off by default: the outputs as usual
    out, nsfw, *_ = run_filter(images, detector, "medium", threshold, "blur")
    assert nsfw is True and not torch.equal(out, images)
    # on: the node raises, so ComfyUI ends the prompt there and shows the message
    with pytest.raises(nodes.WorkflowStopped) as stopped:
        nodes.NSFWSafetyFilter().filter(images, detector, "medium", threshold, "blur", stop_on_flag=True)
    reasons = "; ".join(f"#{i}: medium {float(medium[i]):.2f} >= {threshold:.2f}" for i in hits)
    assert str(stopped.value) == (f"NSFW Safety Filter stopped the workflow: 2 of 3 images flagged ({reasons}). "
                                  f"No later node received them.")
    # on, nothing flagged: the batch passes untouched
    out, nsfw, *_ = nodes.NSFWSafetyFilter().filter(images, load("tiny-eva-safe"), "medium", 0.5, "blur",
                                                    stop_on_flag=True)
    assert nsfw is False and torch.equal(out, images)
    # fail closed: an image that could not be checked stops it too, whatever the model says
    bad = images.clone()
    bad[2, 0, 0, 0] = float("nan")
    with pytest.raises(nodes.WorkflowStopped, match=r"1 of 3 images flagged \(#2: non-finite input\)"):
        nodes.NSFWSafetyFilter().filter(bad, load("tiny-eva-safe"), "medium", 0.5, "none", stop_on_flag=True)
    # a long list is cut short
    many = comfy_images(12)
    with pytest.raises(nodes.WorkflowStopped, match=r"12 of 12 images flagged \(#0: .*#7: [^;]*; and 4 more\)"):
        nodes.NSFWSafetyFilter().filter(many, load("tiny-eva-nsfw"), "medium", 0.5, "black", stop_on_flag=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_filter_on_gpu_keeps_the_cpu_image(models_dir):
    detector = load_detector(str(models_dir / "tiny-eva-nsfw"), device="cuda")
    images = comfy_images(2)
    out, nsfw, _, _, mask = run_filter(images, detector, action="black")
    assert detector.dtype == torch.bfloat16 and out.device.type == "cpu" and out.dtype == torch.float32
    assert nsfw is True and bool(out.eq(0).all()) and mask.device.type == "cpu"


# --- switch ------------------------------------------------------------------------------------

def test_switch_routes_flagged_images(models_dir):
    detector = load("tiny-eva")
    images = comfy_images(6)
    medium = detector.predict(images, layout="BHWC").levels[:, 2]
    threshold = float(medium.median())
    flagged = medium >= threshold
    safe, bad, nsfw, text = nodes.NSFWSafetySwitch().switch(images, detector, "medium", threshold, "none")
    assert torch.equal(safe, images[~flagged]) and torch.equal(bad, images[flagged]) and nsfw is True
    assert [im["flagged"] for im in json.loads(text)["images"]] == flagged.tolist()
    _, blurred, _, _ = nodes.NSFWSafetySwitch().switch(images, detector, "medium", threshold, "blur")
    assert blurred.shape == bad.shape and not torch.equal(blurred, bad)


def test_switch_blocks_an_empty_branch(models_dir, monkeypatch):
    images = comfy_images(2)
    safe, bad, nsfw, _ = nodes.NSFWSafetySwitch().switch(images, load("tiny-eva-safe"), "medium", 0.5, "blur")
    assert torch.equal(safe, images) and bad.shape == (0, 40, 48, 3) and nsfw is False  # no ComfyUI here

    class Blocker:  # ComfyUI's comfy_execution.graph.ExecutionBlocker skips the nodes after it
        def __init__(self, message):
            self.message = message

    monkeypatch.setattr(nodes, "ExecutionBlocker", Blocker)
    safe, bad, nsfw, _ = nodes.NSFWSafetySwitch().switch(images, load("tiny-eva-nsfw"), "medium", 0.5, "black")
    assert isinstance(safe, Blocker) and safe.message is None
    assert bad.shape == images.shape and bool(bad.eq(0).all()) and nsfw is True


# --- ComfyUI model management (its API as the pack uses it) ------------------------------------

def test_model_management_glue(models_dir, monkeypatch):
    calls = []

    class Patcher:
        def __init__(self, model, load_device, offload_device):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        calls.append((models, force_full_load))
        for patcher in models:
            patcher.model.device = patcher.load_device  # what ComfyUI's ModelPatcher does
            patcher.model.to(patcher.load_device)

    mm = types.SimpleNamespace(get_torch_device=lambda: torch.device("cpu"),
                               unet_offload_device=lambda: torch.device("cpu"), load_models_gpu=load_models_gpu)
    monkeypatch.setattr(management, "mm", mm)
    monkeypatch.setattr(management, "model_patcher", types.SimpleNamespace(ModelPatcher=Patcher))
    detector = load("tiny-vit")  # a transformers model: it forbids assigning .device
    images = comfy_images(2)
    for _ in range(2):
        assert run_filter(images, detector)[0].shape == images.shape
    (first, full), (second, _) = calls
    assert full is True and first[0] is second[0]  # one patcher per detector, reused every run
    assert first[0].model.net is detector.model


# --- installed as a node pack ------------------------------------------------------------------

def import_like_comfyui(path: Path) -> types.ModuleType:
    """What ComfyUI's custom-node loader does with a pack folder: its __init__.py as a package."""
    name = str(path).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:  # a fresh import next time
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    return module


def test_root_package_registers_the_nodes():
    pack = import_like_comfyui(ROOT)
    assert set(pack.NODE_CLASS_MAPPINGS) == {"NSFWDetectorLoader", "NSFWSafetyFilter", "NSFWSafetySwitch",
                                             "NSFWSecondOpinion", "NSFWRegionDetectorLoader", "NSFWRegionFilter"}
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["NSFWSafetyFilter"] == "NSFW Safety Filter"
    assert not hasattr(pack, "comfy_entrypoint")  # V1 wins in ComfyUI anyway


def test_cloned_pack_works_without_the_package_installed(tmp_path):
    pack = tmp_path / "ComfyUI" / "custom_nodes" / "nsfw-safety"
    pack.mkdir(parents=True)
    shutil.copy(ROOT / "__init__.py", pack)
    for part in ("comfyui_node", "nsfw_safety"):
        shutil.copytree(ROOT / part, pack / part, ignore=shutil.ignore_patterns("__pycache__"))
    code = f"""
import importlib.util, sys
sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]  # not installed
assert importlib.util.find_spec('nsfw_safety') is None
sys.path.insert(0, {str(tmp_path / 'ComfyUI')!r})  # ComfyUI's root is on sys.path
spec = importlib.util.spec_from_file_location('pack', {str(pack / '__init__.py')!r})
module = importlib.util.module_from_spec(spec); sys.modules['pack'] = module; spec.loader.exec_module(module)
import nsfw_safety
print(sorted(module.NODE_CLASS_MAPPINGS), nsfw_safety.__file__)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    assert ("['NSFWDetectorLoader', 'NSFWRegionDetectorLoader', 'NSFWRegionFilter', 'NSFWSafetyFilter', "
            "'NSFWSafetySwitch', 'NSFWSecondOpinion']") in result.stdout
    assert str(pack / "nsfw_safety") in result.stdout


# --- V3 ----------------------------------------------------------------------------------------

def test_v1_where_the_pinned_v3_api_is_missing(monkeypatch, caplog):
    """An older ComfyUI: no comfy_api at all, or one without the pinned version."""
    from comfyui_node import v3

    assert v3.AVAILABLE is False and not hasattr(v3, "comfy_entrypoint")
    monkeypatch.setenv("NSFW_SAFETY_NODE_API", "v3")
    with caplog.at_level(logging.WARNING):
        pack = import_like_comfyui(ROOT)
    assert "NODE_CLASS_MAPPINGS" in vars(pack) and "comfy_entrypoint" not in vars(pack)
    assert f"has no comfy_api.{v3.API_VERSION}: using the classic nodes" in caplog.text
    monkeypatch.delenv("NSFW_SAFETY_NODE_API")
    monkeypatch.setitem(sys.modules, "comfy_api", types.ModuleType("comfy_api"))
    monkeypatch.setitem(sys.modules, "comfy_api.latest", _fake_comfy_api())  # only an unpinned API
    pack = import_like_comfyui(ROOT)
    assert set(pack.__all__) == {"NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"}
    assert list(pack.NODE_CLASS_MAPPINGS) == [n.node_id for n in nodes.NODES]


def _fake_comfy_api() -> types.ModuleType:
    """The slice of a versioned ``comfy_api`` (``v0_0_2``) the V3 module uses, recording what it is given."""

    class Socket:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    def socket_type(io_type):
        sock = type(f"{io_type}Socket", (Socket,), {"io_type": io_type})
        return type(io_type, (), {"io_type": io_type, "Input": sock, "Output": sock})

    io = types.ModuleType("comfy_api.v0_0_2.io")  # a module, as the real one is
    vars(io).update(
        ComfyNode=type("ComfyNode", (), {}), Schema=lambda **kw: types.SimpleNamespace(**kw),
        NodeOutput=lambda *values: values, Custom=socket_type,
        **{n: socket_type(n.upper()) for n in ("Image", "Mask", "Boolean", "Float", "String", "Combo")})
    api = types.ModuleType("comfy_api.v0_0_2")
    api.io, api.ComfyExtension = io, type("ComfyExtension", (), {})
    return api


def assert_v3_matches_classic(v3_node: type, classic: type) -> None:
    """The V3 schema states exactly what the classic attributes state, input by input."""
    v3 = v3_node.define_schema()
    assert (v3.node_id, v3.category, v3.description) == (classic.__name__, classic.CATEGORY, classic.DESCRIPTION)
    spec = classic.INPUT_TYPES()
    given = {**spec["required"], **spec.get("optional", {})}
    assert [i.args for i in v3.inputs] == [(name,) for name in given]
    for socket, (name, (kind, *options)) in zip(v3.inputs, given.items()):
        kwargs = dict(socket.kwargs)
        assert kwargs.pop("optional", False) == (name in spec.get("optional", {})), name
        if isinstance(kind, list):  # a combo: its choices are the V3 options
            assert socket.io_type == schema.COMBO and kwargs.pop("options") == kind
        else:
            assert socket.io_type == kind
        assert kwargs == (options[0] if options else {}), socket.args
    assert [o.io_type for o in v3.outputs] == list(classic.RETURN_TYPES)
    assert [o.kwargs for o in v3.outputs] == [{"display_name": n, "tooltip": t or None}
                                              for n, t in zip(classic.RETURN_NAMES, classic.OUTPUT_TOOLTIPS)]


def test_both_apis_are_generated_from_one_description():
    """Any node of the table, generated both ways, says the same thing and runs the same function."""
    calls = []

    def run(images, rule, strength, count=None):
        """Runs the node."""
        calls.append((images, rule, strength))
        return (images, rule)

    node = schema.Node(
        "AnyNode", "Any Node", "test", "does things", "go", run,
        inputs=(schema.Input("images", "IMAGE", "the pictures"), schema.Input("rule", "NSFW_DETECTOR"),
                schema.Input("strength", "FLOAT", default=0.25, min=0.0, max=2.0, step=0.05),
                schema.Input("count", schema.COMBO, "how many", default="b", choices=lambda: ("a", "b"))),
        outputs=(schema.Output("IMAGE", "out", "the pictures again"), schema.Output("NSFW_DETECTOR", "rule")))
    classic = schema.classic(node)
    v3 = schema.v3(_fake_comfy_api().io, node)
    assert classic.INPUT_TYPES()["required"] == {
        "images": ("IMAGE", {"tooltip": "the pictures"}), "rule": ("NSFW_DETECTOR",),
        "strength": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 2.0, "step": 0.05}),
        "count": (["a", "b"], {"default": "b", "tooltip": "how many"})}
    assert (classic.RETURN_TYPES, classic.RETURN_NAMES, classic.OUTPUT_TOOLTIPS) == (
        ("IMAGE", "NSFW_DETECTOR"), ("out", "rule"), ("the pictures again", ""))
    assert classic.FUNCTION == "go" and classic.go.__doc__ == "Runs the node."
    assert_v3_matches_classic(v3, classic)
    assert classic().go(1, "r", 0.5) == (1, "r") and v3.execute(images=2, rule="s", strength=1.0) == (2, "s")
    assert calls == [(1, "r", 0.5), (2, "s", 1.0)]


def test_v3_first_where_comfyui_provides_the_pinned_api(models_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "comfy_api", types.ModuleType("comfy_api"))
    monkeypatch.setitem(sys.modules, "comfy_api.v0_0_2", _fake_comfy_api())
    monkeypatch.setenv("NSFW_SAFETY_NODE_API", "v1")  # forced: the classic nodes all the same
    pack = import_like_comfyui(ROOT)
    assert "NODE_CLASS_MAPPINGS" in vars(pack) and "comfy_entrypoint" not in vars(pack)
    monkeypatch.delenv("NSFW_SAFETY_NODE_API")  # by default: V3, and only V3, or ComfyUI would take V1
    pack = import_like_comfyui(ROOT)
    assert pack.__all__ == ["comfy_entrypoint"] and "NODE_CLASS_MAPPINGS" not in vars(pack)
    assert pack.comfyui_node.API == "v3" and "NODE_CLASS_MAPPINGS" not in vars(pack.comfyui_node)
    v3 = pack.comfyui_node.v3
    assert v3.io is sys.modules["comfy_api.v0_0_2"].io
    monkeypatch.setattr(v3.nodes.management, "checkpoint_roots", lambda: [str(models_dir)])

    node_list = asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())
    assert [n.define_schema().node_id for n in node_list] == list(NODE_CLASS_MAPPINGS)
    for node in node_list:
        schema_ = node.define_schema()
        assert schema_.display_name == NODE_DISPLAY_NAME_MAPPINGS[schema_.node_id]
        assert_v3_matches_classic(node, NODE_CLASS_MAPPINGS[schema_.node_id])
    model_input = v3.NSFWDetectorLoader.define_schema().inputs[0]
    assert "tiny-eva-nsfw" in model_input.kwargs["options"] and model_input.kwargs["default"] == "eva"

    (detector,) = v3.NSFWDetectorLoader.execute(model="tiny-eva-nsfw", dtype="auto")
    assert detector is v3.nodes.management.load("tiny-eva-nsfw")  # the loader's one cache, either API
    out = v3.NSFWSafetyFilter.execute(images=comfy_images(2), detector=detector, level="medium",
                                      threshold=0.5, action="black")
    assert len(out) == 5 and bool(out[0].eq(0).all()) and out[1] is True
    with pytest.raises(v3.nodes.WorkflowStopped, match="2 of 2 images flagged"):
        v3.NSFWSafetyFilter.execute(images=comfy_images(2), detector=detector, level="medium", threshold=0.5,
                                    action="black", stop_on_flag=True)
    safe, bad, nsfw, _ = v3.NSFWSafetySwitch.execute(images=comfy_images(2), detector=detector, level="medium",
                                                     threshold=0.5, action="none")
    assert len(safe) == 0 and len(bad) == 2 and nsfw is True


# --- example workflows and packaging files ------------------------------------------------------

EXAMPLES = ROOT / "examples" / "comfyui"
#: (API file, UI file) of each example: the same graph in both formats
WORKFLOWS = {"filter": ("nsfw_safety_api.json", "nsfw_safety_workflow.json"),
             "txt2img": ("txt2img_safety_api.json", "txt2img_safety_workflow.json"),
             "regions": ("nsfw_safety_regions_inpaint_api.json", "nsfw_safety_regions_inpaint_workflow.json")}
# the sockets of the ComfyUI core nodes used by the examples (as ComfyUI declares them)
CORE_OUTPUTS = {"LoadImage": ("IMAGE", "MASK"), "MaskToImage": ("IMAGE",), "SaveImage": (), "PreviewImage": (),
                "CheckpointLoaderSimple": ("MODEL", "CLIP", "VAE"), "CLIPTextEncode": ("CONDITIONING",),
                "EmptyLatentImage": ("LATENT",), "KSampler": ("LATENT",), "VAEDecode": ("IMAGE",),
                "VAEEncodeForInpaint": ("LATENT",), "ImageCompositeMasked": ("IMAGE",)}
CORE_INPUTS = {"LoadImage": {}, "MaskToImage": {"mask": "MASK"}, "SaveImage": {"images": "IMAGE"},
               "PreviewImage": {"images": "IMAGE"}, "CheckpointLoaderSimple": {}, "CLIPTextEncode": {"clip": "CLIP"},
               "EmptyLatentImage": {}, "VAEDecode": {"samples": "LATENT", "vae": "VAE"},
               "KSampler": {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING",
                            "latent_image": "LATENT"},
               "VAEEncodeForInpaint": {"pixels": "IMAGE", "vae": "VAE", "mask": "MASK"},
               "ImageCompositeMasked": {"destination": "IMAGE", "source": "IMAGE", "mask": "MASK"}}


def input_spec(class_type: str) -> dict:
    """Input name -> (type or combo list, options), required and optional, of one of our nodes."""
    spec = NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    return {**spec["required"], **spec.get("optional", {})}


def sockets(class_type: str) -> tuple[dict, tuple]:
    """(input name -> type or combo list, output types) of a node class."""
    if class_type in NODE_CLASS_MAPPINGS:
        return {k: v[0] for k, v in input_spec(class_type).items()}, NODE_CLASS_MAPPINGS[class_type].RETURN_TYPES
    return CORE_INPUTS[class_type], CORE_OUTPUTS[class_type]


def load_example(name: str) -> tuple[dict, dict]:
    api, ui = WORKFLOWS[name]
    return json.loads((EXAMPLES / api).read_text()), json.loads((EXAMPLES / ui).read_text())


@pytest.mark.parametrize("name", WORKFLOWS)
def test_api_workflow_is_valid_for_the_nodes(name):
    prompt, _ = load_example(name)
    assert {n["class_type"] for n in prompt.values()} >= {"NSFWDetectorLoader", "NSFWSafetyFilter"}
    for node_id, node in prompt.items():
        inputs, _ = sockets(node["class_type"])
        ours = node["class_type"] in NODE_CLASS_MAPPINGS
        if ours:
            assert set(NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()["required"]) <= set(node["inputs"])
            assert set(node["inputs"]) <= set(inputs), node_id
        for name_, value in node["inputs"].items():
            if isinstance(value, list):  # a link: [source node id, output index]
                source = prompt[value[0]]
                assert sockets(source["class_type"])[1][value[1]] == inputs[name_], (node_id, name_)
            elif ours and isinstance(inputs[name_], list):
                assert value in inputs[name_], (node_id, name_)
            elif ours and inputs[name_] == "BOOLEAN":
                assert isinstance(value, bool)
            elif ours:
                spec = input_spec(node["class_type"])[name_][1]
                assert spec["min"] <= value <= spec["max"]


def test_the_examples_put_the_filter_before_every_save():
    prompt, _ = load_example("filter")
    assert prompt["3"]["inputs"]["images"] == ["1", 0] and prompt["4"]["inputs"]["images"] == ["3", 0]
    prompt, _ = load_example("txt2img")
    kinds = {k: v["class_type"] for k, v in prompt.items()}
    (decode,) = [k for k, v in kinds.items() if v == "VAEDecode"]
    (guard,) = [k for k, v in kinds.items() if v == "NSFWSafetyFilter"]
    assert prompt[guard]["inputs"]["images"] == [decode, 0] and prompt[guard]["inputs"]["stop_on_flag"] is False
    saves = [v for v in prompt.values() if v["class_type"] == "SaveImage"]
    assert saves and all(save["inputs"]["images"] == [guard, 0] for save in saves)


def test_the_example_workflows_are_wired_as_described():
    plain = json.loads((EXAMPLES / "nsfw_safety_api.json").read_text())
    assert plain["3"]["inputs"]["images"] == ["1", 0] and plain["4"]["inputs"]["images"] == ["3", 0]
    inpaint = json.loads((EXAMPLES / "nsfw_safety_regions_inpaint_api.json").read_text())
    kinds = {k: n["class_type"] for k, n in inpaint.items()}
    region = next(k for k, c in kinds.items() if c == "NSFWRegionFilter")
    encode = next(n for n in inpaint.values() if n["class_type"] == "VAEEncodeForInpaint")
    paste = next(n for n in inpaint.values() if n["class_type"] == "ImageCompositeMasked")
    # the censored image and its region mask go to the inpaint; the repaint is pasted inside the mask only
    assert encode["inputs"]["pixels"] == [region, 0] and encode["inputs"]["mask"] == [region, 4]
    assert paste["inputs"]["destination"] == [region, 0] and paste["inputs"]["mask"] == [region, 4]
    # and the repainted image is checked again before it is saved
    save = next(n for n in inpaint.values() if n["class_type"] == "SaveImage")
    assert kinds[save["inputs"]["images"][0]] == "NSFWSafetyFilter"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_is_the_same_graph(name):
    prompt, ui = load_example(name)
    nodes_by_id = {n["id"]: n for n in ui["nodes"]}
    assert {str(i): n["type"] for i, n in nodes_by_id.items()} == {k: v["class_type"] for k, v in prompt.items()}
    assert ui["last_node_id"] == max(nodes_by_id) and ui["last_link_id"] == max(link[0] for link in ui["links"])
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        output, socket = nodes_by_id[src]["outputs"][src_slot], nodes_by_id[dst]["inputs"][dst_slot]
        assert link_id in output["links"] and socket["link"] == link_id
        assert output["type"] == socket["type"] == kind == sockets(nodes_by_id[src]["type"])[1][src_slot]
        assert prompt[str(dst)]["inputs"][socket["name"]] == [str(src), src_slot]  # the same link in the API form
    for node in ui["nodes"]:
        links = {i["name"] for i in node["inputs"]}
        assert links == {k for k, v in prompt[str(node["id"])]["inputs"].items() if isinstance(v, list)}
        if node["type"] in NODE_CLASS_MAPPINGS:
            cls = NODE_CLASS_MAPPINGS[node["type"]]
            assert [o["name"] for o in node["outputs"]] == list(cls.RETURN_NAMES)
            assert [o["type"] for o in node["outputs"]] == list(cls.RETURN_TYPES)
            spec = input_spec(node["type"])
            widgets = [k for k, v in spec.items() if isinstance(v[0], list) or v[0] in ("FLOAT", "INT", "BOOLEAN")]
            assert [i["name"] for i in node["inputs"]] == [k for k in spec if k not in widgets]
            assert node["widgets_values"] == [prompt[str(node["id"])]["inputs"][k] for k in widgets]


def test_requirements_and_registry_metadata():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in lines if line and not line.startswith("#")]
    assert not any("==" in r or "<" in r for r in requirements)  # never pin what other packs share
    names = {r.split(">")[0].strip().lower() for r in requirements}
    needed = {d.split(">")[0].strip().lower() for d in project["project"]["dependencies"]}
    assert needed - {"torch", "torchvision"} <= names and not names & {"torch", "torchvision"}
    # the same tested lower bounds (README, "Development") as the package's
    bounds = lambda reqs: {r.split(">=")[0].strip().lower(): r.split(">=")[1].strip() for r in reqs}  # noqa: E731
    core = bounds(project["project"]["dependencies"])
    assert bounds(requirements) == {k: v for k, v in core.items() if k not in {"torch", "torchvision"}}
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert "comfyui" not in project["project"]["name"].lower()
