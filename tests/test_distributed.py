"""Multi-process training through the real entry point, on CPU with 2 processes over gloo."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO, accelerate, chat_rows, launch, run_script, train_argv, write_jsonl

TRAIN = str(REPO / "train.py")
pytestmark = pytest.mark.slow


def training_flags(base, data, out, micro: int, *extra: str) -> list[str]:
    return train_argv(
        base, data, out, *extra, micro_batch_size=micro, max_steps=3, learning_rate="1e-3", save_steps=3, seed=3
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", chat_rows(32))


def test_ddp_two_processes_match_one_process(tiny_model_dir, data, tmp_path):
    single = run_script(TRAIN, *training_flags(tiny_model_dir, data, tmp_path / "one", 4))
    assert single.returncode == 0, single.stderr[-3000:]
    fresh = write_jsonl(tmp_path / "fresh_copy.jsonl", chat_rows(32))  # not in the datasets cache yet
    double = launch(
        *accelerate("--multi_gpu", "--num_processes", "2"),
        TRAIN,
        *training_flags(tiny_model_dir, fresh, tmp_path / "two", 2),
    )
    assert double.returncode == 0, double.stderr[-3000:]
    assert "2 per micro-batch x 1 accumulation x 2 process(es)" in double.stderr
    # Prepared once: rank 0 tokenizes, rank 1 waits and then reads the cache (no second progress bar).
    assert double.stderr.count("Tokenizing fresh_copy.jsonl:   0%") == 1

    one = load_file(tmp_path / "one" / "models" / "run" / "model.safetensors")
    two = load_file(tmp_path / "two" / "models" / "run" / "model.safetensors")
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-4, "training changed nothing"


def test_fsdp_with_the_shipped_config(tiny_model_dir, data, tmp_path):
    result = launch(
        *accelerate("--config_file", str(REPO / "fsdp_config.yaml"), "--num_processes", "2", "--mixed_precision", "no"),
        TRAIN,
        *training_flags(tiny_model_dir, data, tmp_path, 2, "--use_lora", "--lora_merge"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    merged = tmp_path / "models" / "run"
    model = AutoModelForCausalLM.from_pretrained(merged)  # a normal, full model folder
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters()
    )
    assert (tmp_path / "loras" / "run" / "adapter_model.safetensors").is_file()
