"""nsfw-safety scan on animations and videos, through the real console command: every frame is
checked, one row per file, censored copies in the same format, a censored poster on the page."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nsfw_safety.frames import read_frames
from nsfw_safety.scan.html import thumbnail_jpeg
from videos import pictures, write_animation, write_video

pytest.importorskip("av")


def nsfw_safety(*argv) -> subprocess.CompletedProcess:
    """The real ``nsfw-safety`` command in a subprocess."""
    script = Path(sys.executable).parent / "nsfw-safety"
    cmd = [str(script)] if script.exists() else [sys.executable, "-c",
                                                 "import sys; from nsfw_safety.cli import main; sys.exit(main())"]
    return subprocess.run([*cmd, *map(str, argv)], capture_output=True, text=True, timeout=300)


def _rows(report: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in map(json.loads, report.read_text().splitlines())}


def noise(n: int, seed: int = 0) -> list[Image.Image]:
    """Noise frames: any blur changes every one of them."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(n)]


def _rgb(image) -> Image.Image:
    return (image if isinstance(image, Image.Image) else Image.fromarray(image)).convert("RGB")


@pytest.fixture
def clips(tmp_path) -> Path:
    root = tmp_path / "in"
    root.mkdir()
    write_animation(root / "anim.gif", noise(5), [100] * 5)
    write_animation(root / "anim.webp", noise(4, seed=3), [80] * 4)
    write_video(root / "clip.mp4", noise(12, seed=5), audio=False)
    return root


def test_scan_checks_every_frame_of_animations_and_videos(clips, tmp_path, eva_nsfw_dir):
    report, html, out = tmp_path / "r.jsonl", tmp_path / "r.html", tmp_path / "out"
    before = {p.name: p.read_bytes() for p in clips.iterdir()}

    proc = nsfw_safety("scan", clips, "--model", eva_nsfw_dir, "--report", report, "--html", html, "--out", out,
                       "--action", "blur", "--workers", "2", "--json")

    assert proc.returncode == 1, proc.stderr  # flagged, no error
    summary = json.loads(proc.stdout)
    assert summary["files"] == 3 and summary["flagged"] == 3 and summary["errors"] == 0
    rows = _rows(report)
    assert sorted(rows) == ["anim.gif", "anim.webp", "clip.mp4"]
    for name, n in (("anim.gif", 5), ("anim.webp", 4), ("clip.mp4", 12)):
        row = rows[name]
        assert row["status"] == "flagged" and row["frames"] == f"{n}/{n}", row
        assert row["reason"].startswith(f"checked {n} of {n} frames; flagged {n}: 0-{n - 1}")
        assert row["high"] > 0.5 and row["action"] == "blur"
        copy = Path(row["output"])
        assert copy == out / name and copy.suffix == Path(name).suffix
        originals = [np.asarray(_rgb(f.image), np.float32) for f in read_frames(clips / name)]
        censored = [np.asarray(_rgb(f.image), np.float32) for f in read_frames(copy)]
        assert len(censored) == n
        assert all(np.abs(c - o).mean() > 4 for c, o in zip(censored, originals))  # every frame blurred
    assert {p.name: p.read_bytes() for p in clips.iterdir()} == before  # inputs untouched
    # the page shows a poster per file, each censored, never an uncensored frame
    posters = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', html.read_text())
    assert len(posters) == 3
    firsts = [next(read_frames(clips / name)).image for name in sorted(before)]
    for data in posters:
        poster = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
        for first in firsts:
            plain = np.asarray(Image.open(io.BytesIO(thumbnail_jpeg(_rgb(first))))
                               .convert("RGB").resize(poster.size), np.float32)
            assert np.abs(np.asarray(poster, np.float32) - plain).mean() > 4


def test_scan_clean_video_and_a_truncated_animation(tmp_path, eva_safe_dir):
    root = tmp_path / "in"
    root.mkdir()
    write_video(root / "clip.webm", pictures(6), audio=False)
    data = write_animation(tmp_path / "a.png", pictures(6), [100] * 6).read_bytes()
    (root / "cut.png").write_bytes(data[: len(data) * 2 // 3])  # the header announces 6 frames
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mov").write_text("not a video\n" * 20)
    report = tmp_path / "r.jsonl"

    proc = nsfw_safety("scan", root, "--model", eva_safe_dir, "--report", report, "--workers", "2", "--json")

    assert proc.returncode == 2, proc.stderr  # error rows
    rows = _rows(report)
    assert sorted(rows) == ["clip.webm", "cut.png", "empty.mp4", "text.mov"]
    clean = rows["clip.webm"]
    assert clean["status"] == "ok" and not clean["flagged"] and clean["frames"] == "6/6"
    assert clean["reason"].startswith("checked 6 of 6 frames; none flagged")
    cut = rows["cut.png"]
    n = int(cut["frames"].split("/")[0])
    assert 1 <= n < 6 and cut["frames"] == f"{n}/6"
    assert cut["status"] == "error" and cut["flagged"] is True  # never "safe"
    assert cut["reason"].startswith(f"checked {n} of 6 frames, then: ")
    for name in ("empty.mp4", "text.mov"):
        assert rows[name]["status"] == "error" and rows[name]["flagged"] is True
        assert rows[name]["reason"].startswith("error: ")
    assert str(root) not in rows["text.mov"]["reason"]
