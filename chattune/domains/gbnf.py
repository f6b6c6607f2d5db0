"""Building blocks for GBNF grammars, llama.cpp's grammar format, which the tasks use to constrain replies.

A task writes one grammar text per prompt; llama.cpp reads it as it is (`--grammar-file`, `LlamaGrammar`), and
the transformers path hands the same text to a grammar engine (chattune.evaluation.constrained). Rule names are
made of letters, digits and dashes; literals are double-quoted with backslash escapes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

# JSON text, as json.dumps writes it (the replies' format): a string of any characters but the quote, the
# backslash and control characters, or an escape; numbers; and any value, for arguments whose type is unknown.
JSON_RULES = {
    "json-string": '"\\"" json-char* "\\""',
    "json-char": '[^"\\\\\\x00-\\x1f] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])',
    "json-int": '"-"? ("0" | [1-9] [0-9]*)',
    "json-number": 'json-int ("." [0-9]+)? ([eE] [-+]? [0-9]+)?',
    "json-bool": '"true" | "false"',
    "json-value": 'json-string | json-number | json-bool | "null" | json-array | json-object',
    "json-array": '"[" (json-value (", " json-value)*)? "]"',
    "json-object": '"{" (json-string ": " json-value (", " json-string ": " json-value)*)? "}"',
}
_RULE_NAME = re.compile(r"[^a-zA-Z0-9]+")


def literal(text: str) -> str:
    """`text` as a GBNF string literal: quotes, backslashes and control characters escaped, the rest verbatim
    (llama.cpp reads UTF-8 in literals)."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def json_literal(value: object) -> str:
    """The GBNF literal of `value` written as JSON, the way the reply format writes it (non-ASCII kept)."""
    return literal(json.dumps(value, ensure_ascii=False))


def alternatives(options: Iterable[str]) -> str:
    """`a | b | c`, or a rule that matches nothing useful when there are no options (never the case by design)."""
    options = list(options)
    if not options:
        raise ValueError("a grammar rule needs at least one alternative")
    return " | ".join(options)


def rule_name(*parts: str) -> str:
    """A valid rule name from free text: `light.turn_on` -> `light-turn-on`."""
    return "-".join(_RULE_NAME.sub("-", part).strip("-").lower() or "x" for part in parts)


def render(rules: dict[str, str], needs_json: bool = False) -> str:
    """The grammar text: `root` first, then the other rules in insertion order, then JSON's if used."""
    if "root" not in rules:
        raise ValueError("a grammar needs a root rule")
    ordered = {"root": rules["root"], **rules}
    if needs_json:
        ordered.update({name: body for name, body in JSON_RULES.items() if name not in ordered})
    return "".join(f"{name} ::= {body}\n" for name, body in ordered.items())


# Unsigned integers 0-100 and 0-255, without leading zeros.
PERCENT = '"100" | [1-9] [0-9] | [0-9]'
BYTE = '"25" [0-5] | "2" [0-4] [0-9] | "1" [0-9] [0-9] | [1-9] [0-9] | [0-9]'


def sequence(parts: Sequence[str]) -> str:
    return " ".join(part for part in parts if part)
