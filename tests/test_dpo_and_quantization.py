"""Preference training (DPO, SimPO, ORPO, KTO) and quantized bases (QLoRA 4-bit, 8-bit, GPTQ guard), on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from chattune.config.flags import FlagError, parse_flags
from chattune.data.formats import DataError
from chattune.training.modeling import quantization_config
from chattune.training.preference import check_method, load_pairs, load_preferences
from conftest import TRAIN, chat_rows, generates, run_script, train_argv, write_jsonl


def pairs(n: int = 16) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append(
            {
                "system": "You control the house.",
                "question": f"Turn on the kitchen light {i}",
                "chosen": f'Turning it on.\n```homeassistant\n{{"service": "light.turn_on", "n": {i}}}\n```',
                "rejected": "I cannot help with that.",
            }
        )
    return rows


def run(tmp_path, base, data, *extra, steps: int = 12):
    result = run_script(
        TRAIN,
        *train_argv(
            base, data, tmp_path, *extra, max_steps=steps, learning_rate="2e-3", logging_steps=1, save_steps=steps
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((tmp_path / "runs" / "run" / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry], result.stderr


def test_dpo_raises_the_reward_margin(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs())
    logs, _ = run(tmp_path, tiny_model_dir, data, "--dpo", "--beta", "0.1", "--dpo_loss", "sigmoid", steps=24)
    margins = [entry["rewards/margins"] for entry in logs]
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the first step
    assert sum(margins[-4:]) / 4 > 0.5
    assert all(entry["rewards/accuracies"] == 1.0 for entry in logs[-4:])
    assert logs[-1]["num_input_tokens_seen"] > logs[0]["num_input_tokens_seen"] > 0  # the summary's "tokens seen"
    generates(tmp_path / "models" / "run")


def test_dpo_lora_merge_on_trl_conversational_pairs(tiny_model_dir, tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": r["question"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in pairs()
    ]
    data = write_jsonl(tmp_path / "trl.jsonl", rows)
    logs, _ = run(
        tmp_path,
        tiny_model_dir,
        data,
        "--dpo",
        "--dpo_loss",
        "ipo",
        "--use_lora",
        "--lora_merge",
        "--learning_rate",
        "1e-2",
    )
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
    assert (tmp_path / "loras" / "run" / "adapter_config.json").is_file()
    generates(tmp_path / "models" / "run")


def test_simpo_runs_reference_free(tiny_model_dir, tmp_path):
    rows = [{"prompt": r["question"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in pairs()]
    logs, _ = run(
        tmp_path,
        tiny_model_dir,
        write_jsonl(tmp_path / "plain.jsonl", rows),
        "--dpo",
        "--simpo",
        "--beta",
        "2.0",
        "--simpo_gamma",
        "0.5",
        steps=6,
    )
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]


def conversations(row: dict, answer: str) -> list[dict]:
    return [
        {"role": "system", "content": row["system"]},
        {"role": "user", "content": row["question"]},
        {"role": "assistant", "content": row[answer]},
    ]


def implicit_prompt_pairs() -> list[dict]:
    """TRL's implicit-prompt pairs: whole conversations whose shared first messages are the prompt."""
    return [{"chosen": conversations(r, "chosen"), "rejected": conversations(r, "rejected")} for r in pairs()]


def unpaired_rows() -> list[dict]:
    """KTO's rows: one completion each, labelled good (the chosen answer) or bad (the rejected one)."""
    return [
        {
            "prompt": conversations(r, "chosen")[:2],
            "completion": [conversations(r, answer)[2]],
            "label": answer == "chosen",
        }
        for r in pairs()
        for answer in ("chosen", "rejected")
    ]


@pytest.mark.parametrize(
    "method,rows,extra",
    [
        ("orpo", implicit_prompt_pairs, []),
        ("kto", unpaired_rows, []),
        (
            "kto",
            pairs,
            ["--use_lora", "--learning_rate", "1e-2"],
        ),  # TRL unpairs pairs; the adapter off is the reference
    ],
    ids=["orpo-implicit-prompt", "kto-unpaired", "kto-pairs-lora"],
)
def test_orpo_and_kto_prefer_the_chosen_answer(tiny_model_dir, tmp_path, method, rows, extra):
    data = write_jsonl(tmp_path / f"{method}.jsonl", rows())
    logs, _ = run(tmp_path, tiny_model_dir, data, "--method", method, *extra, steps=8)
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    margins = [entry["rewards/margins"] for entry in logs if "rewards/margins" in entry]  # KTO: both labels seen
    assert len(margins) >= 4 and margins[-1] > margins[0]
    if method == "orpo":
        assert "log_odds_ratio" in logs[-1] and logs[-1]["loss"] < logs[0]["loss"]
    final = tmp_path / ("loras" if "--use_lora" in extra else "models") / "run"
    assert (final / ("adapter_config.json" if "--use_lora" in extra else "model.safetensors")).is_file()


