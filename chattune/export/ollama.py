"""An Ollama Modelfile beside each exported GGUF file (`NAME.Modelfile` for `NAME.gguf`), so that
`ollama create NAME -f NAME.Modelfile` needs no editing. One per GGUF file: exporting a second type into a folder
leaves the first file's Modelfile (perhaps edited by hand) as it is.

Ollama does not run the Jinja chat template stored in the GGUF file: it formats prompts with a template of its own,
written in Go's template language. The Modelfile therefore carries a Go template for the model's chat format, the
end-of-turn token(s) as stop sequences, and the training data's system prompt when every training row had the same.

The chat format is found by behaviour, not by reading the Jinja source: the tokenizer's own template renders a
probe conversation (system, user, assistant, user, then the generation prompt), and each known family renders the
same probe the way its Go template does; the family whose text is identical is the model's. Each family's
`format` is the Python mirror of its Go `template` (tests/test_ollama.py renders the Go text with a Go-template
subset and checks both agree). A template no family reproduces gets a Modelfile without TEMPLATE and a comment
saying that it must be written by hand. A template that refuses the probe's system message (Gemma 2's) is probed
again without it, and only the families without a system turn, which fold the system text into the first user turn,
are tried.

The Go templates range over `.Messages` as current Ollama versions do. Ollama keeps system messages in `.Messages`
and also joins them into `.System`; the Modelfile's SYSTEM is prepended as a system message when a request has
none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from chattune.atomic import write_text_atomic

logger = logging.getLogger(__name__)

MODELFILE_SUFFIX = ".Modelfile"
DOCS = 'docs/export.md, section "Ollama"'

# Contents without surrounding spaces or newlines: templates that `| trim` a message render them unchanged.
PROBE: tuple[dict[str, str], ...] = (
    {"role": "system", "content": "Probe system text."},
    {"role": "user", "content": "First probe question?"},
    {"role": "assistant", "content": "First probe answer."},
    {"role": "user", "content": "Second probe question?"},
)
_PROBE_WITHOUT_SYSTEM = PROBE[1:]
# A private-use code point no template writes: where a default system prompt goes in a family's rendering.
_MARKER = "\ue000"

Messages = Sequence[dict[str, Any]]


@dataclass(frozen=True)
class ChatFamily:
    """A chat format Ollama can be given: its Go template, and what that template renders for a conversation."""

    name: str
    template: str  # Ollama's TEMPLATE, Go template syntax
    format: Callable[[Messages], str]  # the same rendering in Python; messages as Ollama hands them over
    folds_system: bool = False  # no system turn: the system text opens the first user turn

    def with_prefix(self, prefix: str) -> ChatFamily:
        """The family with `prefix` (a BOS token the tokenizer does not add by itself) before every prompt."""
        if not prefix:
            return self
        return replace(self, template=prefix + self.template, format=lambda messages: prefix + self.format(messages))


def _system(messages: Messages) -> str:
    """Ollama's `.System`: the contents of every system message, joined by a blank line."""
    return "\n\n".join(m["content"] for m in messages if m["role"] == "system")


# The system text and a blank line, inside a `range $i, $m := .Messages` loop's user turn. Ollama merges
# consecutive messages of one role: a system prompt is message 0, so the first user turn is message 1.
_FOLDED_SYSTEM_GO = "{{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}"


def _user_turns_with_system(messages: Messages) -> list[tuple[dict[str, Any], str]]:
    """The user and assistant messages, each with the text that opens it: the system text and a blank line for
    the first user turn when there is a system text (the Python side of _FOLDED_SYSTEM_GO), else nothing."""
    system, turns, folded = _system(messages), [], False
    for m in messages:
        if m["role"] == "user" and system and not folded:
            turns.append((m, system + "\n\n"))
            folded = True
        elif m["role"] in ("user", "assistant"):
            turns.append((m, ""))
    return turns


# ---------------------------------------------------------------------------------------------------------------
# The families


def _chatml() -> ChatFamily:
    template = (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    )

    def format(messages: Messages) -> str:
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return turns + "<|im_start|>assistant\n"

    return ChatFamily("chatml", template, format)


def _llama3() -> ChatFamily:
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    template = (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )

    def format(messages: Messages) -> str:
        turns = "".join(header.format(m["role"]) + m["content"] + "<|eot_id|>" for m in messages)
        return turns + header.format("assistant")

    return ChatFamily("llama3", template, format)


