"""Data loading and preparation: formats, bad input with file:line, skip accounting."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from chattune.data.formats import DataError, detect_format, load_rows, normalize_messages
from chattune.data.masking import IGNORE_INDEX, ChatMasker
from chattune.data.tokenization import tokenize_dataset
from chattune.models.chatml import CHATML_TEMPLATE
from conftest import chat_rows, write_jsonl

OPENAI_ROW = {
    "messages": [
        {"role": "user", "content": "Lights on"},
        {"role": "assistant", "content": "On."},
    ]
}


def test_sharegpt_role_names_are_mapped():
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}, {"from": "system", "value": "s"}]
    assert [m["role"] for m in normalize_messages(turns)] == ["user", "assistant", "system"]


@pytest.mark.parametrize(
    "row,name",
    [
        (chat_rows(1)[0], "sharegpt"),
        ({"conversations": OPENAI_ROW["messages"]}, "sharegpt"),
        (OPENAI_ROW, "openai"),
        ({"text": "just text"}, "text"),
        ({"instruction": "Name a color.", "input": "", "output": "Red."}, "alpaca"),
    ],
)
def test_formats_are_detected(tmp_path, row, name):
    rows = load_rows(write_jsonl(tmp_path / "d.jsonl", [row] * 3))
    assert detect_format(rows, "d.jsonl").name == name


def test_json_array_and_saved_dataset_folder(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([OPENAI_ROW] * 2))
    assert len(load_rows(tmp_path / "d.json")) == 2
    Dataset.from_list([OPENAI_ROW] * 3).save_to_disk(str(tmp_path / "saved"))
    assert len(load_rows(tmp_path / "saved")) == 3


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(OPENAI_ROW) + "\n" + json.dumps(OPENAI_ROW) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        load_rows(path)


def test_missing_file_and_wrong_columns(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_rows(tmp_path / "missing.jsonl")
    rows = load_rows(write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}]))
    with pytest.raises(DataError, match=r"odd\.jsonl: unrecognised columns \['answer', 'question'\]; expected"):
        detect_format(rows, str(tmp_path / "odd.jsonl"))


def test_tools_column_reaches_the_template(test_tokenizer, tmp_path):
    template = (
        "{% if tools %}<|im_start|>system\nTOOLS: {{ tools | length }}<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    masker = ChatMasker(test_tokenizer, template)
    tools = [{"type": "function", "function": {"name": "light_on", "parameters": {}}}]
    row = {**OPENAI_ROW, "tools": json.dumps(tools)}
    data, _ = tokenize_dataset(
        load_rows(write_jsonl(tmp_path / "t.jsonl", [row])), test_tokenizer, masker, source="t", ctx_size=512
    )
    assert "TOOLS: 1" in test_tokenizer.decode(data[0]["input_ids"])


def test_skips_are_counted(test_tokenizer, tmp_path):
    masker = ChatMasker(test_tokenizer, CHATML_TEMPLATE)
    long_prompt = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    no_answer = {"messages": [{"role": "user", "content": "hello"}]}
    rows = load_rows(write_jsonl(tmp_path / "mix.jsonl", [OPENAI_ROW, long_prompt, no_answer, OPENAI_ROW]))
    data, counts = tokenize_dataset(rows, test_tokenizer, masker, source="mix", ctx_size=64)
    assert len(data) == 2
    assert counts["kept"] == 2
    assert counts["skipped: no response tokens left after truncation to ctx_size"] == 1
    assert counts["skipped: no assistant response found"] == 1
    assert all(len(ids) <= 64 for ids in data["input_ids"])


def missing_response_warning(caplog, rows_file, tokenizer, masker, **ids) -> str:
    with caplog.at_level("WARNING", logger="chattune.data.tokenization"):
        tokenize_dataset(load_rows(rows_file), tokenizer, masker, source=str(rows_file), ctx_size=256, **ids)
    (message,) = [r.getMessage() for r in caplog.records if "has no assistant response" in r.getMessage()]
    return message


def test_an_example_without_a_response_is_shown_where_the_response_should_start(test_tokenizer, tmp_path, caplog):
    masker = ChatMasker(test_tokenizer, CHATML_TEMPLATE)
    path = tmp_path / "blank-line.jsonl"  # a blank line before the row: its line is not its row number
    path.write_text("\n" + json.dumps(OPENAI_ROW) + "\n" + json.dumps(OPENAI_ROW) + "\n", encoding="utf-8")
    message = missing_response_warning(caplog, path, test_tokenizer, masker, prefix_ids=[1, 2])
    assert message.startswith(f"{path}:2: ") and "(1 more like it" in message
    assert "--prefix_ids 1,2 do not occur" in message
    header_ids = test_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert f"'<|im_start|>assistant\\n' = {','.join(map(str, header_ids))}" in message  # the template's marker
    before, after = message.split("(|> marks it): ")[1].split("|> ")
    assert "'<|im_start|>'" in before and "'<|im_end|>'" in before  # the header and the user turn's end
    first_reply_id = int(after.split(" ", 1)[0])
    assert "On.".startswith(test_tokenizer.decode([first_reply_id]).strip())  # the reply starts at the mark


def test_a_conversation_without_an_assistant_turn_names_its_roles(test_tokenizer, tmp_path, caplog):
    masker = ChatMasker(test_tokenizer, CHATML_TEMPLATE)
    rows = write_jsonl(tmp_path / "q.jsonl", [OPENAI_ROW, {"messages": [{"role": "user", "content": "hello"}]}])
    message = missing_response_warning(caplog, rows, test_tokenizer, masker)
    assert message.startswith(f"{rows}:2: ") and "more like it" not in message
    assert "no assistant message (roles: user)" in message and message.endswith("|> (end)")


def test_rows_are_located_by_line_in_files_and_by_number_elsewhere(tmp_path):
    from chattune.data.sources import row_location

    text = tmp_path / "docs.txt"
    text.write_text("first\ndocument\n\n\nsecond\n  \nthird\n", encoding="utf-8")
    assert [row_location(str(text), index) for index in range(3)] == [f"{text}:1", f"{text}:5", f"{text}:7"]
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([OPENAI_ROW, OPENAI_ROW]), encoding="utf-8")
    assert row_location(str(array), 1) == f"{array}: row 2"
    assert row_location("org/name", 4) == "org/name: row 5"


def test_text_rows_train_on_every_token_and_end_with_eos(test_tokenizer, tmp_path):
    rows = load_rows(write_jsonl(tmp_path / "text.jsonl", [{"text": "The kitchen light is on."}]))
    data, _ = tokenize_dataset(rows, test_tokenizer, None, source="text", ctx_size=64)
    assert data[0]["labels"] == data[0]["input_ids"]
    assert data[0]["input_ids"][-1] == test_tokenizer.eos_token_id


def test_train_on_prompts_labels_the_whole_conversation(test_tokenizer, tmp_path):
    masker = ChatMasker(test_tokenizer, CHATML_TEMPLATE)
    no_answer = {"messages": [{"role": "user", "content": "hello"}]}
    rows = load_rows(write_jsonl(tmp_path / "chat.jsonl", [OPENAI_ROW, no_answer]))
    replies, _ = tokenize_dataset(rows, test_tokenizer, masker, source="chat", ctx_size=64)
    everything, counts = tokenize_dataset(
        rows, test_tokenizer, masker, source="chat", ctx_size=64, train_on_prompts=True
    )
    assert everything["input_ids"] == replies["input_ids"]
    assert everything[0]["labels"] == everything[0]["input_ids"]
    labelled_replies = [label for label in replies[0]["labels"] if label != IGNORE_INDEX]
    assert 0 < len(labelled_replies) < len(everything[0]["labels"])
    assert counts["skipped: no assistant response found"] == 1  # a conversation without a reply is still skipped


def test_multiprocess_map_gives_the_same_labels(test_tokenizer, tmp_path):
    masker = ChatMasker(test_tokenizer, CHATML_TEMPLATE)
    rows = load_rows(write_jsonl(tmp_path / "many.jsonl", chat_rows(300)))
    one, _ = tokenize_dataset(rows, test_tokenizer, masker, source="many", ctx_size=512, num_proc=1)
    two, _ = tokenize_dataset(rows, test_tokenizer, masker, source="many", ctx_size=512, num_proc=2)
    assert one["labels"] == two["labels"]
    assert any(label != IGNORE_INDEX for label in one[0]["labels"])


# ------------------------------------------------------------------------------------------ the format registry

ALPACA_ROW = {"instruction": "Summarize:", "input": "The cat sat on the mat.", "output": "A cat sat."}
# One row of every registered format, and what it becomes.
SAMPLE_ROWS = {
    "sharegpt": chat_rows(1)[0],
    "openai": OPENAI_ROW,
    "text": {"text": "just text"},
    "alpaca": ALPACA_ROW,
    "generator_pairs": {"system": "s", "question": "q", "chosen": "yes", "rejected": "no"},
    "trl_pairs": {"prompt": "q", "chosen": "yes", "rejected": "no"},
    "implicit_prompt_pairs": {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no"}],
    },
    "unpaired": {"prompt": "q", "completion": "yes", "label": True},
}


def test_every_registered_format_has_a_sample_here():
    from chattune.data.formats import FORMATS

    assert set(FORMATS) == set(SAMPLE_ROWS), "add a sample row (and tests) for the new format"


@pytest.mark.parametrize("name", SAMPLE_ROWS)
def test_each_format_detects_itself_and_converts_its_rows(name, tmp_path):
    from chattune.data.formats import CHAT, FORMATS, Conversation, detect

    entry = FORMATS[name]
    rows = load_rows(write_jsonl(tmp_path / "d.jsonl", [SAMPLE_ROWS[name]] * 2))
    assert detect(rows.column_names, "d.jsonl", [entry.use]) is entry
    converted = entry.convert(rows[0], "d.jsonl: row 1: ")
    if entry.use == CHAT:
        assert isinstance(converted, Conversation) and converted.messages[-1]["role"] == "assistant"
        assert converted.trained == [m["role"] == "assistant" for m in converted.messages]
    else:
        assert converted


def test_alpaca_rows_train_evaluate_and_merge_alike(test_tokenizer, tmp_path):
    from chattune.data.formats import FORMATS
    from chattune.domains.homeassistant.datagen.merge import load_alpaca
    from chattune.evaluation.inputs import load_examples

    path = write_jsonl(tmp_path / "alpaca.jsonl", [ALPACA_ROW])
    (example,) = load_examples(str(path))
    assert example.prompt == [{"role": "user", "content": "Summarize:\n\nThe cat sat on the mat."}]
    assert example.reference == "A cat sat."
    ((_, merged),) = load_alpaca(path)
    assert merged == FORMATS["alpaca"].convert(ALPACA_ROW, "") and merged.messages == [
        *example.prompt,
        {"role": "assistant", "content": "A cat sat."},
    ]
    data, _ = tokenize_dataset(
        load_rows(path), test_tokenizer, ChatMasker(test_tokenizer, CHATML_TEMPLATE), source="a", ctx_size=128
    )
    labelled = [t for t in data[0]["labels"] if t != IGNORE_INDEX]
    assert test_tokenizer.decode(labelled) == "A cat sat.<|im_end|>"


WEIGHTED = {
    "messages": [
        {"role": "user", "content": "Lights on"},
        {"role": "assistant", "content": "Sure thing.", "weight": 0},
        {"role": "user", "content": "Fan on"},
        {"role": "assistant", "content": "On.", "weight": 1},
    ]
}


@pytest.mark.parametrize("explicit", [False, True], ids=["automatic", "prefix-ids"])
def test_a_reply_with_weight_0_is_context_not_trained(test_tokenizer, tmp_path, explicit):
    masker = ChatMasker(test_tokenizer, CHATML_TEMPLATE)
    ids = {}
    if explicit:
        prefix = test_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        ids = {"prefix_ids": prefix, "suffix_ids": [test_tokenizer.convert_tokens_to_ids("<|im_end|>")]}
    rows = load_rows(write_jsonl(tmp_path / "w.jsonl", [WEIGHTED]))
    data, _ = tokenize_dataset(rows, test_tokenizer, masker, source="w", ctx_size=256, **ids)
    labelled = test_tokenizer.decode([t for t in data[0]["labels"] if t != IGNORE_INDEX])
    assert labelled == "On.<|im_end|>"
    assert "Sure thing." in test_tokenizer.decode(data[0]["input_ids"])


@pytest.mark.parametrize(
    "turn,message",
    [
        ({"role": "assistant", "content": "x", "weight": 0.5}, "row 2: `weight` is 0 or 1"),
        ({"role": "user", "content": "x", "weight": 0}, "not 0 on a user turn"),
        ({"role": "narrator", "content": "x"}, "row 2: unknown role 'narrator'"),
    ],
)
def test_bad_turns_past_the_first_row_are_named(test_tokenizer, tmp_path, turn, message):
    rows = load_rows(write_jsonl(tmp_path / "bad.jsonl", [OPENAI_ROW, {"messages": [turn]}]))
    with pytest.raises(DataError, match=message):
        tokenize_dataset(rows, test_tokenizer, ChatMasker(test_tokenizer, CHATML_TEMPLATE), source="bad", ctx_size=64)


def test_a_new_format_is_one_registry_entry(test_tokenizer, tmp_path, monkeypatch):
    from chattune.data import formats
    from chattune.evaluation.inputs import load_examples

    def question_answer(row, where):
        return formats.Conversation([{"role": "user", "content": row["q"]}, {"role": "assistant", "content": row["a"]}])

    entry = formats.Format("qa", formats.CHAT, ("q", "a"), '{"q", "a"}', question_answer)
    monkeypatch.setitem(formats.FORMATS, "qa", entry)
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Lights on", "a": "On."}])
    data, counts = tokenize_dataset(
        load_rows(path), test_tokenizer, ChatMasker(test_tokenizer, CHATML_TEMPLATE), source="qa", ctx_size=64
    )
    assert counts["kept"] == 1 and load_examples(str(path))[0].reference == "On."


def test_prefix_ids_that_do_not_open_one_span_per_reply_skip_a_weighted_row(test_tokenizer, tmp_path):
    rows = load_rows(write_jsonl(tmp_path / "w.jsonl", [WEIGHTED, OPENAI_ROW]))
    start, end = (test_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    masker = ChatMasker(test_tokenizer, CHATML_TEMPLATE)
    data, counts = tokenize_dataset(  # <|im_start|> opens user turns too: 4 spans for 2 replies
        rows, test_tokenizer, masker, source="w", ctx_size=256, prefix_ids=[start], suffix_ids=[end]
    )
    assert len(data) == 1 and counts["kept"] == 1
    assert sum(n for name, n in counts.items() if "one per reply" in name) == 1
