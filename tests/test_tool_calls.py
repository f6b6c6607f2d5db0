"""Tool calling: the generator's `--format tool_calls` (rows, tools, failed-call recovery, held-out split), and
training on tool-calling rows (a user's own schema; templates and rows that cannot train are refused)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_datagen import DEVICE_LINE, read_jsonl

from chattune.data.formats import DataError, _trained, normalize_messages
from chattune.domains.homeassistant.datagen import DataGenError, GenerateConfig, generate
from chattune.domains.homeassistant.datagen.piles import PILES_DIR, discover_languages
from chattune.domains.homeassistant.datagen.tool_calls import INTENT_OF_SERVICE, INTENTS, INTENTS_BY_DOMAIN
from conftest import REPO, TRAIN, make_tiny_model, run_script, shared_tokenizer_path, train_argv, write_jsonl

LANGUAGES = discover_languages(PILES_DIR)
KINDS = {"specific_action", "template_action", "multi_device_action", "status", "refusal", "failed_call_recovery"}


def generated(tmp_path: Path, **overrides) -> dict[str, list[dict]]:
    values = {
        "output_dir": tmp_path / "out",
        "piles_dir": PILES_DIR,
        "languages": LANGUAGES,
        "train_count": 200,
        "fmt": "tool_calls",
        "progress": False,
    }
    generate(GenerateConfig(**{**values, **overrides}))
    return {split: read_jsonl(tmp_path / "out" / f"home_assistant_{split}.jsonl") for split in ("train", "test")}


@pytest.fixture(scope="module")
def intents(tmp_path_factory) -> dict[str, list[dict]]:
    return generated(tmp_path_factory.mktemp("intents"))


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> dict[str, list[dict]]:
    return generated(tmp_path_factory.mktemp("services"), tool_set="services")


def listed_devices(system: str) -> dict[str, str]:
    """{entity_id: friendly name} from the Devices list of a system prompt."""
    lines = system.split("\n")
    matches = [DEVICE_LINE.match(line) for line in lines[lines.index("Devices:") + 1 :]]
    return {match.group(1): match.group(2) for match in matches if match}


def calls_of(message: dict) -> list[tuple[str, dict]]:
    return [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in message["tool_calls"]]


def check_row(row: dict, key: str) -> None:
    """Structure every row must have; `key` is how calls address devices ('name' or 'entity_id')."""
    messages = row["messages"]
    assert [m["role"] for m in messages[:2]] == ["system", "user"]
    assert "Services:" not in messages[0]["content"]
    devices = listed_devices(messages[0]["content"])
    tool_names = {tool["function"]["name"] for tool in row["tools"]}
    assert messages[-1]["role"] == "assistant" and messages[-1]["content"] and "tool_calls" not in messages[-1]
    pending: dict[str, str] = {}
    for message in messages[2:-1]:
        if message["role"] == "assistant":
            assert not pending, "a new call before every tool result came back"
            for call, (name, arguments) in zip(message["tool_calls"], calls_of(message)):
                assert name in tool_names and isinstance(call["function"]["arguments"], str)
                pending[call["id"]] = name
                if message.get("train_on_turn") is not False:  # the corrected call acts on a listed device
                    assert arguments[key] in (devices.values() if key == "name" else devices)
        else:
            assert message["role"] == "tool" and pending.pop(message["tool_call_id"]) == message["name"]
            json.loads(message["content"])
    assert not pending, "a call without its tool result"


@pytest.mark.parametrize("split", ["train", "test"])
def test_intent_rows_are_well_formed_in_every_language(intents, split):
    rows = intents[split]
    assert {row["language"] for row in rows} == set(LANGUAGES)
    assert {row["kind"] for row in rows} == KINDS
    for row in rows:
        check_row(row, "name")
        called = {name for m in row["messages"] if m.get("tool_calls") for name, _ in calls_of(m)}
        assert called <= set(INTENTS)
        has_calls = bool(called)
        assert has_calls == (row["kind"] not in ("status", "refusal"))


def test_service_rows_address_entity_ids_and_offer_the_listed_domains(services):
    for row in services["train"]:
        check_row(row, "entity_id")
        domains = {entity.split(".")[0] for entity in listed_devices(row["messages"][0]["content"])}
        assert {tool["function"]["name"].split(".")[0] for tool in row["tools"]} == domains
    called = {
        name for row in services["train"] for m in row["messages"] if m.get("tool_calls") for name, _ in calls_of(m)
    }
    assert called - set(INTENT_OF_SERVICE), "the services tool set keeps services that no intent covers"


def test_intents_cover_exactly_the_mapped_services(intents):
    """No intent row needs a service outside the mapping (toggle, stop_cover, set_hvac_mode...)."""
    assert "light.toggle" not in INTENT_OF_SERVICE and "cover.stop_cover" not in INTENT_OF_SERVICE
    for row in intents["train"]:
        for message in row["messages"]:
            for name, arguments in calls_of(message) if message.get("tool_calls") else []:
                for key in arguments:
                    assert key in dict(INTENTS[name].parameters), (name, key)


def test_failed_call_recovery_retries_or_explains(intents):
    recoveries = [row for row in intents["train"] if row["kind"] == "failed_call_recovery"]
    retries = [row for row in recoveries if len(row["messages"]) == 7]
    explains = [row for row in recoveries if len(row["messages"]) == 5]
    assert retries and explains and len(retries) + len(explains) == len(recoveries)
    for row in retries:
        first, error, second = row["messages"][2:5]
        assert first["train_on_turn"] is False and "train_on_turn" not in second
        (name, wrong), (retried_name, right) = calls_of(first)[0], calls_of(second)[0]
        assert name == retried_name and wrong["name"] != right["name"]
        assert wrong["name"] not in listed_devices(row["messages"][0]["content"]).values()
        assert json.loads(error["content"])["error"] == "MatchFailedError"
    for row in explains:
        result = json.loads(row["messages"][3]["content"])
        assert result["error"] == "DeviceUnavailable"
        assert calls_of(row["messages"][2])[0][1]["name"] in row["messages"][-1]["content"]


def test_test_split_keeps_its_devices_and_requests_held_out(intents):
    def names(rows: list[dict]) -> set[str]:
        return {name for row in rows for name in listed_devices(row["messages"][0]["content"]).values()}

    assert not names(intents["train"]) & names(intents["test"])
    train_users = {row["messages"][1]["content"] for row in intents["train"]}
    assert not train_users & {row["messages"][1]["content"] for row in intents["test"]}


@pytest.mark.parametrize("fmt", ["tool_calls", "sharegpt"])
def test_no_system_role_opens_the_user_turn_with_the_system_text(tmp_path, fmt):
    rows = generated(tmp_path, fmt=fmt, no_system_role=True, languages=["english"], train_count=40)["train"]
    for row in rows:
        messages = row.get("messages") or row["conversations"]
        assert messages[0]["role"] == "user" and all(m["role"] != "system" for m in messages)
        assert "Devices:" in messages[0]["content"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"fmt": "raw_corpus", "no_system_role": True}, "--no_system_role"),
        ({"dpo": True}, "--dpo"),
        ({"tool_set": "apis"}, "unknown tool set"),
    ],
)
def test_bad_combinations_are_refused_before_any_work(tmp_path, overrides, message):
    with pytest.raises(DataGenError, match=message):
        generated(tmp_path, **overrides)
    assert not (tmp_path / "out").exists()


def test_train_on_turn_false_makes_a_turn_context_only():
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "wrong", "train_on_turn": False},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "right", "train_on_turn": True},
    ]
    assert _trained(turns, normalize_messages(turns), "") == [False, False, False, True]
    bad = [{"role": "user", "content": "hi", "train_on_turn": False}]
    with pytest.raises(DataError, match="train_on_turn"):
        _trained(bad, normalize_messages(bad), "f.jsonl:3: ")


# ------------------------------------------------------------------------------------------ training


CALENDAR_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calendar_add_event",
            "description": "Adds an event to the user's calendar",
            "parameters": {
                "type": "object",
                "properties": {"title": {"type": "string"}, "date": {"type": "string"}},
                "required": ["title", "date"],
            },
        },
    }
]


def calendar_rows(n: int = 8, arguments: str | None = None) -> list[dict]:
    """A user's own tool schema, nothing of Home Assistant: add an event, get the result, confirm."""
    rows = []
    for i in range(n):
        call_arguments = arguments or json.dumps({"title": f"Dentist {i}", "date": f"2026-12-{i + 1:02d}"})
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Put the dentist on December {i + 1}"},
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [
                            {
                                "id": "call00001",
                                "type": "function",
                                "function": {"name": "calendar_add_event", "arguments": call_arguments},
                            }
                        ],
                    },
                    {
                        "role": "tool",
                        "tool_call_id": "call00001",
                        "name": "calendar_add_event",
                        "content": '{"ok": true}',
                    },
                    {"role": "assistant", "content": f"Added the dentist on December {i + 1}."},
                ],
                "tools": CALENDAR_TOOLS,
            }
        )
    return rows


