"""nsfw-safety scan --frames-report, through the real console command: one JSON line per checked
frame of each animation and video (none for still images), in step with the report's rows, and
resumed without repeating or losing a line after a kill."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nsfw_safety import load_detector
from nsfw_safety.frames import read_frames
from nsfw_safety.vocabulary import LEVELS
from test_scan import Zygote
from videos import write_animation, write_video

pytest.importorskip("av")

GIF_MS = [100, 200, 300, 150, 250]


def nsfw_safety(*argv) -> subprocess.CompletedProcess:
    """The real ``nsfw-safety`` command in a subprocess."""
    script = Path(sys.executable).parent / "nsfw-safety"
    cmd = [str(script)] if script.exists() else [sys.executable, "-c",
                                                 "import sys; from nsfw_safety.cli import main; sys.exit(main())"]
    return subprocess.run([*cmd, *map(str, argv)], capture_output=True, text=True, timeout=300)


def noise(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(n)]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_file(frame_lines: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for line in frame_lines:
        out.setdefault(Path(line["path"]).name, []).append(line)
    return out


def flagged_in_reason(reason: str) -> list[int]:
    """The flagged frames a report row's reason names: "...; flagged 3: 0-1 (0.00-0.12 s), 5 (0.62 s); ..."."""
    m = re.search(r"; flagged \d+: (.*?); ", reason)
    if m is None:
        return []
    out = []
    for a, b in re.findall(r"(\d+)(?:-(\d+))? \(", m.group(1)):
        out += range(int(a), int(b or a) + 1)
    return out


