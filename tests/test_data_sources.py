"""Data sources: files, folders and hub ids, mixtures by weight, `.txt` documents, and bad input named before the
model is loaded (issue 20 point 1 and its bad-input list, issue 21 point 8)."""

from __future__ import annotations

import json
import logging
import re

import pytest
from datasets import Dataset

from chattune.data import sources
from chattune.data.formats import DataError, load_rows
from chattune.data.masking import IGNORE_INDEX, ChatMasker
from chattune.data.sources import Source, combine, parse_source, parse_sources, read_sources
from chattune.data.tokenization import tokenize_dataset
from chattune.models.chatml import CHATML_TEMPLATE
from conftest import chat_rows, train_argv, write_jsonl

OPENAI_ROW = {"messages": [{"role": "user", "content": "Lights on"}, {"role": "assistant", "content": "On."}]}
ALPACA_ROWS = [{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(40)]


def texts(dataset) -> list:
    return [json.dumps(row, sort_keys=True) for row in dataset]


def keep(rows, source):
    return rows


# ------------------------------------------------------------------------------------------ one source


def test_one_path_is_read_as_it_always_was(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(5))
    (source,) = parse_sources(str(path))
    assert source == Source(str(path), "json", str(path))
    seen = []
    data = read_sources([str(path)], lambda rows, source: seen.append(source) or rows, seed=1)
    assert seen == [source] and texts(data) == texts(load_rows(path))  # no mixing, no shuffling, no extra column


def test_each_kind_of_local_source_loads(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [OPENAI_ROW] * 2)
    (tmp_path / "a.json").write_text(json.dumps([OPENAI_ROW] * 3))
    Dataset.from_list([OPENAI_ROW] * 4).to_parquet(str(tmp_path / "a.parquet"))
    Dataset.from_list([OPENAI_ROW] * 5).save_to_disk(str(tmp_path / "saved"))
    write_jsonl(tmp_path / "rows.ndjson", [OPENAI_ROW] * 6)
    (tmp_path / "notes.md").write_text("one\n\ntwo\n")
    sizes = {
        "a.jsonl": 2,
        "a.json": 3,
        "a.parquet": 4,
        "saved": 5,
        "jsonl:rows.ndjson": 6,  # torchllms' prefixes say how to read a file whatever its name
        "text:notes.md": 2,
        "local:saved": 5,
    }
    for spec, size in sizes.items():
        prefix, _, name = spec.rpartition(":")
        data = load_rows(f"{prefix}:{tmp_path / name}" if prefix else tmp_path / name)
        assert len(data) == size, spec


def hub_layout(folder):
    """A folder laid out like a dataset repository on the hub: data files named by split."""
    (folder / "data").mkdir(parents=True)
    write_jsonl(folder / "data" / "train.jsonl", [OPENAI_ROW] * 3)
    write_jsonl(folder / "data" / "test.jsonl", [OPENAI_ROW] * 2)
    return folder


def test_a_folder_laid_out_like_a_hub_repository_gives_the_split_asked_for(tmp_path):
    folder = hub_layout(tmp_path / "repo")
    assert len(load_rows(folder)) == 3  # --train_dataset takes the train split
    assert len(load_rows(folder, default_split="test")) == 2  # --test_dataset the test split
    assert len(load_rows(f"{folder}:test")) == 2
    with pytest.raises(DataError, match=r"holds splits \['test', 'train'\], not 'dev'; name one as .*repo:SPLIT"):
        load_rows(f"{folder}:dev")


def test_a_hub_id_goes_to_load_dataset_with_its_split_and_revision(tmp_path, monkeypatch):
    import datasets

    folder, real = hub_layout(tmp_path / "repo"), datasets.load_dataset
    calls = []

    def load_dataset(name, split=None, revision=None):  # the hub, offline: a local folder laid out like a repo
        calls.append((name, split, revision))
        return real(str(folder), split=split)

    monkeypatch.setattr("datasets.load_dataset", load_dataset)
    source = parse_source("acme/home-chat:test@v2:0.5")
    assert source == Source("acme/home-chat:test@v2:0.5", "hub", "acme/home-chat", "test", "v2", 0.5)
    assert parse_source("hub:acme/home-chat@v2:test").revision == "v2"
    assert len(sources.load_source(source)) == 2
    assert len(load_rows("acme/home-chat")) == 3
    assert calls == [("acme/home-chat", "test", "v2"), ("acme/home-chat", None, None)]


def test_a_hub_id_offline_says_so_and_suggests_a_local_path():
    with pytest.raises(DataError, match=r"nobody/nothing: no such local file or folder.*cannot be reached.*local path"):
        load_rows("nobody/nothing")


# ------------------------------------------------------------------------------------------ .txt documents


def test_a_txt_file_is_one_document_per_blank_line_separated_block(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("Line one\nline two\n\n\n  \nSecond document\r\n\r\nThird\n")
    assert load_rows(path)["text"] == ["Line one\nline two", "Second document", "Third"]


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", r"empty\.txt:1: empty file"),
        (b"\n  \n\n", r"empty\.txt:1: empty file"),
        (b"fine\n\nstill fine\nbad \xff here\n", r"empty\.txt:4: not UTF-8 \(byte 0xff at column 5\)"),
    ],
)
def test_an_empty_or_non_utf8_txt_file_names_file_and_line(tmp_path, content, message):
    (tmp_path / "empty.txt").write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_rows(tmp_path / "empty.txt")


