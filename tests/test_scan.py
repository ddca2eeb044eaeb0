"""nsfw-safety scan under an unlucky operator: start-up, messages, settings changed between
runs, SIGKILLs, two runs at once, odd names, links, permissions, full disks, outputs inside
the inputs, and the review page across runs. Real files and real processes throughout; the
processes that are killed, run concurrently or run as another user are forked from a warm
interpreter (tests/zygote.py) so that each costs no torch import."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nsfw_safety import cli
from nsfw_safety.scan.files import TEMP_PREFIX
from nsfw_safety.scan.reports import decode_path, encode_path, read_report

HERE = Path(__file__).parent
NOBODY = 65534
HEAVY = ("torch", "timm", "transformers", "PIL", "numpy")


def noise(path: Path, seed: int, size: tuple[int, int] = (24, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def readable_copy(folder: Path, to: Path) -> Path:
    """A copy of ``folder`` at ``to`` that every user may read (for the runs as another user)."""
    shutil.copytree(folder, to)
    subprocess.run(["chmod", "-R", "a+rX", str(to)], check=True)
    return to


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def scan(capsys, *argv) -> tuple[int, dict | None, str]:
    """cli.main in-process; (exit code, JSON summary or None, stderr)."""
    capsys.readouterr()
    code = cli.main(["scan", *map(str, argv), "--workers", "2", "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def rows_by_name(report: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in read_report(report)}


class Zygote:
    """Client of tests/zygote.py: forks real ``nsfw-safety`` processes."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.proc = subprocess.Popen([sys.executable, str(HERE / "zygote.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.n = 0

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        return json.loads(line)

    def start(self, *argv, uid: int | None = None, slow: float = 0.0) -> tuple[int, Path, Path]:
        self.n += 1
        out, err = self.tmp / f"out{self.n}.txt", self.tmp / f"err{self.n}.txt"
        req = {"argv": ["scan", *map(str, argv)], "stdout": str(out), "stderr": str(err), "slow": slow}
        if uid is not None:
            req.update(uid=uid, gid=uid)
        return self._ask(req)["pid"], out, err

    def wait(self, pid: int) -> int:
        return self._ask({"wait": pid})["code"]

    def run(self, *argv, **kw) -> tuple[int, str, str]:
        pid, out, err = self.start(*argv, **kw)
        return self.wait(pid), out.read_text(), err.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def zygote():
    tmp = Path(tempfile.mkdtemp(prefix="nsfw-zygote-"))
    tmp.chmod(0o777)  # children running as nobody write their output here
    z = Zygote(tmp)
    yield z
    z.close()
    shutil.rmtree(tmp)


