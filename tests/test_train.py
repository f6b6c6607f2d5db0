"""train.py end to end, in subprocesses, on tiny random-weight models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TRAIN, chat_rows, generates, make_tiny_model, run_script, train_argv, write_jsonl

FAST = {"max_steps": 4, "learning_rate": "1e-3", "logging_steps": 1, "save_steps": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", chat_rows(24))


def train(base: Path, data: Path, out: Path, *extra: str) -> str:
    result = run_script(TRAIN, *train_argv(base, data, out, *extra, **FAST))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_full_fine_tune(tiny_model_dir, dataset, tmp_path):
    log = train(tiny_model_dir, dataset, tmp_path, "--test_dataset", str(dataset), "--report_to", "tensorboard")
    final = tmp_path / "models" / "run"
    assert (final / "model.safetensors").is_file() and (final / "chat_template.jinja").is_file()
    generates(final)
    assert sorted(p.name for p in (tmp_path / "runs" / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert list((tmp_path / "runs" / "run").rglob("events.out.tfevents.*")), "no TensorBoard log"
    assert "24  kept" in log and "padding-free" in log
    assert not list(tmp_path.glob("models/.*")), "a temporary folder was left behind"


def test_lora_merge_matches_adapter(tiny_model_dir, dataset, tmp_path):
    from peft import PeftModel

    train(
        tiny_model_dir,
        dataset,
        tmp_path,
        "--use_lora",
        "--lora_rank",
        "4",
        "--lora_alpha",
        "8",
        "--lora_merge",
        "--learning_rate",
        "1e-2",
    )
    adapter_dir, merged_dir = tmp_path / "loras" / "run", tmp_path / "models" / "run"
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "tokenizer.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
        adapter_logits = adapted(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-3, "the adapter learned nothing"
    assert (merged_logits - adapter_logits).abs().max() < 1e-4
    generates(merged_dir)


def test_loss_decreases_on_a_repeated_example(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "one.jsonl", chat_rows(1) * 8)
    train(
        tiny_model_dir,
        data,
        tmp_path,
        "--max_steps",
        "30",
        "--save_steps",
        "30",
        "--learning_rate",
        "3e-3",
        "--epochs",
        "100",
    )
    state = json.loads((tmp_path / "runs" / "run" / "checkpoint-30" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) >= 25
    assert losses[-1] < 0.5 * losses[0]


def test_added_tokens_train_embeddings_with_lora(test_tokenizer_dir, dataset, tmp_path):
    bare = tmp_path / "bare-tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(test_tokenizer_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    base = make_tiny_model(bare, tmp_path / "base")
    log = train(
        base,
        dataset,
        tmp_path,
        "--use_lora",
        "--add_pad_token",
        "--add_chatml_tokens",
        "--add_tool_calling_tokens",
        "--lora_merge",
    )
    assert "modules_to_save" in log
    merged = tmp_path / "models" / "run"
    saved = AutoTokenizer.from_pretrained(merged)
    assert "<tool_call>" in saved.get_vocab() and saved.chat_template
    rows = AutoModelForCausalLM.from_pretrained(merged).get_input_embeddings().weight.shape[0]
    assert rows % 32 == 0 and rows >= len(saved)


def test_no_chat_template_explains_both_options(test_tokenizer_dir, dataset, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(test_tokenizer_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    base = make_tiny_model(bare, tmp_path / "base")
    result = run_script(TRAIN, *train_argv(base, dataset, tmp_path, run_name="r"))
    assert result.returncode == 2
    assert "--add_chatml_tokens" in result.stderr and "--prompt_template_file" in result.stderr


def test_refusals(tiny_model_dir, dataset, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{oops\n')
    result = run_script(TRAIN, *train_argv(tiny_model_dir, bad, tmp_path, run_name="r"))
    assert result.returncode == 2 and "bad.jsonl:2: invalid JSON" in result.stderr

    result = run_script(TRAIN, *train_argv(tiny_model_dir, dataset, tmp_path, run_name="r", prefix_ids="1,2,3,4"))
    assert result.returncode == 2 and "--prefix_ids 1,2,3,4 never matched" in result.stderr

    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "something").write_text("x")
    result = run_script(TRAIN, *train_argv(tiny_model_dir, dataset, tmp_path, run_name="r"))
    assert result.returncode == 2 and "not empty" in result.stderr and "--resume_from_checkpoint" in result.stderr


def test_early_stopping_eval_fraction_throughput_and_summary(tiny_model_dir, dataset, tmp_path):
    result = run_script(
        TRAIN,
        *train_argv(
            tiny_model_dir,
            dataset,
            tmp_path,
            test_dataset=dataset,
            max_steps=20,
            learning_rate=0,
            eval_steps=2,
            save_steps=2,
            eval_fraction=0.25,
            early_stopping_patience=1,
            logging_steps=1,
            flops_baseline="1e12",
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steps:          4" in result.stdout  # lr 0: the second evaluation does not improve, so it stops
    assert "best eval loss" in result.stdout and "final eval loss (whole test set)" in result.stdout
    assert f"saved: {tmp_path / 'models' / 'run'}" in result.stdout
    state = json.loads((tmp_path / "runs" / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    evals = [entry for entry in state["log_history"] if "eval_loss" in entry]
    assert evals[0]["eval_samples_per_second"] and len(evals) == 2
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert all(entry["tokens_per_second"] > 0 and 0 < entry["mfu"] < 1 for entry in logged[1:])


def test_export_gguf_after_training(test_tokenizer_dir, dataset, tmp_path):
    base = make_tiny_model(test_tokenizer_dir, tmp_path / "base", arch="qwen2")
    train(base, dataset, tmp_path, "--use_lora", "--lora_merge", "--export_gguf", "q8_0")
    assert (tmp_path / "models" / "run" / "run-q8_0.gguf").stat().st_size > 0
