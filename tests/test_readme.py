"""The README quickstart runs as written, against a local checkpoint directory."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_quickstart_runs_as_written(eva_dir, tmp_path, monkeypatch, capsys):
    text = README.read_text()
    block = re.search(r"<!-- quickstart[^>]*-->\s*```python\n(.*?)```", text, re.S).group(1)
    shutil.copytree(eva_dir, tmp_path / "nsfw_image_detector")  # what `hf download --local-dir` makes
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README quickstart", "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size" not in out and "'levels'" in out and "medium" in out


def test_pytest_runs_in_a_clone_named_as_the_readme_names_it(tmp_path):
    """`git clone <this repository> nsfw-safety`: a folder name that is not a Python name, whose
    root __init__.py (the ComfyUI entry) pytest imports as a plain module. Both `pytest` (no cwd
    on sys.path, as the console script) and `python -m pytest` collect and run there."""
    root, clone = README.parent, tmp_path / "nsfw-safety"
    clone.mkdir()
    for name in ("__init__.py", "pyproject.toml"):
        shutil.copy(root / name, clone)
    for name in ("benchmarks", "comfyui_node", "nsfw_safety"):
        shutil.copytree(root / name, clone / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    (clone / "tests").mkdir()
    (clone / "tests" / "test_imports.py").write_text(
        "import benchmarks.run, comfyui_node\n\n"
        "def test_imports_come_from_the_clone():\n"
        f"    assert benchmarks.run.__file__.startswith({str(clone)!r})\n"
        f"    assert comfyui_node.__file__.startswith({str(clone)!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for how in (["-P", "-m", "pytest"], ["-m", "pytest"]):  # -P: the console script's sys.path
        run = subprocess.run([sys.executable, *how, "-q", "-p", "no:cacheprovider"], cwd=clone, env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "1 passed" in run.stdout, (how, run.stdout[-3000:], run.stderr[-3000:])
