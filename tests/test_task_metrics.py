"""--eval_generate (task metrics at every evaluation) and the best checkpoint by --metric_for_best_model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_crash_safety import straight_and_killed_then_resumed

from chattune.config.flags import FlagError, TrainFlags
from chattune.domains.homeassistant.task import HomeAssistantTask
from chattune.training.trainers.arguments import best_metric_key, greater_is_better
from chattune.training.trainers.task_metrics import (
    GenerationPlan,
    check_best_metric,
    load_generation_sample,
    refuse_sharded_generation,
    untouched_training_state,
)
from conftest import TRAIN, run_script, train_argv, write_jsonl

CALL = '\n```homeassistant\n{"service": "light.turn_on", "target_device": "light.kitchen"}\n```'
# A test reply the training data never says: the model learns the call, and over-fits to its own sentence.
UNSEEN_SENTENCE = "Grüße aus München, ça va? ¿Qué tal? Zażółć gęślą jaźń. Emoji and tabs."


def home_rows(n: int, reply: str) -> list[dict]:
    system = "You control the house. Devices: light.kitchen, fan.bedroom"
    return [
        {
            "conversations": [
                {"from": "system", "value": system},
                {"from": "human", "value": f"Please help me with the kitchen number {i}"},
                {"from": "gpt", "value": reply},
            ]
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("data")
    train = write_jsonl(folder / "train.jsonl", home_rows(24, "Sure." + CALL))
    test = write_jsonl(folder / "test.jsonl", home_rows(6, UNSEEN_SENTENCE + CALL))
    return train, test


def best_run_argv(base: Path, data: tuple[Path, Path], out: Path, **flags) -> list[str]:
    """train.py's arguments for a run on the data above that evaluates on its test set."""
    train, test = data
    return train_argv(base, train, out, test_dataset=test, learning_rate="1e-2", **flags)


