"""nsfw-safety scan / serve: real files in a generated tree, tiny checkpoints, main() in-process
(a subprocess only for the kill test and the console script)."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import types
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import nsfw_safety
from nsfw_safety import cli, load_detector
from nsfw_safety.filter import SafetyFilter
from nsfw_safety.inputs import open_image
from nsfw_safety.scan import run as scan_run
from nsfw_safety.scan.reports import COLUMNS, read_report
from nsfw_safety.scan.walk import walk

GOOD = ["a.png", "sub/b.jpg", "sub/c.webp", "d.gif", "e.bmp", "sub/deep/f.tiff"]
BAD = {"bad/zero.png": "empty file", "bad/trunc.png": "truncated", "bad/text.png": "cannot identify",
       "bad/bomb.png": "decompression bomb", "bad/link.png": "cannot stat"}
N = len(GOOD) + len(BAD)
PARAMS = "a cat on a sofa, masterpiece, Steps: 20, Seed: 1"


def _noise(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_header(w: int, h: int) -> bytes:
    """A small valid-looking PNG that claims w x h pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def make_good(root: Path, names=GOOD, seed: int = 0) -> None:
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        im = _noise(24 + 4 * i, 40, seed + i)
        if path.suffix == ".png":
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", PARAMS)
            info.add_itxt("comment", "ünïcode", lang="en")
            im.save(path, pnginfo=info)
        elif path.suffix == ".jpg":
            exif = Image.Exif()
            exif[0x0112] = 6  # rotate 90: the decoded image is portrait
            _noise(20, 30, seed + i).save(path, exif=exif, quality=95)
        elif path.suffix == ".gif":  # one frame: an animation is an error row (tests/test_trust_scan.py)
            Image.new("RGB", (32, 24), (200, 30, 30)).save(path)
        else:
            im.save(path)


