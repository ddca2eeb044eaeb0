"""CUDA-only checks (skipped without a GPU): bf16 by default, no host sync on the tensor path,
compile, and results equal to the CPU's within the bf16 bound."""

import pytest
import torch

from nsfw_safety import SafetyFilter, load_detector

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_by_default_and_close_to_fp32_cpu(eva_dir):
    gpu = load_detector(str(eva_dir), device="cuda")
    assert gpu.dtype == torch.bfloat16
    x = torch.rand(8, 3, 96, 80)
    cpu = load_detector(str(eva_dir), device="cpu").predict(x).levels
    assert (gpu.predict(x.cuda()).levels.cpu() - cpu).abs().max() < 0.05


def test_tensor_path_never_syncs_until_read(eva_dir):
    det = load_detector(str(eva_dir), device="cuda")
    x = torch.rand(4, 3, 512, 512, device="cuda", dtype=torch.float16) * 2 - 1
    det.predict(x, value_range=(-1, 1))  # warm-up: per-device constants are made once
    torch.cuda.set_sync_debug_mode("error")
    try:
        scores = det.predict(x, value_range=(-1, 1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert scores.levels.device.type == "cuda" and scores.levels.shape == (4, 4)


def test_filter_keeps_device_dtype_and_range(eva_nsfw_dir):
    guard = SafetyFilter(load_detector(str(eva_nsfw_dir), device="cuda"), action="blur")
    x = torch.rand(2, 3, 128, 128, device="cuda", dtype=torch.float16) * 2 - 1
    out = guard(x, value_range=(-1, 1))
    assert out.flagged == [True, True]
    assert out.images.device == x.device and out.images.dtype == x.dtype
    assert out.images.min() >= -1 and out.images.max() <= 1


def test_compile_gives_the_same_scores(eva_dir):
    eager = load_detector(str(eva_dir), device="cuda")
    compiled = load_detector(str(eva_dir), device="cuda", compile=True)
    x = torch.rand(4, 3, 256, 256, device="cuda")
    assert (compiled.predict(x).levels - eager.predict(x).levels).abs().max() < 0.02
