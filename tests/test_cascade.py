"""Cascades and ensembles (nsfw_safety.cascade): every rule and the band on tiny checkpoints whose
outputs are forced, so each decision is known in advance; the second model's calls counted;
fail-closed; devices; and the CUDA path emulated (one host read before the policy's)."""

from __future__ import annotations

import math

import pytest
import torch

from nsfw_safety import LEVELS, SafetyFilter, load_detector
from nsfw_safety.cascade import Cascade, Ensemble, MemberError, is_detector, members_of, model_name, second_opinion
from nsfw_safety.levels import NOT_SCORED, Policy, Scores


@pytest.fixture
def forced(forced_dirs):
    """name -> checkpoint whose every output is forced (see conftest.forced_dirs)."""
    return forced_dirs


def det(forced, name):
    return load_detector(forced[name], device="cpu")


def counted(detector) -> list[int]:
    """The batch size of each forward pass of ``detector``'s model, as they happen."""
    calls: list[int] = []
    detector.model.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    return calls


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 40, 48, generator=torch.Generator().manual_seed(seed))


# --- every rule, decision known in advance ------------------------------------------------------

CASCADE_CASES = [  # first, second, band, combine, flagged, reason, second model runs
    ("eva60", "vit20", (0.5, 1.0), "override", False, "vit20 medium 0.20 < 0.50 (second opinion on eva60 0.60)", True),
    ("eva60", "vit20", (0.5, 1.0), "mean", False, "mean medium 0.40 < 0.50 (eva60 0.60, vit20 0.20)", True),
    ("eva60", "vit20", (0.5, 1.0), "max", True, "eva60 medium 0.60 >= 0.50 (max of eva60 0.60, vit20 0.20)", True),
    ("eva60", "vit90", (0.5, 1.0), "override", True, "vit90 medium 0.90 >= 0.50 (second opinion on eva60 0.60)", True),
    ("eva60", "vit90", (0.5, 1.0), "mean", True, "mean medium 0.75 >= 0.50 (eva60 0.60, vit90 0.90)", True),
    ("eva60", "vit90", (0.5, 1.0), "max", True, "vit90 medium 0.90 >= 0.50 (max of eva60 0.60, vit90 0.90)", True),
    ("eva30", "vit90", (0.2, 0.4), "override", True, "vit90 medium 0.90 >= 0.50 (second opinion on eva30 0.30)", True),
    ("eva30", "vit90", (0.2, 0.4), "mean", True, "mean medium 0.60 >= 0.50 (eva30 0.30, vit90 0.90)", True),
    ("eva30", "vit20", (0.2, 0.4), "max", False, "eva30 medium 0.30 < 0.50 (max of eva30 0.30, vit20 0.20)", True),
    # outside the band: the first decides alone, and the second model never runs
    ("eva30", "vit90", (0.5, 1.0), "override", False, "eva30 medium 0.30 < 0.50", False),
    ("eva30", "vit90", (0.5, 1.0), "max", False, "eva30 medium 0.30 < 0.50", False),
    ("eva60", "vit20", (0.2, 0.4), "override", True, "eva60 medium 0.60 >= 0.50", False),
    ("eva60", "vit20", (0.2, 0.4), "mean", True, "eva60 medium 0.60 >= 0.50", False),
]


@pytest.mark.parametrize("first,second,band,combine,flagged,reason,runs", CASCADE_CASES)
def test_cascade_rules(forced, first, second, band, combine, flagged, reason, runs):
    a, b = det(forced, first), det(forced, second)
    calls = counted(b)
    out = SafetyFilter(Cascade(a, b, band=band, combine=combine), action="black")(images(3))
    assert out.flagged == [flagged] * 3
    assert out.reasons == [reason] * 3
    assert calls == ([3] if runs else [])
    assert out.actions == (["black"] * 3 if flagged else ["none"] * 3)


