"""A second opinion in every integration: the ComfyUI combiner node and its example workflows, and
the server's --second-opinion, on checkpoints whose outputs are forced (conftest.forced_dirs)."""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # comfyui_node is not an installed package
    sys.path.insert(0, str(ROOT))

from comfyui_node import NODE_CLASS_MAPPINGS, management, nodes  # noqa: E402
from nsfw_safety import SafetyFilter, load_detector  # noqa: E402
from nsfw_safety.cascade import RULES, Cascade, Ensemble, is_detector, second_opinion  # noqa: E402


def counted(detector) -> list[int]:
    calls: list[int] = []
    detector.model.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    return calls


# --- ComfyUI ------------------------------------------------------------------------------------

@pytest.fixture
def models_dir(tmp_path, monkeypatch, forced_dirs):
    root = tmp_path / "models" / "nsfw_detector"
    root.mkdir(parents=True)
    for name, path in forced_dirs.items():
        (root / name).symlink_to(path, target_is_directory=True)
    monkeypatch.setattr(management, "checkpoint_roots", lambda: [str(root)])
    return root


def loaded(name: str):
    return nodes.NSFWDetectorLoader().load(name, "auto")[0]


def test_combiner_node_schema_comes_from_the_core():
    cls = nodes.NSFWSecondOpinion
    required = cls.INPUT_TYPES()["required"]
    assert list(required) == ["first", "second", "combine", "level", "band_low", "band_high"]
    assert required["first"] == ("NSFW_DETECTOR", {"tooltip": "scores every image"})
    assert required["combine"][0] == list(RULES) and required["combine"][1]["default"] == "override"
    assert required["level"][1]["default"] == "medium"
    assert (required["band_low"][1]["default"], required["band_high"][1]["default"]) == (0.5, 1.0)
    assert cls.RETURN_TYPES == ("NSFW_DETECTOR",) and cls.FUNCTION == "combine"


@pytest.mark.parametrize("combine,band,flagged,reason,second_calls", [
    ("override", (0.5, 1.0), False, "vit20 medium 0.20 < 0.50 (second opinion on eva60 0.60)", [2]),
    ("max", (0.5, 1.0), True, "eva60 medium 0.60 >= 0.50 (max of eva60 0.60, vit20 0.20)", [2]),
    ("override", (0.0, 0.4), True, "eva60 medium 0.60 >= 0.50", []),  # outside the band: not run
    ("all", (0.0, 0.4), False, "vit20 medium 0.20 < 0.50 (all of eva60 0.60, vit20 0.20)", [2]),  # no band
])
def test_combiner_feeds_the_filter(models_dir, combine, band, flagged, reason, second_calls):
    first, second = loaded("eva60"), loaded("vit20")
    (detector,) = nodes.NSFWSecondOpinion().combine(first, second, combine, "medium", *band)
    assert is_detector(detector) and detector.members == (first, second)
    assert isinstance(detector, Ensemble if combine == "all" else Cascade)
    calls = counted(second)
    images = torch.rand(2, 40, 48, 3)
    out, nsfw, max_score, report, mask = nodes.NSFWSafetyFilter().filter(images, detector, "medium", 0.5, "black")
    assert nsfw is flagged and calls == second_calls
    assert bool(out.eq(0).all()) is flagged and mask.shape == (2, 40, 48)
    body = json.loads(report)
    assert body["model"] == detector.model_id
    assert [im["reason"] for im in body["images"]] == [reason] * 2
    parts = body["images"][0]["parts"]
    assert [p["model"] for p in parts] == ["eva60", "vit20"] and parts[1]["scored"] is bool(second_calls)
    assert max_score == pytest.approx(body["images"][0]["levels"]["medium"])


def test_combiner_refuses_what_is_not_a_detector(models_dir):
    with pytest.raises(TypeError, match="second must come from an NSFW Detector Loader"):
        nodes.NSFWSecondOpinion().combine(loaded("eva60"), "vit20", "override", "medium", 0.5, 1.0)


