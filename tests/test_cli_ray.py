"""``nsfw-safety scan --engine ray`` in real subprocesses, each starting its own local Ray (two
start-ups in all: a scan with an unreadable file, then a re-run that skips everything)."""

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

from nsfw_safety import SafetyFilter, load_detector  # noqa: E402
from nsfw_safety.cli import main  # noqa: E402


def _scan(*args: str) -> subprocess.CompletedProcess:
    """fp32 as the suite pins in-process (conftest), so the values compare exactly."""
    return subprocess.run([sys.executable, "-m", "nsfw_safety.cli", "scan", "--engine", "ray", *args, "--json", "--dtype", "fp32"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"})


def test_scan_engine_ray_errors_and_resume(tmp_path, eva_dir):
    src, out, report = tmp_path / "src", tmp_path / "out", tmp_path / "report.csv"
    (src / "sub").mkdir(parents=True)
    images = {}
    for i in range(5):
        path = src / ("sub" if i % 2 else "") / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 40 + i, 3), dtype=np.uint8)).save(path)
        images[str(path)] = Image.open(path)
    (src / "broken.png").write_bytes(b"not an image at all")

    first = _scan(str(src), "--out", str(out), "--model", str(eva_dir), "--level", "low", "--threshold", "0.6",
                  "--report", str(report))
    assert first.returncode == 2, first.stderr[-3000:]
    summary = json.loads(first.stdout)
    assert (summary["files"], summary["scanned"], summary["skipped"], summary["errors"]) == (6, 6, 0, 1)
    assert summary["flagged"] + summary["clean"] == 5 and summary["parquet"] == str(out)
    assert str(src / "broken.png") in first.stderr

    # the Parquet rows and the report: one per file, values as the library's SafetyFilter gives them
    table = pq.read_table(out)
    assert sorted(table.column("id").to_pylist()) == sorted([*images, str(src / "broken.png")])
    result = SafetyFilter(load_detector(str(eva_dir)), level="low", threshold=0.6)(list(images.values()))
    with open(report, newline="") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    assert len(rows) == 6
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
    assert summary["flagged"] == sum(result.flagged)

    # a re-run skips every file, writes no Parquet file, and answers the same
    files = sorted(out.glob("*.parquet"))
    again = _scan(str(src), "--out", str(out), "--model", str(eva_dir), "--level", "low", "--threshold", "0.6")
    assert again.returncode == 2, again.stderr[-3000:]
    summary2 = json.loads(again.stdout)
    assert (summary2["files"], summary2["scanned"], summary2["skipped"], summary2["errors"]) == (6, 0, 6, 1)
    assert sorted(out.glob("*.parquet")) == files and pq.read_table(out).num_rows == 6


def test_engine_ray_arguments_checked_without_ray(tmp_path, capsys):
    """Usage errors answer before Ray starts (or is imported)."""
    assert main(["scan", "--engine", "ray", str(tmp_path)]) == 2
    assert "--engine ray needs --out DIR" in capsys.readouterr().err
    assert main(["scan", "--engine", "ray", str(tmp_path), "--out", str(tmp_path / "o"), "--html", "x.html"]) == 2
    assert "--html not available with --engine ray" in capsys.readouterr().err
    assert main(["scan", str(tmp_path), "--address", "auto"]) == 2
    assert "--address and --actors need --engine ray" in capsys.readouterr().err


def test_settings_mismatch_refused(tmp_path, eva_dir, capsys):
    """A folder scored with other rules is refused before Ray starts: resume would mix them."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "_nsfw-safety-settings.json").write_text(json.dumps({"model": "x", "revision": "", "rules": "low=0.1"}))
    assert main(["scan", "--engine", "ray", str(tmp_path), "--out", str(out), "--model", str(eva_dir)]) == 2
    assert "use another --out" in capsys.readouterr().err
