"""nsfw-safety scan on inputs that used to pass unchecked (issue #11): a picture hidden in the
alpha channel, a 16-bit PNG, and an animation. Run like tests/test_cli.py, with main() in-process."""

from __future__ import annotations

import json

import numpy as np
import torch
from images import synthetic
from PIL import Image

from nsfw_safety import cli, load_detector


def _levels(row: dict) -> torch.Tensor:
    return torch.tensor([[row[k] for k in ("neutral", "low", "medium", "high")]])


def test_scan_scores_alpha_and_16_bit_as_seen_and_checks_animations(tmp_path, eva_dir):
    root = tmp_path / "in"
    root.mkdir()
    gray = synthetic(5, (64, 80)).convert("L")
    g = np.asarray(gray)
    hidden = np.zeros((*g.shape, 4), np.uint8)
    hidden[..., 3] = 255 - g  # black colour; over a white page it shows the picture
    Image.fromarray(hidden).save(root / "hidden.png")
    Image.fromarray(g.astype(np.uint16) * 257).save(root / "deep.png")
    frames = [synthetic(i, (24, 32)) for i in range(3)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    report = tmp_path / "r.jsonl"

    code = cli.main(["scan", str(root), "--model", str(eva_dir), "--report", str(report), "--workers", "2"])

    assert code in (0, 1)  # no error row: the animation is checked, every frame
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in map(json.loads, report.read_text().splitlines())}
    assert sorted(rows) == ["anim.gif", "deep.png", "hidden.png"]
    anim = rows["anim.gif"]
    assert anim["status"] in ("ok", "flagged") and anim["frames"] == "3/3"
    assert anim["reason"].startswith("checked 3 of 3 frames")

    det = load_detector(str(eva_dir))
    picture, black, white = det.predict([gray, Image.new("L", gray.size, 0), Image.new("L", gray.size, 255)]).levels
    hid, deep = rows["hidden.png"], rows["deep.png"]
    assert hid["status"] in ("ok", "flagged") and deep["status"] in ("ok", "flagged")
    # the picture over a white page, or the black page, whichever is stricter per level
    want = torch.cat([torch.minimum(picture[:1], black[:1]), torch.maximum(picture[1:], black[1:])])
    torch.testing.assert_close(_levels(hid)[0], want, atol=1e-4, rtol=0)
    assert (want - black).abs().max() > 0.1  # not what the colour channels alone score
    assert hid["reason"].endswith(("(over white)", "(over black)", "(over white and black)"))
    # 16-bit: the picture, not the white page that clipping to 8 bits made of it
    torch.testing.assert_close(_levels(deep)[0], picture, atol=1e-4, rtol=0)
    assert (picture - white).abs().max() > 0.1
