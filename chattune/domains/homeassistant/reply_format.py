"""The Home Assistant reply format shared by the dataset generator and the evaluator.

An assistant reply is one natural sentence, optionally followed by a fenced block that holds one
JSON service call per line::

    Turning on the Kitchen Light.
    ```homeassistant
    {"service": "light.turn_on", "target_device": "light.kitchen", "brightness": 80}
    ```

Model output is untrusted, so `parse_reply` never raises: malformed lines only clear `json_valid`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from chattune.domains.metrics import values_equal

BLOCK_NAME = "homeassistant"
FENCE = "```"
FENCE_OPEN = FENCE + BLOCK_NAME


@dataclass
class ParsedReply:
    """What `parse_reply` found in one assistant reply."""

    sentence: str
    calls: list[dict] = field(default_factory=list)
    json_valid: bool = True
    has_block: bool = False


def format_call(call: dict) -> str:
    """One call as a single JSON line (key order kept, non-ASCII kept readable)."""
    return json.dumps(call, ensure_ascii=False)


def format_calls(calls: list[dict]) -> str:
    """Render the fenced ```homeassistant block for `calls`."""
    return "\n".join([FENCE_OPEN, *(format_call(call) for call in calls), FENCE])


def format_reply(sentence: str, calls: list[dict]) -> str:
    """The full assistant reply: the sentence, then the block when there is something to call."""
    if not calls:
        return sentence
    return f"{sentence}\n{format_calls(calls)}"


def parse_reply(text: str) -> ParsedReply:
    """Split a reply into its sentence and calls; tolerant of any malformed model output."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    start = text.find(FENCE_OPEN)
    if start < 0:
        return ParsedReply(sentence=text.strip())
    body_start = start + len(FENCE_OPEN)
    end = text.find(FENCE, body_start)
    body = text[body_start:] if end < 0 else text[body_start:end]
    calls, valid = _parse_block(body)
    # A block that never closes means generation stopped mid-way: its JSON cannot be trusted as complete.
    return ParsedReply(sentence=text[:start].strip(), calls=calls, json_valid=valid and end >= 0, has_block=True)


def _parse_block(body: str) -> tuple[list[dict], bool]:
    calls: list[dict] = []
    valid = True
    for line in body.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            valid = False
            continue
        if isinstance(value, dict):
            calls.append(value)
        else:
            valid = False
    return calls, valid


def calls_equal(a: list[dict], b: list[dict]) -> bool:
    """Compare two call lists as multisets: call order and key order do not matter."""
    if len(a) != len(b):
        return False
    unmatched = list(b)
    for call in a:
        for index, candidate in enumerate(unmatched):
            if values_equal(call, candidate):
                del unmatched[index]
                break
        else:
            return False
    return True


def normalize_call(call: dict) -> str:
    """A canonical string for a call (sorted keys, rounded numbers), handy for counting and hashing."""
    return json.dumps(_normalize_value(call), ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _normalize_value(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        rounded = round(float(value), 4)
        return int(rounded) if rounded.is_integer() else rounded
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        return [_normalize_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _normalize_value(item) for key, item in value.items()}
    return value
