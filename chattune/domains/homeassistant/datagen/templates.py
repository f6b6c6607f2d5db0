"""Placeholders in pile phrasings: parsing `{name}`, filling them, and checking nothing is left over."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from chattune.domains.homeassistant.datagen.errors import DataGenError

PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
# Anything brace-shaped that survived filling; JSON objects start with `{"` and are not matched.
LEFTOVER_RE = re.compile(r"\{[^{}\"\s]*\}")
# Device placeholders: {device}, {device2}, {device_acc}, {device1_acc} (slot 1-3, optional grammatical form).
DEVICE_RE = re.compile(r"^device([1-3])?(?:_([a-z][a-z0-9_]*))?$")
# Value placeholders: {brightness}, {brightness2} (slot numbers only appear in multi-device phrasings).
VALUE_RE = re.compile(r"^([a-z][a-z_]*?)([1-3])?$")


@dataclass(frozen=True)
class Placeholder:
    """One parsed `{name}`: what it stands for, the device slot it belongs to, the grammatical form."""

    name: str
    base: str
    slot: int | None = None
    form: str | None = None

    @property
    def is_device(self) -> bool:
        return self.base == "device"


def parse_placeholder(name: str) -> Placeholder | None:
    """Classify a placeholder name; None when it is not well-formed."""
    match = DEVICE_RE.match(name)
    if match:
        slot = int(match.group(1)) if match.group(1) else None
        return Placeholder(name, "device", slot, match.group(2))
    match = VALUE_RE.match(name)
    if match:
        slot = int(match.group(2)) if match.group(2) else None
        return Placeholder(name, match.group(1), slot)
    return None


def placeholder_names(template: str) -> list[str]:
    """Placeholder names in order of first appearance (a list, not a set, to keep output deterministic)."""
    names: list[str] = []
    for name in PLACEHOLDER_RE.findall(template):
        if name not in names:
            names.append(name)
    return names


def fill(template: str, values: Mapping[str, str], where: str = "") -> str:
    """Substitute every placeholder; a missing value is a bug in the pile or the generator, never silent."""

    def substitute(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise DataGenError(f"{where}: no value for placeholder {{{name}}} in {template!r}")
        return values[name]

    text = PLACEHOLDER_RE.sub(substitute, template)
    check_filled(text, where)
    return text


def check_filled(text: str, where: str = "") -> None:
    """Raise when an unfilled `{placeholder}` would reach an output file."""
    match = LEFTOVER_RE.search(text)
    if match:
        raise DataGenError(f"{where}: unfilled placeholder {match.group(0)} in {text!r}")


def template_regex(template: str) -> re.Pattern:
    """A regex matching any filling of `template`, with one named group per placeholder.

    Used by the tests to recover which pile row produced a text and with which values.
    """
    parts: list[str] = []
    seen: set[str] = set()
    position = 0
    for match in PLACEHOLDER_RE.finditer(template):
        parts.append(re.escape(template[position : match.start()]))
        name = match.group(1)
        parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>.+?)")
        seen.add(name)
        position = match.end()
    parts.append(re.escape(template[position:]))
    return re.compile("".join(parts), re.DOTALL)
