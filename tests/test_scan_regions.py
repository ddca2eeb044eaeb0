"""nsfw-safety scan in region mode (#15): censored copies and in-place versions censored in the
regions only (the library's answer, pixel for pixel), regions in the CSV and JSONL rows, outlines
on the review page's censored thumbnails, fail closed, resume, animations, and bad flags.

Real PNG files made from scikit-image's pictures (tests/region_images.py), the real NudeNet
320n model, tiny forced classifiers (everything flagged, or nothing)."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from region_images import WHEEL_BOX, astronaut, wheel_scene
from test_scan import rows_by_name, scan

from nsfw_safety import SafetyFilter
from nsfw_safety.regions import RegionDetector, RegionSettings
from nsfw_safety.scan.html import OUTLINE
from nsfw_safety.scan.reports import read_report

SCENE, FACE = wheel_scene(), astronaut()
REGION_TEXT = "--regions exposed --region-threshold 0.25 --region-expand 0.0 --region-shape rectangle " \
              "--region-feather 0.0"


@pytest.fixture
def tree(tmp_path) -> Path:
    """scene.png: the wheel, found as BUTTOCKS_EXPOSED; face.png: a face and nothing exposed."""
    root = tmp_path / "in"
    root.mkdir()
    Image.fromarray(SCENE).save(root / "scene.png")
    Image.fromarray(FACE).save(root / "face.png")
    return root


@pytest.fixture(scope="module")
def library(nsfw):
    """What the library answers for one image with the scan's settings: (censored HWC, mask HW)."""
    regions = RegionSettings(RegionDetector(device="cpu"))

    def answer(image: np.ndarray, action: str) -> tuple[np.ndarray, np.ndarray]:
        out = SafetyFilter(nsfw, action=action, regions=regions)(Image.fromarray(image))
        return np.asarray(out.images), out.masks[0].numpy()
    return answer


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix * iy / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# --- copies, rows ----------------------------------------------------------------------------

def test_out_copies_are_censored_in_their_regions_only(tree, tmp_path, eva_nsfw_dir, library, capsys):
    report, out = tmp_path / "r.jsonl", tmp_path / "out"
    code, summary, err = scan(capsys, tree, "--model", eva_nsfw_dir, "--regions", "exposed", "--out", out,
                              "--report", report, "--action", "pixelate")
    assert code == 1 and summary["flagged"] == 2 and summary["regions"] == REGION_TEXT, err
    rows = rows_by_name(report)
    scene, face = rows["scene.png"], rows["face.png"]
    (region,) = scene["regions"]
    assert region["label"] == "BUTTOCKS_EXPOSED" and 0.55 < region["score"] < 0.6
    assert iou(region["box"], WHEEL_BOX) > 0.9  # in the file's own pixels (800 x 600)
    assert scene["reason"] == f"medium 1.00 >= 0.50; regions: BUTTOCKS_EXPOSED {region['score']:.2f}"
    assert scene["action"] == "pixelate" and scene["region_settings"] == REGION_TEXT

    copy = pixels(out / "scene.png")
    want, mask = library(SCENE, "pixelate")
    np.testing.assert_array_equal(copy, want)  # one path: the filter's answer, bit for bit (PNG)
    outside = mask == 0
    assert 0.15 < (~outside).mean() < 0.3  # the box, nothing else
    np.testing.assert_array_equal(copy[outside], SCENE[outside])  # untouched outside the region
    assert (copy[~outside] != SCENE[~outside]).any(-1).mean() > 0.3  # pixelated inside

    # flagged, but nothing exposed: censored whole, as the library does
    assert face["regions"] == [] and face["reason"].endswith("no region of exposed at or above threshold: "
                                                             "censored whole")
    np.testing.assert_array_equal(pixels(out / "face.png"), library(FACE, "pixelate")[0])
    assert (pixels(out / "face.png") != FACE).any(-1).mean() > 0.5