ENSEMBLE_CASES = [  # members, combine, flagged, reason
    (("eva60", "vit20"), "any", True, "eva60 medium 0.60 >= 0.50 (any of eva60 0.60, vit20 0.20)"),
    (("eva60", "vit20"), "all", False, "vit20 medium 0.20 < 0.50 (all of eva60 0.60, vit20 0.20)"),
    (("eva60", "vit20"), "mean", False, "mean medium 0.40 < 0.50 (eva60 0.60, vit20 0.20)"),
    (("eva30", "vit90"), "any", True, "vit90 medium 0.90 >= 0.50 (any of eva30 0.30, vit90 0.90)"),
    (("eva30", "vit90"), "all", False, "eva30 medium 0.30 < 0.50 (all of eva30 0.30, vit90 0.90)"),
    (("eva30", "vit90"), "mean", True, "mean medium 0.60 >= 0.50 (eva30 0.30, vit90 0.90)"),
    (("eva60", "vit90"), "all", True, "eva60 medium 0.60 >= 0.50 (all of eva60 0.60, vit90 0.90)"),
    (("vit20", "vit50", "vit90"), "mean", True, "mean medium 0.53 >= 0.50 (vit20 0.20, vit50 0.50, vit90 0.90)"),
]


@pytest.mark.parametrize("members,combine,flagged,reason", ENSEMBLE_CASES)
def test_ensemble_rules(forced, members, combine, flagged, reason):
    dets = [det(forced, m) for m in members]
    calls = [counted(d) for d in dets]
    out = SafetyFilter(Ensemble(dets, combine))(images(2))
    assert out.flagged == [flagged] * 2 and out.reasons == [reason] * 2
    assert calls == [[2]] * len(dets)  # every member on every image, once


def test_mixed_models_combine_level_by_level(forced):
    """A 4-level EVA and a 2-class ViT (low = medium = high = p_nsfw) meet in the level columns."""
    eva, vit = det(forced, "eva60"), det(forced, "vit50")
    expected = {  # neutral, low, medium, high; and the member kept per level
        "any": ([0.30, 0.70, 0.60, 0.50], [0, 0, 0, 1]),
        "all": ([0.50, 0.50, 0.50, 0.45], [1, 1, 1, 0]),
        "mean": ([0.40, 0.60, 0.55, 0.475], [0, 0, 0, 1]),
    }
    for rule, (levels, source) in expected.items():
        s = Ensemble([eva, vit], rule).predict(images(2))
        assert s.labels == LEVELS  # different label sets: the combined distribution is over the levels
        assert torch.allclose(s.levels, torch.tensor([levels] * 2), atol=2e-3), rule
        assert s.parts.source.tolist() == [source] * 2
        assert torch.allclose(s.probs.sum(1), torch.ones(2), atol=1e-5) and bool((s.probs >= 0).all())
        assert torch.allclose(s.probs @ torch.tensor([[1., 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]]),
                              s.levels, atol=1e-5)  # the cumulative reading holds
    # the same labels: the combined probabilities keep them
    same = Ensemble([det(forced, "vit20"), det(forced, "vit90")], "mean").predict(images(1))
    assert same.labels == ("sfw", "nsfw") and torch.allclose(same.probs, torch.tensor([[0.45, 0.55]]), atol=1e-5)


def test_per_level_thresholds_name_the_member_of_that_level(forced):
    ens = Ensemble([det(forced, "eva60"), det(forced, "vit50")], "any")
    verdict = Policy(thresholds={"low": 0.9, "high": 0.4}).decide(ens.predict(images(1)))
    assert verdict.flagged == [True]
    assert verdict.reasons == ["vit50 high 0.50 >= 0.40 (any of eva60 0.45, vit50 0.50)"]
    passed = Policy(thresholds={"low": 0.9, "high": 0.6}).decide(ens.predict(images(1)))
    assert passed.reasons == ["eva60 low 0.70 < 0.90 (any of eva60 0.70, vit50 0.50), "
                              "vit50 high 0.50 < 0.60 (any of eva60 0.45, vit50 0.50)"]