def run_state(out: Path) -> dict:
    run_dir = out / "runs" / "run"
    last = max(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((last / "trainer_state.json").read_text())


def evaluations(state: dict) -> list[dict]:
    return [entry for entry in state["log_history"] if "eval_loss" in entry]


def weights(folder: Path, name: str) -> dict:
    return load_file(folder / name)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_task_metric_picks_a_checkpoint_the_loss_would_not(tiny_model_dir, data, tmp_path):
    argv = best_run_argv(
        tiny_model_dir,
        data,
        tmp_path,
        max_steps=80,
        learning_rate_schedule="constant",
        eval_steps=8,
        save_steps=8,
        logging_steps=8,
        eval_generate=4,
        metric_for_best_model="service_call_exact_match",
        report_to="tensorboard",
    )
    result = run_script(TRAIN, *argv, "--load_best_model_at_end")
    assert result.returncode == 0, result.stderr[-3000:]

    evals = evaluations(run_state(tmp_path))
    assert len(evals) == 10
    for entry in evals:  # the task metrics are logged at every evaluation, next to the loss
        assert {"eval_service_call_exact_match", "eval_call_recall", "eval_entity_accuracy"} <= entry.keys()
    lowest_loss = min(evals, key=lambda e: e["eval_loss"])
    best = max(evals, key=lambda e: e["eval_service_call_exact_match"])  # the first of equals, as the Trainer
    # The case is real: the model over-fits its training sentence (the loss rises again) while it learns the call.
    assert best["eval_service_call_exact_match"] > lowest_loss["eval_service_call_exact_match"]
    assert best["eval_loss"] > lowest_loss["eval_loss"]
    step = best["step"]
    assert f"best step:      {step} (checkpoint-{step}) by eval_service_call_exact_match = 1.0000" in result.stdout
    run_dir = tmp_path / "runs" / "run"
    final = weights(tmp_path / "models" / "run", "model.safetensors")
    assert same_weights(final, weights(run_dir / f"checkpoint-{step}", "model.safetensors"))
    if step != 80:  # the final model is the best checkpoint's, not the last step's
        assert not same_weights(final, weights(run_dir / "checkpoint-80", "model.safetensors"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(run_dir.rglob("events.out.tfevents.*")))).Reload()
    logged = events.Scalars("eval/service_call_exact_match")
    assert [e.step for e in logged] == [e["step"] for e in evals]
    assert [e.value for e in logged] == [e["eval_service_call_exact_match"] for e in evals]


def test_lora_keeps_the_best_adapter(tiny_model_dir, data, tmp_path):
    steps = {"max_steps": 12, "eval_steps": 4, "save_steps": 4}
    argv = best_run_argv(
        tiny_model_dir, data, tmp_path, **steps, eval_generate=2, metric_for_best_model="entity_accuracy"
    )
    result = run_script(TRAIN, *argv, "--use_lora", "--load_best_model_at_end")
    assert result.returncode == 0, result.stderr[-3000:]
    evals = evaluations(run_state(tmp_path))
    assert [e["step"] for e in evals] == [4, 8, 12] and all("eval_entity_accuracy" in e for e in evals)
    step = max(evals, key=lambda e: e["eval_entity_accuracy"])["step"]
    assert f"best step:      {step} (checkpoint-{step})" in result.stdout
    name = "adapter_model.safetensors"
    final = weights(tmp_path / "loras" / "run", name)
    assert same_weights(final, weights(tmp_path / "runs" / "run" / f"checkpoint-{step}", name))
    if step != 12:  # the final adapter is the best checkpoint's, not the last step's
        assert not same_weights(final, weights(tmp_path / "runs" / "run" / "checkpoint-12", name))


@pytest.mark.slow
def test_resume_after_sigkill_with_eval_generate_is_exact(tiny_model_dir, data, tmp_path):
    train, test = data
    flags = ["--max_steps", "12", "--save_steps", "4", "--eval_steps", "2", "--test_dataset", str(test)]
    flags += ["--eval_generate", "3", "--metric_for_best_model", "call_recall"]
    straight_and_killed_then_resumed(tiny_model_dir, train, tmp_path, *flags)

    a, b = (weights(tmp_path / side / "models" / "run", "model.safetensors") for side in ("a", "b"))
    assert max((a[name] - b[name]).abs().max().item() for name in a) < 1e-6
    # timings differ; TRL's eval_num_tokens counter restarts from 0 on resume (TRL keeps it out of the checkpoint)
    drop = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_num_tokens")
    scores_a, scores_b = (
        [{k: v for k, v in e.items() if k not in drop} for e in evaluations(run_state(tmp_path / side))]
        for side in ("a", "b")
    )
    assert len(scores_a) == 6 and scores_a == scores_b


def test_generation_leaves_mode_and_every_rng_as_it_found_them():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with untouched_training_state(model):
        assert not model.training  # no dropout while generating
        torch.rand(3), random.random(), np.random.rand()
    assert model.training
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert (np.random.get_state()[1] == before[2]).all()


def test_metric_direction_and_names():
    assert best_metric_key("service_call_exact_match") == "eval_service_call_exact_match"
    assert best_metric_key("eval_loss") == "eval_loss"
    assert greater_is_better("eval_service_call_exact_match") and greater_is_better("eval_json_valid_rate")
    assert not greater_is_better("eval_loss") and not greater_is_better("eval_edit_distance")


def flags(test: Path | None, **values) -> TrainFlags:
    return TrainFlags(run_name="r", base_model="m", train_dataset="t.jsonl", test_dataset=test and str(test), **values)


def test_the_sample_is_fixed_by_the_seed(tmp_path):
    test = write_jsonl(tmp_path / "test.jsonl", [row | {"kind": str(i)} for i, row in enumerate(home_rows(20, "ok"))])
    first, again = (load_generation_sample(str(test), 5, seed=3) for _ in range(2))
    assert [e.kind for e in first] == [e.kind for e in again] and len({e.kind for e in first}) == 5
    assert [e.kind for e in load_generation_sample(str(test), 5, seed=4)] != [e.kind for e in first]
    assert len(load_generation_sample(str(test), 50, seed=3)) == 20  # all of a smaller test set


def test_bad_metric_and_generation_flags(tmp_path):
    with pytest.raises(FlagError, match="--eval_generate needs --test_dataset"):
        flags(None, eval_generate=4)
    with pytest.raises(FlagError, match="--load_best_model_at_end needs --test_dataset"):
        flags(None, load_best_model_at_end=True)
    with pytest.raises(FlagError, match="at least 1"):
        flags(tmp_path / "t.jsonl", eval_generate=0)
    with pytest.raises(FlagError, match="--method dpo evaluates on preference rows"):
        flags(tmp_path / "t.jsonl", eval_generate=4, method="dpo")

    no_calls = write_jsonl(tmp_path / "no_calls.jsonl", home_rows(4, "Nothing to do."))
    sample = GenerationPlan(load_generation_sample(str(no_calls), 4, seed=1), HomeAssistantTask())
    with pytest.raises(FlagError, match="add --eval_generate N to log it"):
        check_best_metric(flags(no_calls, metric_for_best_model="service_call_exact_match"), None)
    with pytest.raises(FlagError, match="entity_accuracy cannot be measured on the 4 sampled"):
        check_best_metric(flags(no_calls, eval_generate=4, metric_for_best_model="entity_accuracy"), sample)
    check_best_metric(flags(no_calls, eval_generate=4, metric_for_best_model="no_call_accuracy"), sample)
    check_best_metric(flags(no_calls, metric_for_best_model="mean_token_accuracy"), None)


def test_eval_generate_is_refused_under_fsdp(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(FlagError, match="--eval_generate under FSDP"):
        refuse_sharded_generation(flags(tmp_path / "t.jsonl", eval_generate=4))
    refuse_sharded_generation(flags(tmp_path / "t.jsonl"))  # without generation FSDP trains as before


def test_a_metric_never_logged_stops_the_run_before_training(tiny_model_dir, data, tmp_path):
    train, test = data
    argv = train_argv(tiny_model_dir, train, tmp_path, test_dataset=test, eval_generate=2, metric_for_best_model="acc")
    result = run_script(TRAIN, *argv)
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert "--metric_for_best_model acc: this run never logs eval_acc" in error
    assert "valid names: eval_loss, eval_mean_token_accuracy, eval_service_call_exact_match" in error
    assert "Tokenizing" not in result.stderr and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_ddp_processes_share_the_sample_and_log_the_same_scores(tiny_model_dir, data, tmp_path):
    from test_distributed import accelerate, launch, training_flags

    train, test = data
    # 5 examples over 2 processes: shares of 3 and 2, gathered back into one summary
    extra = ("--test_dataset", str(test), "--eval_steps", "1", "--eval_generate", "5")
    single = run_script(TRAIN, *training_flags(tiny_model_dir, train, tmp_path / "one", 4, *extra))
    assert single.returncode == 0, single.stderr[-3000:]
    double = launch(
        *accelerate("--multi_gpu", "--num_processes", "2"),
        TRAIN,
        *training_flags(tiny_model_dir, train, tmp_path / "two", 2, *extra),
    )
    assert double.returncode == 0, double.stderr[-3000:]

    def task_scores(out: Path) -> list[dict]:
        return [
            {k: v for k, v in e.items() if k.endswith(("_match", "_recall", "_accuracy", "bleu", "rougeL"))}
            for e in evaluations(run_state(out))
        ]

    one, two = task_scores(tmp_path / "one"), task_scores(tmp_path / "two")
    assert len(one) == 3 and all("eval_service_call_exact_match" in e for e in one)
    assert one == two
