"""Argument values: drawing them for request placeholders and parsing the fixed `arguments` column.

A request placeholder such as {brightness} is filled with text ("40") and produces a call argument
(`"brightness": 40`); the mapping between the two lives here.
"""

from __future__ import annotations

import random
import re
from typing import Any

from chattune.domains.homeassistant.datagen.devices import ServiceSpec, ValueVocab
from chattune.domains.homeassistant.datagen.errors import DataGenError

# Request placeholder -> the service argument it fills.
ARG_OF_PLACEHOLDER: dict[str, str] = {
    "brightness": "brightness",
    "color": "rgb_color",
    "temperature": "temperature",
    "humidity": "humidity",
    "percentage": "percentage",
    "position": "position",
    "volume": "volume_level",
    "media": "media_content_id",
    "duration": "duration",
    "item": "item",
}
PLACEHOLDER_OF_ARG: dict[str, str] = {arg: name for name, arg in ARG_OF_PLACEHOLDER.items()}
HVAC_MODES: tuple[str, ...] = ("heat", "cool", "auto", "off")
DURATION_RE = re.compile(r"^\d{2}:[0-5]\d:[0-5]\d$")
PERCENT_ARGS = ("brightness", "percentage", "position", "humidity")


def placeholders_for(spec: ServiceSpec) -> tuple[str, ...]:
    """Value placeholders a phrasing for `spec` may use."""
    return tuple(PLACEHOLDER_OF_ARG[arg] for arg in spec.args if arg in PLACEHOLDER_OF_ARG)


def draw_value(name: str, rng: random.Random, vocab: ValueVocab) -> tuple[str, Any]:
    """Draw a value for placeholder `name`: (text put into the sentence, value put into the call)."""
    if name == "brightness":
        value = rng.randrange(10, 101, 5)
        return str(value), value
    if name == "color":
        color_name, rgb = rng.choice(vocab.colors)
        return color_name, list(rgb)
    if name == "temperature":
        value = rng.randint(16, 28)
        return str(value), value
    if name == "humidity":
        value = rng.randrange(30, 66, 5)
        return str(value), value
    if name == "percentage":
        value = rng.randrange(10, 101, 10)
        return str(value), value
    if name == "position":
        value = rng.randrange(10, 91, 10)
        return str(value), value
    if name == "volume":
        percent = rng.randrange(5, 101, 5)
        return str(percent), round(percent / 100, 2)
    if name == "media":
        title = rng.choice(vocab.media)
        return title, title
    if name == "duration":
        phrase, duration = rng.choice(vocab.durations)
        return phrase, duration
    if name == "item":
        item = rng.choice(vocab.items)
        return item, item
    raise DataGenError(f"unknown value placeholder {{{name}}}")


def text_for_argument(arg: str, value: Any, vocab: ValueVocab) -> str | None:
    """Sentence text for a fixed argument value, so responses can quote it; None when there is none."""
    if arg in PERCENT_ARGS or arg == "temperature":
        return f"{value:g}" if isinstance(value, float) else str(value)
    if arg == "volume_level":
        return str(round(value * 100))
    if arg in ("item", "media_content_id"):
        return str(value)
    if arg == "rgb_color":
        return next((name for name, rgb in vocab.colors if list(rgb) == list(value)), None)
    if arg == "duration":
        return next((phrase for phrase, duration in vocab.durations if duration == value), None)
    return None


def parse_arguments(text: str, spec: ServiceSpec, where: str) -> dict[str, Any]:
    """Parse the `arguments` column: `key=value;key=value` with keys among the service's arguments."""
    result: dict[str, Any] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, raw = part.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or key not in spec.args:
            allowed = ", ".join(spec.args) or "none"
            raise DataGenError(f"{where}: bad argument {part!r} for {spec.full_name} (key=value; keys: {allowed})")
        result[key] = _parse_value(key, raw, where)
    return result


def _parse_value(key: str, raw: str, where: str) -> Any:
    try:
        if key in PERCENT_ARGS:
            value = int(raw)
            if not 0 <= value <= 100:
                raise ValueError
            return value
        if key == "temperature":
            number = float(raw)
            return int(number) if number.is_integer() else number
        if key == "volume_level":
            value = float(raw)
            if not 0 <= value <= 1:
                raise ValueError
            return value
        if key == "oscillating":
            return {"true": True, "false": False}[raw.lower()]
        if key == "hvac_mode":
            if raw not in HVAC_MODES:
                raise ValueError
            return raw
        if key == "duration" and not DURATION_RE.match(raw):
            raise ValueError
        if key == "rgb_color":
            red, green, blue = (int(x) for x in raw.split("/"))
            return [red, green, blue]
    except (ValueError, KeyError) as exc:
        raise DataGenError(f"{where}: bad value {raw!r} for argument {key} ({_VALUE_HELP.get(key, 'text')})") from exc
    if not raw:
        raise DataGenError(f"{where}: empty value for argument {key}")
    return raw


_VALUE_HELP = {
    **{key: "whole number 0-100" for key in PERCENT_ARGS},
    "temperature": "number",
    "volume_level": "number 0-1",
    "oscillating": "true or false",
    "hvac_mode": " | ".join(HVAC_MODES),
    "duration": "HH:MM:SS",
    "rgb_color": "r/g/b",
}
