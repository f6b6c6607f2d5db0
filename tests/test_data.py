"""Data loading and preparation: formats, bad input with file:line, skip accounting."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from chattune.data.formats import DataError, detect_format, load_rows, normalize_messages
from chattune.data.masking import IGNORE_INDEX, ChatMasker
from chattune.data.tokenization import tokenize_dataset
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
    "row,column",
    [
        (chat_rows(1)[0], "conversations"),
        ({"conversations": OPENAI_ROW["messages"]}, "conversations"),
        (OPENAI_ROW, "messages"),
        ({"text": "just text"}, "text"),
    ],
)
def test_formats_are_detected(tmp_path, row, column):
    rows = load_rows(write_jsonl(tmp_path / "d.jsonl", [row] * 3))
    assert detect_format(rows, "d.jsonl") == column


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
    masker = ChatMasker(
        test_tokenizer, "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    long_prompt = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    no_answer = {"messages": [{"role": "user", "content": "hello"}]}
    rows = load_rows(write_jsonl(tmp_path / "mix.jsonl", [OPENAI_ROW, long_prompt, no_answer, OPENAI_ROW]))
    data, counts = tokenize_dataset(rows, test_tokenizer, masker, source="mix", ctx_size=64)
    assert len(data) == 2
    assert counts["kept"] == 2
    assert counts["skipped: no response tokens left after truncation to ctx_size"] == 1
    assert counts["skipped: no assistant response found"] == 1
    assert all(len(ids) <= 64 for ids in data["input_ids"])


def test_text_rows_train_on_every_token_and_end_with_eos(test_tokenizer, tmp_path):
    rows = load_rows(write_jsonl(tmp_path / "text.jsonl", [{"text": "The kitchen light is on."}]))
    data, _ = tokenize_dataset(rows, test_tokenizer, None, source="text", ctx_size=64)
    assert data[0]["labels"] == data[0]["input_ids"]
    assert data[0]["input_ids"][-1] == test_tokenizer.eos_token_id


def test_train_on_prompts_labels_the_whole_conversation(test_tokenizer, tmp_path):
    masker = ChatMasker(
        test_tokenizer, "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
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
    masker = ChatMasker(
        test_tokenizer, "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    rows = load_rows(write_jsonl(tmp_path / "many.jsonl", chat_rows(300)))
    one, _ = tokenize_dataset(rows, test_tokenizer, masker, source="many", ctx_size=512, num_proc=1)
    two, _ = tokenize_dataset(rows, test_tokenizer, masker, source="many", ctx_size=512, num_proc=2)
    assert one["labels"] == two["labels"]
    assert any(label != IGNORE_INDEX for label in one[0]["labels"])
