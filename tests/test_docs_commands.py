"""Every complete command shown in README.md and docs/ parses with the flags of the tool it calls.

Commands that need a hub model cannot run offline, so each one is checked with the parser of its entry
point (an installed `chattune-*` command with the parser of the script it runs the same as): a renamed or
removed flag in the code, or a typo in the docs, fails here. Commands that elide arguments with `...` and
usage lines with `[optional]` parts are skipped (the distributed ones run in tests/test_distributed.py).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from chattune.config.flags import parse_flags
from conftest import CONSOLE_SCRIPTS, REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def documented_commands() -> list[tuple[str, str]]:
    commands = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S):
            for command in block.replace("\\\n", " ").splitlines():
                command = command.split(" #")[0].split(" | ")[0].strip()
                synopsis = "..." in command or " [" in command  # elided arguments or a usage line
                if command.startswith(("python3 ", "accelerate launch", *CONSOLE_SCRIPTS)) and not synopsis:
                    commands.append((doc.name, command))
    return commands


def parse(command: str) -> None:
    words = shlex.split(command)
    if words[0] in CONSOLE_SCRIPTS:  # the installed commands take the flags of the checkout's scripts
        words = ["python3", CONSOLE_SCRIPTS[words[0]], *words[1:]]
    if words[0] == "accelerate":
        words = ["python3", *words[words.index("train.py") :]]
    script, args = words[1], words[2:]
    if script == "train.py":
        parse_flags(args)
    elif script == "data/generate_home_assistant_data.py":
        from chattune.domains.homeassistant.datagen.cli import build_parser

        build_parser(Path("data")).parse_args(args)
    elif script == "evaluate.py":
        from chattune.commands.evaluate import parse_args

        parse_args(args)
    elif script == "find_split.py":
        from chattune.commands.find_split import parse_args

        parse_args(args)
    elif script == "scripts/export_gguf.py" or (script == "-m" and args[0] == "chattune.export.gguf"):
        from chattune.export.gguf import build_parser

        build_parser().parse_args(args if script.endswith(".py") else args[1:])
    elif script == "scripts/house_grammar.py":
        from chattune.domains.homeassistant.grammar_cli import parse_args

        parse_args(args)
    elif script.startswith("bench/") or script == "scripts/demo.py":
        import importlib.util

        spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.parse_args(args)
    elif script == "-m" and args[0] == "chattune.config.flags":
        pass
    else:
        pytest.fail(f"no parser known for {command!r}")


@pytest.mark.parametrize("doc,command", documented_commands(), ids=lambda value: value[:60])
def test_documented_command_parses(doc, command, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes and data paths in the docs are relative to the repository
    parse(command)


def test_the_docs_show_commands_for_every_entry_point():
    scripts = {shlex.split(command)[1] for _, command in documented_commands()}
    assert {"train.py", "evaluate.py", "find_split.py", "data/generate_home_assistant_data.py", "-m"} <= scripts


def test_the_readme_layout_names_every_module():
    layout = (REPO / "README.md").read_text(encoding="utf-8").split("## Layout", 1)[1].split("\n## ", 1)[0]
    for path in sorted((REPO / "chattune").rglob("*.py")):
        if path.name == "__init__.py":
            if path.parent != REPO / "chattune":
                assert f"{path.parent.name}/" in layout, f"README.md's Layout does not name {path.parent}"
        else:
            assert f"`{path.stem}`" in layout, f"README.md's Layout does not name {path.relative_to(REPO)}"
