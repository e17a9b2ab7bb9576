"""Every ```python block of README.md runs as written against the bundled default model, each in
a fresh interpreter, so the README cannot drift from the API."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipemax.models.default_model import default_model_path

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.DOTALL | re.MULTILINE)


def test_readme_has_python_examples():
    assert BLOCKS, "README.md has no ```python block"


@pytest.mark.subprocess
@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{index}" for index in range(len(BLOCKS))])
def test_readme_block_runs(code):
    default_model_path()  # convert the default model here, so the block's timeout is for the block alone
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"README block failed:\n{code}\n--- stderr ---\n{result.stderr[-3000:]}"