def test_transparent_image_keeps_its_composite_in_the_reason(forced):
    rgba = torch.rand(1, 4, 32, 32)
    out = SafetyFilter(Cascade(det(forced, "eva60"), det(forced, "vit90")))(rgba)
    assert out.reasons == ["vit90 medium 0.90 >= 0.50 (over white) (second opinion on eva60 0.60)"]


# --- the band: the second model sees exactly the images in it ----------------------------------

def test_band_selects_exactly_the_uncertain_images(eva_dir, forced):
    first, second = load_detector(eva_dir, device="cpu"), det(forced, "vit90")
    x = images(12, seed=3)
    alone = first.predict(x).levels
    medium = alone[:, 2]
    ranked = medium.sort().values
    lo, hi = float(ranked[2:4].mean()), float(ranked[6:8].mean())  # between scores: exactly 4 images inside
    inside = ((medium >= lo) & (medium <= hi)).nonzero()[:, 0].tolist()
    assert len(inside) == 4
    seen: list[torch.Tensor] = []
    second.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    scores = Cascade(first, second, band=(lo, hi), combine="override").predict(x)
    assert [len(t) for t in seen] == [4]  # one batch of the 4 images in the band, no more
    # ... and they are those images: the second model's input equals its preprocessing of them
    from nsfw_safety.preprocess import preprocess
    assert torch.allclose(seen[0], preprocess(x[inside], second.preprocess_config, torch.float32))
    first_part, second_part = scores.parts.scores
    assert (second_part.status != NOT_SCORED).nonzero()[:, 0].tolist() == inside
    assert torch.equal(first_part.levels, alone)
    outside = [i for i in range(12) if i not in inside]
    assert torch.equal(scores.levels[outside], alone[outside])  # the first's where the second did not run
    assert torch.allclose(scores.levels[inside], torch.tensor([[0.1, 0.9, 0.9, 0.9]]).expand(4, 4), atol=1e-5)
    assert scores.parts.source[:, 2].tolist() == [int(i in inside) for i in range(12)]


def test_flagged_mode_rechecks_every_hit_only(eva_dir, forced):
    """band=(t, 1): the second model sees the images the first flags at level >= t, no others."""
    first, second = load_detector(eva_dir, device="cpu"), det(forced, "vit20")
    calls = counted(second)
    x = images(12, seed=3)
    hits = Policy("medium", 0.5).decide(first.predict(x)).flagged
    assert 0 < sum(hits) < 12
    out = SafetyFilter(second_opinion(first, second))(x)  # the default: re-check what the first flags
    assert calls == [sum(hits)]
    assert out.flagged == [False] * 12  # vit20 clears every hit; the rest were never flagged
    assert [r.startswith("vit20 ") for r in out.reasons] == hits


def test_a_list_of_sizes_and_an_empty_band(eva_dir, forced):
    first, second = load_detector(eva_dir, device="cpu"), det(forced, "vit90")
    calls = counted(second)
    x = [torch.rand(3, 40, 30), torch.rand(3, 24, 64), torch.rand(3, 33, 33)]
    scores = Cascade(first, second, band=(0.0, 1.0)).predict(x)
    assert calls == [3] and torch.allclose(scores.levels[:, 1:], torch.full((3, 3), 0.9), atol=1e-5)
    calls.clear()
    s = Cascade(first, second, band=(1.0, 1.0)).predict(x)  # nothing scores exactly 1: nothing in the band
    assert calls == [] and torch.equal(s.levels, first.predict(x).levels)
    assert s.to_dicts()[0]["parts"][1] == {"model": "vit90", "scored": False, "levels": None, "probs": None,
                                           "problem": None}


# --- fail closed -------------------------------------------------------------------------------

def nan_output(detector, rows=None):
    """Make ``detector``'s model return NaN logits (for every row, or ``rows``)."""
    def hook(module, args, output):
        output = output.clone()
        output[rows if rows is not None else slice(None)] = torch.nan
        return output
    detector.model.register_forward_hook(hook)
    return detector


