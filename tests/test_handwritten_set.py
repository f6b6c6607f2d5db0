"""The hand-written out-of-generator test set (data/home_assistant_handwritten.jsonl) is well formed and honest.

Well formed: every reference reply parses, and every call names a listed service and device with valid arguments.
Honest: no request is a near copy of a generator template, and the house is not made of the piles' devices.
"""

from __future__ import annotations

import copy
import csv
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chattune.domains.homeassistant.datagen.devices import DOMAINS, SERVICE_BY_NAME
from chattune.domains.homeassistant.datagen.leakage import NearCopy, Normaliser, split_phrasings
from chattune.domains.homeassistant.datagen.leakage import near_copies as leakage_near_copies
from chattune.domains.homeassistant.datagen.piles import load_language
from chattune.domains.homeassistant.datagen.prompts import DEVICES_LABEL, services_line
from chattune.domains.homeassistant.reply_format import parse_reply

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "data" / "home_assistant_handwritten.jsonl"
PILES = ROOT / "chattune" / "domains" / "homeassistant" / "piles"
KINDS = ("action", "value", "multi_device", "implied", "status", "refusal")
CALLING_KINDS = {"action", "value", "multi_device", "implied"}
PERSONAS = {
    "You are a friendly smart home assistant.",
    "You are a smart home assistant who talks like a salty old pirate captain.",
    "You are a smart home assistant that speaks like a precise, literal robot.",
}
DEVICE_LINE = re.compile(r"^([a-z_]+\.[a-z0-9_]+) '([^']+)' = (\S.*)$")
HVAC_MODES = {"off", "heat", "cool", "heat_cool", "auto", "dry", "fan_only"}
DURATION = re.compile(r"^\d{2}:[0-5]\d:[0-5]\d$")
MAX_SIMILARITY = 90


def load_rows() -> list[dict]:
    with DATASET.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


ROWS = load_rows()


def turns(row: dict) -> tuple[str, str, str]:
    """The system, user and assistant texts of a row."""
    roles = [turn["role"] for turn in row["conversations"]]
    assert roles == ["system", "user", "assistant"], roles
    system, user, assistant = (turn["content"] for turn in row["conversations"])
    return system, user, assistant


def listed_devices(system: str) -> dict[str, str]:
    """entity_id -> friendly name of the Devices lines."""
    lines = system.splitlines()
    devices = {}
    for line in lines[lines.index(DEVICES_LABEL) + 1 :]:
        match = DEVICE_LINE.match(line)
        assert match, f"bad device line: {line!r}"
        devices[match[1]] = match[2]
    return devices


def listed_services(system: str) -> set[str]:
    """The service names of the Services line."""
    line = system.splitlines()[1]
    return set(re.findall(r"([a-z_]+\.[a-z_]+)\(", line))


def is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def is_number(value: Any, low: float, high: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high


def is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


# What each argument's value must be.
VALUE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "brightness": lambda value: is_int(value, 0, 100),
    "percentage": lambda value: is_int(value, 0, 100),
    "position": lambda value: is_int(value, 0, 100),
    "humidity": lambda value: is_int(value, 0, 100),
    "rgb_color": lambda value: isinstance(value, list) and len(value) == 3 and all(is_int(v, 0, 255) for v in value),
    "volume_level": lambda value: is_number(value, 0, 1),
    "temperature": lambda value: is_number(value, 5, 35),
    "hvac_mode": lambda value: isinstance(value, str) and value in HVAC_MODES,
    "duration": lambda value: isinstance(value, str) and bool(DURATION.match(value)),
    "oscillating": lambda value: isinstance(value, bool),
    "media_content_id": is_text,
    "item": is_text,
}


def value_problem(arg: str, value: Any) -> str | None:
    """Why `value` is not a valid `arg`, or None."""
    return None if VALUE_CHECKS[arg](value) else f"bad {arg}: {value!r}"


def call_problems(call: dict, services: set[str], devices: dict[str, str]) -> list[str]:
    """Everything wrong with one reference call against the row's Services and Devices lines."""
    name, target = call.get("service"), call.get("target_device")
    spec = SERVICE_BY_NAME.get(name)
    if spec is None or name not in services:
        return [f"service {name!r} not offered"]
    problems = []
    if target not in devices:
        problems.append(f"target {target!r} not listed")
    elif target.split(".", 1)[0] != spec.domain:
        problems.append(f"{name} cannot act on {target}")
    args = [key for key in call if key not in ("service", "target_device")]
    problems += [f"{name} has no argument {key!r}" for key in args if key not in spec.args]
    problems += [f"{name} misses {key!r}" for key in spec.required if key not in call]
    problems += [p for key in args if key in spec.args and (p := value_problem(key, call[key]))]
    if list(call)[:2] != ["service", "target_device"] or args != [a for a in spec.args if a in call]:
        problems.append(f"key order {list(call)}")
    return problems


def row_problems(row: dict) -> list[str]:
    """Everything wrong with one row (an empty list for a good row)."""
    system, _, assistant = turns(row)
    if row.get("kind") not in KINDS or row.get("language") != "english":
        return [f"kind/language {row.get('kind')!r}/{row.get('language')!r}"]
    parsed = parse_reply(assistant)
    if not parsed.json_valid or not parsed.sentence or "\n" in parsed.sentence:
        return ["reply does not parse into one sentence and valid JSON"]
    if (row["kind"] in CALLING_KINDS) != bool(parsed.calls) or parsed.has_block != bool(parsed.calls):
        return [f"{row['kind']} row with {len(parsed.calls)} calls"]
    services, devices = listed_services(system), listed_devices(system)
    return [problem for call in parsed.calls for problem in call_problems(call, services, devices)]


