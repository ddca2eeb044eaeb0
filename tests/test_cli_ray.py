"""``nsfw-safety scan --engine ray`` in real subprocesses, each starting its own local Ray (three
start-ups in all: a scan with an unreadable file, an animation and a video, then a re-run that
skips everything; a second
opinion in region mode, whose re-runs with other settings are refused before Ray starts)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray")
import pyarrow.parquet as pq  # noqa: E402
from region_images import astronaut, wheel_scene  # noqa: E402
from videos import pictures, write_animation, write_video  # noqa: E402

from nsfw_safety import SafetyFilter, load_detector  # noqa: E402
from nsfw_safety.cli import main  # noqa: E402


def _scan(*args: str) -> subprocess.CompletedProcess:
    """fp32 as the suite pins in-process (conftest), so the values compare exactly."""
    return subprocess.run([sys.executable, "-m", "nsfw_safety.cli", "scan", "--engine", "ray", *args, "--json", "--dtype", "fp32"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"})


def _one_flagged_in_the_middle(eva_dir) -> list[Image.Image]:
    """Five frames whose "low" score (tiny model, fp32) is far below 0.6 but for the middle one's:
    the two lowest-scored pictures alternate around the highest (margins for GIF colours and H.264)."""
    pics = pictures(12)
    low = load_detector(str(eva_dir), dtype="fp32").predict(pics).levels[:, 1].tolist()
    ranked = sorted(range(12), key=low.__getitem__)
    assert low[ranked[1]] < 0.1 and low[ranked[-1]] > 0.9, low
    return [pics[i] for i in (ranked[0], ranked[1], ranked[-1], ranked[0], ranked[1])]


def test_scan_engine_ray_errors_and_resume(tmp_path, eva_dir, capsys):
    src, out, report = tmp_path / "src", tmp_path / "out", tmp_path / "report.csv"
    (src / "sub").mkdir(parents=True)
    images = {}
    for i in range(5):
        path = src / ("sub" if i % 2 else "") / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 40 + i, 3), dtype=np.uint8)).save(path)
        images[str(path)] = Image.open(path)
    (src / "broken.png").write_bytes(b"not an image at all")
    pytest.importorskip("av")
    frames = _one_flagged_in_the_middle(eva_dir)
    moving = [str(write_animation(src / "anim.gif", frames, [100] * 5)),
              str(write_video(src / "sub" / "clip.mp4", [np.asarray(f) for f in frames], audio=False))]

    first = _scan(str(src), "--out", str(out), "--model", str(eva_dir), "--level", "low", "--threshold", "0.6",
                  "--report", str(report))
    assert first.returncode == 2, first.stderr[-3000:]
    summary = json.loads(first.stdout)
    assert (summary["files"], summary["scanned"], summary["skipped"], summary["errors"]) == (8, 8, 0, 1)
    assert summary["flagged"] + summary["clean"] == 7 and summary["parquet"] == str(out)
    assert str(src / "broken.png") in first.stderr

    # the Parquet rows and the report: one per file, values as the library's SafetyFilter gives them
    table = pq.read_table(out)
    assert sorted(table.column("id").to_pylist()) == sorted([*images, *moving, str(src / "broken.png")])
    result = SafetyFilter(load_detector(str(eva_dir)), level="low", threshold=0.6)(list(images.values()))
    with open(report, newline="") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    assert len(rows) == 8
    bad = rows[str(src / "broken.png")]
    assert (bad["status"], bad["flagged"], bad["low"], bad["rules"]) == ("error", "true", "", "low=0.6")
    for (path, image), flagged, reason, scores in zip(images.items(), result.flagged, result.reasons,
                                                      result.scores.to_dicts()):
        row = rows[path]
        assert (row["status"], row["flagged"], row["reason"]) == ("flagged" if flagged else "ok",
                                                                  "true" if flagged else "false", reason)
        assert (int(row["width"]), int(row["height"])) == image.size
        for level, value in scores["levels"].items():
            assert float(row[level]) == pytest.approx(value, abs=1e-6)
    assert summary["flagged"] == sum(result.flagged) + 2

    # the animation and the video: every frame checked, one row each, the local scan's values
    local_report = tmp_path / "local.csv"
    assert main(["scan", str(src), "--model", str(eva_dir), "--level", "low", "--threshold", "0.6", "--dtype", "fp32",
                 "--report", str(local_report), "--json"]) == 2
    capsys.readouterr()
    with open(local_report, newline="") as fh:
        local = {r["path"]: r for r in csv.DictReader(fh)}
    for path in moving:
        row, lib = rows[path], local[path]
        assert lib["frames"] == "5/5" and lib["reason"].startswith("checked 5 of 5 frames; flagged 1: 2 ("), lib
        for k in ("frames", "status", "flagged", "reason", "width", "height"):
            assert row[k] == lib[k], (path, k)
        assert row["action"] == "blur"  # as for still images: the filter's censoring (the local scan's: what it wrote)
        for level in ("neutral", "low", "medium", "high"):
            assert float(row[level]) == pytest.approx(float(lib[level]), abs=1e-6)
    assert {r["frames"] for p, r in rows.items() if p not in moving} == {""}

    # a re-run skips every file, writes no Parquet file, and answers the same
    files = sorted(out.glob("*.parquet"))
    again = _scan(str(src), "--out", str(out), "--model", str(eva_dir), "--level", "low", "--threshold", "0.6")
    assert again.returncode == 2, again.stderr[-3000:]
    summary2 = json.loads(again.stdout)
    assert (summary2["files"], summary2["scanned"], summary2["skipped"], summary2["errors"]) == (8, 0, 8, 1)
    assert sorted(out.glob("*.parquet")) == files and pq.read_table(out).num_rows == 8


def test_engine_ray_arguments_checked_without_ray(tmp_path, capsys):
    """Usage errors answer before Ray starts (or is imported)."""
    assert main(["scan", "--engine", "ray", str(tmp_path)]) == 2
    assert "--engine ray needs --out DIR" in capsys.readouterr().err
    assert main(["scan", "--engine", "ray", str(tmp_path), "--out", str(tmp_path / "o"), "--html", "x.html"]) == 2
    assert "--html not available with --engine ray" in capsys.readouterr().err
    assert main(["scan", str(tmp_path), "--address", "auto"]) == 2
    assert "--address and --actors need --engine ray" in capsys.readouterr().err


def test_region_model_that_cannot_load_refused_before_ray(tmp_path, eva_dir, capsys):
    """Named, exit 2, without starting Ray, and the folder records no settings."""
    bad, out = tmp_path / "bad.onnx", tmp_path / "out"
    bad.write_bytes(b"not an onnx model")
    assert main(["scan", "--engine", "ray", str(tmp_path), "--out", str(out), "--model", str(eva_dir),
                 "--regions", "exposed", "--region-model", str(bad)]) == 2
    assert f"error: cannot load the region model {bad}: " in capsys.readouterr().err
    assert not (out / "_nsfw-safety-settings.json").exists()


def test_settings_mismatch_refused(tmp_path, eva_dir, capsys):
    """A folder scored with other rules is refused before Ray starts: resume would mix them."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "_nsfw-safety-settings.json").write_text(json.dumps({"model": "x", "revision": "", "rules": "low=0.1"}))
    assert main(["scan", "--engine", "ray", str(tmp_path), "--out", str(out), "--model", str(eva_dir)]) == 2
    assert "use another --out" in capsys.readouterr().err


