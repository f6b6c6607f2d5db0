"""The methods table (chattune.config.methods): adding a method is one entry, which train.py's flag checks, data
reading and trainer building all take from the table; reading the table and the flags imports neither torch nor TRL."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from dataclasses import fields, replace

import pytest

from chattune.config.flags import TrainFlags, parse_flags
from chattune.config.methods import METHODS, SCOPED_FLAGS, Method, register
from chattune.data.formats import PAIRS
from conftest import REPO, train_argv, write_jsonl

REQUIRED = ["--run_name", "r", "--base_model", "m", "--train_dataset", "d.jsonl"]

# RPO: DPO's loss plus the SFT loss on the chosen answer, on TRL's DPOTrainer (its `loss_type` takes a list)
RPO = Method(
    name="rpo",
    formats=(PAIRS,),
    trains_on=PAIRS,
    trl=(("trl", "DPOConfig", "DPOTrainer"),),
    config=lambda flags: dict(beta=flags.beta, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0]),
    reference=True,
)


@pytest.fixture
def rpo(monkeypatch):
    """RPO registered for one test only."""
    monkeypatch.setitem(METHODS, RPO.name, RPO)
    return RPO


def refusal(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        parse_flags([*REQUIRED, *argv])
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_a_registered_method_is_a_choice_of_method(rpo):
    flags = parse_flags([*REQUIRED, "--method", "rpo"])
    assert flags.method == "rpo" and flags.preference


def test_an_unregistered_method_is_refused(capsys):
    assert "invalid choice: 'rpo'" in refusal(["--method", "rpo"], capsys)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--packing", "--train_on_prompts"], "--packing, --train_on_prompts shape(s) SFT batches and labels; "
         "--method rpo does not use them"),
        (["--dpo_loss", "ipo"], "--dpo_loss ipo applies to --method dpo, not rpo"),
        (["--simpo_gamma", "1"], "--simpo_gamma applies to --method simpo, not rpo"),
        (["--precompute_ref_log_probs"], "--method rpo is not supported with it (dpo only)"),
        (["--loss_reduction", "sequences"], "--method rpo has its own loss"),
    ],
)  # fmt: skip
def test_flags_the_new_method_does_not_list_are_refused(rpo, argv, message, capsys):
    assert message in refusal(["--method", "rpo", *argv], capsys)


def test_a_method_that_lists_a_flag_takes_it(rpo, monkeypatch):
    monkeypatch.setitem(METHODS, "rpo", replace(RPO, flags=("dpo_loss",)))
    assert parse_flags([*REQUIRED, "--method", "rpo", "--dpo_loss", "ipo"]).dpo_loss == "ipo"


def test_an_entry_names_only_method_specific_flags_and_those_are_train_flags():
    names = {field.name for field in fields(TrainFlags)}
    assert set(SCOPED_FLAGS) <= names
    for entry in METHODS.values():
        assert set(entry.flags) <= set(SCOPED_FLAGS), entry.name
    with pytest.raises(ValueError, match="not method-specific: \\['ctx_size'\\]"):
        register(replace(RPO, flags=("ctx_size",)))
    assert "rpo" not in METHODS


def test_the_method_flag_resolution_imports_neither_torch_nor_trl():
    code = f"""
        import json, sys
        from chattune.data.formats import PAIRS
        from chattune.config.flags import parse_flags
        from chattune.config.methods import Method, register
        register(Method(name="rpo", formats=(PAIRS,), trains_on=PAIRS, trl=(("trl", "DPOConfig", "DPOTrainer"),),
                        config=lambda flags: dict(beta=flags.beta), reference=True))
        assert parse_flags({[*REQUIRED, "--method", "rpo"]!r}).preference
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "trl"))))
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == []


def test_docs_list_every_method():
    table = (REPO / "docs" / "training.md").read_text(encoding="utf-8").split("| `--method` |", 1)[1]
    documented = re.findall(r"^\| `([a-z_]+)` \|", table.split("\n\n", 1)[0], flags=re.M)
    assert documented == list(METHODS)


def pairs(count: int) -> list[dict]:
    return [
        {
            "system": "You control the house.",
            "question": f"Turn on the kitchen light {index}",
            "chosen": f'Turning it on.\n```homeassistant\n{{"service": "light.turn_on", "n": {index}}}\n```',
            "rejected": "I cannot help with that.",
        }
        for index in range(count)
    ]


@pytest.mark.slow
def test_a_method_registered_in_a_test_trains_through_train_py(rpo, tiny_model_dir, tmp_path, monkeypatch):
    """The entry alone is enough: train.py resolves --method rpo, reads pairs for it, and builds TRL's trainer with
    the entry's config and a reference model."""
    from trl import DPOTrainer

    from chattune.commands import train as run

    built = []

    def spy(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    build = run.build_preference_trainer
    monkeypatch.setattr(run, "build_preference_trainer", spy)
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(8))
    argv = train_argv(tiny_model_dir, data, tmp_path, "--method", "rpo", max_steps=2, logging_steps=1, save_steps=2)
    assert run.main(argv) == 0
    trainer = built[0]
    assert isinstance(trainer, DPOTrainer)
    assert trainer.args.loss_type == ["sigmoid", "sft"] and trainer.ref_model is not None
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and "rewards/margins" in logged[-1]
    assert (tmp_path / "models" / "run" / "model.safetensors").is_file()
