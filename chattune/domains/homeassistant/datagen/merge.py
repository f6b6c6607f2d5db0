"""--merge: mixing an Alpaca dataset ({instruction, input, output}) into the train split.

Accepts a JSON list or JSONL; every error names file:line so a broken record is easy to find. A record becomes
a conversation through the `alpaca` entry of chattune.data.formats' registry, as train.py and evaluate.py read
Alpaca rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chattune.data.formats import ALPACA_KEYS, FORMATS, Conversation, DataError
from chattune.domains.homeassistant.datagen.errors import DataGenError
from chattune.domains.homeassistant.datagen.examples import MERGED_KIND, Example
from chattune.domains.homeassistant.datagen.piles import LanguagePile


def load_alpaca(path: Path) -> list[tuple[str, Conversation]]:
    """Records as ("file:line", conversation) pairs, from a JSON list or a JSON-lines file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataGenError(f"{path}: cannot read merge file ({exc})") from exc
    records = _json_list(path, text) if text.lstrip().startswith("[") else _json_lines(path, text)
    if not records:
        raise DataGenError(f"{path}: the merge file holds no records; give one with Alpaca records, or drop --merge")
    return [(where, _conversation(where, record)) for where, record in records]


def _json_lines(path: Path, text: str) -> list[tuple[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataGenError(f"{path}:{number}: bad JSON ({exc.msg})") from exc
    return records


def _json_list(path: Path, text: str) -> list[tuple[str, Any]]:
    """Decode the list item by item so each record knows the line it starts on."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    records = []
    while True:
        position = _skip_space(text, position)
        if position < len(text) and text[position] == "]":
            break
        try:
            record, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise DataGenError(f"{path}:{exc.lineno}: bad JSON ({exc.msg})") from exc
        records.append((f"{path}:{text.count(chr(10), 0, position) + 1}", record))
        position = _skip_space(text, end)
        if position < len(text) and text[position] == ",":
            position += 1
        elif position >= len(text) or text[position] != "]":
            line = text.count("\n", 0, min(position, len(text))) + 1
            raise DataGenError(f"{path}:{line}: bad JSON (expected ',' or ']' after a record)")
    return records


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def _conversation(where: str, record: Any) -> Conversation:
    if not isinstance(record, dict):
        raise DataGenError(f"{where}: expected an object with keys {', '.join(ALPACA_KEYS)}")
    try:
        return FORMATS["alpaca"].convert(record, f"{where}: ")
    except DataError as error:
        raise DataGenError(str(error)) from None


def merged_examples(path: Path, pile: LanguagePile) -> list[Example]:
    """Alpaca records as chat examples under the first persona's prompt.

    No device list: these examples are not about the home. Their text is user data, not pile
    templates, so braces in it (code, format strings) are left alone.
    """
    persona = next(iter(pile.personas))
    examples = []
    for _, conversation in load_alpaca(path):
        user, output = (message["content"] for message in conversation.messages)
        examples.append(Example(pile.personas[persona], user, output, pile.language, MERGED_KIND, persona))
    return examples
