"""chattune as an installable package: its metadata agrees with the checkout, and an installed copy runs.

The slow test installs the package into a fresh virtual environment with pip (no network: `--no-deps
--no-build-isolation --no-index`; the dependencies, pip and setuptools come from this interpreter's
site-packages) and runs every console script from a folder outside the checkout, so it is the installed
copy that answers.
"""

from __future__ import annotations

import ast
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONSOLE_SCRIPTS, REPO


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def imported_main(script: Path) -> str:
    """`module:main` for the `from module import main` of an entry script."""
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and any(alias.name == "main" for alias in node.names):
            return f"{node.module}:main"
    raise AssertionError(f"{script} imports no main function")


def test_dependencies_are_requirements_txt():
    lines = (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()
    requirements = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert pyproject()["project"]["dependencies"] == requirements


def test_console_scripts_run_the_entry_scripts_main_functions():
    scripts = pyproject()["project"]["scripts"]
    assert set(scripts) == set(CONSOLE_SCRIPTS)
    for name, script in CONSOLE_SCRIPTS.items():
        assert scripts[name] == imported_main(REPO / script), name


def make_venv(folder: Path) -> Path:
    """A fresh venv that sees this interpreter's site-packages (torch, transformers, pip, setuptools, ...)."""
    result = subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(folder)],
        capture_output=True,
        text=True,
    )
    python = folder / "bin" / "python"
    if result.returncode != 0 or not python.is_file():
        pytest.skip(f"python -m venv is unavailable here: {result.stderr.strip()[-300:]}")
    # When this interpreter is itself a venv, --system-site-packages reaches the base interpreter's packages,
    # not this one's: name them in a .pth file. Plain paths, so their own .pth files (an editable chattune
    # install, say) are not run. The new venv's pip and setuptools are this interpreter's.
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    parents = [path for path in site.getsitepackages() if Path(path).is_dir()]
    Path(purelib, "chattune_test_parent_site.pth").write_text("".join(f"{path}\n" for path in parents))
    for module in ("pip", "setuptools"):
        if subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode != 0:
            pytest.skip(f"no {module} for the new venv: this interpreter has none")
    return folder / "bin"


@pytest.mark.slow
def test_installed_package_runs_its_console_scripts(tmp_path):
    source = tmp_path / "source"  # a copy, so the build writes nothing into the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "chattune", source / "chattune", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    bin_dir = make_venv(tmp_path / "venv")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    install = subprocess.run(
        [bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", source],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    where = subprocess.run(
        [bin_dir / "python", "-c", "import chattune; print(chattune.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=elsewhere,
    )
    assert where.returncode == 0, where.stderr[-2000:]
    installed = Path(where.stdout.strip()).resolve()
    assert installed.is_relative_to((tmp_path / "venv").resolve()), installed
    assert not installed.is_relative_to(REPO)

    # Package discovery found every sub-package: the installed copy holds the checkout's modules, and they import.
    listing = (
        "import chattune, importlib, pkgutil\n"
        "names = sorted(m.name for m in pkgutil.walk_packages(chattune.__path__, 'chattune.'))\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(*names)"
    )
    modules = subprocess.run(
        [bin_dir / "python", "-c", listing], capture_output=True, text=True, env=env, cwd=elsewhere, timeout=300
    )
    assert modules.returncode == 0, modules.stderr[-2000:]
    expected = sorted(
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for path in (REPO / "chattune").rglob("*.py")
        if path.name != "__init__.py" or path.parent != REPO / "chattune"
    )
    assert modules.stdout.split() == expected

    for name in CONSOLE_SCRIPTS:
        result = subprocess.run(
            [bin_dir / name, "--help"], capture_output=True, text=True, env=env, cwd=elsewhere, timeout=300
        )
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
        assert "usage:" in result.stdout, f"{name}: {result.stdout[:500]}"

    # The piles are package data: the installed generator writes ./data/ the same bytes as the checkout's script.
    generated = subprocess.run(
        [bin_dir / "chattune-data", "--sample", "--language", "english", "german"],
        capture_output=True,
        text=True,
        env=env,
        cwd=elsewhere,
        timeout=300,
    )
    assert generated.returncode == 0, generated.stderr[-3000:]
    reference = tmp_path / "reference"
    checkout = subprocess.run(
        [
            sys.executable,
            REPO / "data" / "generate_home_assistant_data.py",
            *("--sample", "--language", "english", "german", "--output_dir", reference),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert checkout.returncode == 0, checkout.stderr[-3000:]
    name = "home_assistant_sample.jsonl"
    assert (elsewhere / "data" / name).read_bytes() == (reference / name).read_bytes()
