"""Tool calls in model output: parsing the common syntaxes, and scoring turns against reference calls.

Nothing here knows Home Assistant: a call is a function name and a dict of arguments, as in OpenAI's format.
Model output is untrusted, so parsing never raises: what cannot be read clears `json_valid`.

Syntaxes (`--tool_call_format`):

* `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one per call (Qwen2/2.5, Hermes, and
  chattune's recipes/templates/chatml_tools.jinja);
* `mistral`: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`;
* `json`: the reply is a JSON object (or a list of them) with `name` and `parameters`/`arguments`, optionally after
  `<|python_tag|>` (Llama 3.1/3.2's JSON tool calling);
* `auto` (default): the first of those whose marker appears in the reply;
* `regex:PATTERN`: every match of PATTERN, whose first group is one call's JSON object.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chattune.domains.metrics import latency, perplexity, ratio, rouge_l, values_equal
from chattune.domains.task import Score
from chattune.errors import ChattuneError

FORMATS = ("auto", "hermes", "mistral", "json")
_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
_MISTRAL = "[TOOL_CALLS]"
_PYTHON_TAG = "<|python_tag|>"


class ToolCallFormatError(ChattuneError, ValueError):
    """An unknown --tool_call_format, or a regex that does not compile."""


@dataclass
class ToolCall:
    name: str
    arguments: dict


@dataclass
class ParsedCalls:
    calls: list[ToolCall] = field(default_factory=list)
    attempted: bool = False  # a call syntax was found, readable or not
    json_valid: bool = True  # every attempted call was readable JSON with a name
    text: str = ""  # the reply without its calls


def call_from_json(value: Any) -> ToolCall | None:
    """{"name", "arguments" | "parameters"} (arguments possibly a JSON string) -> a call, else None."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None
    return ToolCall(value["name"], arguments) if isinstance(arguments, dict) else None


def _bodies_to_calls(bodies: Sequence[str], text: str) -> ParsedCalls:
    parsed = ParsedCalls(attempted=bool(bodies), text=text.strip())
    for body in bodies:
        try:
            call = call_from_json(json.loads(body))
        except json.JSONDecodeError:
            call = None
        if call is None:
            parsed.json_valid = False
        else:
            parsed.calls.append(call)
    return parsed


def parse_hermes(text: str) -> ParsedCalls:
    return _bodies_to_calls([m.strip() for m in _HERMES.findall(text)], _HERMES.sub("", text))


def parse_mistral(text: str) -> ParsedCalls:
    if _MISTRAL not in text:
        return ParsedCalls(text=text.strip())
    before, _, after = text.partition(_MISTRAL)
    return _parse_json_calls(after.strip(), before)


def parse_json(text: str) -> ParsedCalls:
    body = text.strip().removeprefix(_PYTHON_TAG).strip()
    if not body.startswith(("{", "[")):
        return ParsedCalls(text=text.strip())
    return _parse_json_calls(body, "")


def _parse_json_calls(body: str, rest: str) -> ParsedCalls:
    """A JSON object or list of objects at the start of `body`; trailing text is kept as the reply's text."""
    try:
        value, end = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError:
        return ParsedCalls(attempted=True, json_valid=False, text=rest.strip())
    items = value if isinstance(value, list) else [value]
    calls = [call_from_json(item) for item in items]
    valid = [call for call in calls if call is not None]
    text = (rest + body[end:]).strip()
    return ParsedCalls(valid, attempted=True, json_valid=len(valid) == len(calls) and bool(items), text=text)


def parse_auto(text: str) -> ParsedCalls:
    if "<tool_call>" in text:
        return parse_hermes(text)
    if _MISTRAL in text:
        return parse_mistral(text)
    return parse_json(text)


PARSERS: dict[str, Callable[[str], ParsedCalls]] = {
    "auto": parse_auto,
    "hermes": parse_hermes,
    "mistral": parse_mistral,
    "json": parse_json,
}


def parser_for(spec: str) -> Callable[[str], ParsedCalls]:
    """The parser a --tool_call_format value names; `regex:PATTERN` builds one. Checked before any work."""
    if spec.startswith("regex:"):
        try:
            pattern = re.compile(spec.removeprefix("regex:"), re.S)
        except re.error as error:
            raise ToolCallFormatError(f"--tool_call_format {spec!r}: not a regular expression ({error})") from None
        if pattern.groups < 1:
            raise ToolCallFormatError(f"--tool_call_format {spec!r}: the pattern needs a group holding the call's JSON")
        return lambda text: _bodies_to_calls([m.group(1) for m in pattern.finditer(text)], pattern.sub("", text))
    if spec not in PARSERS:
        raise ToolCallFormatError(
            f"--tool_call_format {spec!r}: unknown; one of {', '.join(FORMATS)}, or regex:PATTERN with one group"
        )
    return PARSERS[spec]


def reference_calls(message: dict) -> list[ToolCall]:
    """The calls of a reference assistant message in OpenAI's format (arguments already parsed by the loader)."""
    calls = [call_from_json(call.get("function")) for call in message.get("tool_calls") or []]
    return [call for call in calls if call is not None]


# --------------------------------------------------------------------------------------------- scoring


