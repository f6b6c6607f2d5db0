"""The Ollama Modelfile written beside a GGUF file: for each chat-template family, the generated Go template,
rendered by a Go-template subset (tests/gotemplate.py) with Ollama's handling of messages, gives the very text the
tokenizer's own Jinja template gives; stop tokens, SYSTEM, an unrecognised template, atomic writing, the
command line and train.py --export_gguf.

The Llama 3, Zephyr (also StableLM Zephyr's, with `<|endoftext|>` as EOS), Phi-3 and Gemma 2/3 templates below are
written here in the style of those models' published templates (they are not shipped in ../shared); ChatML and
Mistral [INST] are also checked on the real Qwen2.5 and Mistral v1 tokenizers of ../shared when it is there, and
Phi-2 (no chat template of its own) on the GPT-2 vocabulary given ChatML by train.py's --add_chatml_tokens, as
home-llm's Phi-2 command does.
"""

from __future__ import annotations

import errno
import logging
import re
import shutil
from pathlib import Path

import pytest

from chattune.atomic import DiskFullError
from chattune.export.ollama import (
    constant_system_prompt,
    families,
    modelfile_path,
    write_modelfile,
)
from chattune.models.chatml import CHATML_TEMPLATE
from conftest import (
    TRAIN,
    chat_rows,
    make_gemma_like_tokenizer,
    make_tiny_model,
    run_script,
    shared_tokenizer_path,
    train_argv,
    write_jsonl,
)
from gotemplate import ollama_render, render
from templates import GEMMA, MISTRAL

