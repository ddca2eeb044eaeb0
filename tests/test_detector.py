"""Loading (registry, directory, hub cache, offline errors), scores semantics, batching, fail-closed."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from nsfw_safety import LEVELS, REGISTRY, ModelLoadError, load_detector
from nsfw_safety import detector as detector_module
from nsfw_safety import device_cache
from nsfw_safety.detector import _CACHE, NATIVE_BF16_FLAGS, cpu_bf16_native, resolve_dtype
from nsfw_safety.detector import _cpu_capabilities as real_cpu_capabilities  # before conftest pins it
from nsfw_safety.levels import level_matrix
from nsfw_safety.models import load_model


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


def test_every_load_is_a_new_detector_over_weights_read_once(eva_dir, eva_nsfw_dir, tmp_path, monkeypatch):
    reads = []
    monkeypatch.setattr(detector_module, "load_model", lambda *a: reads.append(a[0]) or load_model(*a))
    folder = shutil.copytree(eva_dir, tmp_path / "eva")  # a checkpoint no other test has read
    a, b = load_detector(folder), load_detector(folder)
    assert reads == [folder]  # read from disk once
    assert b is not a and b.model is not a.model
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert pa is not pb and pa.data_ptr() == pb.data_ptr(), name  # own tensors, one copy in memory
    x = torch.rand(3, 3, 40, 50)
    torch.testing.assert_close(a.predict(x).probs, b.predict(x).probs, rtol=0, atol=0)
    c = load_detector(folder, dtype="bf16")
    assert c.dtype == torch.bfloat16 and a.dtype == torch.float32 and reads == [folder]
    # a checkpoint replaced on disk is read again
    shutil.copy(eva_nsfw_dir / "model.safetensors", folder / "model.safetensors")
    replaced = load_detector(folder)
    assert reads == [folder, folder] and float(replaced.predict(x).levels[:, 3].min()) > 0.99
    assert float(a.predict(x).levels[:, 3].max()) < 0.99  # the detectors already out keep their weights


def test_moving_or_casting_one_detector_leaves_the_others(eva_dir):
    a, b = load_detector(str(eva_dir)), load_detector(str(eva_dir))
    x = torch.rand(2, 3, 48, 48)
    before = b.predict(x).probs
    a.to(dtype=torch.float16)  # as a pipeline's pipe.to(torch.float16) could
    assert a.dtype == torch.float16 and b.dtype == torch.float32
    a.to("meta")  # as pipe.to("cuda:1") would: the weights leave the CPU
    assert a.device.type == "meta" and b.device.type == "cpu"
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in b.model.parameters())
    torch.testing.assert_close(b.predict(x).probs, before, rtol=0, atol=0)
    c = load_detector(str(eva_dir))
    assert (c.device.type, c.dtype) == ("cpu", torch.float32)
    torch.testing.assert_close(c.predict(x).probs, before, rtol=0, atol=0)


def test_a_symlinked_folder_keeps_its_own_name(eva_dir, tmp_path):
    link = tmp_path / "my-detector"
    link.symlink_to(eva_dir, target_is_directory=True)
    linked, direct = load_detector(link), load_detector(eva_dir)
    assert (linked.model_id, linked.path) == (str(link), link)
    assert (direct.model_id, direct.path) == (str(eva_dir), eva_dir)
    assert next(linked.model.parameters()).data_ptr() == next(direct.model.parameters()).data_ptr()  # read once


def test_constants_are_made_once_per_device(eva_dir):
    made = []

    def factory():
        made.append(1)
        return torch.ones(3), torch.zeros(1)

    first = device_cache.on_device(("test", 3), factory, "cpu")
    assert device_cache.on_device(("test", 3), factory, torch.device("cpu")) is first and len(made) == 1
    elsewhere = device_cache.on_device(("test", 3), factory, "meta")
    assert elsewhere[0].device.type == "meta" and first[0].device.type == "cpu" and len(made) == 2
    # scoring reuses the level matrix and the normalization constants: nothing new on the second call
    det = load_detector(str(eva_dir))
    det.predict(torch.rand(2, 3, 40, 40))
    kept = dict(device_cache._CACHE)
    det.predict(torch.rand(2, 3, 40, 40))
    assert all(device_cache._CACHE[k] is v for k, v in kept.items()) and len(device_cache._CACHE) == len(kept)
    cpu = torch.device("cpu")
    assert (("levels", det.labels), cpu) in kept
    assert (("mean_std", det.preprocess_config.mean, det.preprocess_config.std), cpu) in kept


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
    monkeypatch.setattr(detector_module, "_cpu_capabilities", lambda: flags)
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
