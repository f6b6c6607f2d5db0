"""Preference training (DPO, SimPO) and quantized bases (QLoRA 4-bit, 8-bit, GPTQ guard), on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chattune.config.flags import FlagError, parse_flags
from chattune.data.formats import DataError
from chattune.training.modeling import quantization_config
from chattune.training.preference import load_pairs
from conftest import REPO, chat_rows, run_script, write_jsonl

TRAIN = str(REPO / "train.py")


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
        "--run_name",
        "run",
        "--base_model",
        str(base),
        "--train_dataset",
        str(data),
        "--output_dir",
        str(tmp_path),
        "--max_steps",
        str(steps),
        "--batch_size",
        "4",
        "--micro_batch_size",
        "2",
        "--learning_rate",
        "2e-3",
        "--logging_steps",
        "1",
        "--save_steps",
        str(steps),
        "--report_to",
        "none",
        *extra,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((tmp_path / "runs" / "run" / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry], result.stderr


def generates(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert model.generate(**ids, max_new_tokens=2, do_sample=False).shape[1] > ids["input_ids"].shape[1]


def test_dpo_raises_the_reward_margin(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs())
    logs, _ = run(tmp_path, tiny_model_dir, data, "--dpo", "--beta", "0.1", "--dpo_loss", "sigmoid", steps=24)
    margins = [entry["rewards/margins"] for entry in logs]
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the first step
    assert sum(margins[-4:]) / 4 > 0.5
    assert all(entry["rewards/accuracies"] == 1.0 for entry in logs[-4:])
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


def test_preference_data_errors(tmp_path):
    with pytest.raises(DataError, match=r"lacks column\(s\) \['rejected'\]"):
        load_pairs(str(write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "chosen": "c"}])))
    same = [*pairs(3), {"question": "q", "chosen": "same", "rejected": "same"}]
    assert len(load_pairs(str(write_jsonl(tmp_path / "b.jsonl", same)))) == 3


def test_qlora_4bit_sft_and_merge(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(1) * 8)
    logs, log = run(
        tmp_path,
        tiny_model_dir,
        data,
        "--use_lora",
        "--load_in_4bit",
        "--lora_merge",
        "--learning_rate",
        "1e-2",
        "--epochs",
        "100",
    )
    assert "4-bit NF4" in log
    losses = [entry["loss"] for entry in logs]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    merged = tmp_path / "models" / "run"
    assert not json.loads((merged / "config.json").read_text()).get("quantization_config")
    generates(merged)


def test_8bit_lora(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(1) * 8)
    logs, log = run(
        tmp_path,
        tiny_model_dir,
        data,
        "--use_lora",
        "--load_in_8bit",
        "--learning_rate",
        "1e-2",
        "--epochs",
        "100",
        steps=8,
    )
    assert "8-bit weights" in log
    losses = [entry["loss"] for entry in logs]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


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