def test_second_opinion_and_regions_as_the_local_scan_gives_them(tmp_path, forced_dirs, capsys):
    """A cascade of forced checkpoints in region mode with the real NudeNet model: the summary's
    second_opinion and regions, and each report row's parts, models, regions and settings columns, are
    the local engine's; a re-run with another second opinion or other region settings is refused."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    Image.fromarray(wheel_scene()).save(src / "scene.png")
    Image.fromarray(astronaut()).save(src / "face.png")
    eva60, vit90, vit20 = (str(forced_dirs[k]) for k in ("eva60", "vit90", "vit20"))
    flags = ["--model", eva60, "--second-opinion", vit90, "--band", "0.55", "1", "--regions", "exposed",
             "--region-expand", "0.1"]
    run = _scan(str(src), "--out", str(out), *flags, "--report", str(tmp_path / "ray.jsonl"))
    assert run.returncode == 1, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    capsys.readouterr()
    assert main(["scan", str(src), *flags, "--report", str(tmp_path / "local.jsonl"), "--json", "--dtype", "fp32"]) == 1
    local = json.loads(capsys.readouterr().out)
    assert summary["second_opinion"] == local["second_opinion"] == {"model": vit90, "combine": "override",
                                                                     "band": [0.55, 1.0]}
    assert summary["regions"] == local["regions"] and summary["regions"].startswith("--regions exposed ")
    assert (summary["flagged"], summary["clean"], summary["errors"]) == (local["flagged"], local["clean"],
                                                                         local["errors"]) == (2, 0, 0)

    def rows(report):
        return {os.path.basename(r["path"]): r for r in map(json.loads, report.read_text().splitlines())}

    got, want = rows(tmp_path / "ray.jsonl"), rows(tmp_path / "local.jsonl")
    assert sorted(got) == sorted(want) == ["face.png", "scene.png"]
    for name, row in got.items():
        lib = want[name]
        for k in ("status", "flagged", "reason", "model", "rules", "second_opinion", "band", "combine", "models",
                  "region_settings"):
            assert row[k] == lib[k], k
        assert [(p["model"], p["scored"]) for p in row["parts"]] == [("eva60", True), ("vit90", True)]
        for p, q in zip(row["parts"], lib["parts"]):
            assert p["levels"] == pytest.approx(q["levels"], abs=1e-6)
        assert [r["label"] for r in row["regions"]] == [r["label"] for r in lib["regions"]]
        for r, q in zip(row["regions"], lib["regions"]):
            assert r["box"] == pytest.approx(q["box"], abs=0.01)
    assert [r["label"] for r in got["scene.png"]["regions"]] == ["BUTTOCKS_EXPOSED"]
    assert got["face.png"]["regions"] == []
    table = pq.read_table(out, columns=["id", "parts", "regions"]).to_pylist()
    assert {os.path.basename(r["id"]): json.loads(r["regions"]) for r in table} == {
        n: r["regions"] for n, r in got.items()}
    assert all([p["model"] for p in json.loads(r["parts"])] == ["eva60", "vit90"] for r in table)

    # the folder's settings record the second opinion and the region settings: others are refused
    settings, files = (out / "_nsfw-safety-settings.json").read_bytes(), sorted(out.glob("*.parquet"))
    same = ["--model", eva60, "--regions", "exposed", "--region-expand", "0.1"]
    for other in (["--second-opinion", vit20, "--band", "0.55", "1"], ["--second-opinion", vit90],
                  ["--second-opinion", vit90, "--band", "0.55", "1", "--combine", "max"], []):
        assert main(["scan", "--engine", "ray", str(src), "--out", str(out), *same, *other]) == 2
        assert "use another --out" in capsys.readouterr().err
    assert main(["scan", "--engine", "ray", str(src), "--out", str(out), *flags[:-2], "--region-expand", "0.2"]) == 2
    assert "use another --out" in capsys.readouterr().err
    assert (out / "_nsfw-safety-settings.json").read_bytes() == settings and sorted(out.glob("*.parquet")) == files