@pytest.fixture
def shared() -> Path:
    """A folder every user can use (pytest's own are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="nsfw-shared-"))
    root.chmod(0o777)
    yield root
    shutil.rmtree(root)


# --- start-up and messages (#13 front door 4, 5) ----------------------------------------------

PROBE = ("import sys\n"
         "from nsfw_safety import cli\n"
         "code = cli.main(sys.argv[1:])\n"
         f"print('RESULT', code, *sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))\n")


@pytest.mark.parametrize("argv,code", [
    (["--help"], 0), (["--version"], 0), (["scan", "--help"], 0), (["bogus"], 2),
    (["scan", "x", "--thresholds", "low=2"], 2), (["scan", "x", "--threshold", "1.5"], 2),
    (["scan", "x", "--in-place", "--out", "y"], 2), (["scan", "x", "--model", "./nope"], 2),
    (["scan", "x", "--report", "r.txt"], 2), (["scan", "x", "--level", "neutral"], 2),
    (["serve", "--help"], 0), (["serve", "--level", "neutral"], 2), (["serve", "--max-batch", "0"], 2),
    (["serve", "--second-opinion", "vit", "--band", "0.8", "0.2"], 2), (["serve", "--regions", "TAILS"], 2),
    (["serve", "--region-threshold", "x"], 2), (["scan", "x", "--regions", "TAILS"], 2),
    (["scan", "x", "--region-shape", "ellipse"], 2),
    (["scan", "x", "--regions", "exposed", "--region-feather", "2"], 2),
    (["scan", "x", "--regions", "faces", "--region-threshold", "BUTTOCKS=0.5"], 2),
    (["scan", "x", "--regions", "exposed", "--region-model", "nope.onnx"], 2),
    (["scan", "x", "--band", "0.2", "0.8"], 2), (["scan", "x", "--second-opinion", "vit", "--band", "0.8", "0.2"], 2),
    (["scan", "x", "--second-opinion", "vit", "--combine", "any", "--band", "0.2", "0.8"], 2),
    (["scan", "x", "--second-opinion", "vit", "--thresholds", "low=0.5"], 2),
    (["scan", "x", "--second-opinion", "./nope"], 2),
])
def test_parsing_imports_no_model_library(argv, code):
    """--help, --version and argument errors never import torch, timm, transformers, PIL, numpy (nor fastapi)."""
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    result = [line for line in r.stdout.splitlines() if line.startswith("RESULT")]
    assert result == [f"RESULT {code}"], r.stdout + r.stderr
    probe = subprocess.run([sys.executable, "-X", "importtime", "-m", "nsfw_safety.cli", *argv],
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == code
    imported = {line.split("|")[-1].strip().split(".")[0] for line in probe.stderr.splitlines()
                if line.startswith("import time:")}
    assert "nsfw_safety" in imported and not imported & {*HEAVY, "fastapi"}, sorted(imported & {*HEAVY, "fastapi"})


def test_public_names_still_import():
    r = subprocess.run([sys.executable, "-c",
                        "import sys, nsfw_safety\n"
                        "assert 'torch' not in sys.modules\n"
                        "from nsfw_safety import *\n"
                        "from nsfw_safety import SafetyFilter, load_detector, Policy, ACTIONS, REGISTRY\n"
                        "assert SafetyFilter.__module__ == 'nsfw_safety.filter' and 'eva' in REGISTRY\n"
                        "assert set(nsfw_safety.__all__) <= set(dir(nsfw_safety))\n"
                        "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "True", r.stderr


def test_messages(tmp_path, eva_nsfw_dir, capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"nsfw-safety {__import__('nsfw_safety').__version__}"
    root = tmp_path / "in"
    for i in range(3):
        noise(root / f"{i}.png", i)
    # a path-like --model that does not exist is not looked up on the hub
    assert cli.main(["scan", str(root), "--model", "./nope"]) == 2
    err = capsys.readouterr().err
    assert "--model './nope': no such directory" in err and "hub" not in err
    # a bad combination shows the scan usage
    assert cli.main(["scan", str(root), "--in-place", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: nsfw-safety scan ") and "--in-place cannot be combined" in err
    assert cli.main(["scan", str(root), "--force"]) == 2
    assert "--force only applies to --in-place" in capsys.readouterr().err
    # the summary lists the flagged files
    assert cli.main(["scan", str(root), "--model", str(eva_nsfw_dir), "--workers", "1"]) == 1
    out, err = capsys.readouterr()
    assert "Flagged: 3" in out and err == ""
    for i in range(3):
        assert f"  flagged: {root / f'{i}.png'} (medium 1.00 >= 0.50)" in out
    # -q: nothing on stdout or stderr unless there are errors; errors are still printed
    assert cli.main(["scan", str(root), "--model", str(eva_nsfw_dir), "-q"]) == 1
    assert capsys.readouterr() == ("", "")
    (root / "bad.png").write_bytes(b"not an image")
    assert cli.main(["scan", str(root), "--model", str(eva_nsfw_dir), "-q"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().startswith(str(root / "bad.png")) and "not a readable image" in err
    assert len(err.strip().splitlines()) == 1


# --- resume with other settings (#13 scan 1) ---------------------------------------------------

def test_resume_with_other_settings_refuses(tmp_path, eva_dir, eva_safe_dir, capsys, monkeypatch):
    root, report = tmp_path / "in", tmp_path / "r.csv"
    for i in range(4):
        noise(root / f"{i}.png", i)
    code, first, _ = scan(capsys, root, "--model", eva_dir, "--report", report)
    assert first["scanned"] == 4 and first["model"] == str(eva_dir)
    rows = read_report(report)
    assert {(r["model"], r["revision"], r["rules"]) for r in rows} == {(str(eva_dir), "", "medium=0.5")}
    before = report.read_bytes()
    for other in (["--threshold", "0.9"], ["--thresholds", "low=0.5"], ["--model", eva_safe_dir],
                  ["--revision", "v2"]):
        argv = ["--model", eva_dir, *other] if other[0] != "--model" else other
        code, summary, err = scan(capsys, root, *argv, "--report", report)
        assert (code, summary) == (2, None)
        assert "was written with --model" in err and "--thresholds medium=0.5" in err, err
        assert "start fresh: pass another --report, or delete" in err
        assert report.read_bytes() == before  # untouched: never mixed
    # the same settings spelled differently resume (a relative model path, --thresholds)
    monkeypatch.chdir(eva_dir.parent)
    code, again, _ = scan(capsys, root, "--model", eva_dir.name, "--thresholds", "medium=0.5", "--report", report)
    assert (again["skipped"], again["scanned"]) == (4, 0)
    assert (again["flagged"], again["clean"]) == (first["flagged"], first["clean"])


# --- crash-consistent moves (#13 scan 2) -------------------------------------------------------

def test_move_flagged_survives_repeated_sigkill(tmp_path, eva_dir, zygote):
    """SIGKILL a --move-flagged scan at random instants, resume each time, and check that no
    original is ever lost; at the end each is exactly once in the tree or the quarantine, with
    the row that says where. Every link, unlink, rename and fsync is slowed; half the kills
    land anywhere in the first 0.8 s of a run (model load, recovery, walk, first batches), the
    other half 0-80 ms after the report grew (rows announced, their moves under way)."""
    root, quarantine, report = tmp_path / "in", tmp_path / "q", tmp_path / "r.jsonl"
    originals = {}
    for i in range(80):  # more than 10 short runs can get through, so that every kill lands mid-run
        p = noise(root / f"d{i % 3}" / f"{i:02d}.png", 100 + i)
        originals[digest(p)] = p
    argv = (root, "--model", eva_dir, "--move-flagged", quarantine, "--report", report,
            "--batch-size", "2", "--workers", "1", "--no-fail-on-flagged", "-q")
    rng = random.Random(13)
    kills = attempts = halfway = 0
    while kills < 10 and attempts < 30:
        attempts += 1
        size = report.stat().st_size if report.exists() else 0
        pid, _, err = zygote.start(*argv, slow=0.02)
        if attempts % 2:
            time.sleep(rng.uniform(0.0, 0.8))
        else:
            deadline = time.time() + 30
            while time.time() < deadline and not (report.exists() and report.stat().st_size > size):
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.08))
        os.kill(pid, signal.SIGKILL)
        code = zygote.wait(pid)
        if code == -signal.SIGKILL:
            kills += 1
        else:
            assert code == 0, err.read_text()
        found = [digest(p) for p in files_under(root) + files_under(quarantine) if not p.name.startswith(TEMP_PREFIX)]
        assert set(originals) <= set(found), f"lost after kill {kills}"  # nothing lost at any instant
        if report.exists():  # was the kill between announcing a move and finishing it?
            halfway += any(r["moved_to"] and os.path.lexists(r["path"]) for r in read_report(report))
    assert kills >= 8, f"only {kills} kills landed mid-run in {attempts} attempts"
    code, _, err = zygote.run(*argv)
    assert code == 0, err

    rows = {r["path"]: r for r in read_report(report)}
    everywhere = files_under(root) + files_under(quarantine)
    assert not [p for p in everywhere if p.name.startswith(TEMP_PREFIX)]
    moved = 0
    for h, original in originals.items():
        where = [p for p in everywhere if digest(p) == h]
        assert len(where) == 1, (original, where)  # none lost, none duplicated
        row = rows[str(original)]
        if where[0] == original:
            assert row["status"] == "ok" and row["moved_to"] == ""
        else:
            assert row["status"] == "flagged" and row["moved_to"] == str(where[0]) and "move" in row["action"]
            assert where[0].is_relative_to(quarantine)
            moved += 1
    assert 0 < moved < 80 and len(rows) == 80
    print(f"survived {kills} SIGKILLs in {attempts} runs ({halfway} mid-move); {moved} of 80 moved")


def test_settling_announced_moves(tmp_path):
    """Every state a kill can leave a move in, settled without ever deleting the only copy."""
    from nsfw_safety.scan.outputs import move, recover_move

    def state(name: str, data: bytes = b"png bytes") -> tuple[dict, Path, Path]:
        src, target = tmp_path / "in" / name, tmp_path / "q" / name
        src.parent.mkdir(exist_ok=True)
        target.parent.mkdir(exist_ok=True)
        src.write_bytes(data)
        return {"path": str(src), "moved_to": str(target)}, src, target

    row, src, target = state("announced.png")  # killed before the link: scan it again
    assert recover_move(row) is False and src.exists() and not target.exists()
    row, src, target = state("linked.png")  # killed between the link and the unlink: finish
    os.link(src, target)
    assert recover_move(row) is True and not src.exists() and target.read_bytes() == b"png bytes"
    row, src, target = state("copied.png")  # across file systems, copy published: finish
    target.write_bytes(b"png bytes")
    assert recover_move(row) is True and not src.exists()
    row, src, target = state("other.png")  # the name holds something else: keep both, scan again
    target.write_bytes(b"someone else's")
    assert recover_move(row) is False and src.read_bytes() == b"png bytes"
    assert target.read_bytes() == b"someone else's"
    row, src, target = state("done.png")  # finished
    move(str(src), target)
    assert recover_move(row) is True and target.read_bytes() == b"png bytes"
    with pytest.raises(FileExistsError):  # a move never replaces a file
        move(str(tmp_path / "in/other.png"), tmp_path / "q/other.png")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    from nsfw_safety.scan.files import write_atomic

    target = tmp_path / "t.bin"
    target.write_bytes(b"old")

    def fail(fh):
        fh.write(b"half")
        raise OSError(28, "No space left on device")

    for overwrite in (True, False):
        with pytest.raises(OSError):
            write_atomic(target, fail, overwrite=overwrite)
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"] and target.read_bytes() == b"old"
    assert write_atomic(target, lambda fh: fh.write(b"new"), overwrite=False) == tmp_path / "t-1.bin"
    assert write_atomic(target, lambda fh: fh.write(b"new"), overwrite=False, reuse_identical=True) == \
        tmp_path / "t-1.bin"  # the same bytes: not copied again
    assert write_atomic(target, lambda fh: fh.write(b"new"), overwrite=True) == target
    assert target.read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 2


# --- concurrent runs (#13 scan 3) --------------------------------------------------------------

def test_second_run_on_the_same_report_refuses(tmp_path, eva_dir, zygote):
    root, report = tmp_path / "in", tmp_path / "r.jsonl"
    for i in range(12):
        noise(root / f"{i:02d}.png", i)
    argv = (root, "--model", eva_dir, "--report", report, "--batch-size", "2", "--workers", "1",
            "--no-fail-on-flagged")
    first, _, err1 = zygote.start(*argv, slow=0.2)  # each report fsync waits: a long run
    lock = Path(f"{report}.lock")
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text() == str(first)) and time.time() < deadline:
        time.sleep(0.02)
    code, _, err = zygote.run(*argv)
    assert code == 2
    assert f"another scan is writing the report {str(report)!r} (pid {first})" in err and "Traceback" not in err
    assert zygote.wait(first) == 0, err1.read_text()
    lines = report.read_text().splitlines()
    assert len(lines) == 12 and len({json.loads(x)["path"] for x in lines}) == 12  # nothing lost
    # a killed holder leaves no lock behind
    argv = (root, "--model", eva_dir, "--report", tmp_path / "r2.csv", "--batch-size", "2", "--workers", "1",
            "--no-fail-on-flagged")
    pid, _, _ = zygote.start(*argv, slow=0.2)
    while not Path(f"{tmp_path / 'r2.csv'}.lock").exists():
        time.sleep(0.02)
    time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    assert zygote.wait(pid) == -signal.SIGKILL
    assert zygote.run(*argv)[0] == 0


# --- names (#13 scan 4) ------------------------------------------------------------------------

def test_path_encoding_is_reversible():
    for raw in (b"/a/b.png", b"/a/caf\xe9.png", b"/a/new\nline.png", b'"quoted".png', b"/a/back\\slash\xff.png",
                b"/a/\xc3\xa9t\xc3\xa9.png", b'/a/"', b"/\\x41"):
        path = os.fsdecode(raw)
        text = encode_path(path)
        text.encode("utf-8")  # always valid text
        assert os.fsencode(decode_path(text)) == raw
        assert (text == path) == (b"\xe9" not in raw and b"\xff" not in raw and b"\n" not in raw
                                  and not raw.startswith(b'"'))
    assert encode_path(os.fsdecode(b"/a/caf\xe9.png")) == '"/a/caf\\xe9.png"'


def test_non_utf8_names_become_rows(tmp_path, eva_nsfw_dir, capsys):
    root = tmp_path / "in"
    noise(root / "plain.png", 1)
    bad = os.fsdecode(os.fsencode(str(root)) + b"/caf\xe9.png")
    ctrl = str(root / "line\nbreak.png")
    noise(Path(bad), 2)
    noise(Path(ctrl), 3)
    for report in (tmp_path / "r.csv", tmp_path / "r.jsonl"):
        code, summary, err = scan(capsys, root, "--model", eva_nsfw_dir, "--report", report, "--html",
                                  tmp_path / "r.html", "--out", tmp_path / "out")
        assert (code, summary["files"], summary["errors"]) == (1, 3, 0), err
        report.read_bytes().decode("utf-8")  # valid UTF-8
        rows = {r["path"]: r for r in read_report(report)}
        assert set(rows) == {str(root / "plain.png"), bad, ctrl}
        assert os.fsencode(rows[bad]["path"]).endswith(b"/caf\xe9.png")
        assert os.path.exists(rows[bad]["output"]) and os.fsencode(rows[bad]["output"]).endswith(b"caf\xe9.png")
        assert re.search(r"caf\\+xe9\.png", report.read_text())  # the escaped byte, as text
        page = (tmp_path / "r.html").read_bytes().decode("utf-8")
        assert "caf\\xe9.png" in page and "line\\x0abreak.png" in page
        assert ("\\xe9" in json.dumps(summary["flagged_files"]))
        code, again, _ = scan(capsys, root, "--model", eva_nsfw_dir, "--report", report)
        assert (again["skipped"], again["scanned"]) == (3, 0)  # the names read back match the files
        shutil.rmtree(tmp_path / "out")


# --- links (#13 scan 5) ------------------------------------------------------------------------

def test_links(tmp_path, eva_nsfw_dir, capsys):
    root, outside = tmp_path / "in", tmp_path / "outside"
    noise(root / "real/a.png", 1)
    noise(outside / "x.png", 2)
    noise(outside / "y.png", 3)
    (root / "inner").symlink_to(root / "real")           # a folder link inside: not walked twice
    (root / "loop").symlink_to(root)                      # a loop
    (root / "away").symlink_to(outside)                   # a folder link outside: an error row
    (root / "alias.png").symlink_to(root / "real/a.png")  # a file link to a scanned file: skipped
    (root / "far.png").symlink_to(outside / "y.png")      # a file link outside: scanned through it
    report = tmp_path / "r.csv"
    code, s, _ = scan(capsys, root, "--model", eva_nsfw_dir, "--report", report)
    rows = {r["path"]: r for r in read_report(report)}
    assert set(rows) == {str(root / "real/a.png"), str(root / "away"), str(root / "far.png")}
    assert rows[str(root / "away")]["status"] == "error"
    assert "link to a folder outside the scanned folders" in rows[str(root / "away")]["reason"]
    assert code == 2  # x.png under the roots was not checked: never exit 0 or 1

    # with the outside folder given too, every image is checked once: no error
    code, s, _ = scan(capsys, root, outside, "--model", eva_nsfw_dir)
    assert (code, s["files"], s["errors"]) == (1, 3, 0)

    # --in-place never replaces a link, and says so; the real file is censored
    before = {p: digest(p) for p in (outside / "x.png", outside / "y.png")}
    report = tmp_path / "r2.csv"
    code, s, _ = scan(capsys, root, "--model", eva_nsfw_dir, "--in-place", "--action", "black", "--report", report)
    rows = {r["path"]: r for r in read_report(report)}
    assert rows[str(root / "far.png")]["status"] == "error"
    assert "is a symbolic link: not overwritten" in rows[str(root / "far.png")]["reason"]
    assert rows[str(root / "far.png")]["action"] == "none"
    assert (root / "far.png").is_symlink() and {p: digest(p) for p in before} == before
    assert rows[str(root / "real/a.png")]["action"] == "black"
    assert np.asarray(Image.open(root / "real/a.png")).max() == 0
    assert (root / "alias.png").is_symlink()


def test_folder_that_cannot_be_listed_is_an_error_row(shared, eva_safe_dir, zygote):
    """As nobody: a folder it may not list hides images, so the scan cannot exit 0."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run as nobody")
    model = readable_copy(eva_safe_dir, shared / "safe")
    root = shared / "in"
    noise(root / "open/a.png", 1)
    noise(root / "closed/b.png", 2)
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    (root / "closed").chmod(0o700)
    report = shared / "r.csv"
    code, out, err = zygote.run(root, "--model", model, "--report", report, uid=NOBODY)
    rows = {r["path"]: r for r in read_report(report)}
    assert code == 2, err
    assert rows[str(root / "closed")]["reason"] == "error: cannot list folder: Permission denied"
    assert rows[str(root / "open/a.png")]["status"] == "ok" and len(rows) == 2