def test_implicit_prompt_is_the_shared_first_messages(tmp_path):
    row = load_preferences(str(write_jsonl(tmp_path / "p.jsonl", implicit_prompt_pairs()[:1])), "orpo")[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["chosen"] == [{"role": "assistant", "content": pairs()[0]["chosen"]}]
    assert row["rejected"] == [{"role": "assistant", "content": "I cannot help with that."}]


def test_kto_rows_are_split_from_pairs_and_shuffled_once(tmp_path):
    data = str(write_jsonl(tmp_path / "pairs.jsonl", pairs(8)))
    rows = load_preferences(data, "kto", seed=1)
    assert len(rows) == 16 and sum(rows["label"]) == 8
    assert rows["label"] != [True] * 8 + [False] * 8  # not every good answer before every bad one
    assert rows["completion"] == load_preferences(data, "kto", seed=1)["completion"]  # the same order for a seed


@pytest.mark.parametrize(
    "rows,method,message",
    [
        (unpaired_rows()[:2], "dpo", "unpaired .KTO's format.; train them with --method kto"),
        ([{**unpaired_rows()[0], "label": 1}], "kto", "row 1: label must be true"),
        ([{"chosen": "a b", "rejected": "a c"}], "dpo", "row 1: chosen and rejected without a prompt must be"),
        (
            [{"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]}],
            "dpo",
            "share no first message",
        ),
        (
            [{"chosen": implicit_prompt_pairs()[0]["chosen"][:2], "rejected": implicit_prompt_pairs()[0]["rejected"]}],
            "simpo",
            "each needs a reply of its own",
        ),
        ([{"prompt": "p", "completion": "c"}], "kto", r"lacks column\(s\) \['label'\] of the unpaired format"),
    ],
    ids=["unpaired-for-dpo", "label-not-bool", "plain-text-no-prompt", "no-shared-prompt", "no-reply", "no-label"],
)
def test_preference_rows_that_cannot_work_are_named(tmp_path, rows, method, message):
    with pytest.raises(DataError, match=message):
        load_preferences(str(write_jsonl(tmp_path / "rows.jsonl", rows)), method)


def test_a_method_the_installed_trl_lacks_is_refused_with_its_version(monkeypatch):
    import trl

    from chattune.training import preference

    monkeypatch.setitem(preference.TRL_CLASSES, "orpo", (("trl", "NoSuchConfig", "NoSuchTrainer"),))
    flags = parse_flags(["--run_name", "r", "--base_model", "m", "--train_dataset", "d.jsonl", "--method", "orpo"])
    with pytest.raises(FlagError, match=f"TRL {trl.__version__} does not have"):
        check_method(flags)


def test_an_unknown_dpo_loss_is_refused_before_any_work():
    flags = parse_flags(["--run_name", "r", "--base_model", "m", "--train_dataset", "d.jsonl", "--dpo"])
    check_method(flags)
    flags.dpo_loss = "sigmod"
    with pytest.raises(FlagError, match="not a TRL DPO loss; choose one of sigmoid, hinge, ipo"):
        check_method(flags)


def test_preference_data_errors(tmp_path):
    with pytest.raises(DataError, match=r"lacks column\(s\) \['rejected'\]"):
        load_pairs(str(write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "chosen": "c"}])))
    same = [*pairs(3), {"question": "q", "chosen": "same", "rejected": "same"}]
    assert len(load_pairs(str(write_jsonl(tmp_path / "b.jsonl", same)))) == 3


@pytest.mark.parametrize(
    "quantization,logged,merge,steps",
    [("--load_in_4bit", "4-bit NF4", True, 12), ("--load_in_8bit", "8-bit weights", False, 8)],
    ids=["qlora-4bit-and-merge", "lora-on-8bit"],
)
def test_lora_on_a_quantized_base(tiny_model_dir, tmp_path, quantization, logged, merge, steps):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(1) * 8)
    extra = ["--use_lora", quantization, "--learning_rate", "1e-2", "--epochs", "100"]
    logs, log = run(tmp_path, tiny_model_dir, data, *extra, *(["--lora_merge"] if merge else []), steps=steps)
    assert logged in log
    losses = [entry["loss"] for entry in logs]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    if merge:  # QLoRA's merge reloads the base in full precision: a plain model folder
        merged = tmp_path / "models" / "run"
        assert not json.loads((merged / "config.json").read_text()).get("quantization_config")
        generates(merged)


def test_missing_quantization_backends_say_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("bitsandbytes", "gptqmodel") else real(name, *a)
    )
    common = ["--run_name", "r", "--base_model", "m", "--train_dataset", "d.jsonl", "--use_lora"]
    with pytest.raises(FlagError, match="pip install bitsandbytes"):
        quantization_config(parse_flags([*common, "--load_in_4bit"]), torch.float32)
    with pytest.raises(FlagError, match="pip install gptqmodel"):
        quantization_config(parse_flags([*common, "--load_as_gptq"]), torch.float32)
