"""The diffusers examples run offline with local checkpoints: --model (the detector) and
--pipeline (a tiny SD / SDXL pipeline saved as diffusers saves one), with no network at all."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
from test_diffusers import sd_parts, sd_pipe, sdxl_pipe  # noqa: E402

from nsfw_safety.diffusers import light_feature_extractor  # noqa: E402

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd15")
    sd_pipe(sd_parts(), feature_extractor=light_feature_extractor()).save_pretrained(path)  # a repo has one
    return path


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl")
    sdxl_pipe().save_pretrained(path)
    return path


def run_example(name: str, *args: str, monkeypatch, cwd: Path) -> None:
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [name, "--steps", "2", *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_dropin_example(sd_dir, eva_nsfw_dir, no_network, monkeypatch, tmp_path, capsys):
    run_example("sd15_dropin.py", "--model", str(eva_nsfw_dir), "--pipeline", str(sd_dir), "a fox",
                monkeypatch=monkeypatch, cwd=tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["sd15_dropin_0.png: blurred", "sd15_dropin_1.png: blurred"]
    assert (tmp_path / "sd15_dropin_0.png").is_file() and (tmp_path / "sd15_dropin_1.png").is_file()


def test_zero_copy_example(sd_dir, eva_safe_dir, no_network, monkeypatch, tmp_path, capsys):
    run_example("sd15_zero_copy.py", "--model", str(eva_safe_dir), "--pipeline", str(sd_dir),
                monkeypatch=monkeypatch, cwd=tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("images: (4, 3, 32, 32)") and len(lines) == 5
    assert all(line.startswith("ok ") for line in lines[1:])


def test_sdxl_example(sdxl_dir, eva_nsfw_dir, no_network, monkeypatch, tmp_path, capsys):
    run_example("sdxl_guard.py", "--model", str(eva_nsfw_dir), "--pipeline", str(sdxl_dir),
                monkeypatch=monkeypatch, cwd=tmp_path)
    assert capsys.readouterr().out == "sdxl_guard.png: blurred (medium 1.00 >= 0.50)\n"
    assert (tmp_path / "sdxl_guard.png").is_file()