@dataclass
class TurnScore(Score):
    """One assistant turn: the calls it should make (maybe none) against what the model wrote. `exact_match`: the
    same set of calls (order ignored), and nothing unreadable."""

    expects_call: bool
    makes_call: bool
    n_expected: int
    n_names_correct: int  # expected calls whose function the reply called (one-to-one)
    key_hits: dict[str, tuple[int, int]]  # argument key -> (expected, correct) over name-matched calls
    attempted: bool
    json_valid: bool
    after_tool_result: bool  # the turn answers a tool result (the final reply of a tool-calling exchange)
    reply_text: str
    reference_text: str
    expected_calls: list[dict]
    predicted_calls: list[dict]


def _same_call(a: ToolCall, b: ToolCall) -> bool:
    return a.name == b.name and values_equal(a.arguments, b.arguments)


def _pair_by_name(expected: Sequence[ToolCall], predicted: Sequence[ToolCall]) -> list[tuple[ToolCall, ToolCall]]:
    """Expected calls paired one-to-one with predicted calls of the same function: equal ones first."""
    unmatched, pairs = list(predicted), []
    for exact_first in (True, False):
        for call in expected:
            if any(call is pair[0] for pair in pairs):
                continue
            for index, candidate in enumerate(unmatched):
                if candidate.name == call.name and (not exact_first or _same_call(call, candidate)):
                    pairs.append((call, unmatched.pop(index)))
                    break
    return pairs


def score_turn(
    reference: dict, reply: str, parse: Callable[[str], ParsedCalls], after_tool_result: bool = False
) -> TurnScore:
    """Score one generated turn against its reference message; never raises on model output."""
    expected = reference_calls(reference)
    got = parse(reply)
    pairs = _pair_by_name(expected, got.calls)
    key_hits: dict[str, list[int]] = {}
    for want, have in pairs:
        for key, value in want.arguments.items():
            counts = key_hits.setdefault(key, [0, 0])
            counts[0] += 1
            counts[1] += key in have.arguments and values_equal(have.arguments[key], value)
    for want in expected:  # arguments of calls the reply never made count as missed
        if not any(want is pair[0] for pair in pairs):
            for key in want.arguments:
                key_hits.setdefault(key, [0, 0])[0] += 1
    exact = len(pairs) == len(expected) == len(got.calls) and all(_same_call(a, b) for a, b in pairs) and got.json_valid
    return TurnScore(
        expects_call=bool(expected),
        makes_call=got.attempted,
        exact_match=exact,
        n_expected=len(expected),
        n_names_correct=len(pairs),
        key_hits={key: (n, hit) for key, (n, hit) in key_hits.items()},
        attempted=got.attempted,
        json_valid=got.json_valid,
        after_tool_result=after_tool_result,
        reply_text=got.text,
        reference_text=str(reference.get("content") or ""),
        expected_calls=[vars(call) for call in expected],
        predicted_calls=[vars(call) for call in got.calls],
    )


TASK = "tool_calls"
# Summary keys, in the order evaluate.py's table prints them.
METRIC_KEYS = (
    "tool_call_exact_match",
    "function_name_accuracy",
    "argument_accuracy",
    "json_valid_rate",
    "no_call_accuracy",
    "final_reply_rougeL",
    "perplexity",
    "latency_mean_s",
    "latency_p95_s",
    "n_turns",
)


def aggregate(scores: Sequence[TurnScore]) -> dict[str, Any]:
    """Tool-calling metrics of one group of turns; a metric with no applicable turn is None."""
    calling = [s for s in scores if s.expects_call]
    silent = [s for s in scores if not s.expects_call]
    finals = [s for s in silent if s.after_tool_result]
    by_key: dict[str, list[int]] = {}
    for score in calling:
        for key, (n, hit) in score.key_hits.items():
            counts = by_key.setdefault(key, [0, 0])
            counts[0] += n
            counts[1] += hit
    return {
        "tool_call_exact_match": ratio(sum(s.exact_match for s in calling), len(calling)),
        "function_name_accuracy": ratio(sum(s.n_names_correct for s in calling), sum(s.n_expected for s in calling)),
        "argument_accuracy": ratio(sum(h for _, h in by_key.values()), sum(n for n, _ in by_key.values())),
        "argument_accuracy_by_key": {key: ratio(hit, n) for key, (n, hit) in sorted(by_key.items())},
        "json_valid_rate": ratio(sum(s.json_valid for s in scores if s.attempted), sum(s.attempted for s in scores)),
        "no_call_accuracy": ratio(sum(not s.makes_call for s in silent), len(silent)),
        "final_reply_rougeL": rouge_l([s.reply_text for s in finals], [s.reference_text for s in finals]),
        "perplexity": perplexity(scores),
        **latency([s.seconds for s in scores]),
        "n_turns": len(scores),
    }


def summarize(scores: Sequence[TurnScore], languages: Sequence[str], kinds: Sequence[str]) -> dict[str, Any]:
    """Overall metrics plus the same per language and per kind (the keys evaluate.py's table reads)."""

    def groups(labels: Sequence[str]) -> dict[str, dict[str, Any]]:
        grouped: dict[str, list[TurnScore]] = {}
        for score, label in zip(scores, labels):
            grouped.setdefault(label, []).append(score)
        return {name: aggregate(group) for name, group in sorted(grouped.items())}

    return {"task": TASK, **aggregate(scores), "by_language": groups(languages), "by_kind": groups(kinds)}