@pytest.fixture
def tree(tmp_path) -> Path:
    """good/ and bad/ files under tmp_path/'in', plus a .txt that must be ignored."""
    root = tmp_path / "in"
    make_good(root)
    (root / "bad").mkdir()
    (root / "bad/zero.png").write_bytes(b"")
    buf = io.BytesIO()
    _noise(64, 64, 9).save(buf, "PNG")
    (root / "bad/trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    (root / "bad/text.png").write_text("not an image at all\n")
    (root / "bad/bomb.png").write_bytes(_png_header(100_000, 100_000))
    (root / "bad/link.png").symlink_to(root / "bad/gone.png")  # dangling
    (root / "notes.txt").write_text("not scanned")
    return root


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def scan(*argv) -> int:
    return cli.main(["scan", *map(str, argv), "--workers", "2"])


def run_json(capsys, *argv) -> tuple[int, dict]:
    capsys.readouterr()
    code = scan(*argv, "--json")
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def calls(monkeypatch):
    """Records the number of images of every SafetyFilter call."""
    sizes: list[int] = []
    real = SafetyFilter.__call__

    def spy(self, images, **kwargs):
        sizes.append(len(images))
        return real(self, images, **kwargs)

    monkeypatch.setattr(SafetyFilter, "__call__", spy)
    return sizes


# --- reports -------------------------------------------------------------------------------

def test_csv_report_rows_scores_and_errors(tree, tmp_path, eva_dir, calls):
    report = tmp_path / "r.csv"
    code = scan(tree, "--model", eva_dir, "--report", report, "--batch-size", 4)
    assert code == 2  # bad files are errors
    with open(report, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = {Path(r["path"]).relative_to(tree).as_posix(): r for r in reader}
    assert sorted(rows) == sorted(GOOD + list(BAD))  # notes.txt ignored, one row per file
    assert calls == [4, 2]  # one filter call per batch, never one per image

    detector = load_detector(str(eva_dir))
    for name in GOOD:
        r, path = rows[name], tree / name
        st = path.stat()
        assert (int(r["size"]), int(r["mtime_ns"])) == (st.st_size, st.st_mtime_ns)
        assert r["status"] in ("ok", "flagged")
        lv = [float(r[k]) for k in ("neutral", "low", "medium", "high")]
        assert lv[0] + lv[1] == pytest.approx(1, abs=1e-5) and lv[1] >= lv[2] >= lv[3]
        expected = detector.predict(open_image(path)).levels[0].tolist()
        assert lv == pytest.approx(expected, abs=1e-4)  # the batched CLI scores match a direct call
        assert (r["flagged"] == "true") == (lv[2] >= 0.5) == (r["status"] == "flagged")
        assert r["reason"] == (f"medium {lv[2]:.2f} >= 0.50" if lv[2] >= 0.5 else f"medium {lv[2]:.2f} < 0.50")
        assert r["action"] == "none" and r["output"] == "" and r["moved_to"] == ""
    assert {r["status"] for n, r in rows.items() if n in GOOD} == {"ok", "flagged"}  # eva_dir spreads
    assert (rows["sub/b.jpg"]["width"], rows["sub/b.jpg"]["height"]) == ("20", "30")  # EXIF rotation
    for name, why in BAD.items():
        r = rows[name]
        assert r["status"] == "error" and r["flagged"] == "true", name
        assert why in r["reason"] and r["reason"].startswith("error: "), (name, r["reason"])
        assert r["low"] == r["medium"] == "" and r["action"] == "none"


def test_jsonl_report_and_json_summary(tree, tmp_path, eva_nsfw_dir, capsys):
    report = tmp_path / "r.jsonl"
    code, summary = run_json(capsys, tree, "--model", eva_nsfw_dir, "--report", report,
                             "--thresholds", "low=0.9,high=0.8")
    assert code == 2 and summary["exit_code"] == 2
    assert (summary["files"], summary["scanned"], summary["skipped"]) == (N, N, 0)
    assert (summary["flagged"], summary["clean"], summary["errors"]) == (6, 0, len(BAD))
    assert summary["rules"] == {"low": 0.9, "high": 0.8}
    assert summary["by_level"]["high"] == {"threshold": 0.8, "count": 6}
    assert summary["by_level"]["medium"] == {"threshold": 0.5, "count": 6}
    assert sorted(e["path"] for e in summary["error_files"]) == sorted(str(tree / n) for n in BAD)
    lines = report.read_text().splitlines()
    assert len(lines) == N
    rows = [json.loads(line) for line in lines]
    assert all(tuple(r) == COLUMNS for r in rows)
    flagged = [r for r in rows if r["status"] == "flagged"]
    assert len(flagged) == 6 and all(r["flagged"] is True and r["high"] > 0.99 for r in flagged)
    assert all(r["reason"] == f"low {r['low']:.2f} >= 0.90" for r in flagged)


def test_exit_codes(tmp_path, eva_dir, eva_nsfw_dir, eva_safe_dir, capsys):
    good = tmp_path / "good"
    make_good(good)
    assert scan(good, "--model", eva_safe_dir) == 0
    assert scan(good, "--model", eva_nsfw_dir) == 1
    assert scan(good, "--model", eva_nsfw_dir, "--no-fail-on-flagged") == 0
    assert scan(good, "--model", eva_safe_dir, "--level", "high", "--threshold", "0") == 1
    (good / "zero.png").write_bytes(b"")
    assert scan(good, "--model", eva_safe_dir, "--no-fail-on-flagged") == 2
    assert scan(tmp_path / "missing", "--model", eva_safe_dir) == 2
    capsys.readouterr()
    # usage errors exit 2 and say why
    assert scan(good, "--copy-safe") == 2
    assert "--copy-safe needs --out" in capsys.readouterr().err
    assert scan(good, "--thresholds", "low=0.9", "--level", "high") == 2
    assert scan(good, "--thresholds", "low=2") == 2
    assert scan(good, "--thresholds", "neutral=0.5") == 2
    assert scan(good, "--in-place", "--out", tmp_path / "o") == 2
    assert scan(good, "--report", tmp_path / "r.txt") == 2
    assert scan(good, "--model", tmp_path / "no-such-model") == 2
    assert "no such directory" in capsys.readouterr().err
    assert scan(good, "--model", tmp_path) == 2  # a folder, but not a checkpoint
    assert "cannot load model" in capsys.readouterr().err
    theirs = tmp_path / "theirs.csv"
    theirs.write_text("name,price\nbike,100\n")
    assert scan(good, "--model", eva_safe_dir, "--report", theirs) == 2
    assert "is not an nsfw-safety csv report" in capsys.readouterr().err
    assert theirs.read_text() == "name,price\nbike,100\n"  # never appended to
    assert cli.main(["scan", "--help"]) == 0
    assert "--move-flagged" in capsys.readouterr().out


def test_max_pixels_limit(tmp_path, eva_safe_dir):
    good = tmp_path / "good"
    make_good(good, ["small.png", "big.png"])
    Image.new("RGB", (200, 100)).save(good / "big.png")
    report = tmp_path / "r.csv"
    assert scan(good, "--model", eva_safe_dir, "--report", report, "--max-pixels", 10_000) == 2
    rows = {Path(r["path"]).name: r for r in read_report(report)}
    assert rows["small.png"]["status"] == "ok"
    assert rows["big.png"]["status"] == "error"
    assert "200x100 = 20,000 pixels, over the limit of 10,000" in rows["big.png"]["reason"]
    assert Image.MAX_IMAGE_PIXELS == cli.DEFAULT_MAX_PIXELS  # PIL's global is restored


def test_unreadable_file(tmp_path, eva_safe_dir):
    if os.geteuid() != 0:
        good = tmp_path / "good"
        make_good(good, ["ok.png", "locked.png"])
        (good / "locked.png").chmod(0)
        report = tmp_path / "r.csv"
        assert scan(good, "--model", eva_safe_dir, "--report", report) == 2
        rows = {Path(r["path"]).name: r for r in read_report(report)}
        assert rows["ok.png"]["status"] == "ok" and "Permission denied" in rows["locked.png"]["reason"]
        return
    # root reads chmod-000 files, so decode one as the unprivileged user "nobody" in a fork
    folder = Path(tempfile.mkdtemp())
    try:
        folder.chmod(0o755)
        make_good(folder, ["locked.png"])
        (folder / "locked.png").chmod(0)
        [f] = walk([str(folder / "locked.png")])
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.setgid(65534)
                os.setuid(65534)
                os.write(write, (scan_run._decode(f, cli.DEFAULT_MAX_PIXELS).error or "no error").encode())
            finally:
                os._exit(0)
        os.close(write)
        reason = os.read(read, 4096).decode()
        os.waitpid(pid, 0)
        assert reason.startswith("error: ") and "Permission denied" in reason, reason
    finally:
        shutil.rmtree(folder)


# --- actions ---------------------------------------------------------------------------------

def test_censored_copies_mirror_tree_keep_metadata_and_originals(tree, tmp_path, eva_nsfw_dir):
    before = hashes(tree)
    out, report = tmp_path / "out", tmp_path / "r.csv"
    assert scan(tree, "--model", eva_nsfw_dir, "--report", report, "--out", out, "--action", "black") == 2
    assert hashes(tree) == before  # originals untouched
    assert sorted(hashes(out)) == sorted(GOOD)  # mirrored tree; no copies of unreadable files
    for name in GOOD:
        copy, orig = Image.open(out / name), open_image(tree / name)
        assert copy.format == Image.open(tree / name).format
        assert copy.size == orig.size  # JPEG: the rotation is applied to the copy's pixels
        assert np.asarray(copy.convert("RGB")).max() <= 3, name  # black (JPEG rounding)
    png = Image.open(out / "a.png")
    assert png.text["parameters"] == PARAMS and png.text["comment"] == "ünïcode"
    rows = {Path(r["path"]).relative_to(tree).as_posix(): r for r in read_report(report)}
    assert all(rows[n]["output"] == str(out / n) and rows[n]["action"] == "black" for n in GOOD)


def test_blur_copies_and_copy_safe(tree, tmp_path, eva_nsfw_dir, eva_safe_dir):
    out = tmp_path / "out"
    scan(tree, "--model", eva_nsfw_dir, "--out", out)  # default action: blur
    orig = np.asarray(open_image(tree / "a.png"), dtype=np.float32)
    blurred = np.asarray(Image.open(out / "a.png"), dtype=np.float32)
    assert blurred.shape == orig.shape
    assert blurred.std() < 0.25 * orig.std()  # noise is smoothed away
    assert abs(blurred.mean() - orig.mean()) < 8  # ... but it is the same picture, not a fill

    safe_out = tmp_path / "safe"
    assert scan(tree, "--model", eva_safe_dir, "--out", safe_out, "--copy-safe") == 2  # bad files
    assert hashes(safe_out) == {n: h for n, h in hashes(tree).items() if n in GOOD}  # exact copies


def test_output_folders_inside_the_tree_are_not_scanned(tmp_path, eva_nsfw_dir, capsys):
    good = tmp_path / "good"
    make_good(good, ["a.png", "sub/b.png"])
    args = (good, "--model", eva_nsfw_dir, "--out", good / "censored", "--move-flagged", good / "q")
    code, summary = run_json(capsys, *args)
    assert (code, summary["files"]) == (1, 2)
    assert sorted(hashes(good)) == ["censored/a.png", "censored/sub/b.png", "q/a.png", "q/sub/b.png"]
    code, summary = run_json(capsys, *args)
    assert (code, summary["files"]) == (0, 0)  # neither copies nor quarantine are picked up


def test_name_clashes_get_a_suffix(tmp_path, eva_nsfw_dir):
    one, two, out = tmp_path / "one", tmp_path / "two", tmp_path / "out"
    make_good(one, ["x.png"], seed=1)
    make_good(two, ["x.png"], seed=2)
    out.mkdir()
    (out / "x.png").write_bytes(b"someone else's file")
    report = tmp_path / "r.csv"
    assert scan(one, two, "--model", eva_nsfw_dir, "--out", out, "--report", report) == 1
    assert (out / "x.png").read_bytes() == b"someone else's file"
    assert sorted(p.name for p in out.iterdir()) == ["x-1.png", "x-2.png", "x.png"]
    outputs = {Path(r["path"]).parent.name: r["output"] for r in read_report(report)}
    assert outputs == {"one": str(out / "x-1.png"), "two": str(out / "x-2.png")}


def test_move_flagged(tree, tmp_path, eva_nsfw_dir):
    before = hashes(tree)
    quarantine, report = tmp_path / "q", tmp_path / "r.csv"
    (quarantine / "sub").mkdir(parents=True)
    (quarantine / "sub/b.jpg").write_bytes(b"already here")
    assert scan(tree, "--model", eva_nsfw_dir, "--move-flagged", quarantine, "--report", report) == 2
    assert sorted(hashes(tree)) == ["notes.txt"]  # flagged and unreadable files are moved out
    moved = hashes(quarantine)
    assert moved.pop("sub/b.jpg") == hashlib.sha256(b"already here").hexdigest()
    assert moved.pop("sub/b-1.jpg") == before["sub/b.jpg"]
    assert moved == {n: h for n, h in before.items() if n not in ("notes.txt", "sub/b.jpg")}  # bytes intact
    rows = {Path(r["path"]).relative_to(tree).as_posix(): r for r in read_report(report)}
    assert rows["sub/b.jpg"]["moved_to"] == str(quarantine / "sub/b-1.jpg")
    assert rows["a.png"]["action"] == "move" and rows["bad/zero.png"]["moved_to"] == str(quarantine / "bad/zero.png")


def test_in_place(tmp_path, eva_nsfw_dir, calls):
    good, report = tmp_path / "good", tmp_path / "r.jsonl"
    make_good(good, ["a.png", "b.jpg"])
    assert scan(good, "--model", eva_nsfw_dir, "--in-place", "--action", "black", "--report", report) == 1
    png = Image.open(good / "a.png")
    assert np.asarray(png).max() == 0 and png.text["parameters"] == PARAMS
    assert np.asarray(Image.open(good / "b.jpg")).max() <= 3
    assert sorted(p.name for p in good.iterdir()) == ["a.png", "b.jpg"]  # no temp files left
    for row in read_report(report):  # the row describes the file as it now is
        st = os.stat(row["path"])
        assert (row["size"], row["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
        assert row["output"] == row["path"] and row["action"] == "black"
    calls.clear()
    assert scan(good, "--model", eva_nsfw_dir, "--in-place", "--report", report) == 1
    assert calls == []  # resumed: nothing rescored


# --- resume and interruption -------------------------------------------------------------

def test_resume_skips_scored_and_rescans_changed(tree, tmp_path, eva_dir, calls, capsys):
    report = tmp_path / "r.csv"
    code, first = run_json(capsys, tree, "--model", eva_dir, "--report", report, "--batch-size", 3)
    assert (code, first["scanned"], sum(calls)) == (2, N, 6)
    calls.clear()
    code, second = run_json(capsys, tree, "--model", eva_dir, "--report", report)
    assert calls == []  # nothing new to score; only the error rows are retried (no model call)
    assert (code, second["skipped"], second["scanned"]) == (2, 6, len(BAD))
    assert (second["flagged"], second["clean"]) == (first["flagged"], first["clean"])

    time.sleep(0.01)
    _noise(50, 50, 99).save(tree / "a.png")  # changed: new size and mtime
    calls.clear()
    code, third = run_json(capsys, tree, "--model", eva_dir, "--report", report)
    assert calls == [1] and (third["skipped"], third["scanned"]) == (5, 1 + len(BAD))
    rows = read_report(report)
    assert len(rows) == N and len({r["path"] for r in rows}) == N  # compacted: one row per file
    a = next(r for r in rows if r["path"] == str(tree / "a.png"))
    assert (a["size"], a["width"]) == ((tree / "a.png").stat().st_size, 50)


def test_ctrl_c_leaves_a_valid_report_and_resumes(tmp_path, eva_dir, monkeypatch, capsys):
    good, report = tmp_path / "good", tmp_path / "r.csv"
    make_good(good, [f"{i:02d}.png" for i in range(7)])
    real = SafetyFilter.__call__
    seen = []

    def interrupt_second_batch(self, images, **kwargs):
        seen.append(len(images))
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(self, images, **kwargs)

    monkeypatch.setattr(SafetyFilter, "__call__", interrupt_second_batch)
    assert scan(good, "--model", eva_dir, "--report", report, "--batch-size", 3) == 130
    assert "a re-run resumes" in capsys.readouterr().err
    rows = read_report(report)
    assert [Path(r["path"]).name for r in rows] == ["00.png", "01.png", "02.png"]
    with open(report, "a") as fh:  # as if killed mid-write: a half row, no newline
        fh.write(f'{good / "03.png"},12,34,,,ok,fal')
    monkeypatch.setattr(SafetyFilter, "__call__", real)
    code, summary = run_json(capsys, good, "--model", eva_dir, "--report", report, "--batch-size", 3)
    assert (summary["skipped"], summary["scanned"]) == (3, 4)
    assert sorted(Path(r["path"]).name for r in read_report(report)) == [f"{i:02d}.png" for i in range(7)]


def test_killed_console_script_leaves_a_valid_report(tmp_path, eva_dir, capsys):
    """SIGKILL the real ``nsfw-safety`` script after its first batch: every row on disk is
    complete, and a re-run finishes the job."""
    script = Path(sys.executable).parent / "nsfw-safety"
    if not script.exists():
        pytest.skip("the nsfw-safety console script is not installed (pip install -e .)")
    good, report, hook = tmp_path / "good", tmp_path / "r.csv", tmp_path / "hook"
    make_good(good, [f"{i:02d}.png" for i in range(12)])
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(  # slows each batch so the kill lands mid-run
        "import time\n"
        "from nsfw_safety import filter as f\n"
        "real = f.SafetyFilter.__call__\n"
        "def slow(self, images, **kw):\n"
        "    time.sleep(0.5)\n"
        "    return real(self, images, **kw)\n"
        "f.SafetyFilter.__call__ = slow\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([str(script), "scan", str(good), "--model", str(eva_dir), "--report", str(report),
                             "--batch-size", "2", "--workers", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if report.exists() and report.read_text().count("\n") >= 2:  # header + a batch
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    with open(report, newline="") as fh:
        raw = list(csv.reader(fh))
    assert raw[0] == list(COLUMNS) and 2 <= len(raw) - 1 < 12
    assert all(len(r) == len(COLUMNS) for r in raw)
    done = len(raw) - 1
    assert len(read_report(report)) == done  # every row parses completely

    code, summary = run_json(capsys, good, "--model", eva_dir, "--report", report, "--batch-size", 2)
    assert (summary["skipped"], summary["scanned"]) == (done, 12 - done)
    assert sorted(Path(r["path"]).name for r in read_report(report)) == [f"{i:02d}.png" for i in range(12)]


# --- HTML ------------------------------------------------------------------------------------

class _Entries(HTMLParser):
    def __init__(self):
        super().__init__()
        self.entries: list[dict] = []
        self.svgs = 0
        self._card: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "entry" in (a.get("class") or "").split():
            self._card = {"path": a["data-path"], "status": a["data-status"], "img": None}
            self.entries.append(self._card)
        elif tag == "img" and self._card is not None:
            self._card["img"] = a["src"]
        elif tag == "svg":
            self.svgs += 1


def _thumb(src: str) -> np.ndarray:
    assert src.startswith("data:image/jpeg;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def test_html_report(tree, tmp_path, eva_nsfw_dir, eva_safe_dir):
    page = tmp_path / "r.html"
    assert scan(tree, "--model", eva_nsfw_dir, "--html", page, "--action", "black") == 2
    parser = _Entries()
    parser.feed(page.read_text())
    assert parser.svgs == 3  # a histogram per level
    by_path = {e["path"]: e for e in parser.entries}
    assert len(parser.entries) == len(by_path) == N
    assert set(by_path) == {str(tree / n) for n in GOOD + list(BAD)}
    for name in GOOD:  # flagged images are shown as the filter censored them: black
        e = by_path[str(tree / name)]
        assert e["status"] == "flagged" and _thumb(e["img"]).max() <= 3
    assert all(by_path[str(tree / n)]["status"] == "error" for n in BAD)
    assert "empty file (0 bytes)" in page.read_text()
    assert set(hashes(tree)) == set(GOOD + list(BAD) + ["notes.txt"]) - {"bad/link.png"}  # nothing written

    clean = tmp_path / "clean.html"
    scan(tree, "--model", eva_safe_dir, "--html", clean)
    parser = _Entries()
    parser.feed(clean.read_text())
    thumb = _thumb(next(e for e in parser.entries if e["path"] == str(tree / "a.png"))["img"])
    assert thumb.std() > 30  # clean images are shown as they are (noise), not censored


# --- serve -----------------------------------------------------------------------------------

def test_serve_is_wired_to_the_server_module(monkeypatch):
    got = {}
    fake = types.ModuleType("nsfw_safety.server")
    fake.run = lambda args: got.setdefault("port", args.port) and 7
    monkeypatch.setitem(sys.modules, "nsfw_safety.server", fake)
    monkeypatch.setattr(nsfw_safety, "server", fake, raising=False)
    assert cli.main(["serve", "--port", "9123"]) == 7
    assert got == {"port": 9123}


def test_serve_without_the_server_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nsfw_safety.server", None)  # import fails like a missing fastapi
    monkeypatch.delattr(nsfw_safety, "server", raising=False)
    assert cli.main(["serve"]) == 2
    assert "pip install -e '.[server]'" in capsys.readouterr().err