def house() -> dict[str, str]:
    """Every device listed in any row: entity_id -> friendly name."""
    devices: dict[str, str] = {}
    for row in ROWS:
        devices.update(listed_devices(turns(row)[0]))
    return devices


def test_the_set_is_big_enough_and_covers_every_domain_and_kind():
    devices = house()
    assert len(ROWS) >= 60
    assert len(devices) >= 25
    assert {entity.split(".", 1)[0] for entity in devices} == set(DOMAINS)
    for kind in KINDS:
        assert sum(row["kind"] == kind for row in ROWS) >= 10, kind


def test_every_prefix_of_whole_rounds_is_a_stratified_sample():
    """Rows take the kinds in turn, so `evaluate.py --max_examples 6k` scores k rows of each kind (the demo does)."""
    for rounds in range(1, 11):
        prefix = [row["kind"] for row in ROWS[: rounds * len(KINDS)]]
        assert all(prefix.count(kind) == rounds for kind in KINDS), rounds


def test_system_prompts_have_the_compact_structure():
    for row in ROWS:
        system = turns(row)[0]
        lines = system.splitlines()
        domains = {entity.split(".", 1)[0] for entity in listed_devices(system)}
        assert lines[0] in PERSONAS
        assert lines[1] == services_line(domains)
        assert lines[2] == DEVICES_LABEL


def test_every_service_argument_has_a_value_check():
    assert {arg for spec in SERVICE_BY_NAME.values() for arg in spec.args} == set(VALUE_CHECKS)


@pytest.mark.parametrize("index", range(len(ROWS)))
def test_every_row_is_well_formed(index: int):
    assert row_problems(ROWS[index]) == []


def with_call(row: dict, call: dict, kind: str | None = None) -> dict:
    """A copy of `row` whose reference reply makes `call` (and whose kind is `kind` when given)."""
    broken = copy.deepcopy(row)
    broken["conversations"][2]["content"] = f"Done.\n```homeassistant\n{json.dumps(call)}\n```"
    broken["kind"] = kind or broken["kind"]
    return broken


BROKEN_CALLS = [
    {"service": "light.turn_on", "target_device": "light.garage"},
    {"service": "fan.turn_on", "target_device": "light.bedroom_lamp"},
    {"service": "light.dim", "target_device": "light.bedroom_lamp"},
    {"service": "light.turn_on", "target_device": "light.bedroom_lamp", "brightness": 140},
    {"service": "light.turn_on", "target_device": "light.bedroom_lamp", "color": "red"},
    {"service": "fan.set_percentage", "target_device": "fan.living_room"},
    {"service": "media_player.volume_set", "target_device": "media_player.kitchen_radio", "volume_level": 40},
    {"service": "timer.start", "target_device": "timer.hob", "duration": "ten minutes"},
    {"service": "climate.set_hvac_mode", "target_device": "climate.ground_floor", "hvac_mode": "warm"},
    {"service": "light.turn_on", "target_device": "light.bedroom_lamp", "rgb_color": [255, 0]},
    {"target_device": "light.bedroom_lamp", "service": "light.turn_on"},
]


@pytest.mark.parametrize("call", BROKEN_CALLS, ids=lambda call: json.dumps(call))
def test_the_checks_catch_a_bad_call(call: dict):
    action = next(row for row in ROWS if row["kind"] == "action")
    assert row_problems(with_call(action, call)) != []


def test_the_checks_catch_a_call_where_none_belongs_and_a_missing_call():
    status = next(row for row in ROWS if row["kind"] == "status")
    good_call = {"service": "light.turn_on", "target_device": "light.bedroom_lamp"}
    assert row_problems(with_call(status, good_call, kind="action")) == []
    assert row_problems(with_call(status, good_call)) != []
    assert row_problems({**status, "kind": "action"}) != []


def generator_templates() -> list[tuple[str, str]]:
    """Every english request and question template of the generator's piles, both splits, as (file:line, text)."""
    phrasings = split_phrasings(load_language(PILES, "english"))
    return phrasings["train"] + phrasings["test"]


def near_copies(requests: list[str]) -> list[NearCopy]:
    """Requests whose normalised forms have a fuzz.ratio of MAX_SIMILARITY or more against some template, by the
    generator's own held-out rule (datagen/leakage.py), with the house's device names as the filled-in texts."""
    templates = generator_templates()
    assert len(templates) > 100
    normalise = Normaliser(house().values())
    return leakage_near_copies(templates, [("request", text) for text in requests], normalise, MAX_SIMILARITY)


def test_no_request_is_a_near_copy_of_a_generator_template():
    assert near_copies([turns(row)[1] for row in ROWS]) == []


def test_a_filled_in_template_counts_as_a_near_copy():
    template = generator_templates()[0][1]
    filled = re.sub(r"\{[^}]*\}", "Bedroom Lamp", template).upper() + "!"
    assert len(near_copies([filled])) == 1


def test_the_house_is_not_made_of_the_piles_devices():
    pile_ids, pile_names = set(), set()
    for path in PILES.glob("*/devices_*.csv"):
        with path.open(encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(line for line in handle if not line.startswith("#")):
                pile_ids.add(row["entity_id"])
                pile_names.add(row["friendly_name"].lower())
    devices = house()
    assert set(devices) & pile_ids == set()
    assert {name.lower() for name in devices.values()} & pile_names == set()