def test_invalid_first_score_never_reaches_the_second(forced):
    first, second = nan_output(det(forced, "eva60"), rows=[1]), det(forced, "vit20")
    calls = counted(second)
    x = images(3)
    x[2, 0, 0, 0] = torch.nan
    # the band holds everything and the second says "safe": the invalid images stay blocked
    out = SafetyFilter(Cascade(first, second, band=(0.0, 1.0), combine="override"), action="blur")(x)
    assert calls == [1]  # image 0 only
    assert out.flagged == [False, True, True]
    assert out.reasons == ["vit20 medium 0.20 < 0.50 (second opinion on eva60 0.60)",
                           "non-finite model output (eva60)", "non-finite input"]
    assert out.actions == ["none", "black", "black"]
    assert out.scores.status.tolist() == [0, 2, 1]


@pytest.mark.parametrize("combine", ["override", "mean", "max"])
def test_invalid_second_score_blocks_the_image(forced, combine):
    first, second = det(forced, "eva30"), nan_output(det(forced, "vit20"), rows=[0])
    out = SafetyFilter(Cascade(first, second, band=(0.0, 1.0), combine=combine))(images(2))
    assert out.flagged == [True, False]
    assert out.reasons[0] == "non-finite model output (vit20)"
    assert out.actions[0] == "black"


@pytest.mark.parametrize("combine", ["any", "all", "mean"])
def test_ensemble_member_that_fails_blocks_whatever_the_rule(forced, combine):
    ens = Ensemble([det(forced, "eva30"), nan_output(det(forced, "vit20"))], combine)
    out = SafetyFilter(ens)(images(2))
    assert out.flagged == [True, True] and out.reasons == ["non-finite model output (vit20)"] * 2


def test_a_member_that_raises_is_named_and_the_batch_blocked(forced):
    first, second = det(forced, "eva60"), det(forced, "vit20")

    def boom(module, args):
        raise RuntimeError("out of luck")

    second.model.register_forward_pre_hook(boom)
    cascade = Cascade(first, second)
    out = SafetyFilter(cascade, action="blur")(images(2))
    assert out.flagged == [True, True] and out.actions == ["black", "black"] and out.scores is None
    assert out.reasons == ["error: MemberError: vit20 failed on 2 image(s): RuntimeError: out of luck"] * 2
    with pytest.raises(MemberError, match="vit20 failed"):
        SafetyFilter(cascade, on_error="raise")(images(2))
    # outside the band the second model is not called, so it cannot fail
    assert SafetyFilter(Cascade(first, second, band=(0.9, 1.0)))(images(2)).flagged == [True, True]
    assert SafetyFilter(Cascade(first, second, band=(0.9, 1.0)))(images(2)).reasons[0] == "eva60 medium 0.60 >= 0.50"


# --- one detector to its callers ----------------------------------------------------------------

def test_one_detector_to_its_callers(forced):
    first, second = det(forced, "eva60"), det(forced, "vit90")
    c = Cascade(first, second)
    assert is_detector(c) and is_detector(first) and not is_detector("eva")
    assert c.device == torch.device("cpu") and c.dtype == torch.float32
    assert c.model_id == f"{first.model_id} -> {second.model_id}" and c.name == "eva60 -> vit90"
    assert c.labels == LEVELS and c.revision is None
    assert set(c.model.parameters()) == set(first.model.parameters()) | set(second.model.parameters())
    assert c.is_nsfw(images(2)) == [True, True]
    third = det(forced, "vit20")
    assert members_of(Ensemble([c, third])) == (first, second, third) and members_of(first) == (first,)
    assert "band=(0.5, 1.0) at medium" in repr(c)