def test_in_place_censors_the_region_only(tree, eva_nsfw_dir, library, capsys):
    code, _, err = scan(capsys, tree / "scene.png", "--model", eva_nsfw_dir, "--regions", "exposed", "--in-place",
                        "--action", "black")
    assert code == 1, err
    got = pixels(tree / "scene.png")
    want, mask = library(SCENE, "black")
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[mask == 0], SCENE[mask == 0])
    assert not got[mask == 1].any()  # black inside


def test_csv_column_and_unflagged_rows(tree, tmp_path, eva_nsfw_dir, eva_safe_dir, capsys):
    """The CSV's compact regions column parses back to the JSONL's regions; unflagged images list
    none (the detector runs on flagged images only); without region mode the column is empty."""
    flagged_csv, flagged_jsonl = tmp_path / "f.csv", tmp_path / "f.jsonl"
    for report in (flagged_csv, flagged_jsonl):
        scan(capsys, tree, "--model", eva_nsfw_dir, "--regions", "exposed", "--report", report)
    with open(flagged_csv, newline="") as fh:
        cells = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    assert cells["face.png"]["regions"] == "[]" and cells["scene.png"]["region_settings"] == REGION_TEXT
    (cell,) = json.loads(cells["scene.png"]["regions"])
    label, score, *box = cell
    (exact,) = rows_by_name(flagged_jsonl)["scene.png"]["regions"]  # JSONL: the library's floats
    assert label == exact["label"] and score == round(exact["score"], 4)
    assert box == [round(v, 1) for v in exact["box"]]
    assert rows_by_name(flagged_csv)["scene.png"]["regions"] == [{"label": label, "score": score, "box": box}]

    safe = tmp_path / "safe.jsonl"
    code, summary, _ = scan(capsys, tree, "--model", eva_safe_dir, "--regions", "exposed", "--report", safe)
    assert code == 0 and summary["clean"] == 2
    assert all(r["regions"] == [] and "region" not in r["reason"] for r in read_report(safe))

    off_csv, off_jsonl = tmp_path / "off.csv", tmp_path / "off.jsonl"
    for report in (off_csv, off_jsonl):
        scan(capsys, tree, "--model", eva_nsfw_dir, "--report", report)
    assert all(json.loads(line)["regions"] is None and json.loads(line)["region_settings"] == ""
               for line in off_jsonl.read_text().splitlines())
    with open(off_csv, newline="") as fh:
        assert {(r["regions"], r["region_settings"]) for r in csv.DictReader(fh)} == {("", "")}