@pytest.mark.parametrize("template", ["qwen2", "chatml_tools.jinja"])
def test_a_users_own_tool_schema_trains(tmp_path, tiny_model_dir, template):
    """On a template with tool syntax (Qwen2's), or on a ChatML model given the shipped ChatML-with-tools template."""
    if template == "qwen2":
        base, extra = make_tiny_model(shared_tokenizer_path("qwen2-instruct"), tmp_path / "base"), []
    else:
        base, extra = tiny_model_dir, ["--prompt_template_file", str(REPO / "recipes" / "templates" / template)]
    data = write_jsonl(tmp_path / "calendar.jsonl", calendar_rows())
    result = run_script(TRAIN, *train_argv(base, data, tmp_path / "out", *extra, max_steps=2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "models" / "run" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "rows, message",
    [
        (calendar_rows(), "row 1 has tool calls, but the chat template does not write"),
        (calendar_rows(arguments='{"title": "Dentist"'), "row 1: the arguments of tool call 'calendar_add_event'"),
    ],
    ids=["template-without-tool-syntax", "arguments-not-json"],
)
def test_tool_rows_that_cannot_train_are_refused_naming_the_row(tiny_model_dir, tmp_path, rows, message):
    data = write_jsonl(tmp_path / "calendar.jsonl", rows)
    result = run_script(TRAIN, *train_argv(tiny_model_dir, data, tmp_path / "out", max_steps=2))
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "calendar.jsonl" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "models").exists()


