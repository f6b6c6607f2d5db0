"""Shell scripts shipped with the project are valid (shellcheck when installed, else bash -n)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import REPO

SCRIPTS = [REPO / "scripts" / "launch.slurm", REPO / ".ci" / "run"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_shell_script_is_clean(script):
    checker = ["shellcheck", "--shell=bash"] if shutil.which("shellcheck") else ["bash", "-n"]
    result = subprocess.run([*checker, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