def test_a_real_subprocess_writes_censored_copies_and_regions(tree, tmp_path, eva_nsfw_dir):
    report, out = tmp_path / "r.csv", tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "nsfw_safety.cli", "scan", str(tree), "--model", str(eva_nsfw_dir),
                           "--regions", "exposed", "--region-expand", "0.2", "--region-shape", "ellipse",
                           "--out", str(out), "--report", str(report), "--workers", "2", "-q"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    rows = rows_by_name(report)
    (region,) = rows["scene.png"]["regions"]
    x1, y1, x2, y2 = region["box"]
    w, h = WHEEL_BOX[2] - WHEEL_BOX[0], WHEEL_BOX[3] - WHEEL_BOX[1]
    assert abs((x2 - x1) - 1.2 * w) < 10 and abs((y2 - y1) - 1.2 * h) < 10  # expanded by 20 %
    assert "--region-expand 0.2 --region-shape ellipse" in rows["scene.png"]["region_settings"]
    copy = pixels(out / "scene.png")
    changed = (copy != SCENE).any(-1)
    assert changed[int(y1 + y2) // 2, int(x1 + x2) // 2] and changed.mean() < 0.4
    assert not changed[int(y1) + 2, int(x1) + 2]  # a corner of the box, outside the ellipse
    assert not changed[:int(y1) - 1].any() and not changed[:, int(x2) + 2:].any()  # outside the box


# --- the review page ---------------------------------------------------------------------------

def _thumbs(page: str) -> dict[str, np.ndarray]:
    found = re.findall(r'data-path="([^"]+)"[^>]*><div class="thumb"><img src="data:image/jpeg;base64,([^"]+)"',
                       page)
    return {Path(p).name: np.asarray(Image.open(io.BytesIO(base64.b64decode(d))).convert("RGB")) for p, d in found}


def _outlined(thumb: np.ndarray, box, scale: float) -> float:
    """The share of outline-coloured pixels along the box's left, right and bottom edges (the
    top left holds the label's tab), scaled to the thumbnail."""
    left, top, right, bottom = (round(v * scale) for v in box)
    right, bottom = right - 1, bottom - 1
    edges = np.concatenate([thumb[top + 14:bottom - 2, left], thumb[top + 14:bottom - 2, right],
                            thumb[bottom, left + 2:right - 2]])
    r, g, b = edges.astype(int).T
    magenta = (abs(r - OUTLINE[0]) < 70) & (g < 90) & (abs(b - OUTLINE[2]) < 70)
    return magenta.mean()


def test_review_page_outlines_regions_on_censored_thumbnails_only(tree, tmp_path, eva_nsfw_dir, eva_safe_dir,
                                                                  capsys):
    flagged, clean = tmp_path / "flagged.html", tmp_path / "clean.html"
    scan(capsys, tree, "--model", eva_nsfw_dir, "--regions", "exposed", "--html", flagged, "--action", "blur",
         "--report", tmp_path / "r.jsonl")
    (region,) = rows_by_name(tmp_path / "r.jsonl")["scene.png"]["regions"]
    thumbs = _thumbs(flagged.read_text())
    scale = thumbs["scene.png"].shape[1] / 800  # 192 / 800
    assert _outlined(thumbs["scene.png"], region["box"], scale) > 0.9
    assert region["label"] in flagged.read_text() and "region mode <code>--regions exposed" in flagged.read_text()
    # the face picture, censored whole: no region, no outline anywhere
    assert not ((thumbs["face.png"][..., 1] < 90) & (thumbs["face.png"][..., [0, 2]] > 185).all(-1)).any()

    scan(capsys, tree, "--model", eva_safe_dir, "--regions", "exposed", "--html", clean)
    shown = _thumbs(clean.read_text())["scene.png"]  # not flagged: the picture as it is, nothing drawn
    assert _outlined(shown, region["box"], scale) < 0.05
    plain = _thumbs(flagged.read_text())["scene.png"]
    assert np.abs(shown.astype(int) - plain.astype(int)).max() > 100  # (and the flagged one was censored)


def test_a_row_that_is_not_flagged_is_never_drawn_on(tmp_path):
    """Whatever regions a row carries, only a flagged row's (censored) thumbnail gets outlines."""
    from nsfw_safety.scan.html import HtmlReport
    from nsfw_safety.scan.reports import COLUMNS

    region = {"label": "BUTTOCKS_EXPOSED", "score": 0.6, "box": list(WHEEL_BOX)}
    page = HtmlReport(tmp_path / "p.html", {"medium": 0.5})
    for name, status in (("ok.png", "ok"), ("flagged.png", "flagged")):
        row = dict.fromkeys(COLUMNS, "") | {"path": str(tmp_path / name), "status": status, "regions": [region],
                                            "neutral": 0.5, "low": 0.5, "medium": 0.5, "high": 0.5, "action": "none"}
        page.add(row, Image.fromarray(np.zeros((600, 800, 3), np.uint8)))
    page.write({})
    page.close()
    thumbs = _thumbs((tmp_path / "p.html").read_text())
    assert _outlined(thumbs["flagged.png"], WHEEL_BOX, 0.24) > 0.9 and _outlined(thumbs["ok.png"], WHEEL_BOX, 0.24) == 0


# --- fail closed, resume, animations, loading ------------------------------------------------

def test_a_failing_region_detector_censors_the_whole_image(tree, tmp_path, eva_nsfw_dir, nsfw, capsys,
                                                           monkeypatch):
    def broken(self, blob):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(RegionDetector, "_run", broken)
    report, out = tmp_path / "r.jsonl", tmp_path / "out"
    code, summary, err = scan(capsys, tree / "scene.png", "--model", eva_nsfw_dir, "--regions", "exposed",
                              "--out", out, "--report", report)
    assert code == 1 and summary["flagged"] == 1, err
    row = rows_by_name(report)["scene.png"]
    assert row["reason"] == ("medium 1.00 >= 0.50; region detector failed: RuntimeError: out of memory: "
                             "censored whole")
    assert row["regions"] == [] and row["action"] == "blur"
    whole = np.asarray(SafetyFilter(nsfw, action="blur")(Image.fromarray(SCENE)).images)
    np.testing.assert_array_equal(pixels(out / "scene.png"), whole)  # the whole-image blur


def test_resume_with_other_region_settings_is_refused(tree, tmp_path, eva_nsfw_dir, capsys):
    report = tmp_path / "r.jsonl"
    code, first, _ = scan(capsys, tree, "--model", eva_nsfw_dir, "--regions", "exposed", "--report", report)
    assert code == 1 and first["scanned"] == 2
    before = report.read_bytes()
    for other in (("--regions", "faces"), ("--regions", "exposed", "--region-threshold", "0.5"), ()):
        code, summary, err = scan(capsys, tree, "--model", eva_nsfw_dir, *other, "--report", report)
        assert (code, summary) == (2, None), other
        assert f"was written with --model {eva_nsfw_dir} --thresholds medium=0.5 {REGION_TEXT}," in err
        assert report.read_bytes() == before  # no row of other settings
    # the same settings, spelled out: resumed
    code, again, _ = scan(capsys, tree, "--model", eva_nsfw_dir, "--regions", "exposed", "--region-threshold",
                          "0.25", "--region-shape", "rectangle", "--report", report)
    assert (code, again["skipped"], again["scanned"]) == (1, 2, 0)
    # a report of region mode off refuses region mode
    off = tmp_path / "off.jsonl"
    scan(capsys, tree, "--model", eva_nsfw_dir, "--report", off)
    code, _, err = scan(capsys, tree, "--model", eva_nsfw_dir, "--regions", "faces", "--report", off)
    assert code == 2 and "this run asks for" in err and "--regions faces" in err


def test_animation_frames_without_a_region_are_censored_whole_and_say_so(tmp_path, eva_nsfw_dir, capsys):
    """Frames with regions: tests/test_region_video.py."""
    from videos import pictures, write_animation

    root, out, report = tmp_path / "in", tmp_path / "out", tmp_path / "r.jsonl"
    root.mkdir()
    write_animation(root / "anim.gif", pictures(3), [100] * 3)
    code, _, err = scan(capsys, root, "--model", eva_nsfw_dir, "--regions", "exposed", "--out", out,
                        "--report", report, "--action", "black")
    assert code == 1, err
    row = rows_by_name(report)["anim.gif"]
    assert row["regions"] == [] and row["action"] == "black"  # no region censored: never claimed
    assert row["reason"].endswith("; first flagged frame 0: no region of exposed at or above threshold: "
                                  "censored whole")
    assert row["frames"] == "3/3"
    with Image.open(out / "anim.gif") as gif:  # (Pillow merges identical frames: one black frame of 300 ms)
        frames = [np.asarray(gif.seek(i) or gif.convert("RGB")) for i in range(gif.n_frames)]
        assert sum(gif.seek(i) or gif.info["duration"] for i in range(gif.n_frames)) == 300
    assert not any(f.any() for f in frames)  # every frame black, whole


def test_a_region_model_that_cannot_load_exits_2_naming_it(tree, tmp_path, eva_nsfw_dir, capsys, monkeypatch):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model" * 10)
    code, summary, err = scan(capsys, tree, "--model", eva_nsfw_dir, "--regions", "exposed", "--region-model", bad)
    assert (code, summary) == (2, None) and f"error: cannot load the region model {bad}: " in err
    monkeypatch.setitem(sys.modules, "nudenet", None)  # not installed
    code, _, err = scan(capsys, tree, "--model", eva_nsfw_dir, "--regions", "exposed")
    assert code == 2 and "cannot load the region model nudenet/320n.onnx" in err and "[regions]" in err
