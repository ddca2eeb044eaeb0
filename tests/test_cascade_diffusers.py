"""A second opinion in diffusers: NSFWSafetyChecker.from_pretrained(second_opinion=...) saves and
reloads both models; attach takes one; a real tiny SD pipeline runs it (forced checkpoints)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import StableDiffusionPipeline  # noqa: E402
from test_diffusers import SIZE, run, sd_parts, sd_pipe  # noqa: E402

from nsfw_safety import load_detector  # noqa: E402
from nsfw_safety.cascade import Cascade, Ensemble  # noqa: E402
from nsfw_safety.diffusers import NSFWSafetyChecker, attach  # noqa: E402


def counted(detector) -> list[int]:
    calls: list[int] = []
    detector.model.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    return calls


def test_checker_saves_and_reloads_both_models(forced_dirs, tmp_path):
    eva, vit = forced_dirs["eva60"], forced_dirs["vit20"]
    checker = NSFWSafetyChecker.from_pretrained(str(eva), second_opinion=str(vit), band=(0.5, 1.0),
                                                combine="override", action="black", device="cpu")
    cascade = checker.guard.detector
    assert isinstance(cascade, Cascade) and cascade.band == (0.5, 1.0) and cascade.names == ("eva60", "vit20")
    # both models are the checker's submodules: a pipeline's .to() and offload move them together
    params = set(checker.parameters())
    assert set(cascade.first.model.parameters()) <= params and set(cascade.second.model.parameters()) <= params
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    images, flags = checker(images=x)
    assert flags == [False, False] and torch.equal(images, x)  # vit20 clears eva60's hits
    assert checker.last_result.reasons == ["vit20 medium 0.20 < 0.50 (second opinion on eva60 0.60)"] * 2

    pipe = sd_pipe(sd_parts())
    attach(pipe, checker)
    pipe.save_pretrained(tmp_path)
    saved = tmp_path / "safety_checker"
    for folder, source in (("detector", eva), ("second_opinion", vit)):  # each checkpoint copied verbatim
        assert (saved / folder / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
        assert (saved / folder / "config.json").read_bytes() == (source / "config.json").read_bytes()
    assert (saved / "second_opinion" / "preprocessor_config.json").is_file()
    config = json.loads((saved / "config.json").read_text())
    assert config["model"] == str(eva)
    assert config["second_opinion"] == {"model": str(vit), "revision": None, "combine": "override",
                                        "band": [0.5, 1.0], "level": "medium", "names": ["eva60", "vit20"]}

    loaded = StableDiffusionPipeline.from_pretrained(tmp_path).safety_checker
    again = loaded.guard.detector
    assert isinstance(again, Cascade) and (again.band, again.rule, again.names) == ((0.5, 1.0), "override",
                                                                                    ("eva60", "vit20"))
    assert again.first.path == saved / "detector" and again.second.path == saved / "second_opinion"
    result = loaded.check(x, value_range=(-1, 1))
    assert result.reasons == checker.last_result.reasons
    assert torch.equal(result.scores.levels, checker.last_result.scores.levels)
    # a saved second opinion takes new settings on reload, and saves again in place, keeping its origin
    loaded.save_pretrained(saved)
    assert json.loads((saved / "config.json").read_text())["second_opinion"] == config["second_opinion"]
    maxed = NSFWSafetyChecker.from_pretrained(saved, combine="max", device="cpu")
    assert maxed.check(x, value_range=(-1, 1)).reasons == [
        "eva60 medium 0.60 >= 0.50 (max of eva60 0.60, vit20 0.20)"] * 2
    swapped = NSFWSafetyChecker.from_pretrained(saved, second_opinion=str(forced_dirs["vit90"]), device="cpu")
    assert swapped.guard.detector.names == ("eva60", "vit90") and swapped.guard.detector.rule == "override"


def test_an_ensemble_saves_too_and_a_lone_band_is_refused(forced_dirs, tmp_path):
    checker = NSFWSafetyChecker.from_pretrained(str(forced_dirs["eva30"]), second_opinion=str(forced_dirs["vit90"]),
                                                combine="any", device="cpu")
    assert isinstance(checker.guard.detector, Ensemble)
    checker.save_pretrained(tmp_path)
    again = NSFWSafetyChecker.from_pretrained(tmp_path, device="cpu")
    assert isinstance(again.guard.detector, Ensemble) and again.guard.detector.rule == "any"
    assert again(images=torch.zeros(1, 3, 16, 16))[1] == [True]
    with pytest.raises(ValueError, match="need a second_opinion"):
        NSFWSafetyChecker.from_pretrained(str(forced_dirs["eva30"]), band=(0.2, 0.4), device="cpu")
    three = Ensemble([load_detector(forced_dirs[n], device="cpu") for n in ("eva30", "vit20", "vit90")])
    big = attach(sd_pipe(sd_parts()), three)  # usable; only saving needs the pair
    with pytest.raises(TypeError, match="two detectors"):
        big.save_pretrained(tmp_path / "big")


def test_attach_takes_a_second_opinion(forced_dirs):
    pipe = sd_pipe(sd_parts())
    checker = attach(pipe, model=str(forced_dirs["eva30"]), second_opinion=str(forced_dirs["vit90"]),
                     band=(0.2, 0.4), action="black", device="cpu")
    calls = counted(checker.guard.detector.second)
    out = run(pipe)
    assert out.nsfw_content_detected == [True, True] and not out.images.any()
    assert calls == [2]
    assert checker.last_result.reasons == ["vit90 medium 0.90 >= 0.50 (second opinion on eva30 0.30)"] * 2
    # a loaded detector and the second opinion's settings, as keywords
    first = load_detector(forced_dirs["eva30"], device="cpu")
    other = attach(sd_pipe(sd_parts()), first, second_opinion=load_detector(forced_dirs["vit90"], device="cpu"),
                   combine="max", threshold=0.25)
    assert other.guard.detector.band == (0.25, 1.0) and other.guard.detector.rule == "max"
    assert other.check(torch.rand(1, 3, 16, 16)).flagged == [True]
