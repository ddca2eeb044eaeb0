"""Loading (registry, directory, hub cache, offline errors), scores semantics, batching, fail-closed."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from nsfw_safety import LEVELS, REGISTRY, ModelLoadError, load_detector
from nsfw_safety import detector
from nsfw_safety.detector import _CACHE, NATIVE_BF16_FLAGS, cpu_bf16_native, resolve_dtype
from nsfw_safety.detector import _cpu_capabilities as real_cpu_capabilities  # before conftest pins it
from nsfw_safety.levels import level_matrix


def test_registry_has_the_documented_models():
    assert {"eva", "vit-sd", "vit", "falconsai"} <= set(REGISTRY)
    assert REGISTRY["eva"].hub_id == "Freepik/nsfw_image_detector"
    assert REGISTRY["vit-sd"].gated and "non-commercial" in REGISTRY["vit-sd"].license
    assert REGISTRY["eva"].preprocess.size == (448, 448) and REGISTRY["eva"].preprocess.mode == "squash"


def test_load_from_directory_reads_the_checkpoint_config(eva_dir, vit_dir):
    det = load_detector(str(eva_dir))
    assert det.labels == ("neutral", "low", "medium", "high")
    cfg = det.preprocess_config
    assert (cfg.size, cfg.mode, cfg.interpolation) == ((56, 56), "squash", "bicubic")
    assert cfg.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert det.device.type == "cpu" and det.dtype == torch.float32
    vit = load_detector(vit_dir)  # a PathLike works too
    assert vit.labels == ("sfw", "nsfw")
    assert (vit.preprocess_config.size, vit.preprocess_config.interpolation) == ((32, 32), "bilinear")


def test_detectors_are_cached_by_model_device_dtype(eva_dir):
    a = load_detector(str(eva_dir))
    assert load_detector(str(eva_dir)) is a
    b = load_detector(str(eva_dir), dtype="bf16")
    assert b is not a and b.dtype == torch.bfloat16


def test_a_cached_detector_recast_by_a_host_is_not_handed_out_again(eva_dir):
    a = load_detector(str(eva_dir))
    a.to(dtype=torch.float16)  # as a pipeline's pipe.to(torch.float16) could
    b = load_detector(str(eva_dir))
    assert b is not a and b.dtype == torch.float32 and a.dtype == torch.float16
    assert load_detector(str(eva_dir)) is b


def test_scores_semantics_four_levels(eva_dir):
    det = load_detector(str(eva_dir))
    scores = det.predict(torch.rand(6, 3, 40, 50))
    p, lv = scores.probs, scores.levels
    assert p.shape == (6, 4) and lv.shape == (6, 4)
    torch.testing.assert_close(p.sum(1), torch.ones(6))
    torch.testing.assert_close(lv[:, 0], p[:, 0])
    torch.testing.assert_close(lv[:, 1], p[:, 1] + p[:, 2] + p[:, 3])
    torch.testing.assert_close(lv[:, 2], p[:, 2] + p[:, 3])
    torch.testing.assert_close(lv[:, 3], p[:, 3])
    d = scores.to_dicts()
    assert len(d) == 6 and set(d[0]["levels"]) == set(LEVELS) and d[0]["problem"] is None
    assert json.dumps(d)  # JSON-friendly


def test_scores_semantics_two_classes(vit_dir):
    det = load_detector(str(vit_dir))
    scores = det.predict(torch.rand(4, 3, 32, 32))
    p, lv = scores.probs, scores.levels
    torch.testing.assert_close(lv[:, 0], p[:, 0])
    for col in (1, 2, 3):
        torch.testing.assert_close(lv[:, col], p[:, 1])
    assert set(scores.to_dicts()[0]["probs"]) == {"sfw", "nsfw"}


def test_label_orders_and_unknown_labels():
    m = level_matrix(("NSFW", "normal"))
    assert m[:, 0].tolist() == [0, 1] and m[:, 3].tolist() == [1, 0]
    with pytest.raises(ValueError, match="cannot map"):
        level_matrix(("cat", "dog"))


def test_is_nsfw_matches_the_threshold_rule(eva_dir):
    det = load_detector(str(eva_dir))
    x = torch.rand(8, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    med = det.predict(x).levels[:, 2]
    t = float(med.median())
    assert det.is_nsfw(x, level="medium", threshold=t) == (med >= t).tolist()
    assert 0 < sum(det.is_nsfw(x, level="medium", threshold=t)) < 8  # a mixed batch
    for bad in [dict(level="neutral"), dict(level="severe"), dict(threshold=1.5), dict(threshold=-0.1)]:
        with pytest.raises(ValueError):
            det.is_nsfw(x, **bad)


def test_chunking_gives_the_same_scores(eva_dir):
    det = load_detector(str(eva_dir))
    x = torch.rand(7, 3, 48, 48)
    whole = det.predict(x).levels
    det.max_batch_size = 2
    try:
        torch.testing.assert_close(det.predict(x).levels, whole)
    finally:
        det.max_batch_size = 32


def test_cuda_oom_halves_the_chunk_and_retries(eva_dir, monkeypatch, caplog):
    det = load_detector(str(eva_dir))
    x = torch.rand(8, 3, 48, 48)
    expected = det.predict(x).levels
    real, sizes = det._forward, []

    def small_memory(batch):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(batch)

    monkeypatch.setattr(det, "_forward", small_memory)
    with caplog.at_level(logging.WARNING):
        got = det.predict(x).levels
    torch.testing.assert_close(got, expected)
    assert sizes[:3] == [8, 4, 2] and "out of memory" in caplog.text


def test_non_finite_input_and_output_fail_closed(eva_dir, monkeypatch):
    det = load_detector(str(eva_dir))
    x = torch.rand(3, 3, 48, 48)
    x[1, :, 5, 5] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    s = det.predict(x)
    assert s.problems() == [None, "non-finite input", "non-finite input"]
    assert s.levels[1:].tolist() == [[0.0, 1.0, 1.0, 1.0]] * 2
    assert det.is_nsfw(x, level="high", threshold=1.0)[1:] == [True, True]
    real = det._forward
    monkeypatch.setattr(det, "_forward", lambda b: real(b) * torch.tensor([[1.0], [float("nan")], [1.0]]))
    s = det.predict(torch.rand(3, 3, 48, 48))
    assert s.problems() == [None, "non-finite model output", None]
    assert s.valid.tolist() == [True, False, True]
    assert s.levels[1].tolist() == [0.0, 1.0, 1.0, 1.0]


def test_dtype_resolution():
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", torch.device("cpu"))


@pytest.mark.parametrize("flags, native", [
    ({"avx2": True, "avx512_f": True}, False),  # AVX-512 without BF16 (Skylake, Zen 3): emulated bf16
    ({"avx512_f": True, "avx512_bf16": True}, True),  # Cooper Lake, Zen 4
    ({"amx_tile": True, "amx_bf16": True}, True),  # Sapphire Rapids
    ({"avx512_bf16": False, "amx_bf16": False}, False),
    ({}, False),  # nothing known: the safe default
])
def test_auto_dtype_on_the_cpu_follows_native_bf16(monkeypatch, eva_dir, flags, native):
    monkeypatch.setattr(detector, "_cpu_capabilities", lambda: flags)
    assert cpu_bf16_native() is native
    expected = torch.bfloat16 if native else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == resolve_dtype(None, torch.device("cpu")) == expected
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16  # CUDA: bf16 whatever the CPU
    assert resolve_dtype("auto", torch.device("mps")) == torch.float32
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32  # an explicit dtype always wins
    assert load_detector(str(eva_dir), device="cpu").dtype == expected


def test_cpu_capabilities_are_the_cpus_own_flags(monkeypatch):
    proc = Path("/proc/cpuinfo")
    if not proc.is_file():
        pytest.skip("no /proc/cpuinfo to compare with")
    line = next((ln for ln in proc.read_text().splitlines() if ln.startswith("flags")), None)
    if line is None:
        pytest.skip("/proc/cpuinfo has no flags line (not x86)")
    flags = set(line.split(":", 1)[1].split())
    for reading in (real_cpu_capabilities(), _without_torch_capabilities(monkeypatch)):
        for flag in (*NATIVE_BF16_FLAGS, "avx2"):
            assert bool(reading.get(flag)) == (flag in flags), flag


def _without_torch_capabilities(monkeypatch):
    """The reading on a torch without ``torch.cpu.get_capabilities`` (the /proc/cpuinfo fallback)."""
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    return real_cpu_capabilities.__wrapped__()


def test_bf16_on_cpu_runs(eva_dir):
    det = load_detector(str(eva_dir), dtype=torch.bfloat16)
    s = det.predict(torch.rand(2, 3, 48, 48))
    assert s.probs.dtype == torch.float32 and torch.isfinite(s.levels).all()


# --- the hub path, without a network ---------------------------------------------------------

def test_offline_mode_gives_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as e:
        load_detector("eva", cache_dir=tmp_path)
    msg = str(e.value)
    assert "Freepik/nsfw_image_detector" in msg and "HF_HUB_OFFLINE" in msg and "download" in msg
    with pytest.raises(ModelLoadError, match="gated"):
        load_detector("vit-sd", cache_dir=tmp_path)


def test_local_files_only_and_unknown_names(tmp_path):
    with pytest.raises(ModelLoadError, match="local_files_only"):
        load_detector("Freepik/nsfw_image_detector", cache_dir=tmp_path, local_files_only=True)
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_detector("not-a-model")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_detector(str(tmp_path))


def test_pickled_checkpoints_are_refused(eva_dir, tmp_path):
    d = tmp_path / "pickled"
    shutil.copytree(eva_dir, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="never loaded"):
        load_detector(str(d))


def test_loads_from_a_prepared_hub_cache(eva_dir, tmp_path, monkeypatch):
    """The hub id path, resolved offline from a cache laid out as huggingface_hub writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--Freepik--nsfw_image_detector"
    shutil.copytree(eva_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    det = load_detector("eva", cache_dir=tmp_path)
    assert det.model_id == "Freepik/nsfw_image_detector" and det.spec.name == "eva"
    assert det.predict(torch.rand(1, 3, 48, 48)).levels.shape == (1, 4)
    pinned = load_detector("Freepik/nsfw_image_detector", revision=commit, cache_dir=tmp_path)
    assert pinned.revision == commit
    with pytest.raises(ModelLoadError, match="revision"):
        load_detector("eva", revision="v9", cache_dir=tmp_path)


def teardown_module():
    _CACHE.clear()
