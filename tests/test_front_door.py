"""The front door: `--help` and refused flags answer before torch or transformers is imported (they take seconds),
and what stands in for transformers on that path (its argument parser, its lists of names) agrees with it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from chattune.config import transformers_names
from chattune.config.flags import TrainFlags, build_parser, parse_flags
from conftest import REPO, run_script

HEAVY = ("torch", "transformers", "peft", "trl", "bitsandbytes")
REQUIRED = ["--run_name", "r", "--base_model", "m", "--train_dataset", "d.jsonl"]


def imported_heavy(importtime_log: str) -> list[str]:
    """The heavy packages (or their submodules) named in a `python -X importtime` log."""
    names = {line.rsplit("|", 1)[-1].strip() for line in importtime_log.splitlines() if line.startswith("import time")}
    return sorted(name for name in names if name.split(".")[0] in HEAVY)


def refusal(*args: str, cwd=None) -> tuple[int, str, list[str]]:
    """Run an entry script as a user would, under -X importtime: its status, its message lines, the heavy imports."""
    result = run_script("-X", "importtime", *args, cwd=cwd)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("import time")]
    return result.returncode, "\n".join(lines), imported_heavy(result.stderr)


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "find_split.py"])
def test_help_imports_neither_torch_nor_transformers(script):
    result = run_script("-X", "importtime", script, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
    assert imported_heavy(result.stderr) == []


@pytest.fixture
def bad_recipe(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("run_name: r\nlora_rnak: 8\n")
    return recipe


REFUSALS = {  # id: (arguments after the script, a part of the message)
    "unknown-flag": (["train.py", *REQUIRED, "--lora_rnak", "8"], "unknown flag '--lora_rnak'"),
    "bad-value": (["train.py", *REQUIRED, "--ctx_size", "many"], "invalid int value: 'many'"),
    "bad-choice": (["train.py", *REQUIRED, "--method", "ppo"], "invalid choice: 'ppo'"),
    "combination": (["train.py", *REQUIRED, "--lora_merge"], "--lora_merge merges a LoRA adapter"),
    "evaluation-flag": (["train.py", *REQUIRED, "--load_best_model_at_end"], "needs --test_dataset"),
    "export-type": (["train.py", *REQUIRED, "--export_gguf", "q9"], "--export_gguf must be one of"),
    "recipe-key": (["train.py", "--config", "{recipe}"], "unknown key 'lora_rnak'; did you mean --lora_rank?"),
    "missing-recipe": (["train.py", "--config", "none.yaml"], "--config none.yaml: No such file"),
    "evaluate-value": (["evaluate.py", "m", "--batch_size", "0"], "must be at least 1, got 0"),
    "evaluate-task": (["evaluate.py", "m", "--task", "chess"], "chess"),
    "find-split-flag": (["find_split.py", "m", "--bogus"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_come_before_torch_and_transformers(case, bad_recipe, tmp_path):
    (script, *args), message = REFUSALS[case]
    status, err, heavy = refusal(str(REPO / script), *(arg.format(recipe=bad_recipe) for arg in args), cwd=tmp_path)
    assert status == 2, err[-2000:]
    assert message in err
    assert "Traceback" not in err
    assert heavy == []


ACCEPTED = [*REQUIRED, "--use_lora", "--lora_merge", "--export_gguf", "q8_0", "--optimizer", "adamw_torch"]


def test_accepted_flags_import_neither_torch_nor_transformers():
    """train.py reads its flags again after the allocator restart: that must stay cheap too."""
    code = f"""
        import json, sys
        from chattune.config.flags import parse_flags
        parse_flags({[*ACCEPTED, "--learning_rate_schedule", "cosine", "--attn_implementation", "sdpa"]!r})
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})))
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == []


# --- what stands in for transformers agrees with it -----------------------------------------------------------


@pytest.mark.parametrize(
    "known,installed",
    [
        (transformers_names.SCHEDULES, transformers_names.installed_schedules),
        (transformers_names.OPTIMIZERS, transformers_names.installed_optimizers),
        (transformers_names.ATTENTION_KERNELS, transformers_names.installed_attention_kernels),
    ],
    ids=["schedules", "optimizers", "attention"],
)
def test_names_accepted_without_transformers_are_names_it_knows(known, installed):
    assert set(known) <= set(installed())


def test_a_name_only_the_installed_transformers_knows_is_accepted(monkeypatch):
    monkeypatch.setattr(transformers_names, "SCHEDULES", ())
    monkeypatch.setattr("chattune.config.flags.SCHEDULES", ())
    assert parse_flags([*REQUIRED, "--learning_rate_schedule", "cosine"]).learning_rate_schedule == "cosine"


ARGVS = [
    REQUIRED,
    [*REQUIRED, "--bf16", "--use-lora", "true", "--lora_merge", "no", "--test_dataset", "a.jsonl", "b.jsonl:0.5"],
    [*REQUIRED, "--prefix-ids", "1,2", "--suffix_ids", "3", "--use_lora", "--lora_init", "gaussian"],
]


@pytest.mark.parametrize("argv", ARGVS, ids=range(len(ARGVS)))
def test_the_parser_reads_what_transformers_parser_read(argv):
    from transformers import HfArgumentParser

    theirs = HfArgumentParser(TrainFlags).parse_args_into_dataclasses(args=argv, look_for_args_file=False)[0]
    assert parse_flags(argv) == theirs


def test_the_help_is_transformers_parsers_help():
    from transformers import HfArgumentParser

    ours = build_parser()
    theirs = HfArgumentParser(TrainFlags, prog=ours.prog, description=ours.description, epilog=ours.epilog)
    theirs.add_argument("--config", help=next(action.help for action in ours._actions if action.dest == "config"))
    assert ours.format_help() == theirs.format_help()


def test_outtype_names_are_the_exporters():
    from chattune.config import outtypes
    from chattune.export import gguf, quantize

    assert tuple(gguf.OUTTYPES) == outtypes.WRITTEN_OUTTYPES
    assert tuple(quantize.LLAMA_QUANT_TYPES) == outtypes.LLAMA_QUANT_NAMES
    assert gguf.ALL_OUTTYPES == (*gguf.OUTTYPES, *quantize.LLAMA_QUANT_TYPES)
