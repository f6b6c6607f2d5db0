"""Parsing tool calls from model output in each built-in syntax, the per-turn tool-calling metrics, and evaluate.py
on tool-calling data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from chattune.domains.tool_calling.scoring import (
    ToolCall,
    ToolCallFormatError,
    aggregate,
    parser_for,
    score_turn,
)
from conftest import REPO, run_script

LAMP = {"name": "HassTurnOn", "arguments": {"name": "Desk Lamp"}}
DIM = {"name": "HassLightSet", "arguments": {"name": "Desk Lamp", "brightness": 40}}


def reference(*calls: dict, content: str = "") -> dict:
    return {
        "role": "assistant",
        "content": content,
        "tool_calls": [{"type": "function", "function": call} for call in calls],
    }


def hermes(*calls: dict) -> str:
    return "\n".join(f"<tool_call>{json.dumps(call)}</tool_call>" for call in calls)


@pytest.mark.parametrize(
    "spec, text",
    [
        ("hermes", hermes(LAMP, DIM)),
        ("auto", hermes(LAMP, DIM)),
        ("mistral", "[TOOL_CALLS] " + json.dumps([LAMP, DIM])),
        ("auto", "[TOOL_CALLS] " + json.dumps([LAMP, DIM])),
        (
            "json",
            "<|python_tag|>" + json.dumps([{"name": c["name"], "parameters": c["arguments"]} for c in (LAMP, DIM)]),
        ),
        ("auto", json.dumps([LAMP, DIM])),
        ("regex:<call>(.*?)</call>", f"<call>{json.dumps(LAMP)}</call> then <call>{json.dumps(DIM)}</call>"),
    ],
)
def test_every_syntax_reads_the_same_two_calls(spec, text):
    parsed = parser_for(spec)(text)
    assert parsed.attempted and parsed.json_valid
    assert parsed.calls == [ToolCall(c["name"], c["arguments"]) for c in (LAMP, DIM)]


def test_arguments_given_as_a_json_string_are_read():
    text = hermes({"name": "HassTurnOn", "arguments": json.dumps({"name": "Desk Lamp"})})
    assert parser_for("hermes")(text).calls == [ToolCall("HassTurnOn", {"name": "Desk Lamp"})]


@pytest.mark.parametrize(
    "text", ["<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>', "<tool_call>{"]
)
def test_unreadable_calls_are_attempts_that_clear_json_validity(text):
    parsed = parser_for("auto")(text)
    assert parsed.attempted and not parsed.json_valid and not parsed.calls


def test_plain_text_is_no_call_and_keeps_its_text():
    parsed = parser_for("auto")("The lamp is already on.")
    assert not parsed.attempted and parsed.json_valid and parsed.text == "The lamp is already on."


@pytest.mark.parametrize("spec, message", [("xml", "unknown"), ("regex:(", "not a regular"), ("regex:abc", "group")])
def test_bad_formats_are_refused(spec, message):
    with pytest.raises(ToolCallFormatError, match=message):
        parser_for(spec)


def test_scores_of_a_right_a_half_right_and_a_missing_call():
    parse = parser_for("hermes")
    right = score_turn(reference(LAMP, DIM), hermes(DIM, LAMP), parse)  # order does not matter
    assert right.exact_match and right.n_names_correct == 2
    half = score_turn(reference(DIM), hermes({**DIM, "arguments": {"name": "Desk Lamp", "brightness": 80}}), parse)
    assert not half.exact_match and half.n_names_correct == 1
    assert half.key_hits == {"name": (1, 1), "brightness": (1, 0)}
    missing = score_turn(reference(LAMP, DIM), hermes(LAMP), parse)
    assert not missing.exact_match and missing.key_hits == {"name": (2, 1), "brightness": (1, 0)}
    summary = aggregate([right, half, missing])
    assert summary["tool_call_exact_match"] == pytest.approx(1 / 3)
    assert summary["function_name_accuracy"] == pytest.approx(4 / 5)
    assert summary["argument_accuracy_by_key"] == {"brightness": pytest.approx(1 / 3), "name": pytest.approx(4 / 5)}
    assert summary["no_call_accuracy"] is None and summary["final_reply_rougeL"] is None


def test_no_call_turns_and_final_replies():
    parse = parser_for("auto")
    quiet = score_turn({"role": "assistant", "content": "It is off."}, "It is off.", parse)
    chatty = score_turn({"role": "assistant", "content": "It is off."}, hermes(LAMP), parse)
    final = score_turn({"role": "assistant", "content": "Desk Lamp is on."}, "Desk Lamp is on.", parse, True)
    summary = aggregate([quiet, chatty, final])
    assert summary["no_call_accuracy"] == pytest.approx(2 / 3)
    assert summary["final_reply_rougeL"] == pytest.approx(1.0)
    assert summary["tool_call_exact_match"] is None and summary["json_valid_rate"] == 1.0


def test_numbers_compare_with_tolerance_and_strings_exactly():
    parse = parser_for("hermes")
    assert score_turn(
        reference(DIM), hermes({**DIM, "arguments": {"name": "Desk Lamp", "brightness": 40.0}}), parse
    ).exact_match
    assert not score_turn(reference(LAMP), hermes({**LAMP, "arguments": {"name": "desk lamp"}}), parse).exact_match


# ------------------------------------------------------------------------------------------ evaluate.py


@pytest.fixture(scope="module")
def tool_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with the ChatML-with-tools template as its own, as train.py saves one trained with it."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tool-model")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = (REPO / "recipes" / "templates" / "chatml_tools.jinja").read_text()
    tokenizer.save_pretrained(folder)
    return folder


def test_evaluate_scores_tool_calling_data_turn_by_turn(tool_model, tmp_path):
    data = tmp_path / "data"
    generated = run_script("data/generate_home_assistant_data.py", "--test", "--format", "tool_calls",
                           "--max_devices", "3", "--compact_prompt", "--output_dir", str(data))  # fmt: skip
    assert generated.returncode == 0, generated.stderr[-2000:]
    test_file = data / "home_assistant_test.jsonl"
    rows = [json.loads(line) for line in test_file.read_text().splitlines()[:6]]
    trained_turns = sum(
        1 for row in rows for m in row["messages"] if m["role"] == "assistant" and m.get("train_on_turn") is not False
    )
    result = run_script("evaluate.py", str(tool_model), "--test_dataset", str(test_file), "--max_examples", "6",
                        "--max_new_tokens", "8", "--output_dir", str(tmp_path / "eval"), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["task"] == "tool_calls" and summary["n_turns"] == trained_turns
    assert set(summary["by_kind"]) == {row["kind"] for row in rows}
    for key in ("tool_call_exact_match", "function_name_accuracy", "no_call_accuracy", "final_reply_rougeL"):
        assert key in summary
    failures = (tmp_path / "eval" / "eval_failures.jsonl").read_text().splitlines()
    assert all("expected_calls" in json.loads(line) for line in failures)


def test_a_bad_tool_call_format_is_refused_before_any_model_loads(tmp_path):
    result = run_script("evaluate.py", str(tmp_path / "nothing-here"), "--tool_call_format", "regex:(")
    assert result.returncode == 2 and "not a regular expression" in result.stderr
    assert "Traceback" not in result.stderr