def test_comfy_loads_both_models_together(models_dir, monkeypatch):
    calls = []

    class Patcher:
        def __init__(self, model, load_device, offload_device):
            self.model, self.load_device = model, load_device

    def load_models_gpu(models, force_full_load=False):
        calls.append([p.model.net for p in models])

    monkeypatch.setattr(management, "mm", types.SimpleNamespace(
        get_torch_device=lambda: torch.device("cpu"), unet_offload_device=lambda: torch.device("cpu"),
        load_models_gpu=load_models_gpu))
    monkeypatch.setattr(management, "model_patcher", types.SimpleNamespace(ModelPatcher=Patcher))
    first, second = loaded("eva30"), loaded("vit90")
    (detector,) = nodes.NSFWSecondOpinion().combine(first, second, "override", "medium", 0.5, 1.0)
    nodes.NSFWSafetyFilter().filter(torch.rand(1, 32, 32, 3), detector, "medium", 0.5, "blur")
    nodes.NSFWSafetyFilter().filter(torch.rand(1, 32, 32, 3), first, "medium", 0.5, "blur")
    # one call for both (neither offloads the other), each model with its loader's own patcher
    assert calls == [[first.model, second.model], [first.model]]
    assert management._PATCHERS[first] is not management._PATCHERS[second]


EXAMPLES = ROOT / "examples" / "comfyui"
CORE = {"LoadImage": ({}, ("IMAGE", "MASK")), "SaveImage": ({"images": "IMAGE"}, ())}


def sockets(class_type: str) -> tuple[dict, tuple]:
    if class_type in NODE_CLASS_MAPPINGS:
        cls = NODE_CLASS_MAPPINGS[class_type]
        spec = cls.INPUT_TYPES()
        return {k: v[0] for k, v in {**spec["required"], **spec.get("optional", {})}.items()}, cls.RETURN_TYPES
    return CORE[class_type]


def test_second_opinion_example_workflows_are_valid_and_the_same_graph():
    prompt = json.loads((EXAMPLES / "nsfw_safety_second_opinion_api.json").read_text())
    ui = json.loads((EXAMPLES / "nsfw_safety_second_opinion_workflow.json").read_text())
    assert [n["class_type"] for n in prompt.values()].count("NSFWDetectorLoader") == 2
    for node_id, node in prompt.items():
        inputs, _ = sockets(node["class_type"])
        if node["class_type"] in NODE_CLASS_MAPPINGS:
            assert set(node["inputs"]) == set(inputs), node_id
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                assert sockets(prompt[value[0]]["class_type"])[1][value[1]] == inputs[name], (node_id, name)
            elif isinstance(inputs.get(name), list):
                assert value in inputs[name], (node_id, name)
    assert prompt["5"]["inputs"]["detector"] == ["4", 0]  # the filter gets the combined detector
    by_id = {n["id"]: n for n in ui["nodes"]}
    assert {str(i): n["type"] for i, n in by_id.items()} == {k: v["class_type"] for k, v in prompt.items()}
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        output, socket = by_id[src]["outputs"][src_slot], by_id[dst]["inputs"][dst_slot]
        assert link_id in output["links"] and socket["link"] == link_id
        assert output["type"] == socket["type"] == kind == sockets(by_id[src]["type"])[1][src_slot]
        assert prompt[str(dst)]["inputs"][socket["name"]] == [str(src), src_slot]
    for node in ui["nodes"]:
        if node["type"] in NODE_CLASS_MAPPINGS:
            spec = NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
            spec = {**spec["required"], **spec.get("optional", {})}
            widgets = [k for k, v in spec.items() if isinstance(v[0], list) or v[0] in ("FLOAT", "INT", "BOOLEAN")]
            assert node["widgets_values"] == [prompt[str(node["id"])]["inputs"][k] for k in widgets]


# --- the server -----------------------------------------------------------------------------------

def ready(client) -> None:
    """Wait until the app has loaded its models (in the lifespan, in a thread)."""
    deadline = time.monotonic() + 60
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/health").json()
        time.sleep(0.05)


