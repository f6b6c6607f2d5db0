"""The device model: domains, their services and arguments, device states and how they are listed.

Everything language-independent about Home Assistant lives here; the words live in the piles.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ServiceSpec:
    """One service of a domain, e.g. light.turn_on(brightness, rgb_color)."""

    domain: str
    name: str
    args: tuple[str, ...] = ()
    required: tuple[str, ...] = ()

    @property
    def full_name(self) -> str:
        return f"{self.domain}.{self.name}"

    def signature(self) -> str:
        return f"{self.full_name}({','.join(self.args)})"


def _services(domain: str, *specs: tuple) -> tuple[ServiceSpec, ...]:
    return tuple(ServiceSpec(domain, *spec) for spec in specs)


# Domain order is the order of the Services line; a tuple (not a set) keeps every run identical.
SERVICES: dict[str, tuple[ServiceSpec, ...]] = {
    "light": _services("light", ("turn_on", ("brightness", "rgb_color")), ("turn_off",), ("toggle",)),
    "switch": _services("switch", ("turn_on",), ("turn_off",), ("toggle",)),
    "fan": _services(
        "fan",
        ("turn_on",),
        ("turn_off",),
        ("toggle",),
        ("set_percentage", ("percentage",), ("percentage",)),
        ("oscillate", ("oscillating",), ("oscillating",)),
    ),
    "cover": _services(
        "cover",
        ("open_cover",),
        ("close_cover",),
        ("stop_cover",),
        ("set_cover_position", ("position",), ("position",)),
    ),
    "lock": _services("lock", ("lock",), ("unlock",)),
    "climate": _services(
        "climate",
        ("set_temperature", ("temperature",), ("temperature",)),
        ("set_hvac_mode", ("hvac_mode",), ("hvac_mode",)),
        ("set_humidity", ("humidity",), ("humidity",)),
    ),
    "media_player": _services(
        "media_player",
        ("media_play",),
        ("media_pause",),
        ("volume_set", ("volume_level",), ("volume_level",)),
        ("media_next_track",),
        ("play_media", ("media_content_id",), ("media_content_id",)),
    ),
    "vacuum": _services("vacuum", ("start",), ("return_to_base",), ("stop",)),
    "timer": _services("timer", ("start", ("duration",), ("duration",)), ("cancel",)),
    "todo": _services("todo", ("add_item", ("item",), ("item",))),
}
DOMAINS: tuple[str, ...] = tuple(SERVICES)
SERVICE_BY_NAME: dict[str, ServiceSpec] = {spec.full_name: spec for specs in SERVICES.values() for spec in specs}

# States a device of each domain can be listed in; status phrasings are written per state.
# todo's state is the number of open items, written `count` in the piles.
STATES: dict[str, tuple[str, ...]] = {
    "light": ("on", "off"),
    "switch": ("on", "off"),
    "fan": ("on", "off"),
    "cover": ("open", "closed"),
    "lock": ("locked", "unlocked"),
    "climate": ("heat", "cool", "auto", "off"),
    "media_player": ("playing", "paused", "idle", "off"),
    "vacuum": ("cleaning", "docked", "returning"),
    "timer": ("active", "idle"),
    "todo": ("count",),
}

# Values a status answer may quote, per (domain, state): only what the device line actually shows.
STATE_VALUES: dict[tuple[str, str], tuple[str, ...]] = {
    ("light", "on"): ("color", "brightness"),
    ("fan", "on"): ("percentage",),
    ("cover", "open"): ("position",),
    **{("climate", mode): ("temperature", "humidity") for mode in STATES["climate"]},
    ("media_player", "playing"): ("media", "volume"),
    ("media_player", "paused"): ("media", "volume"),
    ("media_player", "idle"): ("volume",),
    ("timer", "active"): ("minutes",),
    ("todo", "count"): ("count",),
}

# The state a device is most likely in before a service is called (turning on a light that is off).
LIKELY_BEFORE: dict[str, str] = {
    "turn_on": "off",
    "turn_off": "on",
    "open_cover": "closed",
    "close_cover": "open",
    "lock": "unlocked",
    "unlock": "locked",
    "media_play": "paused",
    "media_pause": "playing",
    "start": "docked",
    "return_to_base": "cleaning",
}


@dataclass(frozen=True)
class Device:
    """A device from a devices_<domain>.csv row or composed from rooms.csv and room_devices.csv; `forms` holds
    optional grammatical forms of the name, `room` the rooms.csv slug of the room it is in ("" when unknown)."""

    entity_id: str
    name: str
    type: str
    split: str
    forms: tuple[tuple[str, str], ...] = ()
    room: str = ""

    @property
    def domain(self) -> str:
        return self.entity_id.split(".", 1)[0]

    def placeholder_values(self, prefix: str = "device") -> dict[str, str]:
        """Values for {device}, {device_<form>} (or {device2}, {device2_<form>} with another prefix)."""
        values = {prefix: self.name}
        for form, text in self.forms:
            values[f"{prefix}_{form}"] = text
        return values


@functools.cache
def name_words(name: str) -> frozenset[str]:
    """The lowercased words of a friendly name: "Kitchen Ceiling Light" -> {kitchen, ceiling, light}."""
    return frozenset(re.findall(r"\w+", name.casefold()))


def look_alike_score(device: Device, other: Device) -> int:
    """How easily a request for `device` gets pinned on `other`: the words their names share (Kitchen Light and
    Kitchen Fan share one; Garage Ceiling Light and Kitchen Ceiling Light two), plus one for the same domain.
    0 for the device itself."""
    if device.entity_id == other.entity_id:
        return 0
    return len(name_words(device.name) & name_words(other.name)) + (device.domain == other.domain)


@dataclass
class DeviceState:
    """A device's listed state plus the attribute values shown after it."""

    state: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ValueVocab:
    """Language-specific values: colour names, media titles, spoken durations, to-do items."""

    colors: tuple[tuple[str, tuple[int, int, int]], ...]
    media: tuple[str, ...]
    durations: tuple[tuple[str, str], ...]
    items: tuple[str, ...]


