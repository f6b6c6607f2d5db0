"""--loss_reduction over gradient accumulation and processes: 1 process x 4 micro-batches is 2 processes x 2."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file
from test_distributed import accelerate, launch

from conftest import TRAIN, chat_rows, run_script, train_argv, write_jsonl

pytestmark = pytest.mark.slow


def flags(base, data, out, reduction: str) -> list[str]:
    # SGD without clipping: the weights move by exactly lr x gradient, so equal weights mean equal gradients (Adam
    # normalises a gradient's scale away and blows up rounding in near-zero ones; clipping hides a wrong scale)
    return train_argv(
        base,
        data,
        out,
        "--loss_reduction",
        reduction,
        "--optimizer",
        "sgd",
        batch_size=8,
        micro_batch_size=2,
        max_steps=2,
        learning_rate="0.5",
        gradient_clip=0,
        save_steps=2,
        seed=3,
    )


@pytest.mark.parametrize("reduction", ["sequences", "tokens"])
def test_one_process_times_4_equals_two_processes_times_2(tiny_model_dir, tmp_path, reduction):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(32))  # examples of different lengths
    one = run_script(TRAIN, *flags(tiny_model_dir, data, tmp_path / "one", reduction))
    assert one.returncode == 0, one.stderr[-3000:]
    assert "2 per micro-batch x 4 accumulation x 1 process(es)" in one.stderr
    two = launch(
        *accelerate("--multi_gpu", "--num_processes", "2"),
        TRAIN,
        *flags(tiny_model_dir, data, tmp_path / "two", reduction),
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 per micro-batch x 2 accumulation x 2 process(es)" in two.stderr

    start = load_file(tiny_model_dir / "model.safetensors")
    first = load_file(tmp_path / "one" / "models" / "run" / "model.safetensors")
    second = load_file(tmp_path / "two" / "models" / "run" / "model.safetensors")
    assert max((first[k] - start[k]).abs().max().item() for k in first) > 1e-3, "training changed nothing"
    assert max((first[k] - second[k]).abs().max().item() for k in first) < 1e-6
