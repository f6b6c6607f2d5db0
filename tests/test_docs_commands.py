"""Every command shown in README.md and docs/ is checked, in one of three ways.

* **Run**: commands that need no hub model and little time run here, offline, with their flags unchanged.
  Only what they read and write is moved: their output goes to a temporary folder, a model folder the docs
  name (`models/home-qwen2-0.5b`) is a tiny random model, and `Qwen/Qwen2-0.5B-Instruct` is the shared Qwen2
  tokenizer (../shared/tokenizers, skipped when absent) for find_split.py. The generator's commands run with
  GENERATED_PER_SIZE training examples per language whatever size they name. The export to q4_k_m is skipped
  where llama-cpp-python, whose quantizer it runs, is not installed.
* **Parsed**: commands that train or evaluate a hub model (minutes to hours, and a download) are read by the
  parser of their entry point, as the command itself would read them before any work: a renamed or removed
  flag, or a typo in the docs, fails here. An installed `chattune-*` command is checked with the parser of
  the script it runs the same as.
* **Another tool's**: lines of make, pip, llama.cpp, Ollama, Slurm and the shell are listed in OTHER_TOOLS.

Commands that elide arguments with `...` and usage lines with `[optional]` parts are neither run nor parsed
(the distributed ones run in tests/test_distributed.py and tests/test_launch_configs.py). The Python snippets
of docs/export.md are the API that tests/test_export_gguf.py and tests/test_ollama.py call. A line of a
`bash` block that is none of these fails test_every_documented_line_is_checked, so a new command in the docs
cannot go unchecked.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from chattune.config.flags import parse_flags
from conftest import CONSOLE_SCRIPTS, REPO, SHARED_TOKENIZERS, make_tiny_model

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CHATTUNE_COMMANDS = ("python3 ", "accelerate launch", *CONSOLE_SCRIPTS)
# Commands of other programs that the docs show; none of them is chattune's to run.
OTHER_TOOLS = (
    "make ",
    "pip install ",
    ". .venv/bin/activate",
    "python3 -m venv ",
    "scripts/install_llama_cpp.sh",
    "llama-cli ",
    "llama-server ",
    "ollama ",
    "sbatch ",
)
# Hub models the docs name, and the local stand-in with the same tokenizer that runs offline.
STAND_INS = {"Qwen/Qwen2-0.5B-Instruct": SHARED_TOKENIZERS / "qwen2-instruct"}
# Training examples per language the generator writes here for each of its sizes (thousands in the docs).
GENERATED_PER_SIZE = 40


def bash_lines() -> list[tuple[str, str]]:
    """(doc name, command) for every line of every `bash` block: continuations joined, comments and pipes cut."""
    lines = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S):
            for command in block.replace("\\\n", " ").splitlines():
                command = command.split(" #")[0].split(" | ")[0].strip()
                if command and not command.startswith("#"):
                    lines.append((doc.name, command))
    return lines


def is_elided(command: str) -> bool:
    return "..." in command or " [" in command  # elided arguments or a usage line


def documented_commands() -> list[tuple[str, str]]:
    """The chattune commands of the docs, less the elided ones."""
    return [
        (doc, c)
        for doc, c in bash_lines()
        if c.startswith(CHATTUNE_COMMANDS) and not c.startswith(OTHER_TOOLS) and not is_elided(c)
    ]


def script_and_args(command: str) -> tuple[str, list[str]]:
    """The entry script (`train.py`, `-m` for a module) and its arguments, whatever the launcher."""
    words = shlex.split(command)
    if words[0] in CONSOLE_SCRIPTS:  # the installed commands take the flags of the checkout's scripts
        words = ["python3", CONSOLE_SCRIPTS[words[0]], *words[1:]]
    if words[0] == "accelerate":
        words = ["python3", *words[words.index("train.py") :]]
    return words[1], words[2:]


def parse(command: str) -> None:
    script, args = script_and_args(command)
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


def test_every_documented_line_is_checked():
    unchecked = [
        f"{doc}: {command}"
        for doc, command in bash_lines()
        if not (command.startswith(CHATTUNE_COMMANDS) or command.startswith(OTHER_TOOLS))
    ]
    assert not unchecked, "commands the docs test neither runs, parses nor lists as another tool's: " + str(unchecked)


# ---------------------------------------------------------------------------------------------------------------
# The commands that run here


@dataclass(frozen=True)
class Place:
    """Where a command runs: a temporary folder for what it writes, and the tests' tokenizer for tiny models."""

    tmp: Path
    tokenizer_dir: Path


