"""An argparse parser built from a dataclass's fields, as transformers' HfArgumentParser builds it, without
importing transformers (which imports torch: seconds before `train.py --help` could answer).

It reproduces what train.py's flags rely on: `--name` and `--name-with-dashes` for each field; a bool is a
switch that also takes a value (`--bf16`, `--bf16 false`); `list[str]` takes one or more words; `X | None` takes
an X; a field's metadata (help, choices) goes to `add_argument`; defaults are shown in --help.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

TRUE_WORDS = ("yes", "true", "t", "y", "1")
FALSE_WORDS = ("no", "false", "f", "n", "0")


def string_to_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(
        f"Truthy value expected: got {text} but expected one of yes/no, true/false, t/f, y/n, 1/0 (case insensitive)."
    )


def dataclass_parser(cls: type, **parser_options: Any) -> argparse.ArgumentParser:
    """A parser with one option per field of the dataclass `cls`; `parser_options` go to ArgumentParser."""
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **parser_options)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.init:
            options = [f"--{field.name}", *([f"--{field.name.replace('_', '-')}"] if "_" in field.name else [])]
            parser.add_argument(*options, **_argument(field, hints[field.name]))
    return parser


def list_fields(cls: type) -> set[str]:
    """The fields that take one or more words (`list[...]`, optional or not)."""
    hints = typing.get_type_hints(cls)
    return {name for name, hint in hints.items() if typing.get_origin(_without_none(hint)) is list}


def _argument(field: dataclasses.Field, hint: Any) -> dict[str, Any]:
    if field.default is dataclasses.MISSING:
        raise TypeError(f"{field.name}: every flag needs a default (required flags are checked after parsing)")
    kind = _without_none(hint)
    kwargs = {**field.metadata, "default": field.default}
    if kind is bool:
        return {**kwargs, "type": string_to_bool, "nargs": "?", "const": True}
    if typing.get_origin(kind) is list:
        return {**kwargs, "type": typing.get_args(kind)[0], "nargs": "+"}
    if kind in (str, int, float):
        return {**kwargs, "type": kind}
    raise TypeError(f"{field.name}: a flag of type {hint} is not supported")


def _without_none(hint: Any) -> Any:
    """X for `X | None`, else the hint itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        others = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(others) == 1:
            return others[0]
    return hint
