"""Pure scoring of Home Assistant replies: one (reference, reply) pair at a time, then groups of them.

No model and no I/O here, so every definition can be checked by hand in the tests. The edge cases
(what counts when nothing was expected, predicted, or parseable) are documented in docs/evaluation.md;
the rule throughout is that a metric with no applicable example in a group is None, never 0 or 1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from chattune.domains.homeassistant.reply_format import ParsedReply, calls_equal, parse_reply
from chattune.domains.metrics import bleu, edit_distance, latency, meteor, perplexity, ratio, rouge, values_equal
from chattune.domains.task import Score

# Summary keys, in the order the table prints them.
METRIC_KEYS = (
    "service_call_exact_match",
    "call_precision",
    "call_recall",
    "entity_accuracy",
    "json_valid_rate",
    "no_call_accuracy",
    "perplexity",
    "bleu",
    "rouge1",
    "rouge2",
    "rougeL",
    "meteor",
    "edit_distance",
    "latency_mean_s",
    "latency_p95_s",
    "n_examples",
)
ENTITY_KEY = "target_device"
UNKNOWN = "unknown"


@dataclass
class ExampleScore(Score):
    """Everything the group metrics need from one example (counts, so groups can be micro-averaged)."""

    n_predicted: int  # calls parsed from the reply
    n_expected: int  # calls in the reference
    n_correct: int  # predicted calls matched one-to-one with an expected call
    n_entities_expected: int  # expected calls that name a target_device
    n_entities_found: int  # ... whose target_device appears among the predicted calls
    has_block: bool
    json_valid: bool
    expects_call: bool
    makes_call: bool
    reply_sentence: str
    reference_sentence: str
    expected_calls: list[dict]
    predicted_calls: list[dict]


def makes_call(parsed: ParsedReply) -> bool:
    """A reply calls something when it parsed a call, or opened a block whose lines did not parse.

    A malformed block is an attempted call: it must not pass as a correct "no call" answer.
    """
    return bool(parsed.calls) or (parsed.has_block and not parsed.json_valid)


def count_matches(predicted: Sequence[dict], expected: Sequence[dict]) -> int:
    """Size of a one-to-one matching between equal calls (order of calls and keys ignored)."""
    unmatched = list(expected)
    matched = 0
    for call in predicted:
        for index, candidate in enumerate(unmatched):
            if values_equal(call, candidate):
                del unmatched[index]
                matched += 1
                break
    return matched


def _entity(call: dict) -> str | None:
    value = call.get(ENTITY_KEY) if isinstance(call, dict) else None
    if value is None:
        return None
    # Entity ids are strings; anything else (a list of ids, a number) is compared by its JSON text.
    return value.strip() if isinstance(value, str) else json.dumps(value, sort_keys=True)


def entity_hits(predicted: Sequence[dict], expected: Sequence[dict]) -> tuple[int, int]:
    """(expected calls with a target_device, those whose device appears among the predicted calls)."""
    predicted_entities = {_entity(call) for call in predicted} - {None}
    wanted = [entity for entity in map(_entity, expected) if entity is not None]
    return len(wanted), sum(1 for entity in wanted if entity in predicted_entities)


def score_example(reference: str, reply: str) -> ExampleScore:
    """Score one generated reply against its reference reply; never raises on malformed model output."""
    expected = parse_reply(reference)
    got = parse_reply(reply)
    n_entities_expected, n_entities_found = entity_hits(got.calls, expected.calls)
    # An invalid block cannot match even if its readable lines do: in use, a broken line is a broken request.
    exact = calls_equal(got.calls, expected.calls) and not (got.has_block and not got.json_valid)
    return ExampleScore(
        exact_match=exact,
        n_predicted=len(got.calls),
        n_expected=len(expected.calls),
        n_correct=count_matches(got.calls, expected.calls),
        n_entities_expected=n_entities_expected,
        n_entities_found=n_entities_found,
        has_block=got.has_block,
        json_valid=got.json_valid,
        expects_call=bool(expected.calls),
        makes_call=makes_call(got),
        reply_sentence=got.sentence,
        reference_sentence=expected.sentence,
        expected_calls=expected.calls,
        predicted_calls=got.calls,
    )


def aggregate(scores: Sequence[ExampleScore]) -> dict[str, Any]:
    """The summary metrics of one group of examples (see METRIC_KEYS)."""
    no_call = [s for s in scores if not s.expects_call]
    with_block = [s for s in scores if s.has_block]
    sentences = [s.reply_sentence for s in scores], [s.reference_sentence for s in scores]
    overlap = rouge(*sentences)
    return {
        "service_call_exact_match": ratio(sum(s.exact_match for s in scores), len(scores)),
        "call_precision": ratio(sum(s.n_correct for s in scores), sum(s.n_predicted for s in scores)),
        "call_recall": ratio(sum(s.n_correct for s in scores), sum(s.n_expected for s in scores)),
        "entity_accuracy": ratio(sum(s.n_entities_found for s in scores), sum(s.n_entities_expected for s in scores)),
        "json_valid_rate": ratio(sum(s.json_valid for s in with_block), len(with_block)),
        "no_call_accuracy": ratio(sum(not s.makes_call for s in no_call), len(no_call)),
        "perplexity": perplexity(scores),
        "bleu": bleu(*sentences),
        "rouge1": overlap["rouge1"],
        "rouge2": overlap["rouge2"],
        "rougeL": overlap["rougeL"],
        "meteor": meteor(*sentences),
        "edit_distance": edit_distance(*sentences),
        **latency([s.seconds for s in scores]),
        "n_examples": len(scores),
    }


def group_by(scores: Sequence[ExampleScore], labels: Iterable[str | None]) -> dict[str, list[ExampleScore]]:
    groups: dict[str, list[ExampleScore]] = {}
    for score, label in zip(scores, labels):
        groups.setdefault(label or UNKNOWN, []).append(score)
    return dict(sorted(groups.items()))


def summarize(
    scores: Sequence[ExampleScore],
    languages: Sequence[str | None],
    kinds: Sequence[str | None],
    device_counts: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Overall metrics plus the same metrics per language and per kind, and per DEVICE_BUCKETS range of
    `device_counts` (devices listed in each prompt, see devices_in_prompt) when given."""
    summary = aggregate(scores)
    summary["by_language"] = {name: aggregate(group) for name, group in group_by(scores, languages).items()}
    summary["by_kind"] = {name: aggregate(group) for name, group in group_by(scores, kinds).items()}
    if device_counts is not None:
        groups = group_by(scores, [device_bucket(count) for count in device_counts])
        # buckets in ascending order, not sorted as text ("17+" before "5-8")
        summary["by_devices"] = {name: aggregate(groups[name]) for name in DEVICE_BUCKETS if name in groups}
    return summary


# Prompt sizes by devices listed: home-llm users with many entities run into the context limit.
DEVICE_BUCKETS = {"0": (0, 0), "1-4": (1, 4), "5-8": (5, 8), "9-16": (9, 16), "17+": (17, None)}
# A line of the system prompt's device list starts with an entity id: `light.kitchen 'Kitchen' = on`.
_DEVICE_LINE = re.compile(r"^\s*[a-z_][a-z0-9_]*\.[a-z0-9_]+\b", re.MULTILINE)


def devices_in_prompt(messages: Sequence[dict]) -> int:
    """Lines starting with an entity id (`domain.object_id`) in the prompt's system and user messages (a template
    without a system role gets the device list in the first user message)."""
    return sum(
        len(_DEVICE_LINE.findall(str(message.get("content") or "")))
        for message in messages
        if message.get("role") in ("system", "user")
    )


def device_bucket(count: int) -> str:
    for name, (low, high) in DEVICE_BUCKETS.items():
        if count >= low and (high is None or count <= high):
            return name
    raise ValueError(f"negative device count {count}")