def test_intent_rows_offer_the_intents_of_the_listed_domains_only(intents):
    for row in intents["train"][:200]:
        domains = {entity.split(".")[0] for entity in listed_devices(row["messages"][0]["content"])}
        offered = {tool["function"]["name"] for tool in row["tools"]}
        assert offered == {intent for domain in domains for intent in INTENTS_BY_DOMAIN[domain]}
    assert set(INTENTS) == {intent for intents_ in INTENTS_BY_DOMAIN.values() for intent in intents_}


def test_a_tool_result_without_a_call_is_refused_naming_the_row(tiny_model_dir, tmp_path):
    rows = calendar_rows(3)
    rows[1]["messages"][1] = {"role": "assistant", "content": "Let me check."}  # the call is gone, its result stays
    data = write_jsonl(tmp_path / "calendar.jsonl", rows)
    template = ["--prompt_template_file", str(REPO / "recipes" / "templates" / "chatml_tools.jinja")]
    result = run_script(TRAIN, *train_argv(tiny_model_dir, data, tmp_path / "out", *template, max_steps=2))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "calendar.jsonl: row 2: message 3 is a tool result with no assistant tool call before it" in result.stderr


def test_a_users_own_tool_schema_is_scored_by_evaluate(tmp_path, tiny_model_dir):
    """Calendar rows, nothing of Home Assistant: two trained turns per row (the call, then the reply)."""
    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = (REPO / "recipes" / "templates" / "chatml_tools.jinja").read_text()
    tokenizer.save_pretrained(model)
    data = write_jsonl(tmp_path / "calendar.jsonl", calendar_rows(3))
    result = run_script("evaluate.py", str(model), "--test_dataset", str(data), "--max_new_tokens", "8",
                        "--tool_call_format", "hermes", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["task"] == "tool_calls" and summary["n_turns"] == 6
    assert summary["argument_accuracy_by_key"].keys() == {"title", "date"}


@pytest.mark.parametrize("no_system_role", [True, False])
def test_a_template_that_rejects_a_system_turn(tiny_model_dir, tmp_path, no_system_role):
    """Gemma-style templates raise on a system message: --no_system_role rows have none and train; rows with one
    are refused in one line that names the row and the flag, before the model loads."""
    from templates import GEMMA

    config = {"fmt": "sharegpt", "no_system_role": no_system_role, "languages": ["english"], "train_count": 16}
    data = write_jsonl(tmp_path / "rows.jsonl", generated(tmp_path, **config)["train"])
    template = tmp_path / "gemma.jinja"
    template.write_text(GEMMA)
    argv = train_argv(tiny_model_dir, data, tmp_path / "run", "--prompt_template_file", str(template), max_steps=1)
    result = run_script(TRAIN, *argv)
    if no_system_role:
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "rows.jsonl: row 1: the chat template rejects this conversation" in result.stderr
        assert "--no_system_role" in result.stderr
