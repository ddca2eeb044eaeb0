"""Shared fixtures: tiny checkpoints in the real formats, and synthetic images."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from checkpoints import write_eva, write_vit  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _cpu_without_native_bf16():
    """dtype="auto" on the CPU means bf16 where the CPU has native bf16, fp32 elsewhere; the suite
    pins the second so its results do not depend on the machine (tests/test_detector.py checks
    both decisions). Session-wide, so that module and session fixtures see it too."""
    from nsfw_safety import detector

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(detector, "_cpu_capabilities", lambda: {"avx2": True})
        yield


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test, with an AssertionError that names it."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access: {args!r}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="session")
def eva_dir(tmp_path_factory):
    """Tiny EVA02 TimmWrapper checkpoint; scores spread over (0, 1)."""
    return write_eva(tmp_path_factory.mktemp("eva"))


@pytest.fixture(scope="session")
def eva_nsfw_dir(tmp_path_factory):
    """Tiny EVA02 checkpoint that puts every image in "high" (flagged at any level)."""
    return write_eva(tmp_path_factory.mktemp("eva_nsfw"), bias="nsfw")


@pytest.fixture(scope="session")
def eva_safe_dir(tmp_path_factory):
    """Tiny EVA02 checkpoint that puts every image in "neutral" (never flagged)."""
    return write_eva(tmp_path_factory.mktemp("eva_safe"), bias="safe")


@pytest.fixture(scope="session")
def vit_dir(tmp_path_factory):
    """Tiny ViT sfw/nsfw checkpoint with preprocessor_config.json; scores spread."""
    return write_vit(tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="session")
def vit_nsfw_dir(tmp_path_factory):
    return write_vit(tmp_path_factory.mktemp("vit_nsfw"), bias="nsfw")


@pytest.fixture(scope="session")
def vit_safe_dir(tmp_path_factory):
    return write_vit(tmp_path_factory.mktemp("vit_safe"), bias="safe")


@pytest.fixture(scope="session")
def forced_dirs(tmp_path_factory):
    """Checkpoints whose every output is forced, for the second-opinion tests: name -> directory
    (named so that reasons show the name). EVA: class probabilities (neutral, low, medium, high),
    so levels low/medium/high = 0.70/0.60/0.45 ("eva60") and 0.40/0.30/0.20 ("eva30"), up to the
    bf16 weights. ViT: p_nsfw, so low = medium = high = p ("vit20", "vit50", "vit90")."""
    root = tmp_path_factory.mktemp("forced")
    out = {name: write_eva(root / name, probs=p) for name, p in
           {"eva60": (0.3, 0.1, 0.15, 0.45), "eva30": (0.6, 0.1, 0.1, 0.2)}.items()}
    vits = {"vit20": 0.2, "vit50": 0.5, "vit90": 0.9}
    return out | {name: write_vit(root / name, p_nsfw=p) for name, p in vits.items()}


@pytest.fixture(scope="module")
def nsfw(eva_nsfw_dir):
    """A detector that flags every image (one per test module: tests may move or cast it)."""
    from nsfw_safety import load_detector

    return load_detector(str(eva_nsfw_dir))


@pytest.fixture(scope="module")
def safe(eva_safe_dir):
    """A detector that flags no image (one per test module)."""
    from nsfw_safety import load_detector

    return load_detector(str(eva_safe_dir))
