"""find_split.py: in-context ids, verified against automatic masking, on every template family."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from chattune.data.split_finder import find_split
from conftest import REPO, make_llama3_like_tokenizer, run_script, shared_tokenizer_path
from templates import INLINE_TEMPLATES

FIND_SPLIT = str(REPO / "find_split.py")


@pytest.mark.parametrize("name", sorted(INLINE_TEMPLATES))
def test_inline_templates_are_verified(test_tokenizer, name):
    template, eot, system_ok = INLINE_TEMPLATES[name]
    report = find_split(test_tokenizer, name, template)
    assert report.verified and report.auto_mode_matches, report.notes
    assert test_tokenizer.convert_ids_to_tokens(report.suffix_ids) == [eot]
    if not system_ok:
        assert any("System role not supported" in note for note in report.notes)


def test_llama3_ids_are_the_response_header(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(make_llama3_like_tokenizer(tmp_path / "tok"))
    report = find_split(tokenizer, "llama3-like")
    assert report.prefix_ids == [128006, 78191, 128007, 271]
    assert report.suffix_ids == [128009]


@pytest.mark.parametrize(
    "name,prefix_tokens,suffix_tokens",
    [
        ("qwen2-instruct", ["<|im_start|>", "assistant", "Ċ"], ["<|im_end|>"]),
        ("mistral-v1-instruct", ["/", "INST", "]"], ["</s>"]),
    ],
)
def test_shared_tokenizers_cli(name, prefix_tokens, suffix_tokens):
    path = shared_tokenizer_path(name)
    result = run_script(FIND_SPLIT, str(path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"model", "prefix_ids", "suffix_ids", "verified", "auto_mode_matches", "notes"}
    assert report["verified"] and report["auto_mode_matches"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.convert_ids_to_tokens(report["prefix_ids"]) == prefix_tokens
    assert tokenizer.convert_ids_to_tokens(report["suffix_ids"]) == suffix_tokens


def test_mistral_header_tokenized_alone_never_occurs_in_context():
    """The template writes `[/INST] ` + answer; alone, the trailing space is its own token, in context it
    merges into the answer's first word. Ids computed alone would never match."""
    from chattune.data.masking import find_sublist

    tokenizer = AutoTokenizer.from_pretrained(shared_tokenizer_path("mistral-v1-instruct"))
    alone = tokenizer("[/INST] ", add_special_tokens=False)["input_ids"]
    report = find_split(tokenizer, "mistral")
    assert tokenizer.convert_ids_to_tokens(alone)[-1] == "▁"
    assert all(find_sublist(sample.input_ids, alone) < 0 for sample in report.samples)
    assert report.verified


def test_human_readable_report_prints_flags(tiny_model_dir):
    result = run_script(FIND_SPLIT, str(tiny_model_dir))
    assert result.returncode == 0, result.stderr
    assert "rendered sample:" in result.stdout and "--prefix_ids " in result.stdout and "--suffix_ids " in result.stdout


def test_no_id_pair_can_work_exits_1(test_tokenizer_dir, tmp_path):
    template = tmp_path / "roleless.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    result = run_script(FIND_SPLIT, str(test_tokenizer_dir), "--template", str(template), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["prefix_ids"] is None and not report["verified"]
    assert any("automatic masking" in note for note in report["notes"])


def test_bad_input(test_tokenizer_dir, tmp_path):
    result = run_script(FIND_SPLIT, str(tmp_path / "missing" / "model"))
    assert result.returncode == 2 and "no such folder" in result.stderr

    raising = tmp_path / "raising.jinja"
    raising.write_text("{{ raise_exception('this template refuses everything') }}")
    result = run_script(FIND_SPLIT, str(test_tokenizer_dir), "--template", str(raising))
    assert result.returncode == 2 and "this template refuses everything" in result.stderr


def test_tokenizer_without_template(tmp_path, test_tokenizer_dir):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(test_tokenizer_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    result = run_script(FIND_SPLIT, str(bare))
    assert result.returncode == 2
    assert "--template" in result.stderr and "--add_chatml_tokens" in result.stderr