def test_text_rows_with_prefix_ids_train_only_between_prefix_and_suffix(test_tokenizer, tmp_path, caplog):
    """home-llm's raw-corpus mode: conversations rendered as text, masked by the ids."""
    masker = ChatMasker(test_tokenizer, CHATML_TEMPLATE)
    corpus = [{"text": masker.render(OPENAI_ROW["messages"])}] * 3
    rows = load_rows(write_jsonl(tmp_path / "raw.jsonl", corpus))
    prefix = test_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    suffix = [test_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with caplog.at_level(logging.INFO, logger="chattune"):
        masked, _ = tokenize_dataset(
            rows, test_tokenizer, None, source="raw", ctx_size=128, prefix_ids=prefix, suffix_ids=suffix
        )
        everything, _ = tokenize_dataset(rows, test_tokenizer, None, source="raw", ctx_size=128)
    labelled = test_tokenizer.decode([t for t in masked[0]["labels"] if t != IGNORE_INDEX])
    assert labelled == "On.<|im_end|>"
    assert everything[0]["labels"] == everything[0]["input_ids"] == masked[0]["input_ids"]
    said = [r.getMessage() for r in caplog.records if "training on every token" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("raw: text rows: training on every token")  # once, not per row


# ------------------------------------------------------------------------------------------ weights and mixtures


@pytest.mark.parametrize("weight", ["0", "-1", "nan", "inf", "-0.5"])
def test_weights_that_are_not_positive_numbers_are_refused(tmp_path, weight):
    path = write_jsonl(tmp_path / "a.jsonl", [OPENAI_ROW])
    with pytest.raises(DataError, match=f"a.jsonl:{weight}: weight {weight} must be a positive number"):
        parse_source(f"{path}:{weight}")


def test_a_weight_that_is_not_a_number_and_a_partly_weighted_list_are_refused(tmp_path):
    a, b = (write_jsonl(tmp_path / name, [OPENAI_ROW]) for name in ("a.jsonl", "b.jsonl"))
    with pytest.raises(DataError, match=r"weight 'lots' is not a number"):
        parse_source(f"{a}:lots")
    with pytest.raises(DataError, match=r"a\.jsonl:0\.8 have a weight but .*b\.jsonl do not"):
        parse_sources([f"{a}:0.8", str(b)])


def test_a_path_with_a_colon_that_exists_is_a_path(tmp_path):
    path = write_jsonl(tmp_path / "run:2.jsonl", [OPENAI_ROW])
    assert parse_source(str(path)) == Source(str(path), "json", str(path))


def numbered(name: str, n: int) -> Dataset:
    return Dataset.from_dict({"row": [f"{name}{i}" for i in range(n)]})


def test_a_weighted_mixture_is_sampled_with_the_seed_and_its_counts_logged(caplog):
    chosen = [Source("home.jsonl:0.8", "json", "home.jsonl", weight=0.8), Source("chat:0.2", "hub", "chat", weight=0.2)]
    parts = [numbered("home", 400), numbered("chat", 5000)]
    with caplog.at_level(logging.INFO, logger="chattune"):
        mixed = combine(chosen, parts, seed=3)
    assert mixed["row"] == combine(chosen, parts, seed=3)["row"]  # the same seed, the same mixture
    assert mixed["row"] != combine(chosen, parts, seed=4)["row"]
    home = sum(row.startswith("home") for row in mixed["row"])
    chat = len(mixed) - home
    assert home == 400 and 70 <= chat <= 130  # drawn until the first source runs out: 400 / 0.8 x 0.2 = 100
    assert len(set(mixed["row"])) == len(mixed)  # no row twice
    assert f"data mixture: {len(mixed)} examples from 2 sources" in caplog.text
    assert f"{chat:>8} of     5000  ({chat / len(mixed):.1%}, weight 0.2)  chat:0.2" in caplog.text


def test_unweighted_sources_are_concatenated_every_row_once(caplog):
    chosen = [Source("a", "json", "a"), Source("b", "json", "b")]
    with caplog.at_level(logging.INFO, logger="chattune"):
        mixed = combine(chosen, [numbered("a", 3), numbered("b", 2)], seed=0)
    assert mixed["row"] == ["a0", "a1", "a2", "b0", "b1"] and mixed.column_names == ["row"]
    assert "       2 of        2  (40.0%)  b" in caplog.text


def test_sources_of_different_formats_are_each_detected_and_tokenized(test_tokenizer, tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [OPENAI_ROW] * 4)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS[:3])
    (tmp_path / "notes.txt").write_text("The kitchen light is on.\n\nThe fan is off.\n")
    masker = ChatMasker(test_tokenizer, CHATML_TEMPLATE)

    def tokenize(rows, source):
        return tokenize_dataset(rows, test_tokenizer, masker, source=source.text, ctx_size=64)[0]

    data = read_sources([str(chat), str(alpaca), str(tmp_path / "notes.txt")], tokenize, seed=0)
    assert len(data) == 4 + 3 + 2
    decoded = [test_tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) for labels in data["labels"]]
    assert decoded[0] == "On.<|im_end|>" and decoded[4] == "0<|im_end|>"
    assert "The fan is off." in decoded[-1]  # text rows: every token


