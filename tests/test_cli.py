import subprocess
import sys

import pytest

from pipemax import __version__
from pipemax.cli import main


def test_version_and_env(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == __version__
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "triton " in out


@pytest.mark.subprocess
def test_no_command_prints_help_and_fails():
    result = subprocess.run([sys.executable, "-m", "pipemax.cli"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: pipemax" in result.stderr
