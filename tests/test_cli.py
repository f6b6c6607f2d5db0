"""One error base, one command-line wrapper: every entry point turns chattune's errors into one line and exit
status 2, and Ctrl-C into 130; what would fail late is refused at the start."""

from __future__ import annotations

import importlib

import pytest

from chattune.cli import entry_point
from chattune.errors import ChattuneError
from conftest import CONSOLE_SCRIPTS, REPO, TRAIN, chat_rows, make_tiny_model, run_script, train_argv, write_jsonl

# Each command: its main, its arguments, and a function it calls once its arguments are parsed.
COMMANDS = {
    "train": (
        "chattune.commands.train",
        ["--run_name", "r", "--base_model", "m", "--train_dataset", "d.jsonl"],
        "train",
    ),
    "evaluate": ("chattune.commands.evaluate", ["model"], "run"),
    "find_split": ("chattune.commands.find_split", ["gpt2"], "load_tokenizer"),
    "data": ("chattune.domains.homeassistant.datagen.cli", ["--sample"], "generate"),
    "export": ("chattune.export.gguf", ["model"], "export_gguf"),
}


def raising(error: BaseException):
    def function(*args, **kwargs):
        raise error

    return function


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    "error,status,line",
    [
        (
            ChattuneError("data.jsonl:3: invalid JSON\n  (second line)"),
            2,
            "error: data.jsonl:3: invalid JSON (second line)",
        ),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
    ids=["chattune-error", "ctrl-c"],
)
def test_every_command_maps_errors_and_ctrl_c(command, error, status, line, monkeypatch, capsys):
    module_name, argv, inner = COMMANDS[command]
    module = importlib.import_module(module_name)
    monkeypatch.setattr(module, inner, raising(error))
    assert module.main(argv) == status
    err = capsys.readouterr().err
    assert line in err and "Traceback" not in err
    if status == 2:
        assert [text for text in err.splitlines() if text.startswith("error:")] == [line]


def test_other_exceptions_keep_their_traceback():
    @entry_point
    def main() -> int:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        main()


def test_every_error_class_derives_from_the_base():
    from chattune.config.flags import FlagError
    from chattune.data.formats import DataError
    from chattune.data.masking import MaskingError
    from chattune.data.split_finder import SplitError
    from chattune.domains.homeassistant.datagen.errors import DataGenError, PileError
    from chattune.evaluation.inputs import EvalError
    from chattune.export.gguf import UnsupportedModelError
    from chattune.models.gguf import GGUFError

    errors = [FlagError, DataError, MaskingError, SplitError, DataGenError, PileError, EvalError]
    assert all(issubclass(error, ChattuneError) for error in [*errors, UnsupportedModelError, GGUFError])


def test_console_scripts_run_the_wrapped_mains():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(CONSOLE_SCRIPTS)
    for target in scripts.values():
        module, function = target.split(":")
        assert hasattr(getattr(importlib.import_module(module), function), "__wrapped__"), target


def test_train_refuses_a_gguf_export_it_could_not_write_before_training(test_tokenizer_dir, tmp_path):
    base = make_tiny_model(test_tokenizer_dir, tmp_path / "gpt2", arch="gpt2")
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    result = run_script(TRAIN, *train_argv(base, data, tmp_path, run_name="r", export_gguf="f16"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot export architecture GPT2LMHeadModel to GGUF" in result.stderr
    assert "Tokenizing" not in result.stderr and not (tmp_path / "runs").exists()  # no data prepared, no training


@pytest.mark.parametrize(
    "config,message",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "cannot export architecture GPT2LMHeadModel"),
        ({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "dynamic"}}, "RoPE scaling 'dynamic'"),
        ({"architectures": ["Qwen2ForCausalLM"], "rope_scaling": {"rope_type": "llama3"}}, "RoPE scaling 'llama3'"),
    ],
)
def test_export_preflight_refuses_what_the_exporter_refuses(config, message):
    from chattune.export.gguf import UnsupportedModelError, check_exportable

    with pytest.raises(UnsupportedModelError, match=message):
        check_exportable(config)


def test_export_preflight_accepts_the_test_tokenizer(test_tokenizer):
    from chattune.export.gguf import check_exportable

    check_exportable({"architectures": ["LlamaForCausalLM"]}, test_tokenizer)
