"""nsfw_safety.ray on a real local Ray (2 CPUs, no dashboard), started once for this module.

The results must equal SafetyFilter's on the same images, value for value (a second opinion's
parts and region mode's regions too); every input row gives one output row; unreadable files are
error rows; a scan resumes after its driver is SIGKILLed.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from region_images import WHEEL_BOX, astronaut, wheel_scene  # noqa: E402

from nsfw_safety import SafetyFilter, load_detector  # noqa: E402
from nsfw_safety import ray as nray  # noqa: E402
from nsfw_safety.cascade import second_opinion  # noqa: E402
from nsfw_safety.regions import RegionSettings  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _png(seed: int, size=(40, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


GOOD = {f"img{i:02d}.png": _png(i, (40 + i, 32)) for i in range(12)}
BAD = {"empty.png": b"", "truncated.png": _png(99)[:60], "text.png": b"not an image at all"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_images")
    (root / "sub").mkdir()
    for i, (name, data) in enumerate({**GOOD, **BAD}.items()):
        (root / ("sub" if i % 2 else "") / name).write_bytes(data)
    return root


def _expected(model_dir, names_bytes, **settings):
    """What SafetyFilter says about each good image, keyed by file name."""
    guard = SafetyFilter(load_detector(str(model_dir)), **settings)
    images = [Image.open(io.BytesIO(b)) for b in names_bytes.values()]
    result = guard(images)
    rows = result.scores.to_dicts()
    return {name: (flag, reason, row["levels"]) for name, flag, reason, row
            in zip(names_bytes, result.flagged, result.reasons, rows)}


def _check(rows, expected, bad_names):
    by_name = {Path(r["id"].split("#")[0]).name if "/" in r["id"] else r["id"]: r for r in rows}
    assert len(rows) == len(expected) + len(bad_names)
    for name, (flag, reason, levels) in expected.items():
        row = next(r for r in rows if r["id"].endswith(name.removesuffix(".png")) or r["id"].endswith(name))
        assert row["status"] == ("flagged" if flag else "ok")
        assert row["flagged"] == flag and row["reason"] == reason
        for level, value in levels.items():
            assert row[level] == pytest.approx(value, abs=1e-6)
    for name in bad_names:
        row = next(r for r in rows if r["id"].endswith(name) or r["id"].endswith(name.removesuffix(".png")))
        assert row["status"] == "error" and row["flagged"] is True and row["reason"].startswith("error:")
        assert np.isnan(row["low"])
    return by_name


def test_folder_matches_the_library(folder, eva_dir):
    rows = nray.score_dataset(nray.read_images(str(folder)), model=str(eva_dir), dtype="fp32", threshold=0.5,
                              batch_size=4, actors=1).take_all()
    _check(rows, _expected(eva_dir, GOOD, threshold=0.5), BAD)
    assert {r["model"] for r in rows} == {str(eva_dir)} or len({r["model"] for r in rows}) == 1
    assert all(json.loads(r["probs"]).keys() == {"neutral", "low", "medium", "high"}
               for r in rows if r["status"] != "error")
    assert {(r["parts"], r["regions"]) for r in rows} == {("", "")}  # one model, no region mode


def test_parquet_with_hf_image_structs(tmp_path, eva_dir):
    names = list(GOOD) + list(BAD)
    data = [{"bytes": b, "path": n} for n, b in {**GOOD, **BAD}.items()]
    pq.write_table(pa.table({"key": names, "image": data}), tmp_path / "part-0.parquet")
    ds = nray.read_parquet_images(str(tmp_path / "part-0.parquet"), image_column="image", id_column="key")
    rows = nray.score_dataset(ds, model=str(eva_dir), dtype="fp32", batch_size=5, actors=1).take_all()
    _check(rows, _expected(eva_dir, GOOD), BAD)
    assert sorted(r["id"] for r in rows) == sorted(names)


def test_webdataset_shards(tmp_path, eva_dir):
    items = list({**GOOD, **BAD}.items())
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard:03d}.tar", "w") as tar:
            for name, data in items[shard::2]:
                for member, payload in ((name, data), (name.replace(".png", ".txt"), b"a caption")):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    ds = nray.read_webdataset_images([str(p) for p in sorted(tmp_path.glob("*.tar"))])
    rows = nray.score_dataset(ds, model=str(eva_dir), dtype="fp32", batch_size=3, actors=1).take_all()
    _check(rows, _expected(eva_dir, GOOD), BAD)


def test_hf_dataset(eva_dir):
    datasets = pytest.importorskip("datasets")
    hf = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in GOOD.values()]},
                                    features=datasets.Features({"image": datasets.Image()}))
    rows = nray.score_dataset(nray.from_hf(hf), model=str(eva_dir), dtype="fp32", batch_size=4, actors=1).take_all()
    expected = _expected(eva_dir, GOOD)
    assert sorted(int(r["id"]) for r in rows) == list(range(len(GOOD)))
    for r in rows:
        flag, reason, levels = expected[list(GOOD)[int(r["id"])]]
        assert (r["flagged"], r["reason"]) == (flag, reason)
        assert r["medium"] == pytest.approx(levels["medium"], abs=1e-6)


def test_censor_returns_encoded_images(folder, eva_nsfw_dir):
    rows = nray.score_dataset(nray.read_images(str(folder)), model=str(eva_nsfw_dir), dtype="fp32", censor=True,
                              action="black", batch_size=4, actors=1).take_all()
    good = [r for r in rows if r["status"] != "error"]
    assert len(good) == len(GOOD) and all(r["flagged"] and r["action"] == "black" for r in good)
    for r in good:
        im = Image.open(io.BytesIO(r["censored"]))
        assert im.format == "PNG" and im.size == (r["width"], r["height"])
        assert np.asarray(im.convert("RGB")).max() == 0
    assert all(r["censored"] is None for r in rows if r["status"] == "error")


def test_second_opinion_in_region_mode(tmp_path, forced_dirs):
    """A cascade of forced checkpoints (eva60's medium 0.60 is in the band, so vit90 re-checks it and
    flags) in region mode with the real NudeNet model, on real pictures: the flags, reasons, each
    model's parts, the regions and the censored pixels are SafetyFilter's, built the same way."""
    pictures = {"scene.png": wheel_scene(), "face.png": astronaut()}
    for name, pixels in pictures.items():
        Image.fromarray(pixels).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    eva60, vit90 = str(forced_dirs["eva60"]), str(forced_dirs["vit90"])
    rows = nray.score_dataset(nray.read_images(str(tmp_path)), model=eva60, dtype="fp32", second_opinion=vit90,
                              band=(0.55, 1.0), regions="exposed", region_expand=0.1, censor=True, action="black",
                              batch_size=4, actors=1).take_all()
    by_name = {Path(r["id"]).name: r for r in rows}
    assert sorted(by_name) == ["broken.png", "face.png", "scene.png"]

    guard = SafetyFilter(second_opinion(eva60, vit90, band=(0.55, 1.0), dtype="fp32"), action="black",
                         regions=RegionSettings(classes="exposed", expand=0.1))
    want = guard([Image.open(tmp_path / name) for name in pictures])
    for i, name in enumerate(pictures):
        row = by_name[name]
        assert (row["status"], row["flagged"], row["reason"], row["action"]) == ("flagged", True, want.reasons[i], "black")
        assert row["reason"].startswith("vit90 medium 0.90 >= 0.50 (second opinion on eva60 0.60); ")
        assert row["medium"] == pytest.approx(0.9, abs=0.005)  # the second model's verdict stands (override)
        parts = json.loads(row["parts"])
        assert [(p["model"], p["scored"], p["problem"]) for p in parts] == [("eva60", True, None), ("vit90", True, None)]
        for got, lib in zip(parts, want.scores.parts.to_dicts()[i]):
            assert got["levels"] == pytest.approx(lib["levels"], abs=1e-6)
            assert got["probs"] == pytest.approx(lib["probs"], abs=1e-6)
        assert parts[0]["levels"]["medium"] == pytest.approx(0.60, abs=0.005)
        regions = json.loads(row["regions"])
        assert [r["label"] for r in regions] == [r.label for r in want.regions[i]]
        for got, lib in zip(regions, want.regions[i]):
            assert got["score"] == pytest.approx(lib.score, abs=1e-5) and got["box"] == pytest.approx(lib.box, abs=0.01)
        censored = np.asarray(Image.open(io.BytesIO(row["censored"])))
        np.testing.assert_array_equal(censored, np.asarray(want.images[i]))  # one path: the filter's pixels
    (scene,) = json.loads(by_name["scene.png"]["regions"])
    assert scene["label"] == "BUTTOCKS_EXPOSED"
    x1, y1, x2, y2 = WHEEL_BOX  # grown by 10 %, centred
    dx, dy = 0.05 * (x2 - x1), 0.05 * (y2 - y1)
    assert scene["box"] == pytest.approx([x1 - dx, y1 - dy, x2 + dx, y2 + dy], abs=2)
    censored = np.asarray(Image.open(io.BytesIO(by_name["scene.png"]["censored"])))
    assert not censored[200, 450].any() and (censored[50, 50] == 128).all()  # black in the box, untouched outside
    assert json.loads(by_name["face.png"]["regions"]) == []
    assert by_name["face.png"]["reason"].endswith("no region of exposed at or above threshold: censored whole")
    broken = by_name["broken.png"]
    assert (broken["status"], broken["flagged"], broken["parts"], broken["regions"]) == ("error", True, "", "")


@pytest.mark.parametrize("settings,message", [
    ({"second_opinion": "vit-sd", "band": (0.8, 0.2)}, "band must have LO <= HI"),
    ({"band": (0.2, 0.8)}, "band and combine need a second_opinion model"),
    ({"second_opinion": "vit-sd", "combine": "any", "band": (0.2, 0.8)}, "it takes no band"),
    ({"regions": ["TAILS"]}, "TAILS"),
    ({"regions": "exposed", "region_feather": 2}, "region_feather must be in [0, 1]"),
])
def test_bad_settings_raise_before_any_actor(folder, settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        nray.score_dataset(nray.read_images(str(folder)), **settings)


DRIVER = textwrap.dedent("""
    import sys, ray
    from nsfw_safety import ray as nray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(nray.scan_to_parquet(nray.read_images(sys.argv[1]), sys.argv[2], model=sys.argv[3],
                               batch_size=2, actors=1), flush=True)
""")


def test_resume_after_driver_sigkill(tmp_path, eva_dir):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"{i:03d}.png").write_bytes(_png(i))
    (src / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", DRIVER, str(src), str(out), str(eva_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(out.glob("*.parquet")) and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, mid-run
        proc.wait()
    finally:
        time.sleep(1)
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its local Ray it left behind
    first = nray.done_ids(out)
    assert len(first) < 41, "the kill came after the scan finished: nothing was tested"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout
    counts = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307 -- our own dict repr
    table = pq.read_table(out, columns=["id", "status"])
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 41  # no duplicates, no gaps
    assert counts["skipped"] == len(first) and counts["skipped"] + counts["scored"] == 41
    assert table.filter(pa.compute.equal(table["status"], "error")).num_rows == 1
