"""Find the token ids that open and close an assistant response, as they appear in context.

Tokenizing a marker alone is not enough: SentencePiece and BPE merge a header with the whitespace or
word next to it, so ids computed in isolation often never occur in a real conversation. Here the ids
come from a rendered multi-turn sample, and are kept only if home-llm-style explicit masking with them
reproduces train.py's automatic mask on every sample (with and without a system prompt).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from chattune.data.masking import IGNORE_INDEX, ChatMasker, Encoded, explicit_labels
from chattune.errors import ChattuneError

SYSTEM_PROMPT = "You are a helpful assistant that controls a smart home."
TURNS = [
    ("user", "What is the temperature in the kitchen?"),
    ("assistant", "It is 21 degrees in the kitchen."),
    ("user", "Turn on the bedroom fan, please."),
    (
        "assistant",
        'Turning on the fan.\n```homeassistant\n{"service": "fan.turn_on", "target_device": "fan.bedroom"}\n```',
    ),
]


class SplitError(ChattuneError, ValueError):
    """The chat template cannot render the samples the split is found on."""


@dataclass
class SplitReport:
    model: str
    prefix_ids: list[int] | None
    suffix_ids: list[int] | None
    verified: bool
    auto_mode_matches: bool
    notes: list[str] = field(default_factory=list)
    samples: list[Encoded] = field(default_factory=list, repr=False)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("samples")
        return data


def sample_conversations() -> dict[str, list[dict]]:
    turns = [{"role": role, "content": content} for role, content in TURNS]
    return {"with system prompt": [{"role": "system", "content": SYSTEM_PROMPT}, *turns], "without": turns}


def render_samples(masker: ChatMasker, notes: list[str]) -> list[Encoded]:
    samples, errors = [], []
    for name, messages in sample_conversations().items():
        try:
            samples.append(masker.encode(messages))
        except Exception as error:  # a template's own raise_exception(), or a masking refusal
            errors.append(f"{name}: {error}")
    if not samples:
        raise SplitError("the chat template fails on every sample: " + "; ".join(errors))
    notes += [f"skipped the sample {e}" for e in errors]
    return samples


def find_split(tokenizer: Any, model: str, chat_template: str | None = None) -> SplitReport:
    masker = ChatMasker(tokenizer, chat_template)
    notes: list[str] = []
    samples = render_samples(masker, notes)
    describe_template(tokenizer, samples, notes)

    openers, closers = [], Counter()
    for sample in samples:
        for span in sample.spans:
            first, eot_tokens = turn_tokens(sample, span)
            openers.append(sample.input_ids[:first])
            closers[tuple(eot_tokens)] += 1
            if sample.offsets[first][0] < span.label_start:
                notes.append(
                    "the response header merges with the first word of the answer "
                    f"({tokenizer.convert_ids_to_tokens(sample.input_ids[first])!r}); that token is labelled"
                )
    suffix = list(closers.most_common(1)[0][0])
    if len(closers) > 1:
        notes.append("assistant turns end with different tokens; no single suffix fits them all")
    if not suffix:
        notes.append("the template closes assistant turns with no special token: the model cannot learn to stop")
    header_tokens = count_header_tokens(samples[0], masker.generation_prompt())
    prefix = working_prefix(samples, openers, suffix, header_tokens)
    if prefix is None:
        notes.append(
            "no prefix ids pick out only the assistant turns: the tokens that open a response also occur "
            "elsewhere (e.g. in user turns). train.py's automatic masking (the default) needs no ids."
        )
        return SplitReport(model, None, suffix or None, False, False, notes, samples)
    verified = picks_every_turn(samples, prefix, suffix, tokenizer)
    matches = all(explicit_labels(s.input_ids, prefix, suffix) == s.labels for s in samples)
    return SplitReport(model, prefix, suffix or None, verified, matches, list(dict.fromkeys(notes)), samples)


def turn_tokens(sample: Encoded, span: Any) -> tuple[int, list[int]]:
    """Index of the first labelled token of a turn, and the ids of its end-of-turn tokens."""
    labelled = [i for i, (start, end) in enumerate(sample.offsets) if start < span.label_end and end > span.label_start]
    eot = [sample.input_ids[i] for i in labelled if sample.offsets[i][0] >= span.content_end]
    return labelled[0], eot


def count_header_tokens(sample: Encoded, header: str) -> int:
    """How many tokens the response header (the generation prompt) spans in context before the first answer."""
    span = sample.spans[0]
    start = span.label_start - len(header)
    if not header or sample.text[start : span.label_start] != header:
        return 0
    return sum(1 for token_start, _ in sample.offsets if start <= token_start < span.label_start)


def working_prefix(
    samples: list[Encoded], openers: list[list[int]], suffix: list[int], header_tokens: int
) -> list[int] | None:
    """The whole response header when it works (what users expect to see), else the shortest common tail of
    the openers for which explicit masking equals automatic masking."""
    common = common_tail(openers)
    lengths = [header_tokens] if 0 < header_tokens <= len(common) else []
    for length in lengths + list(range(1, len(common) + 1)):
        prefix = common[-length:]
        if all(explicit_labels(s.input_ids, prefix, suffix) == s.labels for s in samples):
            return prefix
    return None


def common_tail(sequences: list[list[int]]) -> list[int]:
    tail: list[int] = []
    for column in zip(*(reversed(s) for s in sequences)):
        if len(set(column)) != 1:
            break
        tail.insert(0, column[0])
    return tail


def picks_every_turn(samples: list[Encoded], prefix: list[int], suffix: list[int], tokenizer: Any) -> bool:
    """Explicit masking labels one run per assistant turn, and each run holds that turn's answer."""
    answers = [content.strip() for role, content in TURNS if role == "assistant"]
    for sample in samples:
        labels = explicit_labels(sample.input_ids, prefix, suffix)
        runs = label_runs(labels)
        if len(runs) != len(answers):
            return False
        if not all(answer in tokenizer.decode(run) for run, answer in zip(runs, answers)):
            return False
    return True


def label_runs(labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for label in [*labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs


def describe_template(tokenizer: Any, samples: list[Encoded], notes: list[str]) -> None:
    text = samples[-1].text
    if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        notes.append(f"the template writes BOS {tokenizer.bos_token!r} itself; train.py adds no second one")
    if "system" in text[: text.find(TURNS[0][1])].lower():
        notes.append("without a system prompt the template inserts a system turn of its own (a default prompt)")
    for sample in samples:
        for span, following in zip(sample.spans, [s.label_start for s in sample.spans[1:]] + [len(sample.text)]):
            after = sample.text[span.label_end : following]
            if after[:1].isspace():
                notes.append(
                    f"{after[:1]!r} after the end-of-turn token is template text, not labelled: the model "
                    "stops at the end-of-turn token"
                )
                return
