"""The task seam: a task defined in the tests trains and evaluates through train.py and evaluate.py, and the
tool-calling task picks a best checkpoint during training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chattune.domains.task import TaskError, check_task_name, resolve_task, task_class
from chattune.evaluation.inputs import Example
from conftest import REPO, run_script, train_argv, write_jsonl

ECHO_TASK = str(REPO / "tests" / "echo_task.py") + ":FirstWordTask"


def rows(n: int, answer: str) -> list[dict]:
    return [
        {"conversations": [{"role": "user", "content": f"say the word {i}"}, {"role": "assistant", "content": answer}],
         "kind": "even" if i % 2 == 0 else "odd"}
        for i in range(n)
    ]  # fmt: skip


def test_registered_tasks_and_detection():
    home = Example([{"role": "user", "content": "hi"}], "Hello.", "english", "status")
    call = {"role": "assistant", "tool_calls": []}
    tool = Example([{"role": "user", "content": "hi"}], "", "english", "action", reference_message=call)
    assert resolve_task("auto", [home]).name == "homeassistant"
    assert resolve_task("auto", [home, tool]).name == "tool_calls"
    assert task_class(ECHO_TASK).name == "first_word"
    missing = str(REPO / "tests" / "echo_task.py") + ":Missing"
    cases = (("nope", "unknown; one of auto"), ("tests/none.py:X", "cannot import"), (missing, "no Task subclass"))
    for bad, message in cases:
        with pytest.raises(TaskError, match=message):
            check_task_name(bad)


def test_a_task_of_ones_own_trains_and_evaluates(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", rows(16, "Banana is the word."))
    test = write_jsonl(tmp_path / "test.jsonl", rows(4, "Banana."))
    argv = train_argv(
        tiny_model_dir, train, tmp_path, test_dataset=test, max_steps=6, eval_steps=3, save_steps=3,
        learning_rate=3e-3, eval_generate=4, eval_task=ECHO_TASK, metric_for_best_model="first_word_accuracy",
    )  # fmt: skip
    result = run_script("train.py", *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((tmp_path / "runs" / "run" / "checkpoint-6" / "trainer_state.json").read_text())
    evals = [entry for entry in state["log_history"] if "eval_loss" in entry]
    assert [e["step"] for e in evals] == [3, 6]
    assert all({"eval_first_word_accuracy", "eval_reply_words"} <= e.keys() for e in evals)
    assert state["best_metric"] == max(e["eval_first_word_accuracy"] for e in evals)

    out = tmp_path / "eval"
    scored = run_script("evaluate.py", str(tmp_path / "models" / "run"), "--test_dataset", str(test),
                        "--task", ECHO_TASK, "--output_dir", str(out), "--json")  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-3000:]
    summary = json.loads(scored.stdout.strip().splitlines()[-1])
    assert summary["task"] == "first_word" and set(summary["by_kind"]) == {"even", "odd"}
    stored = json.loads((out / "eval_results.json").read_text())["settings"]
    assert stored["task"] == "first_word"
    assert (
        "first"
        in run_script(
            "evaluate.py",
            str(tmp_path / "models" / "run"),
            "--test_dataset",
            str(test),
            "--task",
            ECHO_TASK,
            "--output_dir",
            str(out),
        ).stdout
    )  # the table: its short names


def tool_rows(n: int) -> list[dict]:
    tools = [{"type": "function", "function": {"name": "HassTurnOn", "parameters": {
        "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}]  # fmt: skip
    calls = [{"id": "c1", "type": "function", "function": {"name": "HassTurnOn", "arguments": '{"name": "Lamp"}'}}]
    return [
        {"messages": [{"role": "user", "content": f"lamp on {i}"},
                      {"role": "assistant", "content": "", "tool_calls": calls}], "tools": tools}
        for i in range(n)
    ]  # fmt: skip


@pytest.mark.slow
def test_tool_calling_eval_generate_picks_a_best_checkpoint(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", tool_rows(16))
    test = write_jsonl(tmp_path / "test.jsonl", tool_rows(4))
    argv = train_argv(
        tiny_model_dir, train, tmp_path, test_dataset=test, max_steps=8, eval_steps=4, save_steps=4,
        learning_rate=3e-3, eval_generate=4, metric_for_best_model="tool_call_exact_match",
        prompt_template_file=str(REPO / "recipes" / "templates" / "chatml_tools.jinja"),
    )  # fmt: skip
    result = run_script("train.py", *argv, "--load_best_model_at_end")
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((tmp_path / "runs" / "run" / "checkpoint-8" / "trainer_state.json").read_text())
    evals = [entry for entry in state["log_history"] if "eval_loss" in entry]
    assert [e["step"] for e in evals] == [4, 8]
    assert all("eval_tool_call_exact_match" in e and "eval_function_name_accuracy" in e for e in evals)
    assert Path(state["best_model_checkpoint"]).name in ("checkpoint-4", "checkpoint-8")