# --- --in-place keeps what it should (#13 scan 6) ----------------------------------------------

def test_in_place_keeps_mode_and_owner(tmp_path, eva_nsfw_dir, capsys):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    root, report = tmp_path / "in", tmp_path / "r.csv"
    private = noise(root / "private.png", 1)
    os.chown(private, NOBODY, NOBODY)
    private.chmod(0o600)
    frozen = noise(root / "frozen.png", 2)
    frozen.chmod(0o444)
    old = {p: (p.stat(), digest(p)) for p in (private, frozen)}
    time.sleep(0.01)
    code, _, _ = scan(capsys, root, "--model", eva_nsfw_dir, "--in-place", "--report", report)
    rows = rows_by_name(report)
    st = private.stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o600, NOBODY, NOBODY)
    assert digest(private) != old[private][1] and st.st_mtime_ns > old[private][0].st_mtime_ns  # mtime: now
    assert rows["private.png"]["action"] == "blur" and rows["private.png"]["mtime_ns"] == st.st_mtime_ns
    # a read-only file is an error row, untouched, unless --force
    assert code == 2 and rows["frozen.png"]["status"] == "error"
    assert "is read-only: not overwritten (--force overwrites it)" in rows["frozen.png"]["reason"]
    assert digest(frozen) == old[frozen][1]
    code, _, _ = scan(capsys, root, "--model", eva_nsfw_dir, "--in-place", "--force", "--report", report)
    assert code == 1 and digest(frozen) != old[frozen][1] and frozen.stat().st_mode & 0o7777 == 0o444


