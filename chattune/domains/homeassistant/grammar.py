"""The grammar of a Home Assistant reply for one house: it can only name what the house has.

Built per prompt from its own `Services:` and `Devices:` lines, as GBNF (chattune.domains.gbnf):

* the reply's sentence is free text (no backticks, which open the block);
* then an optional ```homeassistant block of JSON calls, one per line, written as the reply format writes them
  (`{"service": ..., "target_device": ..., <arguments in signature order>}`);
* a call's `target_device` is one of the listed entity ids, and its service is a listed service of that entity's
  domain;
* argument keys come from that service's signature, each at most once, required ones always; values are typed
  and ranged: percentages 0-100, `rgb_color` three bytes, `volume_level` 0-1, `hvac_mode` one of Home
  Assistant's modes, `duration` HH:MM:SS, and so on.

A house with no device (or none whose domain has a listed service) allows only a reply without a block.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from chattune.domains import gbnf
from chattune.domains.homeassistant.datagen.devices import SERVICES
from chattune.domains.homeassistant.reply_format import BLOCK_NAME, FENCE

HVAC_MODES = ("off", "heat", "cool", "heat_cool", "auto", "dry", "fan_only")
# Value rules by argument name. An argument the table does not know takes any JSON value.
ARGUMENT_VALUES = {
    "brightness": "percent",
    "percentage": "percent",
    "position": "percent",
    "humidity": "percent",
    "rgb_color": "rgb",
    "volume_level": "volume",
    "temperature": "temperature",
    "hvac_mode": "hvac-mode",
    "duration": "duration",
    "oscillating": "json-bool",
    "media_content_id": "json-string",
    "item": "json-string",
}
VALUE_RULES = {
    "percent": gbnf.PERCENT,
    "byte": gbnf.BYTE,
    "rgb": '"[" byte ", " byte ", " byte "]"',
    # json.dumps writes 0.4, 0.05, 1.0; a model may also write 0 or 1
    "volume": '"0" | "1" | "1.0" | "0." [0-9] [0-9]? [0-9]?',
    # degrees, Celsius or Fahrenheit, optionally to one decimal
    "temperature": '"-"? [1-9]? [0-9] ("." [0-9])?',
    "hvac-mode": gbnf.alternatives(gbnf.json_literal(mode) for mode in HVAC_MODES),
    "duration": '"\\"" [0-9] [0-9] ":" [0-5] [0-9] ":" [0-5] [0-9] "\\""',
}

_SIGNATURE = re.compile(r"([a-z0-9_]+)\.([a-z0-9_]+)\(([^)]*)\)")
# `<entity_id> '<Friendly Name>' = <state>`: the id is everything before the first space.
_DEVICE = re.compile(r"^(\S+?\.\S+) '.*' = ")


@dataclass(frozen=True)
class House:
    """What a prompt lists: services with their argument names, and entity ids in order."""

    services: dict[str, tuple[str, ...]]
    devices: tuple[str, ...]


def house_from_text(text: str) -> House | None:
    """The house a system prompt describes, or None when it has no `Devices:` line.

    Without a `Services:` line, every service chattune knows for the listed domains is allowed (with their
    arguments), which is what a model trained without that line was taught.
    """
    lines = text.splitlines()
    if "Devices:" not in (line.strip() for line in lines):
        return None
    start = next(i for i, line in enumerate(lines) if line.strip() == "Devices:") + 1
    devices = []
    for line in lines[start:]:
        match = _DEVICE.match(line.strip())
        if not match:
            break
        devices.append(match.group(1))
    services = _listed_services(lines) or {spec.full_name: spec.args for specs in SERVICES.values() for spec in specs}
    return House(services, tuple(dict.fromkeys(devices)))


def house_from_messages(messages: Sequence[dict]) -> House | None:
    """The house of a conversation's prompt: its system message's, or the first user message's when the
    template puts the system prompt there (`--no_system_role`)."""
    for message in messages:
        if message.get("role") in ("system", "user"):
            house = house_from_text(str(message.get("content") or ""))
            if house is not None:
                return house
    return None


def _listed_services(lines: Sequence[str]) -> dict[str, tuple[str, ...]]:
    line = next((line for line in lines if line.startswith("Services:")), None)
    if line is None:
        return {}
    services = {}
    for domain, name, args in _SIGNATURE.findall(line):
        services[f"{domain}.{name}"] = tuple(arg.strip() for arg in args.split(",") if arg.strip())
    return services


def required_arguments(service: str) -> tuple[str, ...]:
    domain, _, name = service.partition(".")
    spec = next((spec for spec in SERVICES.get(domain, ()) if spec.name == name), None)
    return spec.required if spec else ()


def house_grammar(house: House) -> str:
    """GBNF for every reply that names only what `house` lists."""
    rules: dict[str, str] = {"root": "text"}
    calls = []
    uses_json = False
    for domain, ids in _devices_by_domain(house.devices).items():
        services = [s for s in house.services if s.split(".", 1)[0] == domain]
        if not services:
            continue
        rules[gbnf.rule_name("ids", domain)] = gbnf.alternatives(gbnf.json_literal(i) for i in ids)
        for service in services:
            name = gbnf.rule_name("call", service)
            rules[name], needs = _call_rule(service, house.services[service], gbnf.rule_name("ids", domain))
            uses_json |= needs
            calls.append(name)
    rules["text"] = "[^`]*"
    if calls:
        rules["root"] = "text block?"
        # The newline before the fence is the text's: a lexer-based engine (llguidance) ends the free text
        # where a backtick starts, so the block must begin with the fence itself.
        opening = gbnf.literal(f"{FENCE}{BLOCK_NAME}\n")
        rules["block"] = f'{opening} call ("\\n" call)* {gbnf.literal(chr(10) + FENCE)}'
        call_opening = gbnf.literal('{"service": ')
        rules["call"] = f'{call_opening} ({gbnf.alternatives(calls)}) "}}"'
        rules.update(VALUE_RULES)
    return gbnf.render(rules, needs_json=uses_json or bool(calls))


def _devices_by_domain(devices: Sequence[str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for entity_id in devices:
        grouped.setdefault(entity_id.split(".", 1)[0], []).append(entity_id)
    return grouped


def _call_rule(service: str, args: Sequence[str], ids_rule: str) -> tuple[str, bool]:
    """`"light.turn_on", "target_device": <id> (, "brightness": <percent>)? ...` and whether it needs JSON rules."""
    required = set(required_arguments(service))
    parts = [gbnf.json_literal(service), gbnf.literal(', "target_device": '), ids_rule]
    needs_json = False
    for arg in args:
        value = ARGUMENT_VALUES.get(arg, "json-value")
        needs_json |= value.startswith("json-")
        pair = f"{gbnf.literal(', ' + _json_key(arg))} {value}"
        parts.append(pair if arg in required else f"({pair})?")
    return gbnf.sequence(parts), needs_json


def _json_key(name: str) -> str:
    return json.dumps(name, ensure_ascii=False) + ": "
