"""The full EVA02-B/448 architecture, random weights, through the real config path (one smoke test)."""

import pytest
import torch
from checkpoints import write_eva

from nsfw_safety import load_detector
from nsfw_safety.detector import _CACHE


@pytest.mark.slow
def test_full_size_eva_loads_and_runs(tmp_path):
    path = write_eva(tmp_path / "eva-b-448", full=True)
    det = load_detector(str(path))
    try:
        params = sum(p.numel() for p in det.model.parameters())
        assert 85e6 < params < 88e6  # EVA02-B/14 with a 4-class head: ~86.4M
        cfg = det.preprocess_config
        assert (cfg.size, cfg.mode, cfg.interpolation) == ((448, 448), "squash", "bicubic")
        x = torch.rand(1, 3, 512, 512) * 2 - 1  # a VAE-sized decoded image in [-1, 1]
        scores = det.predict(x, value_range=(-1, 1))
        assert scores.levels.shape == (1, 4) and scores.valid.all()
        torch.testing.assert_close(scores.probs.sum(), torch.tensor(1.0))
    finally:
        _CACHE.clear()  # 350 MB of fp32 weights: do not keep them for the rest of the suite