def png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_server_answers_with_each_models_scores(forced_dirs):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from nsfw_safety.server import Settings, create_app

    first, second = load_detector(forced_dirs["eva60"], device="cpu"), load_detector(forced_dirs["vit20"], device="cpu")
    calls = counted(second)
    with TestClient(create_app(Settings(max_batch_size=8, max_wait_ms=50), detector=Cascade(first, second))) as c:
        body = c.post("/compute", files={"file": ("a.png", png(), "image/png")}).json()
        assert (body["category"], body["reason"]) == ("safe", "vit20 medium 0.20 < 0.50 (second opinion on eva60 0.60)")
        assert body["model"] == {"id": f"{first.model_id} -> {second.model_id}", "revision": None}
        assert [(p["model"], p["scored"]) for p in body["parts"]] == [("eva60", True), ("vit20", True)]
        assert body["parts"][0]["levels"]["medium"] == pytest.approx(0.60, abs=3e-3)
        assert body["parts"][1]["probs"] == pytest.approx({"sfw": 0.8, "nsfw": 0.2}, abs=1e-5)
        assert body["levels"]["medium"] == pytest.approx(0.2, abs=1e-5)
        # a stricter request policy applies to the combined scores
        assert c.post("/compute?threshold=0.1", files={"file": ("a.png", png(), "image/png")}).json()["flagged"]
        results = c.post("/compute/batch?censor=black", files=[("files", (f"{i}.png", png(i), "image/png"))
                                                                for i in range(3)]).json()["results"]
        assert [r["action"] for r in results] == ["none"] * 3 and all(len(r["parts"]) == 2 for r in results)
        assert sum(calls) == 5  # the second model saw each image once
        health = c.get("/health").json()
        assert health["model"]["id"] == f"{first.model_id} -> {second.model_id}"


def test_server_builds_the_second_opinion_from_its_settings(forced_dirs):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from nsfw_safety.server import Settings, add_arguments, create_app

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(forced_dirs["eva30"]), "--second-opinion", str(forced_dirs["vit90"]),
                              "--band", "0.2", "0.4", "--combine", "mean", "--device", "cpu"])
    settings = Settings.from_env({}, **{k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__})
    assert (settings.band, settings.combine) == ((0.2, 0.4), "mean")
    with TestClient(create_app(settings)) as c:
        ready(c)
        body = c.post("/compute", files={"file": ("a.png", png(), "image/png")}).json()
    assert (body["category"], body["reason"]) == ("nsfw", "mean medium 0.60 >= 0.50 (eva30 0.30, vit90 0.90)")
    assert [p["scored"] for p in body["parts"]] == [True, True]
    # from the environment; the default band is --threshold to 1: eva30 (0.30) is not re-checked
    env = {"NSFW_SAFETY_MODEL": str(forced_dirs["eva30"]), "NSFW_SAFETY_SECOND_OPINION": str(forced_dirs["vit90"]),
           "NSFW_SAFETY_DEVICE": "cpu"}
    with TestClient(create_app(Settings.from_env(env))) as c:
        ready(c)
        body = c.post("/compute", files={"file": ("a.png", png(), "image/png")}).json()
    assert body["reason"] == "eva30 medium 0.30 < 0.50" and [p["scored"] for p in body["parts"]] == [True, False]
    assert Settings.from_env({"NSFW_SAFETY_SECOND_OPINION": "vit", "NSFW_SAFETY_BAND": "0.3,0.7",
                              "NSFW_SAFETY_COMBINE": "max"}).band == (0.3, 0.7)


@pytest.mark.parametrize("bad,words", [
    (dict(band=(0.3, 0.7)), "need a second_opinion"),
    (dict(combine="max"), "need a second_opinion"),
    (dict(second_opinion="vit", combine="median"), "combine must be one of"),
    (dict(second_opinion="vit", band=(0.7, 0.3)), "LO <= HI"),
    (dict(second_opinion="vit", band=(0.2, 1.5)), "band"),
    (dict(second_opinion="vit", band=(0.2, 0.5), combine="any"), "takes no band"),
])
def test_server_refuses_bad_second_opinion_settings(bad, words):
    pytest.importorskip("fastapi")
    from nsfw_safety.server import Settings

    with pytest.raises(ValueError, match=words):
        Settings(**bad)


# --- the one-liner, as the CLI will call it -------------------------------------------------------

def test_second_opinion_by_names_feeds_a_filter(forced_dirs):
    guard = SafetyFilter(second_opinion(str(forced_dirs["eva60"]), str(forced_dirs["vit90"]), device="cpu"))
    out = guard(torch.rand(2, 3, 32, 32))
    assert out.flagged == [True, True]
    assert out.reasons == ["vit90 medium 0.90 >= 0.50 (second opinion on eva60 0.60)"] * 2
