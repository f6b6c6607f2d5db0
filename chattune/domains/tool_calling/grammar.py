"""The grammar of a tool-calling reply, built from the row's own tool schemas (OpenAI's `tools` format).

A reply is free text, then calls in the Hermes syntax that chattune's ChatML tool template and Qwen2 use:
`<tool_call>{"name": <function>, "arguments": {...}}</tool_call>`, one per line. The function is one of the
tools offered; argument keys are that function's properties; values follow the property's type (string, integer,
number, boolean, array, object) or its enum. Arguments come in any order, as JSON objects may.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from chattune.domains import gbnf

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


def tools_grammar(tools: Sequence[dict]) -> str | None:
    """GBNF for replies that call only these tools; None when no tool has a usable schema."""
    rules: dict[str, str] = {"root": "text"}
    functions = []
    for index, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        name = gbnf.rule_name("fn", str(index))
        rules[name] = _function_rule(function, name, rules)
        functions.append(name)
    if not functions:
        return None
    # Free text ends where a call opens: a lexer-based engine needs the '<' to start the call.
    rules["text"] = "[^<]*"
    rules["root"] = 'text (call ("\\n" call)*)?'
    opening = gbnf.literal(CALL_OPEN + '{"name": ')
    rules["call"] = f"{opening} ({gbnf.alternatives(functions)}) {gbnf.literal('}' + CALL_CLOSE)}"
    rules["percent"] = gbnf.PERCENT
    return gbnf.render(rules, needs_json=True)


def _function_rule(function: dict, name: str, rules: dict[str, str]) -> str:
    """`"HassTurnOn", "arguments": {<pair> (, <pair>)*}` with a pair rule per property."""
    parameters = function.get("parameters") if isinstance(function.get("parameters"), dict) else {}
    properties = parameters.get("properties") if isinstance(parameters.get("properties"), dict) else {}
    head = f"{gbnf.json_literal(function['name'])} {gbnf.literal(', ' + json.dumps('arguments') + ': ')}"
    if not properties:
        return f'{head} "{{}}"'
    pairs = []
    for key, schema in properties.items():
        pair = gbnf.rule_name(name, "arg", key)
        rules[pair] = f"{gbnf.literal(json.dumps(key, ensure_ascii=False) + ': ')} {_value(schema)}"
        pairs.append(pair)
    rules[f"{name}-pair"] = gbnf.alternatives(pairs)
    return f'{head} "{{" ({name}-pair (", " {name}-pair)*)? "}}"'


def _value(schema: Any) -> str:
    """The value rule of one JSON schema property: its enum, or its type."""
    if not isinstance(schema, dict):
        return "json-value"
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return "(" + gbnf.alternatives(gbnf.json_literal(value) for value in schema["enum"]) + ")"
    kind = schema.get("type")
    if kind == "integer" and schema.get("minimum") == 0 and schema.get("maximum") == 100:
        return "percent"
    if kind == "array":
        item = _value(schema.get("items"))
        return f'"[" ({item} (", " {item})*)? "]"'
    return {
        "string": "json-string",
        "integer": "json-int",
        "number": "json-number",
        "boolean": "json-bool",
        "object": "json-object",
    }.get(kind, "json-value")
