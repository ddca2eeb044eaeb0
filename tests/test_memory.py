"""Peak memory of preprocessing, whatever the image's shape (README, "Limits").

Each case runs in a fresh interpreter: the image is made (uint8, as decoded), the code paths are
warmed up on a tiny image, the kernel's peak-RSS mark is reset through ``/proc/self/clear_refs``,
and the growth of the peak (``VmHWM``) over one ``preprocess`` call is compared with the budget.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

#: Working memory of preprocessing one image, beyond its decoded bytes (README, "Limits").
BUDGET_MIB = 16

STRIP = 4096 * 4096  # the server's default pixel limit, as one row or one column

_SCRIPT = r"""
import json, sys, torch
from nsfw_safety.models import REGISTRY
from nsfw_safety.preprocess import PreprocessConfig, preprocess

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

torch.set_num_threads(2)
h, w, name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cfg = REGISTRY["eva"].preprocess if name == "eva" else PreprocessConfig.from_hf_processor(
    {"size": {"shortest_edge": 384}, "do_center_crop": True, "crop_size": {"height": 384, "width": 384},
     "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, None)
image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
tiny = PreprocessConfig((8, 8), cfg.mode, cfg.interpolation, cfg.mean, cfg.std)
preprocess([torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)], tiny, torch.float32)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
before = status("VmRSS")
out = preprocess([image], cfg, torch.float32)
print(json.dumps({"growth_mib": (status("VmHWM") - before) / 2**20, "shape": list(out.shape),
                  "finite": bool(out.isfinite().all())}))
"""


def _clear_refs_works() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _clear_refs_works(), reason="needs Linux's /proc/self/clear_refs to reset the peak RSS")
@pytest.mark.parametrize("config, size", [("eva", 448), ("vit-crop", 384)])
@pytest.mark.parametrize("shape", [(1, STRIP), (STRIP, 1), (4096, 4096)], ids=["1x16M", "16Mx1", "4096x4096"])
def test_peak_memory_is_bounded_whatever_the_shape(shape, config, size):
    run = subprocess.run([sys.executable, "-c", _SCRIPT, *map(str, shape), config],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"{shape[0]}x{shape[1]} {config}: peak grew by {result['growth_mib']:.1f} MiB")
    assert result["shape"] == [1, 3, size, size] and result["finite"]
    assert result["growth_mib"] <= BUDGET_MIB
