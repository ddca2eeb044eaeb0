"""decoder="torchcodec" on the CPU, against PyAV: the same frames (pixels, timestamps, display
rotation) and the same verdict. torchcodec needs FFmpeg's shared libraries; here it gets PyAV's,
through ``link_pyav_ffmpeg`` and ``LD_LIBRARY_PATH`` in a child process (the loader reads it only
at start-up). Skipped, with the reason, where torchcodec is not installed or cannot load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from nsfw_safety.frames import link_pyav_ffmpeg
from videos import pictures, write_video

pytest.importorskip("av")
pytest.importorskip("torchcodec", reason="torchcodec is not installed (pip install torchcodec)")

#: Per pixel and channel, torchcodec's RGB against PyAV's. Both run the same FFmpeg here and agree
#: exactly; another FFmpeg build may round its colour conversion differently.
MAX_DIFF = 2

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from nsfw_safety import SafetyFilter, load_detector
    from nsfw_safety.frames import read_frames
    from nsfw_safety.video import check_video

    model, paths = sys.argv[1], sys.argv[2:]
    guard = SafetyFilter(load_detector(model, device="cpu"), threshold=0.5)
    out = {}
    try:
        for path in paths:
            pyav = list(read_frames(path))
            codec = list(read_frames(path, decoder="torchcodec", device="cpu"))
            diff = [int(np.abs(a.image.astype(int) - b.image.permute(1, 2, 0).numpy().astype(int)).max())
                    if a.image.shape == tuple(b.image.permute(1, 2, 0).shape) else -1 for a, b in zip(pyav, codec)]
            checks = {}
            for decoder in ("pyav", "torchcodec"):
                r = check_video(path, guard, decoder=decoder)
                sparse = check_video(path, guard, decoder=decoder, every=3)
                checks[decoder] = dict(flagged=r.flagged_frames, levels=r.levels, times=r.frame_times,
                                       sparse=sparse.checked, sparse_times=sparse.frame_times)
            out[path] = dict(frames=[len(pyav), len(codec)], diff=diff, shapes=[list(pyav[0].image.shape),
                             list(codec[0].image.shape)], times=[[f.time for f in pyav], [f.time for f in codec]],
                             checks=checks)
    except ImportError as e:
        out = {"skip": str(e)}
    print(json.dumps(out))
""")


def test_torchcodec_decodes_as_pyav_does(tmp_path, eva_dir):
    clips = [write_video(tmp_path / "vfr.mp4", pictures(8), pts=[0, 1, 2, 4, 5, 6, 9, 10]),
             write_video(tmp_path / "clip.webm", pictures(6, seed=3)),
             write_video(tmp_path / "turned.mp4", pictures(5, seed=6), rotation=90)]
    libs = link_pyav_ffmpeg(tmp_path / "ffmpeg")
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(libs), os.environ.get("LD_LIBRARY_PATH")]))}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(eva_dir), *map(str, clips)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.splitlines()[-1])
    if "skip" in found:
        pytest.skip(f"torchcodec cannot load: {found['skip']}")
    for clip, n, shape in zip(clips, (8, 6, 5), ([48, 64, 3], [48, 64, 3], [64, 48, 3])):
        got = found[str(clip)]
        assert got["frames"] == [n, n]
        assert got["shapes"] == [shape, [3, *shape[:2]]]  # upright, as players show it (rotation applied)
        assert max(got["diff"]) <= MAX_DIFF and min(got["diff"]) >= 0, got["diff"]
        assert got["times"][1] == pytest.approx(got["times"][0])
        pyav, codec = got["checks"]["pyav"], got["checks"]["torchcodec"]
        assert codec["flagged"] == pyav["flagged"] and codec["times"] == pytest.approx(pyav["times"])
        assert codec["levels"] == pytest.approx(pyav["levels"], abs=1e-4)
        assert codec["sparse"] == pyav["sparse"] == list(range(0, n, 3))
        assert codec["sparse_times"] == pytest.approx(pyav["sparse_times"])
    assert found[str(clips[0])]["times"][0] == pytest.approx([p / 8 for p in (0, 1, 2, 4, 5, 6, 9, 10)])