def test_to_moves_every_member_and_they_score_on_one_device(forced):
    first, second = det(forced, "eva60"), det(forced, "vit90")
    c = Cascade(first, second)
    c.to(dtype="bf16")
    assert first.dtype == second.dtype == c.dtype == torch.bfloat16
    c.to("meta")
    assert first.device.type == second.device.type == c.device.type == "meta"
    c = Cascade(det(forced, "eva60"), det(forced, "vit90"), band=(0.0, 1.0))
    c.second.to("meta")  # apart when they score: refused, naming them, and the filter blocks
    with pytest.raises(MemberError, match="vit90 is on meta and eva60 on cpu"):
        c.predict(images(1))
    out = SafetyFilter(c)(images(1))
    assert out.flagged == [True] and "all members must be on one device" in out.reasons[0]


def test_names_and_bad_settings(forced, tmp_path):
    a, b = det(forced, "vit20"), det(forced, "vit20")
    assert Ensemble([a, b]).names == ("vit20", "vit20#2")
    assert Ensemble([a, b], names=("left", "right")).names == ("left", "right")
    assert model_name("eva") == model_name("Freepik/nsfw_image_detector") == "eva"
    assert model_name("/some/dir/my-model") == "my-model"
    for bad in [dict(band=(0.7, 0.3)), dict(band=(0.2, 1.5)), dict(band=0.5), dict(level="neutral"),
                dict(combine="any")]:
        with pytest.raises((ValueError, TypeError)):
            Cascade(a, b, **bad)
    with pytest.raises(ValueError, match="at least two"):
        Ensemble([a])
    with pytest.raises(ValueError):
        Ensemble([a, b], "override")
    with pytest.raises(ValueError, match="no band"):
        second_opinion(a, b, combine="any", band=(0.2, 0.8))


def test_second_opinion_is_one_call(forced):
    c = second_opinion(str(forced["eva60"]), str(forced["vit20"]), band=(0.3, 0.7), combine="mean", device="cpu")
    assert isinstance(c, Cascade) and c.band == (0.3, 0.7) and c.rule == "mean" and c.names == ("eva60", "vit20")
    flagged = second_opinion(det(forced, "eva60"), str(forced["vit20"]), threshold=0.65)
    assert flagged.band == (0.65, 1.0) and flagged.second.device == flagged.first.device
    ens = second_opinion(det(forced, "eva60"), det(forced, "vit20"), combine="all")
    assert isinstance(ens, Ensemble) and ens.rule == "all"


def test_scores_keep_each_models_part(forced):
    s = Cascade(det(forced, "eva30"), det(forced, "vit90"), band=(0.2, 0.4)).predict(images(3))
    rows = s.to_dicts()
    assert [p["model"] for p in rows[0]["parts"]] == ["eva30", "vit90"]
    assert rows[0]["parts"][1]["probs"] == pytest.approx({"sfw": 0.1, "nsfw": 0.9}, abs=1e-5)
    assert rows[0]["parts"][0]["levels"]["medium"] == pytest.approx(0.30, abs=3e-3)
    assert rows[0]["levels"]["medium"] == pytest.approx(0.9, abs=1e-5)
    sub = s[[0, 2]]
    assert len(sub) == 2 and len(sub.parts.scores[1]) == 2 and sub.parts.source.shape == (2, 4)
    both = Scores.cat([s[[0]], s[[1, 2]]])
    assert torch.equal(both.parts.source, s.parts.source) and torch.equal(both.levels, s.levels)
    assert Policy().decide(s.to("cpu")).reasons == Policy().decide(s).reasons


# --- the CUDA path, emulated: one host read before the policy's --------------------------------