def random_state(domain: str, rng: random.Random, vocab: ValueVocab, state: str | None = None) -> DeviceState:
    """A plausible state for a device of `domain` (forced to `state` when given)."""
    state = state or rng.choice(STATES[domain])
    values: dict[str, Any] = {}
    wanted = STATE_VALUES.get((domain, state), ())
    if "color" in wanted:
        values["color"] = rng.choice(vocab.colors)
    if "brightness" in wanted:
        values["brightness"] = rng.randrange(5, 101, 5)
    if "percentage" in wanted:
        values["percentage"] = rng.randrange(10, 101, 10)
    if "position" in wanted:
        values["position"] = rng.randrange(10, 101, 10)
    if "temperature" in wanted:
        values["temperature"] = rng.randint(16, 26)
    if "humidity" in wanted:
        values["humidity"] = rng.randrange(30, 66, 5)
    if "media" in wanted:
        values["media"] = rng.choice(vocab.media)
    if "volume" in wanted:
        values["volume"] = rng.randrange(5, 101, 5)
    if "minutes" in wanted:
        values["minutes"] = rng.randint(2, 59)
    if "count" in wanted:
        values["count"] = rng.randint(2, 9)
    return DeviceState(state, values)


def render_state(domain: str, state: DeviceState) -> str:
    """The compact `state;attr;attr` text shown after `=` in the Devices list."""
    if domain == "todo":
        return str(state.values["count"])
    fields = [state.state]
    values = state.values
    if "color" in values:
        name, (red, green, blue) = values["color"]
        fields.append(f"{name} ({red}, {green}, {blue})")
    for key, suffix in (("brightness", "%"), ("percentage", "%"), ("position", "%")):
        if key in values:
            fields.append(f"{values[key]}{suffix}")
    if "temperature" in values:
        fields.append(f"{values['temperature']}°C")
    if "humidity" in values:
        fields.append(f"{values['humidity']}%")
    if "media" in values:
        fields.append(values["media"])
    if "volume" in values:
        fields.append(f"vol={format_volume(values['volume'])}")
    if "minutes" in values:
        fields.append(f"00:{values['minutes']:02d}:00")
    return ";".join(fields)


def format_volume(percent: int) -> str:
    """Volume as Home Assistant's 0-1 volume_level, e.g. 40 -> 0.4."""
    return f"{percent / 100:g}"


def state_placeholder_values(state: DeviceState) -> dict[str, str]:
    """The strings a status answer may quote, e.g. {brightness} -> "80", {color} -> "warm white"."""
    result: dict[str, str] = {}
    for key, value in state.values.items():
        result[key] = value[0] if key == "color" else str(value)
    return result


def device_line(device: Device, state: DeviceState) -> str:
    """One line of the Devices list: `<entity_id> '<Friendly Name>' = <state>`."""
    return f"{device.entity_id} '{device.name}' = {render_state(device.domain, state)}"