def _role_tags(name: str, end: str) -> ChatFamily:
    """Zephyr's and Phi-3's format: `<|role|>`, a newline, the content, `end` and a newline."""
    template = "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}" + end + "\n{{ end }}<|assistant|>\n"

    def format(messages: Messages) -> str:
        return "".join(f"<|{m['role']}|>\n{m['content']}{end}\n" for m in messages) + "<|assistant|>\n"

    return ChatFamily(name, template, format)


def _mistral(eos: str, system_inside: bool, reply_space: str) -> ChatFamily:
    """The [INST] family, which has no system turn. Its templates put the system text, then a blank line, either
    before the first `[INST]` (`system_inside` False) or inside the first user turn; `reply_space` is what
    comes between `[/INST]` and the reply. Nothing follows the last `[/INST]`: the reply comes right after it."""
    reply = '{{ else if eq .Role "assistant" }}' + reply_space + "{{ .Content }}" + eos + "{{ end }}"
    if system_inside:
        user = '{{ if eq .Role "user" }}[INST] ' + _FOLDED_SYSTEM_GO
        template = "{{- range $i, $m := .Messages }}" + user + "{{ .Content }} [/INST]" + reply + "{{ end }}"
    else:
        system = '{{ if eq .Role "system" }}{{ .Content }}\n\n'
        user = '{{ else if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
        template = "{{- range .Messages }}" + system + user + reply + "{{ end }}"

    def turn(m: dict[str, Any], folded: str) -> str:
        if m["role"] == "system":
            return m["content"] + "\n\n"
        if m["role"] == "user":
            return f"[INST] {folded}{m['content']} [/INST]"
        return reply_space + m["content"] + eos

    def format(messages: Messages) -> str:
        if system_inside:
            return "".join(turn(m, folded) for m, folded in _user_turns_with_system(messages))
        return "".join(turn(m, "") for m in messages if m["role"] in ("system", "user", "assistant"))

    return ChatFamily("mistral", template, format, folds_system=system_inside)


def _gemma() -> ChatFamily:
    """Gemma 2 and 3: `<start_of_turn>ROLE`, a newline, the content, `<end_of_turn>` and a newline, with the
    assistant's role called `model`. There is no system turn: Gemma 3's template opens the first user turn with
    the system text and a blank line; Gemma 2's refuses a system message, and the Modelfile folds it the same
    way, as Gemma's model card advises for system instructions."""
    user = '{{ if eq .Role "user" }}<start_of_turn>user\n' + _FOLDED_SYSTEM_GO + "{{ .Content }}<end_of_turn>\n"
    model = '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}'
    template = "{{- range $i, $m := .Messages }}" + user + model + "{{ end }}<start_of_turn>model\n"

    def format(messages: Messages) -> str:
        roles = {"user": "user", "assistant": "model"}
        turns = (
            f"<start_of_turn>{roles[m['role']]}\n{folded}{m['content']}<end_of_turn>\n"
            for m, folded in _user_turns_with_system(messages)
        )
        return "".join(turns) + "<start_of_turn>model\n"

    return ChatFamily("gemma", template, format, folds_system=True)


def families(eos_token: str | None) -> list[ChatFamily]:
    """Every family this module writes templates for, in the order they are tried. `eos_token` closes the
    replies of the families that end a turn with EOS (Zephyr and StableLM Zephyr, Mistral)."""
    found = [_chatml(), _llama3(), _role_tags("phi3", "<|end|>"), _gemma()]
    if eos_token:
        found.append(_role_tags("zephyr", eos_token))
        found += [_mistral(eos_token, inside, space) for inside in (False, True) for space in (" ", "")]
    return found


# ---------------------------------------------------------------------------------------------------------------
# Detection


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS before a text by itself; the GGUF file then tells llama.cpp to do the same
    (tokenizer.ggml.add_bos_token), so Ollama's template must not write it a second time."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    full = tokenizer("a")["input_ids"]
    return len(full) > len(tokenizer("a", add_special_tokens=False)["input_ids"]) and full[0] == bos