def test_in_place_as_another_user(shared, eva_nsfw_dir, zygote):
    """As nobody, in a folder nobody may write: a file owned by root cannot be replaced without
    changing its owner, so it is an error row, with or without --force, and stays as it was."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run as nobody")
    model = readable_copy(eva_nsfw_dir, shared / "nsfw")
    root = shared / "in"
    theirs = noise(root / "roots.png", 1)   # root's, 0644: read-only for nobody
    mine = noise(root / "mine.png", 2)
    os.chown(root, NOBODY, NOBODY)
    os.chown(mine, NOBODY, NOBODY)
    mine.chmod(0o640)
    before = digest(theirs)
    report = shared / "r.csv"
    code, _, err = zygote.run(root, "--model", model, "--in-place", "--report", report, uid=NOBODY)
    rows = rows_by_name(report)
    assert code == 2, err
    assert "is read-only: not overwritten" in rows["roots.png"]["reason"]
    assert rows["mine.png"]["action"] == "blur" and (mine.stat().st_mode & 0o777, mine.stat().st_uid) == (0o640, NOBODY)
    report.unlink()
    code, _, err = zygote.run(root, "--model", model, "--in-place", "--force", "--report", report, uid=NOBODY)
    rows = rows_by_name(report)
    assert code == 2 and "not overwritten: cannot keep its owner (uid 0" in rows["roots.png"]["reason"], rows
    assert digest(theirs) == before and theirs.stat().st_uid == 0 and theirs.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in root.iterdir()) == ["mine.png", "roots.png"]  # no temporary file left


# --- exit codes and failures (#13 scan 7) ------------------------------------------------------

def _tmpfs(mnt: Path, size: str):
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs (root only); skipped where it cannot be mounted."""
    yield from _tmpfs(tmp_path / "small", "256k")


