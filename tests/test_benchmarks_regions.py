"""The region benchmark's smoke mode, in-process: every row and both files are produced.

Not a timed test: the numbers only have to exist and be consistent.
"""

from __future__ import annotations

import json

from benchmarks.regions import main

KEYS = ["classifier", "detector_uint8", "detector_float", "letterbox_uint8", "mask", "censor", "filter_whole",
        "filter_regions"]


def test_smoke_writes_every_row(tmp_path):
    returned = main(["--smoke", "--device", "cpu", "--batch-sizes", "1,2", "--repeats", "1", "--threads", "1",
                     "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["regions-cpu-smoke.json", "regions-cpu-smoke.md"]
    written = json.loads((tmp_path / "regions-cpu-smoke.json").read_text())
    assert written == json.loads(json.dumps(returned))
    meta = written["meta"]
    assert meta["provider"] == "CPU" and meta["threads"] == 1 and meta["batch_sizes"] == [1, 2]
    rows = written["rows"]
    assert [(r["key"], r["batch"]) for r in rows] == [(k, b) for b in (1, 2) for k in KEYS]
    for r in rows:
        assert r["wall_ms_per_image"] == r["wall_ms_all"][0] / r["batch"] > 0
        assert r["cpu_ms_per_image"] >= 0 and len(r["cpu_ms_all"]) == 1
    table = (tmp_path / "regions-cpu-smoke.md").read_text()
    assert table.count("\n| ") == 1 + len(KEYS)  # the header and one line per step
    assert "| region detector, uint8 input: letterbox + onnxruntime + NMS |" in table