@pytest.fixture
def folder(tmp_path, eva_dir) -> tuple[Path, float]:
    """A GIF (5 frames), an MP4 (12 frames, 8 fps) and a still PNG; and a medium threshold between
    two of their frames' scores, so that some frames are flagged and some not."""
    root = tmp_path / "in"
    root.mkdir()
    write_animation(root / "anim.gif", noise(5, seed=1), GIF_MS)
    write_video(root / "clip.mp4", noise(12, seed=2), audio=False)
    noise(1, seed=3)[0].save(root / "still.png")
    frames = [f.image for name in ("anim.gif", "clip.mp4") for f in read_frames(root / name)]
    medium = sorted(load_detector(str(eva_dir), device="cpu").predict(frames).levels[:, 2].tolist())
    low, high = medium[len(medium) // 2 - 1], medium[len(medium) // 2]
    assert high - low > 1e-3, medium  # a clear gap: the same split in the scan
    return root, (low + high) / 2


@pytest.fixture(scope="module")
def zygote():
    """Forks real ``nsfw-safety`` processes without a torch import each (tests/zygote.py)."""
    tmp = Path(tempfile.mkdtemp(prefix="nsfw-zygote-"))
    z = Zygote(tmp)
    yield z
    z.close()
    shutil.rmtree(tmp)


def test_one_line_per_checked_frame_in_step_with_the_report(folder, tmp_path, eva_dir):
    root, threshold = folder
    proc = nsfw_safety("scan", root, "--model", eva_dir, "--thresholds", f"medium={threshold}",
                       "--report", tmp_path / "r.jsonl", "--frames-report", tmp_path / "frames.jsonl",
                       "--workers", "2", "--json")
    assert proc.returncode == 1, proc.stderr
    rows = {Path(r["path"]).name: r for r in lines(tmp_path / "r.jsonl")}
    files = by_file(lines(tmp_path / "frames.jsonl"))

    assert sorted(rows) == ["anim.gif", "clip.mp4", "still.png"] and sorted(files) == ["anim.gif", "clip.mp4"]
    assert sum(len(v) for v in files.values()) == 5 + 12 == sum(int(r["frames"].split("/")[0])
                                                                for r in rows.values() if r["frames"])
    expected_times = {"anim.gif": np.cumsum([0] + GIF_MS[:-1]) / 1000, "clip.mp4": np.arange(12) / 8}
    flagged_total = 0
    for name, file_lines in files.items():
        row = rows[name]
        assert [line["frame"] for line in file_lines] == list(range(len(file_lines)))  # contiguous, in order
        assert [line["time"] for line in file_lines] == pytest.approx(expected_times[name])
        assert all((line["path"], line["size"], line["mtime_ns"]) == (row["path"], row["size"], row["mtime_ns"])
                   for line in file_lines)
        flagged = [line["frame"] for line in file_lines if line["flagged"]]
        assert flagged == flagged_in_reason(row["reason"])
        assert all(line["flagged"] == (line["medium"] >= threshold) for line in file_lines)
        assert all(line["reason"] for line in file_lines)
        for level in LEVELS:  # the row's levels are the maximum over its frames
            assert row[level] == pytest.approx(max(line[level] for line in file_lines), abs=1e-6)
        assert row["flagged"] == bool(flagged)
        flagged_total += len(flagged)
    assert 0 < flagged_total < 17


def test_a_resumed_run_neither_repeats_nor_loses_lines(folder, tmp_path, eva_dir, zygote):
    root, threshold = folder
    report, frames = tmp_path / "r.jsonl", tmp_path / "frames.jsonl"
    argv = (root, "--model", eva_dir, "--thresholds", f"medium={threshold}", "--report", report,
            "--frames-report", frames, "--workers", "1", "--json")
    assert zygote.run(*argv)[0] == 1
    first = frames.read_bytes()
    mp4 = [line for line in lines(frames) if line["path"].endswith("clip.mp4")]

    # nothing changed: every file is skipped, and the frames report is left as it was
    code, out, _ = zygote.run(*argv)
    assert code == 1 and json.loads(out)["skipped"] == 3 and frames.read_bytes() == first

    # a kill after the MP4's lines were written but before its row; then a torn line
    rows = [r for r in report.read_text().splitlines() if not json.loads(r)["path"].endswith("clip.mp4")]
    report.write_text("".join(r + "\n" for r in rows))
    frames.write_bytes(first + b'{"path": "' + str(root / "anim.gif").encode() + b'", "size": 1')
    code, out, err = zygote.run(*argv)
    assert code == 1 and (json.loads(out)["scanned"], json.loads(out)["skipped"]) == (1, 2), err
    after = lines(frames)  # every line parses: the torn one is gone
    assert sorted(map(json.dumps, after)) == sorted(map(json.dumps, lines_of(first)))
    assert [line for line in after if line["path"].endswith("clip.mp4")] == mp4

    # a report made without --frames-report: its videos are scanned again to get their lines
    frames.unlink()
    code, out, _ = zygote.run(*argv)
    assert code == 1 and (json.loads(out)["scanned"], json.loads(out)["skipped"]) == (2, 1)  # the PNG needs no lines
    assert sorted(map(json.dumps, lines(frames))) == sorted(map(json.dumps, lines_of(first)))


def lines_of(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


def test_the_frames_report_survives_repeated_sigkill(tmp_path, eva_dir, zygote):
    """SIGKILL a scan at random instants (file operations slowed, so kills land between writing
    a batch's frame lines and its rows), resume each time; at the end every video has each of its
    frames exactly once, in step with its row."""
    root = tmp_path / "in"
    root.mkdir()
    for i in range(3):  # a still image after each video ends its batch (--batch-size 1)
        write_animation(root / f"{i}a.gif", noise(3 + i, seed=20 + i), [100] * (3 + i))
        noise(1, seed=10 + i)[0].save(root / f"{i}b.png")
        write_video(root / f"{i}c.mp4", noise(4 + i, seed=30 + i), audio=False)
        noise(1, seed=40 + i)[0].save(root / f"{i}d.png")
    report, frames = tmp_path / "r.jsonl", tmp_path / "frames.jsonl"
    argv = (root, "--model", eva_dir, "--report", report, "--frames-report", frames, "--batch-size", "1",
            "--workers", "1", "--no-fail-on-flagged")
    rng = np.random.default_rng(0)
    kills = 0
    for attempt in range(8):
        size = frames.stat().st_size if frames.exists() else 0
        pid, _, err = zygote.start(*argv, slow=0.05)
        deadline = time.time() + 20
        while time.time() < deadline and not (frames.exists() and frames.stat().st_size > size):
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.1) if attempt % 2 else 0)  # within the fsync of the lines, or later
        os.kill(pid, signal.SIGKILL)
        code = zygote.wait(pid)
        if code != -signal.SIGKILL:  # it finished first: nothing left to interrupt
            assert code == 0, err.read_text()
            break
        kills += 1
    assert kills >= 3, f"{kills} kills"
    code, _, err = zygote.run(*argv)
    assert code == 0, err

    rows = {Path(r["path"]).name: r for r in lines(report)}
    files = by_file(lines(frames))  # every line parses
    assert len(rows) == 12 and sorted(files) == sorted(n for n in rows if not n.endswith(".png"))
    for name, file_lines in files.items():
        row = rows[name]
        n = int(row["frames"].split("/")[0])
        assert n == int(name[0]) + (3 if name.endswith(".gif") else 4)
        assert [line["frame"] for line in file_lines] == list(range(n)), name  # once each, none lost
        assert {(line["size"], line["mtime_ns"]) for line in file_lines} == {(row["size"], row["mtime_ns"])}
    print(f"survived {kills} SIGKILLs")


def test_frames_report_arguments(tmp_path, eva_dir):
    root = tmp_path / "in"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a.png")
    bad = nsfw_safety("scan", root, "--model", eva_dir, "--frames-report", tmp_path / "f.csv")
    assert bad.returncode == 2 and "--frames-report" in bad.stderr and ".jsonl" in bad.stderr
    same = nsfw_safety("scan", root, "--model", eva_dir, "--report", tmp_path / "r.jsonl",
                       "--frames-report", tmp_path / "r.jsonl")
    assert same.returncode == 2 and "a file of its own" in same.stderr
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text('{"hello": "world"}\n')
    proc = nsfw_safety("scan", root, "--model", eva_dir, "--frames-report", foreign)
    assert proc.returncode == 2 and "is not an nsfw-safety frames report" in proc.stderr
    assert foreign.read_text() == '{"hello": "world"}\n'  # never rewritten
    help_text = nsfw_safety("scan", "--help").stdout
    assert "--frames-report" in help_text and "still images get none" in " ".join(help_text.split())
