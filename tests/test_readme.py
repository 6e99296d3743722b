"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    (tmp_path / "data").symlink_to(README.parent / "data")  # examples use repo-relative data paths
    monkeypatch.chdir(tmp_path)
    exec(compile(SNIPPETS[index], f"README.md example {index}", "exec"), {})