@pytest.fixture
def other_fs(tmp_path):
    """Another file system (an 8 MiB tmpfs; root only)."""
    yield from _tmpfs(tmp_path / "other", "8m")


def test_move_across_file_systems(tmp_path, other_fs, eva_nsfw_dir, capsys):
    root, report = tmp_path / "in", tmp_path / "r.csv"
    before = {digest(noise(root / f"sub/{i}.png", i)): i for i in range(3)}
    (root / "sub/link.png").symlink_to(tmp_path / "elsewhere.png")
    noise(tmp_path / "elsewhere.png", 9)
    code, s, _ = scan(capsys, root, "--model", eva_nsfw_dir, "--move-flagged", other_fs / "q", "--report", report)
    rows = rows_by_name(report)
    assert {digest(p): int(p.stem) for p in (other_fs / "q/sub").glob("[0-9].png")} == before
    assert sorted(p.name for p in (root / "sub").iterdir()) == ["link.png"]  # originals gone, link stays
    assert all(rows[f"{i}.png"]["moved_to"] == str(other_fs / f"q/sub/{i}.png") for i in range(3))
    assert code == 2 and "error moving: [Errno 18] a link is not moved to another file system" in \
        rows["link.png"]["reason"]
    assert not [p for p in (other_fs / "q/sub").iterdir() if p.name.startswith(TEMP_PREFIX)]


