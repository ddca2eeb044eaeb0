"""nsfw-safety scan --second-opinion (#16): every rule and the band on checkpoints whose outputs are
forced (conftest.forced_dirs: "eva60" says low/medium/high 0.70/0.60/0.45, "eva30" 0.40/0.30/0.20,
"vit20" and "vit90" p_nsfw 0.2 and 0.9), so each decision is known in advance; the second model's
calls counted; each model's scores in the report; resume, load failures, a second model whose
output is not finite, and an animation. Real files; cli.main in-process, one real subprocess."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from checkpoints import write_vit
from test_scan import scan
from nsfw_safety import cascade, cli
from nsfw_safety.scan.reports import read_report
from videos import write_animation


def noise(path: Path, seed: int, size: tuple[int, int] = (24, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def jsonl(report: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in map(json.loads, report.read_text().splitlines())}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("in")
    for i in range(3):
        noise(root / f"{i}.png", i)
    return root


@pytest.fixture
def second_calls(monkeypatch) -> list[int]:
    """The batch sizes the second model is called with: cascade.second_opinion loads it (and only
    it: the scan loads the first itself), and a forward hook counts its images."""
    calls: list[int] = []
    load = cascade.load_detector

    def counted(*args, **kwargs):
        detector = load(*args, **kwargs)
        detector.model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
        return detector

    monkeypatch.setattr(cascade, "load_detector", counted)
    return calls


@pytest.mark.parametrize("first,second,extra,flagged,reason,runs", [
    ("eva60", "vit20", [], False, "vit20 medium 0.20 < 0.50 (second opinion on eva60 0.60)", True),
    ("eva60", "vit20", ["--combine", "mean"], False, "mean medium 0.40 < 0.50 (eva60 0.60, vit20 0.20)", True),
    ("eva60", "vit20", ["--combine", "max"], True, "eva60 medium 0.60 >= 0.50 (max of eva60 0.60, vit20 0.20)", True),
    ("eva60", "vit20", ["--combine", "any"], True, "eva60 medium 0.60 >= 0.50 (any of eva60 0.60, vit20 0.20)", True),
    ("eva60", "vit20", ["--combine", "all"], False, "vit20 medium 0.20 < 0.50 (all of eva60 0.60, vit20 0.20)", True),
    # outside the band the second model never runs, and the first decides
    ("eva60", "vit20", ["--band", "0", "0.4"], True, "eva60 medium 0.60 >= 0.50", False),
    ("eva30", "vit90", [], False, "eva30 medium 0.30 < 0.50", False),  # default band: what the first flags
    ("eva30", "vit90", ["--band", "0.2", "0.4"], True, "vit90 medium 0.90 >= 0.50 (second opinion on eva30 0.30)", True),
    # the band is on --level's score, and defaults to --threshold to 1
    ("eva60", "vit20", ["--level", "high", "--threshold", "0.4"], False,
     "vit20 high 0.20 < 0.40 (second opinion on eva60 0.45)", True),
    ("eva60", "vit20", ["--level", "high", "--threshold", "0.5"], False, "eva60 high 0.45 < 0.50", False),
    # per-level thresholds with both models on every image: each level combined, then each rule
    ("eva60", "vit90", ["--thresholds", "low=0.8,high=0.4", "--combine", "all"], True,
     "eva60 high 0.45 >= 0.40 (all of eva60 0.45, vit90 0.90)", True),
])
def test_rules_and_band_decide_as_known_in_advance(tmp_path, root, forced_dirs, capsys, second_calls,
                                                   first, second, extra, flagged, reason, runs):
    report, page = tmp_path / "r.jsonl", tmp_path / "r.html"
    def given(flag: str, default: str, n: int = 1) -> list[str]:
        return extra[extra.index(flag) + 1:][:n] if flag in extra else [default] * n

    # the settings columns: the rule, and the band where it took effect (none for any and all)
    [combine] = given("--combine", "override")
    band = "" if combine in ("any", "all") else ",".join(repr(float(b)) for b in (
        given("--band", "", 2) if "--band" in extra else [given("--threshold", "0.5")[0], "1"]))
    code, summary, err = scan(capsys, root, "--model", forced_dirs[first], "--second-opinion", forced_dirs[second],
                              *extra, "--report", report, "--html", page)
    assert code == (1 if flagged else 0), err
    assert (summary["flagged"], summary["clean"], summary["errors"]) == ((3, 0, 0) if flagged else (0, 3, 0))
    assert summary["second_opinion"]["model"] == str(forced_dirs[second])
    assert sum(second_calls) == (3 if runs else 0)  # the three images, or none of them
    rows = jsonl(report)
    assert sorted(rows) == ["0.png", "1.png", "2.png"]
    for row in rows.values():
        assert (row["reason"], row["flagged"], row["status"]) == (reason, flagged, "flagged" if flagged else "ok")
        one, two = row["parts"]
        assert (one["model"], one["scored"], two["model"], two["scored"]) == (first, True, second, runs)
        assert one["levels"]["medium"] == pytest.approx(0.60 if first == "eva60" else 0.30, abs=0.005)
        if runs:
            p = 0.2 if second == "vit20" else 0.9
            assert two["levels"] == pytest.approx(dict(neutral=1 - p, low=p, medium=p, high=p), abs=0.005)
            assert set(two["probs"]) == {"sfw", "nsfw"} and two["problem"] is None
            assert row["models"].endswith(f"; {second} low={p:.4f} medium={p:.4f} high={p:.4f}")
        else:  # not zeros that look like scores
            assert (two["levels"], two["probs"], two["problem"]) == (None, None, None)
            assert row["models"].endswith(f"; {second} not scored")
        assert row["models"].startswith(f"{first} low=0.")
        assert (row["second_opinion"], row["combine"], row["band"]) == (str(forced_dirs[second]), combine, band)
    # the review page shows each model's scores under each image's reason
    assert page.read_text().count(f'<div class="models">{rows["0.png"]["models"]}</div>') == 3


def test_parts_have_the_servers_shape(tmp_path, root, forced_dirs, capsys):
    """A JSONL row's parts validate as the server's Part model (the JSON of `serve --second-opinion`)."""
    pytest.importorskip("fastapi")
    from nsfw_safety.server import Part

    report = tmp_path / "r.jsonl"
    scan(capsys, root, "--model", forced_dirs["eva60"], "--second-opinion", forced_dirs["vit20"],
         "--band", "0.7", "1", "--report", report)
    for row in jsonl(report).values():
        assert [Part(**p).model_dump() for p in row["parts"]] == row["parts"]
        assert [p["scored"] for p in row["parts"]] == [True, False]


def test_band_selects_the_images_and_the_csv_shows_who_scored(tmp_path, eva_dir, forced_dirs, capsys):
    """A real subprocess with a first model whose scores spread: the second model scores exactly the
    images whose first score is in the band (bounds set between scores, so the set is known from a
    scan with the first model alone), and the CSV's models column says which it did not."""
    root = tmp_path / "in"
    for i in range(8):
        noise(root / f"{i}.png", 10 + i)
    alone = tmp_path / "alone.jsonl"
    assert scan(capsys, root, "--model", eva_dir, "--report", alone, "--no-fail-on-flagged")[0] == 0
    first = {name: row["medium"] for name, row in jsonl(alone).items()}
    s = sorted(first.values())
    assert min(b - a for a, b in zip(s, s[1:])) > 1e-3, s  # far enough apart for the midpoints below
    lo, hi = (s[1] + s[2]) / 2, (s[5] + s[6]) / 2
    inside = {name for name, v in first.items() if lo <= v <= hi}
    assert len(inside) == 4

    report = tmp_path / "r.csv"
    # fp32 as in this process (conftest pins dtype "auto" to it; the subprocess's could pick bf16)
    r = subprocess.run([sys.executable, "-m", "nsfw_safety.cli", "scan", str(root), "--model", str(eva_dir),
                        "--second-opinion", str(forced_dirs["vit90"]), "--band", repr(lo), repr(hi),
                        "--report", str(report), "--workers", "1", "--dtype", "fp32", "-q"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr  # vit90 flags what it re-checks
    with open(report, newline="") as fh:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(fh)}
    assert len(rows) == 8
    name = Path(eva_dir).name
    for n, row in rows.items():
        v = first[n]
        assert (row["second_opinion"], row["band"], row["combine"]) == (str(forced_dirs["vit90"]),
                                                                        f"{lo!r},{hi!r}", "override")
        assert row["models"].startswith(f"{name} low=")
        if n in inside:
            p = re.search(r"; vit90 low=(\S+) medium=\1 high=\1$", row["models"])
            assert p and float(p[1]) == pytest.approx(0.9, abs=0.005), row["models"]
            assert row["reason"] == f"vit90 medium 0.90 >= 0.50 (second opinion on {name} {v:.2f})"
            assert row["flagged"] == "true"
        else:
            assert row["models"].endswith("; vit90 not scored")
            assert row["reason"] == f"{name} medium {v:.2f} {'>=' if v >= 0.5 else '<'} 0.50"
            assert float(row["medium"]) == pytest.approx(v, abs=1e-6)  # the first model's own score


def test_resume_with_another_second_opinion_never_mixes_rows(tmp_path, root, forced_dirs, capsys):
    report = tmp_path / "r.csv"
    eva60, vit20 = forced_dirs["eva60"], forced_dirs["vit20"]
    code, first, _ = scan(capsys, root, "--model", eva60, "--second-opinion", vit20, "--report", report)
    assert (code, first["scanned"]) == (0, 3)
    assert {(r["second_opinion"], r["band"], r["combine"]) for r in read_report(report)} == {
        (str(vit20), "0.5,1.0", "override")}
    before = report.read_bytes()
    for other in (["--second-opinion", forced_dirs["vit90"]], ["--second-opinion", vit20, "--band", "0.4", "1"],
                  ["--second-opinion", vit20, "--combine", "max"], ["--second-opinion", vit20, "--combine", "any"],
                  []):
        code, summary, err = scan(capsys, root, "--model", eva60, *other, "--report", report)
        assert (code, summary) == (2, None), err
        assert f"was written with --model {eva60} --thresholds medium=0.5 --second-opinion {vit20} " \
               f"--band 0.5 1.0 --combine override, and this run asks for" in err, err
        assert report.read_bytes() == before  # untouched: never mixed
    # the defaults spelled out are the same settings: the run resumes, scoring nothing
    code, again, _ = scan(capsys, root, "--model", eva60, "--second-opinion", vit20, "--band", "0.5", "1",
                          "--combine", "override", "--report", report)
    assert (code, again["skipped"], again["scanned"]) == (0, 3, 0)


@pytest.mark.parametrize("argv,message", [
    (["--band", "0.2", "0.8"], "--band and --combine need --second-opinion MODEL"),
    (["--combine", "max"], "--band and --combine need --second-opinion MODEL"),
    (["--second-opinion", "vit", "--band", "0.8", "0.2"], "bad second opinion: band must have LO <= HI"),
    (["--second-opinion", "vit", "--band", "0.2", "1.5"], "bad second opinion: band must be in [0, 1]"),
    (["--second-opinion", "vit", "--combine", "all", "--band", "0.2", "0.8"], "it takes no band"),
    (["--second-opinion", "vit", "--combine", "median"], "invalid choice: 'median'"),
    (["--second-opinion", "vit", "--thresholds", "low=0.5"], "--thresholds with --second-opinion needs --combine"),
    (["--second-opinion", "./nope"], "--second-opinion './nope': no such directory"),
])
def test_bad_combinations_show_the_usage(capsys, argv, message):
    assert cli.main(["scan", "x", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: nsfw-safety scan ") and message in err, err


def test_a_second_model_that_cannot_load_is_named(tmp_path, root, forced_dirs, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for second, why in (("nope", "unknown model 'nope'"), (empty, "")):
        code, summary, err = scan(capsys, root, "--model", forced_dirs["eva60"], "--second-opinion", second)
        assert (code, summary) == (2, None)
        assert err.startswith(f"error: cannot load the second opinion model {str(second)!r}: ") and why in err, err


@pytest.fixture(scope="module")
def vitnan_dir(tmp_path_factory) -> Path:
    """A ViT whose output is NaN for every image (its classifier's bias is NaN)."""
    path = write_vit(tmp_path_factory.mktemp("nan") / "vitnan", p_nsfw=0.2)
    weights = load_file(path / "model.safetensors")
    weights["classifier.bias"] = torch.full_like(weights["classifier.bias"], torch.nan)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_a_second_model_with_non_finite_output_blocks_the_image(tmp_path, root, forced_dirs, vitnan_dir, capsys):
    report, out = tmp_path / "r.jsonl", tmp_path / "out"
    code, summary, err = scan(capsys, root, "--model", forced_dirs["eva60"], "--second-opinion", vitnan_dir,
                              "--combine", "max", "--report", report, "--out", out)
    assert code == 2 and summary["errors"] == 3
    assert err.count("non-finite model output (vitnan)") == 3  # the printed summary names it too
    for name, row in jsonl(report).items():
        assert (row["status"], row["flagged"], row["reason"]) == ("error", True, "non-finite model output (vitnan)")
        assert row["medium"] is None and row["action"] == "black"
        assert row["parts"][1] == {"model": "vitnan", "scored": True, "levels": dict(neutral=0.0, low=1.0, medium=1.0,
                                   high=1.0), "probs": {"sfw": None, "nsfw": None},
                                   "problem": "non-finite model output"}
        assert row["models"].endswith("; vitnan non-finite model output")
        assert not np.asarray(Image.open(out / name)).any()  # the copy is black, not blurred
    # outside the band it never runs, and cannot block what it did not score
    code, summary, _ = scan(capsys, root, "--model", forced_dirs["eva60"], "--second-opinion", vitnan_dir,
                            "--band", "0", "0.4", "--report", tmp_path / "r2.jsonl")
    assert (code, summary["flagged"], summary["errors"]) == (1, 3, 0)


def test_an_animation_shows_each_models_maximum_over_its_frames(tmp_path, forced_dirs, capsys):
    root, report = tmp_path / "in", tmp_path / "r.jsonl"
    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (24, 32, 3), dtype=np.uint8)) for i in range(3)]
    root.mkdir()
    write_animation(root / "a.gif", frames, [100] * 3)
    for band, reason, scored in (
            ([], "vit90 medium 0.90 >= 0.50 (second opinion on eva60 0.60)", True),
            (["--band", "0", "0.4"], "eva60 medium 0.60 >= 0.50", False)):
        report.unlink(missing_ok=True)
        code, summary, err = scan(capsys, root, "--model", forced_dirs["eva60"], "--second-opinion",
                                  forced_dirs["vit90"], *band, "--report", report)
        assert (code, summary["flagged"]) == (1, 1), err
        row = jsonl(report)["a.gif"]
        assert row["frames"] == "3/3"
        assert row["reason"] == f"checked 3 of 3 frames; flagged 3: 0-2 (0.00-0.20 s); {reason}"
        assert row["medium"] == pytest.approx(0.9 if scored else 0.6, abs=0.005)
        one, two = row["parts"]
        assert (one["model"], one["scored"], one["probs"]) == ("eva60", True, None)
        assert one["levels"]["medium"] == pytest.approx(0.6, abs=0.005)
        assert (two["model"], two["scored"]) == ("vit90", scored)
        if scored:
            assert two["levels"]["medium"] == pytest.approx(0.9, abs=0.005) and two["probs"] is None
        else:
            assert two["levels"] is None and row["models"].endswith("; vit90 not scored")