Runner = Callable[[list[str], Place], int]


def _run_find_split(args: list[str], place: Place) -> int:
    from chattune.commands.find_split import main

    return main([str(STAND_INS.get(args[0], args[0])), *args[1:]])


def _run_generator(args: list[str], place: Place) -> int:
    from chattune.domains.homeassistant.datagen.cli import main

    code = main([*args, "--output_dir", str(place.tmp)])  # the last --output_dir wins over a documented one
    assert list(place.tmp.glob("home_assistant_*.jsonl")), "the command wrote no data file"
    return code


def _run_grammar(args: list[str], place: Place) -> int:
    from chattune.domains.homeassistant.grammar_cli import main

    out = args.index("--out") + 1
    grammar = place.tmp / args[out]
    code = main([*args[:out], str(grammar), *args[out + 1 :]])
    assert grammar.read_text(encoding="utf-8").strip(), "no grammar written"
    return code


def _run_export(args: list[str], place: Place) -> int:
    from chattune.export.gguf import main

    model = make_tiny_model(place.tokenizer_dir, place.tmp / Path(args[0]).name)  # named like the documented one
    code = main([str(model), *args[1:]])
    assert list(model.glob("*.gguf")) and list(model.glob("*.Modelfile")), "no GGUF file and Modelfile written"
    return code


def run_plan(command: str) -> tuple[Runner, list[str]] | None:
    """How a documented command runs here, or None when it is parsed only (a hub model, or a long run)."""
    script, args = script_and_args(command)
    if script == "scripts/export_gguf.py":
        return _run_export, args
    if script == "-m" and args[0] == "chattune.export.gguf":
        return _run_export, args[1:]
    if script == "find_split.py" and (args[0] in STAND_INS or (REPO / args[0]).exists()):
        return _run_find_split, args
    if script == "data/generate_home_assistant_data.py":
        return _run_generator, args
    if script == "scripts/house_grammar.py" and (REPO / args[0]).exists():
        return _run_grammar, args
    return None


def _distinct_runs() -> list[tuple[str, str]]:
    """(doc, command) for each command that runs here, once per script and arguments (`chattune-find-split X` is
    `find_split.py X`), under the first doc that shows it."""
    runs: dict[tuple[str, ...], tuple[str, str]] = {}
    for doc, command in documented_commands():
        script, args = script_and_args(command)
        if run_plan(command):
            runs.setdefault((script, *args), (doc, command))
    return list(runs.values())


@pytest.mark.parametrize("doc,command", [pytest.param(*run, id=run[1]) for run in _distinct_runs()])
def test_documented_command_runs(doc, command, tmp_path, test_tokenizer_dir, monkeypatch):
    runner, args = run_plan(command)
    if runner is _run_find_split and args[0] in STAND_INS and not STAND_INS[args[0]].is_dir():
        pytest.skip(f"no stand-in for {args[0]}: {SHARED_TOKENIZERS} is missing (fresh clone without ../shared)")
    if "q4_k_m" in args and importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("q4_k_m needs llama.cpp's quantizer (scripts/install_llama_cpp.sh); the command is parsed only")
    from chattune.domains.homeassistant.datagen import pipeline

    for size in pipeline.SIZES:
        monkeypatch.setitem(pipeline.SIZES, size, GENERATED_PER_SIZE)
    monkeypatch.chdir(REPO)  # data paths in the docs are relative to the repository; outputs go to tmp_path
    assert runner(args, Place(tmp_path, test_tokenizer_dir)) == 0


def test_the_docs_run_a_command_of_each_cheap_entry_point():
    """The run list is not empty by accident (a changed doc or parser silently moving all to parse-only)."""
    runners = {run_plan(command)[0] for _, command in _distinct_runs()}
    assert runners == {_run_find_split, _run_generator, _run_grammar, _run_export}


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


def test_the_recipes_page_lists_every_recipe():
    table = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    missing = [path.name for path in sorted((REPO / "recipes").glob("*.yaml")) if f"| `{path.name}` |" not in table]
    assert not missing, f"docs/recipes.md's table leaves out {missing}"
