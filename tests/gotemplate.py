"""A subset of Go's text/template, enough to render the Ollama templates chattune writes, for tests that have no
`ollama` binary (and no Go).

Supported: text; actions `{{ pipeline }}` with the trim markers `{{- ` and ` -}}`; `.`, `.Field`, `$`, `$.Field`,
`$name`, `$name.Field`; string and integer literals; the functions `eq` (several right-hand sides, as in Go),
`ne`, `lt`, `le`, `gt`, `ge`, `and`, `or`, `not`, `len`, with parenthesised arguments; `{{ if }}` with
`{{ else if }}` and `{{ else }}`; `{{ range PIPELINE }}` and `{{ range $i, $x := PIPELINE }}`; `{{ $x := ... }}`;
`{{ end }}`. Truth is Go's: false, 0, "", nil and empty collections are false. Fields are
read from dicts (Go's maps and structs alike). Anything else raises, rather than rendering something else.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_ACTION = re.compile(r"\{\{(-[ \t\r\n])?(.*?)([ \t\r\n]-)?\}\}", re.S)
_WORD = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+)')
_SPACE = " \t\r\n"


class GoTemplateError(Exception):
    pass


@dataclass
class _Node:
    kind: str  # "text", "action", "if", "range"
    text: str = ""
    branches: list[tuple[str | None, list]] = field(default_factory=list)  # if: (condition or None for else, body)


def _lex(source: str) -> list[tuple[str, str]]:
    """[("text", ...), ("action", body), ...] with the trim markers applied to the neighbouring text."""
    tokens: list[tuple[str, str]] = []
    position, trim_next = 0, False
    for match in _ACTION.finditer(source):
        text = source[position : match.start()]
        if trim_next:
            text = text.lstrip(_SPACE)
        if match.group(1):
            text = text.rstrip(_SPACE)
        tokens += [("text", text), ("action", match.group(2).strip())]
        position, trim_next = match.end(), bool(match.group(3))
    tail = source[position:]
    tokens.append(("text", tail.lstrip(_SPACE) if trim_next else tail))
    return tokens


def _parse(tokens: list[tuple[str, str]], index: int, stop: tuple[str, ...]) -> tuple[list[_Node], int, str]:
    """Nodes up to one of the `stop` keywords (returned with the index after it, and the keyword's action)."""
    nodes: list[_Node] = []
    while index < len(tokens):
        kind, body = tokens[index]
        index += 1
        if kind == "text":
            nodes.append(_Node("text", body))
            continue
        keyword = body.split(None, 1)[0] if body else ""
        if keyword in stop:
            return nodes, index, body
        if keyword == "if":
            node = _Node("if")
            condition = body[2:].strip()
            while True:
                branch, index, closing = _parse(tokens, index, ("else", "end"))
                node.branches.append((condition, branch))
                if closing == "end":
                    break
                rest = closing[4:].strip()
                condition = rest[2:].strip() if rest.startswith("if") else None
                if condition is None:
                    branch, index, _ = _parse(tokens, index, ("end",))
                    node.branches.append((None, branch))
                    break
            nodes.append(node)
        elif keyword == "range":
            branch, index, _ = _parse(tokens, index, ("end",))
            nodes.append(_Node("range", body[5:].strip(), [(None, branch)]))
        else:
            nodes.append(_Node("action", body))
    if stop:
        raise GoTemplateError(f"missing {{{{ end }}}} (expected one of {stop})")
    return nodes, index, ""


def _truth(value: Any) -> bool:
    return bool(value)  # Python's falsy values are Go's empty ones for the types used here


def _field(value: Any, path: str) -> Any:
    for name in filter(None, path.split(".")):
        if not isinstance(value, dict) or name not in value:
            raise GoTemplateError(f"no field {name!r} in {value!r}")
        value = value[name]
    return value


def _eq(left: Any, *rights: Any) -> bool:
    return any(left == right for right in rights)


_FUNCTIONS = {
    "eq": _eq,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "not": lambda a: not _truth(a),
    "len": len,
}


class _Scope:
    def __init__(self, root: Any, dot: Any, variables: dict[str, Any]) -> None:
        self.root, self.dot, self.variables = root, dot, variables

    def child(self, dot: Any) -> _Scope:
        return _Scope(self.root, dot, dict(self.variables))

    def operand(self, word: str) -> Any:
        if word.startswith('"'):
            return json.loads(word)  # Go's escapes in a double-quoted string are JSON's, for what templates use
        if re.fullmatch(r"-?\d+", word):
            return int(word)
        if word in ("true", "false"):
            return word == "true"
        if word.startswith("."):
            return _field(self.dot, word)
        if word.startswith("$"):
            name, _, path = word.partition(".")
            base = self.root if name == "$" else self.variables[name]
            return _field(base, path)
        raise GoTemplateError(f"unsupported operand {word!r}")

    def evaluate(self, words: list[str]) -> Any:
        """A command: a function and its arguments (words, or values of parenthesised commands), or one operand."""
        arguments: list[tuple[str, Any]] = []  # ("word", text) or ("value", an evaluated sub-command)
        index = 0
        while index < len(words):
            if words[index] == "(":
                depth, end = 1, index + 1
                while depth:
                    depth += {"(": 1, ")": -1}.get(words[end], 0)
                    end += 1
                arguments.append(("value", self.evaluate(words[index + 1 : end - 1])))
                index = end
            else:
                arguments.append(("word", words[index]))
                index += 1
        kind, head = arguments[0]
        values = [self.operand(a) if k == "word" else a for k, a in arguments[1:]]
        if kind == "word" and head in ("and", "or"):
            for value in values:
                if _truth(value) != (head == "and"):
                    return value
            return values[-1]
        if kind == "word" and head in _FUNCTIONS:
            return _FUNCTIONS[head](*values)
        if values:
            raise GoTemplateError(f"unsupported command {words!r}")
        return self.operand(head) if kind == "word" else head

    def pipeline(self, text: str) -> Any:
        return self.evaluate(_WORD.findall(text))


def _assignment(text: str) -> tuple[str, str] | None:
    match = re.fullmatch(r"(\$\w+)\s*:=\s*(.+)", text, re.S)
    return (match.group(1), match.group(2)) if match else None


def _render(nodes: list[_Node], scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "action":
            assigned = _assignment(node.text)
            if assigned:
                scope.variables[assigned[0]] = scope.pipeline(assigned[1])
            else:
                value = scope.pipeline(node.text)
                out.append("" if value is None else str(value))
        elif node.kind == "if":
            for condition, body in node.branches:
                if condition is None or _truth(scope.pipeline(condition)):
                    _render(body, scope, out)
                    break
        else:
            _range(node, scope, out)


def _range(node: _Node, scope: _Scope, out: list[str]) -> None:
    match = re.fullmatch(r"(?:(\$\w+)\s*,\s*(\$\w+)\s*:=\s*)?(.+)", node.text, re.S)
    index_name, value_name, pipeline = match.groups()
    for index, item in enumerate(scope.pipeline(pipeline) or []):
        inner = scope.child(item)
        if index_name:
            inner.variables[index_name], inner.variables[value_name] = index, item
        _render(node.branches[0][1], inner, out)


def render(source: str, data: dict[str, Any]) -> str:
    """`source` executed with `data` as `.` (and `$`)."""
    nodes, _, _ = _parse(_lex(source), 0, ())
    out: list[str] = []
    _render(nodes, _Scope(data, data, {}), out)
    return "".join(out)


def ollama_render(template: str, messages: list[dict], system: str | None = None) -> str:
    """What Ollama's chat endpoint renders for `messages` with a Modelfile's TEMPLATE and SYSTEM: the SYSTEM is
    prepended when the request has no system message first; consecutive messages of one role are merged with a
    blank line; `.System` is every system message's content, joined by a blank line."""
    messages = [dict(m) for m in messages]
    if system and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system})
    merged: list[dict] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"]:
            merged[-1]["content"] += "\n\n" + message["content"]
        else:
            merged.append(message)
    data = {
        "System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"),
        "Messages": [{"Role": m["role"], "Content": m["content"]} for m in merged],
    }
    return render(template, data)