def test_a_recipe_lists_sources_with_weights(tmp_path):
    from chattune.config.flags import parse_flags

    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        "run_name: mix\nbase_model: tiny\ntrain_dataset:\n  - data/home.jsonl:0.8\n"
        "  - {path: acme/chat, split: train, revision: v1, weight: 0.2}\ntest_dataset: data/test.jsonl\n"
    )
    flags = parse_flags(["--config", str(recipe)])
    assert flags.train_dataset == ["data/home.jsonl:0.8", "acme/chat:train@v1:0.2"]
    assert flags.test_dataset == ["data/test.jsonl"]
    assert parse_flags(["--config", str(recipe), "--train_dataset", "x.jsonl"]).train_dataset == ["x.jsonl"]


# ------------------------------------------------------------------------------------------ train.py, end to end


@pytest.fixture
def no_model_loading(monkeypatch):
    """Data errors must stop train.py before the model is loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr("chattune.commands.train.load_model", refuse)


def train_main(argv) -> int:
    from chattune.commands.train import main

    return main(argv)


def write_bytes(path, content: bytes):
    path.write_bytes(content)
    return path


GOOD = json.dumps(chat_rows(1)[0]).encode()
BAD_INPUTS = {
    "unknown role after row 1": (
        "role.jsonl",
        GOOD + b"\n" + GOOD + b'\n{"conversations": [{"from": "narrator", "value": "x"}]}\n',
        r"role\.jsonl: row 3: unknown role 'narrator'",
    ),
    "non-UTF-8 bytes": ("latin1.jsonl", GOOD + b'\n{"text": "caf\xe9"}\n', r"latin1\.jsonl:2: not UTF-8"),
    "mixed formats, a conversation row first": (
        "mixed.jsonl",
        GOOD + b'\n{"text": "plain"}\n',
        r"mixed\.jsonl: row 2: has no `conversations`, the column that decided .*this row has \['text'\]",
    ),
    "an empty file": ("empty.jsonl", b"\n\n", r"empty\.jsonl:1: empty file"),
    "a folder that is not a datasets folder": ("folder", None, r"folder: not a datasets folder: .* found: notes\.md"),
    "an undetectable format": (
        "odd.jsonl",
        b'{"question": "q", "answer": "a"}\n',
        r"odd\.jsonl: unrecognised columns \['answer', 'question'\]; expected one of: sharegpt .* text .* alpaca",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_data_is_one_line_naming_file_and_row_before_the_model(
    case, tiny_model_dir, tmp_path, capsys, no_model_loading
):
    name, content, message = BAD_INPUTS[case]
    path = tmp_path / name
    if content is None:
        path.mkdir()
        (path / "notes.md").write_text("not data")
    else:
        write_bytes(path, content)
    assert train_main(train_argv(tiny_model_dir, path, tmp_path / "out")) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "Traceback" not in error
    assert re.search(message, error), error


def test_a_missing_source_among_several_is_named(tiny_model_dir, tmp_path, capsys, no_model_loading):
    good = write_jsonl(tmp_path / "good.jsonl", chat_rows(4))
    argv = train_argv(
        tiny_model_dir, good, tmp_path / "out", "--train_dataset", str(good), str(tmp_path / "gone.jsonl")
    )
    assert train_main(argv) == 2
    assert "gone.jsonl: no such file or folder (--train_dataset source" in capsys.readouterr().err


def test_train_py_trains_on_a_weighted_mixture_of_formats(tiny_model_dir, tmp_path, caplog):
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(16))
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    extra = ("--train_dataset", f"{chat}:0.8", f"{alpaca}:0.2")
    with caplog.at_level(logging.INFO, logger="chattune"):
        assert train_main(train_argv(tiny_model_dir, chat, tmp_path / "out", *extra, max_steps=1)) == 0
    # 16 conversations at 0.8 run out long before 40 Alpaca rows at 0.2 do: all 16 are in, about 4 Alpaca rows
    total = int(re.search(r"data mixture: (\d+) examples from 2 sources", caplog.text)[1])
    assert f"      16 of       16  ({16 / total:.1%}, weight 0.8)  {chat}:0.8" in caplog.text
    assert 16 < total < 30
    assert (tmp_path / "out" / "models" / "run" / "model.safetensors").is_file()


def test_preference_sources_are_read_each_in_its_format_and_concatenated(tmp_path):
    from chattune.training.trainers.preference import load_preferences

    generator = write_jsonl(tmp_path / "gen.jsonl", [{"question": "q", "chosen": "yes", "rejected": "no"}] * 3)
    explicit = [{"prompt": [{"role": "user", "content": "q"}], "chosen": "yes", "rejected": "no"}] * 2
    trl = write_jsonl(tmp_path / "trl.jsonl", explicit)
    rows = load_preferences([str(generator), str(trl)])
    assert len(rows) == 5 and rows[4]["prompt"] == [{"role": "user", "content": "q"}]
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "q", "chosen": "yes", "rejected": "no"}])
    with pytest.raises(DataError, match=r"gen\.jsonl and .*plain\.jsonl cannot be mixed: their prepared rows differ"):
        load_preferences([str(generator), str(plain)])