def rendered_for_ollama(tokenizer: Any, messages: Messages) -> str:
    """The tokenizer's chat template applied to `messages` with the generation prompt, less the leading BOS when
    llama.cpp adds that one itself: the text an Ollama template must produce."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and adds_bos(tokenizer):
        text = text[len(bos) :]
    return text


def _rendered_probe(tokenizer: Any) -> tuple[Messages, str] | None:
    """The probe conversation and the chat template's rendering of it; the probe without its system message when
    the template refuses one (Gemma 2's); None when it renders neither."""
    for probe in (PROBE, _PROBE_WITHOUT_SYSTEM):
        try:
            return probe, rendered_for_ollama(tokenizer, probe)
        except Exception as error:  # a chat template may raise anything (raise_exception, TypeError, ...)
            logger.debug("the chat template cannot render the probe conversation: %s", error)
    return None


def detect_family(tokenizer: Any) -> ChatFamily | None:
    """The family whose Go template renders the probe conversation exactly as the tokenizer's chat template does,
    or None (no template, a template that refuses the probe, or an unknown format). A template that refuses
    system messages matches only a family without a system turn: that is the only place the Modelfile's SYSTEM
    can go that the model has seen."""
    rendered = _rendered_probe(tokenizer)
    if rendered is None:
        return None
    probe, target = rendered
    bos = getattr(tokenizer, "bos_token", None)
    # A BOS the template writes but the tokenizer would not add goes into the Go template as text.
    prefixes = [""] + ([bos] if bos and not adds_bos(tokenizer) else [])
    for family in families(getattr(tokenizer, "eos_token", None)):
        if probe is _PROBE_WITHOUT_SYSTEM and not family.folds_system:
            continue
        for prefix in prefixes:
            candidate = family.with_prefix(prefix)
            if candidate.format(probe) == target:
                return candidate
    return None


def default_system_prompt(tokenizer: Any, family: ChatFamily) -> str | None:
    """The system prompt the chat template inserts when a conversation has none (Qwen2.5's "You are Qwen, ..."),
    found by rendering the probe without its system message; None when the template inserts nothing."""
    without = _PROBE_WITHOUT_SYSTEM
    try:
        text = rendered_for_ollama(tokenizer, without)
    except Exception:  # a template that insists on a system message: nothing to learn from it
        return None
    if text == family.format(without):
        return None
    head, _, tail = family.format([{"role": "system", "content": _MARKER}, *without]).partition(_MARKER)
    if len(text) > len(head) + len(tail) and text.startswith(head) and text.endswith(tail):
        return text[len(head) : len(text) - len(tail)]
    return None


def stop_tokens(tokenizer: Any) -> list[str]:
    """The token that closes an assistant turn in the chat template, then EOS when it is another token."""
    from chattune.data.masking import ChatMasker

    stops = []
    try:
        stops.append(ChatMasker(tokenizer).end_of_turn_token())
    except Exception as error:  # no template, or one the masker cannot read: EOS alone
        logger.debug("no end-of-turn token from the chat template: %s", error)
    stops.append(getattr(tokenizer, "eos_token", None))
    return list(dict.fromkeys(token for token in stops if token))


# ---------------------------------------------------------------------------------------------------------------
# The training data's system prompt


def _row_messages(row: Any) -> list[dict]:
    """The messages of a row of any chat or preference format (chattune.data.formats), a Conversation or a list
    of messages: a preference row's prompt when it is a conversation; none for plain text."""
    from chattune.data import formats

    if isinstance(row, formats.Conversation):
        return row.messages
    if isinstance(row, list):
        return formats.normalize_messages(row)
    uses = (formats.CHAT, formats.TEXT, formats.PAIRS, formats.UNPAIRED)
    converted = formats.detect(row.keys(), "a row", uses).convert(row, "")
    if isinstance(converted, formats.Conversation):
        return converted.messages
    if isinstance(converted, dict) and isinstance(converted["prompt"], list):
        return converted["prompt"]
    return []


def _first_system(row: Any) -> str | None:
    messages = _row_messages(row)
    return messages[0]["content"] if messages and messages[0]["role"] == "system" else None


def constant_system_prompt(rows: Iterable[Any]) -> str | None:
    """The system prompt when every row opens with the same system message, else None (also for no rows)."""
    found: str | None = None
    for row in rows:
        system = _first_system(row)
        if not system or (found is not None and system != found):
            return None
        found = system
    return found


def training_system_prompt(specs: Sequence[str]) -> str | None:
    """constant_system_prompt of every row of train.py's --train_dataset sources; None, with a warning, when they
    cannot be read again: the Modelfile is then written without SYSTEM rather than failing the export."""
    from chattune.data.sources import load_source, parse_sources

    try:
        sources = parse_sources(specs)
        return constant_system_prompt(row for source in sources for row in load_source(source))
    except Exception as error:  # the model is saved by now: a data problem must not cost the export
        logger.warning("Modelfile without SYSTEM: could not read the system prompt of %s (%s)", specs, error)
        return None


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _block(keyword: str, text: str) -> list[str]:
    """`KEYWORD \"\"\"text\"\"\"`. Ollama's triple-quoted strings have no escapes: a text with three quotes in a row, or
    a quote at either end (which would run into the delimiters), is left out with a note rather than cut short."""
    if '"""' in text or text.startswith('"') or text.endswith('"'):
        logger.warning("Modelfile: %s left out, its text has quotes a Modelfile cannot hold", keyword)
        return [f"# {keyword}: left out, its text has quotes that a triple-quoted Modelfile string cannot hold"]
    return [f'{keyword} """{text}"""']


def _template_lines(family: ChatFamily | None, why_unknown: str) -> list[str]:
    if family is None:
        return [
            f"# TEMPLATE: not written, {why_unknown}; chattune writes one for ChatML, Llama 3, Zephyr",
            "# (StableLM), Mistral [INST], Phi-3 and Gemma. Without it Ollama guesses the prompt format: write a",
            "# TEMPLATE by hand in Ollama's Go template syntax that renders a conversation exactly as the model's",
            f"# chat template does (see {DOCS}).",
        ]
    note = f"# Chat format: {family.name}, found by rendering a probe conversation with the model's chat template."
    if family.folds_system:
        note += "\n# It has no system turn: a system prompt opens the first user turn, followed by a blank line."
    return [note, *_block("TEMPLATE", family.template)]


def _system_lines(system_prompt: str | None, default: str | None) -> list[str]:
    if system_prompt:
        note = "# The system prompt, which Ollama puts before a conversation that has none."
        return ["", note, *_block("SYSTEM", system_prompt)]
    if default:
        note = "# The chat template's own default system prompt, which Ollama puts before a conversation that has none."
        return ["", note, *_block("SYSTEM", default)]
    return []


def _why_unknown(tokenizer: Any) -> str:
    if not getattr(tokenizer, "chat_template", None):
        return "the tokenizer has no chat template"
    return "the model's chat template renders a conversation unlike every format chattune knows"


def modelfile_text(gguf_name: str, tokenizer: Any, system_prompt: str | None) -> str:
    """The Modelfile for the GGUF file `gguf_name` (in the same folder) of a model with this tokenizer."""
    family = detect_family(tokenizer)
    why_unknown = _why_unknown(tokenizer)
    if family is None:
        logger.warning("Modelfile without TEMPLATE: %s; write it by hand (%s)", why_unknown, DOCS)
    default = default_system_prompt(tokenizer, family) if family is not None and not system_prompt else None
    modelfile = modelfile_path(Path(gguf_name)).name
    lines = [f"# Written by chattune: ollama create NAME -f {modelfile} ({DOCS}).", f"FROM ./{gguf_name}", ""]
    lines += [*_template_lines(family, why_unknown), ""]
    lines += [f"PARAMETER stop {_quoted(token)}" for token in stop_tokens(tokenizer)]
    # evaluate.py scores greedy replies, and temperature 0 is greedy decoding in Ollama: the model answers the
    # way it was measured, and a tool call's JSON is not sampled.
    lines += ["# Greedy decoding, as evaluate.py measures the model.", "PARAMETER temperature 0"]
    lines += _system_lines(system_prompt, default)
    return "\n".join(lines) + "\n"


def modelfile_path(gguf_path: str | Path) -> Path:
    """The Modelfile of a GGUF file: beside it, named after it (`home-q8_0.gguf` -> `home-q8_0.Modelfile`)."""
    gguf_path = Path(gguf_path)
    return gguf_path.with_name(gguf_path.name.removesuffix(".gguf") + MODELFILE_SUFFIX)


def write_modelfile(gguf_path: Path, tokenizer: Any, system_prompt: str | None = None) -> Path:
    """Write the Modelfile of `gguf_path` beside it (`modelfile_path`; atomically, replacing one that is there)
    and return its path.

    `system_prompt` becomes SYSTEM (see constant_system_prompt); without one, a default system prompt the chat
    template inserts by itself is used.
    """
    gguf_path = Path(gguf_path)
    path = modelfile_path(gguf_path)
    write_text_atomic(path, modelfile_text(gguf_path.name, tokenizer, system_prompt))
    logger.info("wrote %s", path)
    return path
