"""The README quickstart runs as written, against a local checkpoint directory."""

import re
import shutil
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_quickstart_runs_as_written(eva_dir, tmp_path, monkeypatch, capsys):
    text = README.read_text()
    block = re.search(r"<!-- quickstart[^>]*-->\s*```python\n(.*?)```", text, re.S).group(1)
    shutil.copytree(eva_dir, tmp_path / "nsfw_image_detector")  # what `huggingface-cli download --local-dir` makes
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README quickstart", "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size" not in out and "'levels'" in out and "medium" in out