def _fill(folder: Path) -> None:
    try:
        with open(folder / "filler", "wb", buffering=0) as fh:
            while True:
                fh.write(b"\0" * 4096)
    except OSError:
        pass


def test_full_disk_exits_2_without_traceback(tmp_path, full_disk, eva_dir, zygote):
    root = tmp_path / "in"
    for i in range(6):
        noise(root / f"{i}.png", i, size=(64, 64))
    _fill(full_disk)
    for argv in (["--report", full_disk / "r.csv"], ["--html", full_disk / "r.html"]):
        code, out, err = zygote.run(root, "--model", eva_dir, *argv)
        assert code == 2 and "Traceback" not in err, err
        assert "No space left on device" in err
        assert ("cannot use the report" in err or "cannot write the report" in err) if "r.csv" in str(argv[1]) \
            else "cannot write the HTML page" in err
    assert [p.name for p in full_disk.iterdir() if p.name.startswith(TEMP_PREFIX)] == []


def test_report_on_dev_full_exits_2(tmp_path, eva_dir, capsys):
    """Without root: a report whose writes fail with ENOSPC (a link to /dev/full)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    noise(tmp_path / "in/a.png", 1)
    (tmp_path / "r.csv").symlink_to("/dev/full")
    code, summary, err = scan(capsys, tmp_path / "in", "--model", eva_dir, "--report", tmp_path / "r.csv")
    assert (code, summary) == (2, None)
    assert err == f"error: cannot use the report {str(tmp_path / 'r.csv')!r}: No space left on device\n"


def test_full_disk_copy_safe_leaves_no_partial_copy(tmp_path, full_disk, eva_safe_dir, capsys):
    root = tmp_path / "in"
    for i in range(8):
        noise(root / f"{i}.png", i, size=(96, 128))  # ~37 KB each: about 6 fit in 256 KiB
    out = full_disk / "out"
    code, s, _ = scan(capsys, root, "--model", eva_safe_dir, "--out", out, "--copy-safe")
    assert code == 2 and 0 < s["errors"] < 8
    assert all("No space left on device" in e["reason"] for e in s["error_files"])
    copies = {p.name: digest(p) for p in out.iterdir()}
    assert len(copies) == 8 - s["errors"]
    assert all(copies[n] == digest(root / n) for n in copies)  # complete copies only
    assert not any(n.startswith(TEMP_PREFIX) for n in copies)


def test_temp_files_of_a_killed_run_are_removed_not_scanned(tmp_path, eva_dir, capsys):
    root, out, report = tmp_path / "in", tmp_path / "out", tmp_path / "r.csv"
    noise(root / "a.png", 1)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [root / f"{TEMP_PREFIX}{dead.pid}-0123abcd", out / f"{TEMP_PREFIX}{dead.pid}-89abcdef",
             tmp_path / f"{TEMP_PREFIX}{dead.pid}-00000000"]
    live = root / f"{TEMP_PREFIX}{os.getppid()}-11111111"  # a live process's: kept
    for p in [*stale, live]:
        p.parent.mkdir(exist_ok=True)
        noise(tmp_path / "x.png", 5).replace(p)
    code, s, _ = scan(capsys, root, root / stale[0].name, "--model", eva_dir, "--out", out, "--report", report)
    assert not any(p.exists() for p in stale) and live.exists()
    assert [r["path"] for r in read_report(report)] == [str(root / "a.png"), str(stale[0])]
    assert read_report(report)[1]["status"] == "error"  # named explicitly: it no longer exists


# --- outputs inside the inputs (#13 scan 8) ----------------------------------------------------

def test_output_folder_equal_to_a_root_is_refused(tmp_path, eva_nsfw_dir, capsys):
    root = tmp_path / "in"
    noise(root / "a.png", 1)
    (tmp_path / "alias").symlink_to(root)
    for flag, folder in (("--out", root), ("--move-flagged", root / "."), ("--out", tmp_path / "alias")):
        code, _, err = scan(capsys, root, "--model", eva_nsfw_dir, flag, folder)
        assert code == 2 and err.startswith("usage: nsfw-safety scan") and "is the scanned folder" in err, err
    assert sorted(p.name for p in root.iterdir()) == ["a.png"]
    # inside the root (and the thumbnails of a report inside it): skipped on every run
    args = (root, "--model", eva_nsfw_dir, "--out", root / "o", "--move-flagged", root / "q",
            "--report", root / "r.csv", "--html", root / "r.html")
    code, s, _ = scan(capsys, *args)
    assert (code, s["files"]) == (1, 1) and any((root / "r.csv.thumbs").iterdir())
    noise(root / "b.png", 2)
    code, s, _ = scan(capsys, *args)
    assert (code, s["files"], s["scanned"]) == (1, 1, 1)  # b.png only: no copy, no thumbnail rescanned


# --- the review page survives a re-run (#13 scan 9) --------------------------------------------

def _thumbs(page: str) -> dict[str, np.ndarray | None]:
    out = {}
    for m in re.finditer(r'<div class="card entry (\w+)" data-path="([^"]+)"[^>]*><div class="thumb">(.*?)</div>',
                         page):
        src = re.search(r'src="data:image/jpeg;base64,([^"]+)"', m.group(3))
        out[m.group(2)] = (np.asarray(Image.open(io.BytesIO(base64.b64decode(src.group(1)))).convert("RGB"))
                           if src else None)
    return out


def test_review_page_keeps_earlier_thumbnails(tmp_path, eva_dir, capsys):
    root, report, page = tmp_path / "in", tmp_path / "r.jsonl", tmp_path / "r.html"
    for i in range(5):
        noise(root / f"{i}.png", i)
    args = (root, "--model", eva_dir, "--report", report, "--html", page, "--action", "black", "--level", "low",
            "--move-flagged", tmp_path / "q")
    code, first, _ = scan(capsys, *args)
    assert first["flagged"] and first["clean"]  # both kinds
    noise(root / "5.png", 5)
    code, second, _ = scan(capsys, *args)
    assert (second["skipped"], second["scanned"]) == (first["clean"], 1)
    thumbs = _thumbs(page.read_text())
    rows = {r["path"]: r for r in read_report(report)}
    assert set(thumbs) == set(rows) and len(rows) == 6  # the moved files too
    for path, thumb in thumbs.items():
        assert thumb is not None, path  # earlier runs' files too
        if rows[path]["status"] == "flagged":
            assert thumb.max() <= 3  # censored (black), also when kept from the first run
        else:
            assert thumb.std() > 30  # clean: the picture itself
    store = Path(f"{report}.thumbs")
    assert len(list(store.glob("*.jpg"))) == 6
    changed = next(p for p in rows if rows[p]["status"] == "ok")
    noise(Path(changed), 50, size=(30, 30))  # changed: its old thumbnail goes
    scan(capsys, *args)
    assert len(list(store.glob("*.jpg"))) == 6
    assert all(t is not None for t in _thumbs(page.read_text()).values())