def test_emulated_cuda_one_read_before_the_policy(eva_dir, vit_dir):
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
    from torch.utils._python_dispatch import TorchDispatchMode

    from nsfw_safety import device_cache
    from nsfw_safety.detector import Detector
    from nsfw_safety.models import load_model

    reads = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)

    class Traffic(TorchDispatchMode):
        """Records host reads ("read", answered True) and copies to the host (("d2h", numel))."""

        def __init__(self):
            super().__init__()
            self.events: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in reads:
                self.events.append("read")
                return True
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.device.type == "cpu" and any(
                    isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args):
                self.events.append(("d2h", out.numel()))
            return out

    cached = set(device_cache._CACHE)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            traffic = Traffic()
            members = []
            for path, name in ((eva_dir, "first"), (vit_dir, "second")):
                with unset_fake_temporarily():  # timm's init reads data: load on the real CPU
                    d = Detector(load_model(path, name, None, None)).to(dtype="bf16")
                d.to("cuda")
                # a real CPU constant cannot be copied to the fake device inside inference_mode: copy it now
                d._on(d.device)
                d.model.register_forward_hook(lambda *_, n=name: traffic.events.append(n))
                members.append(d)
            cascade = Cascade(*members, band=(0.0, 1.0))
            cascade._on(cascade.device)
            ensemble = Ensemble(members, "mean")
            x = torch.empty(4, 3, 256, 256, device="cuda", dtype=torch.float16)
            with traffic:  # warm-up, as on a GPU
                cascade.predict(x[:1], value_range=(-1, 1))
            traffic.events.clear()
            with traffic:
                out = SafetyFilter(cascade, on_error="raise")(x, value_range=(-1, 1))
            events = traffic.events
            # the first model, then the band (B bools read once), then the second model on it,
            # and after both, only the policy's one copy
            assert events[0] == "first" and events[1] == ("d2h", 4)
            second = events.index("second")
            assert events[2:second] == ["read"] * 4
            copies = [e for e in events[second:] if isinstance(e, tuple)]
            assert len(copies) == 1 and "first" not in events[second:]
            assert out.images.device.type == "cuda" and out.images.shape == x.shape
            traffic.events.clear()
            with traffic:
                scores = ensemble.predict(x, value_range=(-1, 1))
            assert traffic.events == ["first", "second"]  # an ensemble reads nothing
            assert scores.levels.device.type == "cuda" and scores.parts.source.shape == (4, 4)
    finally:
        for key in set(device_cache._CACHE) - cached:  # fake constants must not outlive the mode
            del device_cache._CACHE[key]


# --- a real GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cascade_syncs_once_and_matches_the_cpu(eva_dir, forced):
    import warnings

    first, second = load_detector(eva_dir, device="cuda"), det(forced, "vit90").to("cuda")
    cascade = Cascade(first, second, band=(0.3, 0.9))
    x = torch.rand(8, 3, 128, 128, device="cuda")
    cascade.predict(x)  # warm-up: per-device constants
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scores = cascade.predict(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    cpu = Cascade(load_detector(eva_dir, device="cpu", dtype="bf16"), det(forced, "vit90"), band=(0.3, 0.9))
    ref = cpu.predict(x.cpu())
    same = (scores.parts.scores[1].status.cpu() == ref.parts.scores[1].status)
    assert bool(same.float().mean() >= 0.75)  # bf16 may move a score across a band edge
    torch.cuda.set_sync_debug_mode("error")
    try:
        Ensemble([first, second], "any").predict(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not math.isnan(float(scores.levels.sum()))


# --- the benchmark, smoke mode -----------------------------------------------------------------

def test_cascade_benchmark_smoke(tmp_path):
    """Not timed: the band holds exactly its width of the synthetic grid, and every row is written."""
    from benchmarks.cascade import main

    result = main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cascade-cpu-smoke.json", "cascade-cpu-smoke.md"]
    rows = result["rows"]
    assert len(rows) == 8 and all(r["latency_ms"] > 0 and r["batch"] == 20 for r in rows)
    seen = {(r["config"], r["second_images"]) for r in rows}
    assert seen == {("first model alone", 0), ("both models on every image", 20),
                    ("cascade, band width 0.2", 4), ("cascade, band width 0.5", 10)}
    assert all(r["vs_both"] == 1.0 for r in rows if r["config"] == "both models on every image")
