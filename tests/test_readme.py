"""README.md's Python examples that need only NumPy run as written (on the CPU path)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
NUMPY_ONLY = [b for b in BLOCKS if "import cuflash" in b
              and not re.search(r"^\s*import (torch|jax|cupy)|^\s*from (torch|jax|cupy)", b, re.M)]


def test_readme_has_numpy_examples():
    assert len(NUMPY_ONLY) >= 2


@pytest.mark.parametrize("block", NUMPY_ONLY, ids=lambda b: b.strip().splitlines()[0][:40])
def test_numpy_example_runs(block):
    exec(compile(block, "README.md", "exec"), {})