LLAMA3_JINJA = (
    "{%- for message in messages %}"
    "{%- set turn = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{%- if loop.first %}{%- set turn = bos_token + turn %}{%- endif %}"
    "{{- turn }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Zephyr's layout: one block per line, relying on transformers' trim_blocks / lstrip_blocks.
ZEPHYR_JINJA = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n' + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
PHI3_JINJA = (
    "{% for message in messages %}{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Gemma 3's layout: no system turn, the system text and a blank line open the first user turn; the assistant's
# role is `model`; roles must alternate. (Gemma 2's template, tests/templates.py's GEMMA, refuses a system message.)
GEMMA3_JINJA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set opening = messages[0]['content'] + '\\n\\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set opening = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (opening if loop.first else '') }}"
    "{{ m['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
# A format no family writes: the Modelfile gets a note instead of a TEMPLATE.
HASHES_JINJA = (
    "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)

SYSTEM = "You control the house. Devices: light.kitchen, fan.bedroom"
CONVERSATIONS = [
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Turn on the kitchen light"},
        {"role": "assistant", "content": 'Turning it on.\n```homeassistant\n{"service": "light.turn_on"}\n```'},
        {"role": "user", "content": "And the fan?"},
    ],
    [{"role": "user", "content": "Hi, ça va? 日本語"}],
    [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three\n\nfour"},
        {"role": "assistant", "content": "five"},
        {"role": "user", "content": "six"},
    ],
]


def _tokenizer(test_tokenizer_dir: Path, template: str | None, **specials: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(test_tokenizer_dir, **specials)
    tokenizer.chat_template = template
    return tokenizer


def _adding_bos(tokenizer):
    """The tokenizer made to put BOS before every text by itself, as Llama 3's does."""
    from tokenizers import processors

    bos = (tokenizer.bos_token, tokenizer.bos_token_id)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos[0]} $A", pair=f"{bos[0]} $A $B", special_tokens=[bos]
    )
    assert tokenizer("a")["input_ids"][0] == bos[1]
    return tokenizer


def _shared(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_tokenizer_path(name))


def _phi2_with_chatml():
    """Phi-2's vocabulary is GPT-2's, with `<|endoftext|>` as BOS and EOS and no chat template: home-llm's Phi-2
    command adds a pad token and ChatML (--add_pad_token --add_chatml_tokens), as train.py does here."""
    from chattune.models.tokenizer import add_tokens

    tokenizer = _shared("gpt2-no-template")
    add_tokens(tokenizer, pad=True, chatml=True)
    return tokenizer


# case -> (tokenizer from the test tokenizer's folder, family detected, stop tokens)
CASES = {
    "chatml": (lambda d: _tokenizer(d, CHATML_TEMPLATE), "chatml", ["<|im_end|>", "</s>"]),
    "chatml-qwen2.5": (lambda d: _shared("qwen2-instruct"), "chatml", ["<|im_end|>"]),
    "llama3": (
        lambda d: _tokenizer(d, LLAMA3_JINJA, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
        "llama3",
        ["<|eot_id|>"],
    ),
    "llama3-bos-added-by-tokenizer": (
        lambda d: _adding_bos(_tokenizer(d, LLAMA3_JINJA, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")),
        "llama3",
        ["<|eot_id|>"],
    ),
    "zephyr": (lambda d: _tokenizer(d, ZEPHYR_JINJA), "zephyr", ["</s>"]),
    "stablelm-zephyr": (lambda d: _tokenizer(d, ZEPHYR_JINJA, eos_token="<|endoftext|>"), "zephyr", ["<|endoftext|>"]),
    "stablelm-2-chat": (
        lambda d: _tokenizer(d, CHATML_TEMPLATE, eos_token="<|endoftext|>"),
        "chatml",
        ["<|im_end|>", "<|endoftext|>"],
    ),
    "phi-2-add-chatml-tokens": (lambda d: _phi2_with_chatml(), "chatml", ["<|im_end|>", "<|endoftext|>"]),
    "gemma3": (lambda d: _tokenizer(d, GEMMA3_JINJA, bos_token="<bos>"), "gemma", ["<end_of_turn>", "</s>"]),
    "gemma3-bos-added-by-tokenizer": (
        lambda d: _adding_bos(_tokenizer(d, GEMMA3_JINJA, bos_token="<bos>")),
        "gemma",
        ["<end_of_turn>", "</s>"],
    ),
    "gemma2-refuses-system": (lambda d: _tokenizer(d, GEMMA, bos_token="<bos>"), "gemma", ["<end_of_turn>", "</s>"]),
    "phi3": (lambda d: _tokenizer(d, PHI3_JINJA, eos_token="<|endoftext|>"), "phi3", ["<|end|>", "<|endoftext|>"]),
    "mistral-system-in-first-turn": (lambda d: _tokenizer(d, MISTRAL), "mistral", ["</s>"]),
    "mistral-v1": (lambda d: _shared("mistral-v1-instruct"), "mistral", ["</s>"]),
}


def parse_modelfile(text: str) -> dict:
    def block(keyword: str) -> str | None:
        found = re.search(rf'^{keyword} """(.*?)"""$', text, re.M | re.S)
        return found.group(1) if found else None

    return {
        "from": re.findall(r"^FROM (.+)$", text, re.M),
        "template": block("TEMPLATE"),
        "system": block("SYSTEM"),
        "stops": re.findall(r'^PARAMETER stop "(.*)"$', text, re.M),
        "temperature": re.findall(r"^PARAMETER temperature (.+)$", text, re.M),
    }


# Templates that refuse a system message: a system prompt is expected where Gemma's model card puts one, at the
# start of the first user turn, followed by a blank line.
REFUSES_SYSTEM = {"gemma2-refuses-system"}


def system_folded(messages: list[dict]) -> list[dict]:
    """`messages` with a leading system message moved into the first user message."""
    if not messages or messages[0]["role"] != "system":
        return messages
    first_user = {**messages[1], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
    return [first_user, *messages[2:]]


def expected_prompt(tokenizer, messages: list[dict]) -> str:
    """The Jinja rendering with the generation prompt; a BOS the tokenizer adds by itself is llama.cpp's to add."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    return text[len(tokenizer.bos_token) :] if adds_bos and text.startswith(tokenizer.bos_token) else text


def written(tmp_path: Path, tokenizer, system: str | None = None) -> tuple[str, dict]:
    gguf = tmp_path / "model-f16.gguf"
    gguf.write_bytes(b"GGUF")
    path = write_modelfile(gguf, tokenizer, system)
    assert path == tmp_path / "model-f16.Modelfile" == modelfile_path(gguf)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Written by chattune: ollama create NAME -f model-f16.Modelfile (")
    return text, parse_modelfile(text)


# ---------------------------------------------------------------------------------------------------------------
# The Go-template subset itself


def test_go_subset_renders_like_go():
    data = {"X": "b", "L": [{"A": 1}, {"A": 2}], "S": ""}
    assert render("a  {{- .X -}}  c", data) == "abc"
    assert render('{{ if eq .X "a" }}A{{ else if eq .X "c" "b" }}B{{ else }}N{{ end }}', data) == "B"
    assert render(
        "{{ range $i, $m := .L }}{{ $i }}:{{ $m.A }}{{ if and $.X (eq $i 1) }}!{{ end }} {{ end }}", data
    ) == ("0:1 1:2! ")
    assert render("{{ if .S }}yes{{ else }}no{{ end }}{{ $n := len .L }}{{ $n }}", data) == "no2"
    assert render("{{- range .L }}\n{{ .A }}\n{{- end }}", data) == "\n1\n2"


@pytest.mark.parametrize("family", families("</s>"), ids=lambda f: f.name)
@pytest.mark.parametrize("prefix", ["", "<s>"])
def test_each_family_format_mirrors_its_go_template(family, prefix):
    family = family.with_prefix(prefix)
    for conversation in CONVERSATIONS:
        assert ollama_render(family.template, conversation) == family.format(conversation)


# ---------------------------------------------------------------------------------------------------------------
# Templates and stop tokens per family


@pytest.mark.parametrize("case", CASES)
def test_template_renders_as_the_chat_template(case, test_tokenizer_dir, tmp_path):
    build, family, _ = CASES[case]
    tokenizer = build(test_tokenizer_dir)
    text, modelfile = written(tmp_path, tokenizer)
    assert f"# Chat format: {family}," in text
    assert modelfile["from"] == ["./model-f16.gguf"]
    for conversation in CONVERSATIONS:
        # Ollama adds the Modelfile's SYSTEM (Qwen2.5's default here) when a conversation has no system message
        rendered = ollama_render(modelfile["template"], conversation, modelfile["system"])
        jinja_input = system_folded(conversation) if case in REFUSES_SYSTEM else conversation
        assert rendered == expected_prompt(tokenizer, jinja_input), conversation


@pytest.mark.parametrize("case", ["gemma3", "gemma2-refuses-system"])
def test_gemma_system_prompt_opens_the_first_user_turn(case, test_tokenizer_dir, tmp_path):
    """Gemma has no system turn: SYSTEM from the training data goes where Gemma 3's template puts a system message,
    and the Modelfile says so."""
    tokenizer = CASES[case][0](test_tokenizer_dir)
    text, modelfile = written(tmp_path, tokenizer, SYSTEM)
    assert "# It has no system turn: a system prompt opens the first user turn" in text
    assert modelfile["system"] == SYSTEM
    question = [{"role": "user", "content": "Turn on the kitchen light"}]
    rendered = ollama_render(modelfile["template"], question, modelfile["system"])
    assert (
        rendered
        == f"<bos><start_of_turn>user\n{SYSTEM}\n\nTurn on the kitchen light<end_of_turn>\n<start_of_turn>model\n"
    )
    if case == "gemma3":
        assert rendered == expected_prompt(tokenizer, [{"role": "system", "content": SYSTEM}, *question])


@pytest.mark.parametrize("case", CASES)
def test_stop_tokens_and_temperature(case, test_tokenizer_dir, tmp_path):
    build, _, stops = CASES[case]
    _, modelfile = written(tmp_path, build(test_tokenizer_dir))
    assert modelfile["stops"] == stops
    assert modelfile["temperature"] == ["0"]


def test_bos_is_text_in_the_template_only_when_the_tokenizer_does_not_add_it(test_tokenizer_dir, tmp_path):
    _, own = written(tmp_path, CASES["llama3"][0](test_tokenizer_dir))
    _, added = written(tmp_path, CASES["llama3-bos-added-by-tokenizer"][0](test_tokenizer_dir))
    assert own["template"] == "<|begin_of_text|>" + added["template"]
    assert "begin_of_text" not in added["template"]


def test_template_default_system_prompt_unless_the_data_has_one(tmp_path):
    tokenizer = _shared("qwen2-instruct")
    _, modelfile = written(tmp_path, tokenizer)
    assert modelfile["system"] == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    _, modelfile = written(tmp_path, tokenizer, SYSTEM)
    assert modelfile["system"] == SYSTEM


@pytest.mark.parametrize(
    "template,why",
    [
        (HASHES_JINJA, "renders a conversation unlike"),
        (None, "the tokenizer has no chat template"),
    ],
    ids=["hashes", "none"],
)
def test_unknown_template_gets_a_note_instead(template, why, test_tokenizer_dir, tmp_path, caplog):
    tokenizer = _tokenizer(test_tokenizer_dir, template)
    with caplog.at_level(logging.WARNING, logger="chattune.export.ollama"):
        text, modelfile = written(tmp_path, tokenizer, SYSTEM)
    assert modelfile["template"] is None and "\nTEMPLATE" not in text
    note = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "# TEMPLATE: not written" in note and why in note and "docs/export.md" in note
    assert modelfile["from"] == ["./model-f16.gguf"] and modelfile["system"] == SYSTEM
    assert modelfile["stops"] == ["</s>"]
    assert "Modelfile without TEMPLATE" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# SYSTEM


def test_constant_system_prompt():
    sharegpt = chat_rows(5)  # every row opens with the same system turn
    assert constant_system_prompt(sharegpt) == SYSTEM
    openai = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]}]
    assert constant_system_prompt(openai + [row["conversations"] for row in sharegpt]) == SYSTEM
    other = {"messages": [{"role": "system", "content": "Other."}, {"role": "user", "content": "hi"}]}
    assert constant_system_prompt([*openai, other]) is None
    assert constant_system_prompt([*openai, {"messages": [{"role": "user", "content": "hi"}]}]) is None
    assert constant_system_prompt([*openai, {"text": "plain"}]) is None
    assert constant_system_prompt([]) is None
    pairs = [{"system": SYSTEM, "question": "q", "chosen": "a", "rejected": "b"}] * 2
    assert constant_system_prompt(pairs) == SYSTEM


def test_system_only_when_given(test_tokenizer_dir, tmp_path):
    tokenizer = _tokenizer(test_tokenizer_dir, CHATML_TEMPLATE)
    text, modelfile = written(tmp_path, tokenizer)
    assert modelfile["system"] is None and "SYSTEM" not in text
    _, modelfile = written(tmp_path, tokenizer, "Line one.\nLine two.")
    assert modelfile["system"] == "Line one.\nLine two."
    text, modelfile = written(tmp_path, tokenizer, 'Say """hi"""')
    assert modelfile["system"] is None and "# SYSTEM: left out" in text


# ---------------------------------------------------------------------------------------------------------------
# Writing


def test_write_is_atomic(test_tokenizer_dir, tmp_path, monkeypatch):
    tokenizer = _tokenizer(test_tokenizer_dir, CHATML_TEMPLATE)
    written(tmp_path, tokenizer)
    written(tmp_path, tokenizer, SYSTEM)  # replaces the first one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-f16.Modelfile", "model-f16.gguf"]
    before = (tmp_path / "model-f16.Modelfile").read_text()

    def full_disk(path, *args, **kwargs):
        handle = open(path, *args, **kwargs)

        def write(text: str) -> int:
            handle.buffer.write(text[:10].encode())
            raise OSError(errno.ENOSPC, "No space left on device")

        handle.write = write
        return handle

    import chattune.atomic

    monkeypatch.setattr(chattune.atomic, "open", full_disk, raising=False)
    with pytest.raises(DiskFullError, match="Modelfile"):
        write_modelfile(tmp_path / "model-f16.gguf", tokenizer, None)
    assert (tmp_path / "model-f16.Modelfile").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-f16.Modelfile", "model-f16.gguf"]


def test_gguf_command_writes_the_modelfile(test_tokenizer_dir, tmp_path, capsys):
    from chattune.export.gguf import main

    model_dir = make_tiny_model(test_tokenizer_dir, tmp_path / "model")
    out = tmp_path / "export" / "tiny.gguf"
    assert main([str(model_dir), "--outtype", "f32", "--out", str(out), "--system_prompt", SYSTEM]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    modelfile = parse_modelfile((out.parent / "tiny.Modelfile").read_text())
    assert modelfile["from"] == ["./tiny.gguf"] and modelfile["system"] == SYSTEM
    assert modelfile["template"] is not None
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.Modelfile", "tiny.gguf"]


def test_each_gguf_file_gets_its_own_modelfile(test_tokenizer_dir, tmp_path, capsys):
    """A second type exported into the folder leaves the first file's Modelfile as it was (perhaps edited)."""
    from chattune.export.gguf import main

    model_dir = make_tiny_model(test_tokenizer_dir, tmp_path / "home-demo")
    assert main([str(model_dir), "--outtype", "f32"]) == 0
    first = model_dir / "home-demo-f32.Modelfile"
    first.write_text(first.read_text() + "# edited by hand\n")
    assert main([str(model_dir), "--outtype", "q8_0"]) == 0
    assert first.read_text().endswith("# edited by hand\n")
    second = parse_modelfile((model_dir / "home-demo-q8_0.Modelfile").read_text())
    assert second["from"] == ["./home-demo-q8_0.gguf"]
    assert not (model_dir / "Modelfile").exists()


def test_gemma3_export_writes_gemma_s_template(tmp_path, capsys):
    """A Gemma 3 model (tiny and random, with Gemma's tokenizer class and turn markers) exported by the command:
    its Modelfile renders conversations as the saved chat template does, the SYSTEM opening the first user turn."""
    from transformers import AutoTokenizer

    from chattune.export.gguf import main

    tokenizer_dir = make_gemma_like_tokenizer(tmp_path / "tokenizer", GEMMA3_JINJA)
    model_dir = make_tiny_model(tokenizer_dir, tmp_path / "gemma3", arch="gemma3", tie_word_embeddings=True)
    assert main([str(model_dir), "--outtype", "f16", "--system_prompt", SYSTEM]) == 0
    text = (model_dir / "gemma3-f16.Modelfile").read_text()
    modelfile = parse_modelfile(text)
    assert "# Chat format: gemma," in text and modelfile["stops"] == ["<end_of_turn>", "<eos>"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for conversation in CONVERSATIONS:
        rendered = ollama_render(modelfile["template"], conversation, modelfile["system"])
        with_system = conversation if conversation[0]["role"] == "system" else [CONVERSATIONS[0][0], *conversation]
        assert rendered == expected_prompt(tokenizer, with_system)


def test_train_export_gguf_writes_the_modelfile(tiny_model_dir, tmp_path):
    """train.py --export_gguf: the Modelfile sits beside the GGUF file, renders conversations as the saved model's
    chat template does, and carries the training rows' system prompt (ShareGPT rows here)."""
    from transformers import AutoTokenizer

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    argv = train_argv(tiny_model_dir, data, tmp_path, export_gguf="f16", max_steps=2, save_steps=2)
    result = run_script(TRAIN, *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "models" / "run"
    modelfile_file = folder / "run-f16.Modelfile"
    assert f"saved: {modelfile_file}" in result.stdout and f"saved: {folder / 'run-f16.gguf'}" in result.stdout
    modelfile = parse_modelfile(modelfile_file.read_text())
    assert modelfile["from"] == ["./run-f16.gguf"] and modelfile["system"] == SYSTEM
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for conversation in CONVERSATIONS:
        rendered = ollama_render(modelfile["template"], conversation, modelfile["system"])
        with_system = conversation if conversation[0]["role"] == "system" else [CONVERSATIONS[0][0], *conversation]
        assert rendered == expected_prompt(tokenizer, with_system)


def _ollama_serving() -> bool:
    import subprocess

    if shutil.which("ollama") is None:
        return False
    return subprocess.run(["ollama", "list"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not _ollama_serving(), reason="no ollama binary with a running server")
def test_ollama_creates_a_model_from_the_modelfile(test_tokenizer_dir, tmp_path):
    import subprocess

    from chattune.export.gguf import main

    model_dir = make_tiny_model(test_tokenizer_dir, tmp_path / "model")
    assert main([str(model_dir), "--outtype", "f32", "--out", str(tmp_path / "x" / "tiny.gguf")]) == 0
    command = ["ollama", "create", "chattune-test-modelfile", "-f", str(tmp_path / "x" / "tiny.Modelfile")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    subprocess.run(["ollama", "rm", "chattune-test-modelfile"], capture_output=True, timeout=120)
