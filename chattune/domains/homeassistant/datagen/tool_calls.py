"""The tool-calling format: OpenAI-style `tool_calls`, `tool` results and a final reply, as Home Assistant's LLM
integrations and home-llm's V2 dataset use them.

Two tool sets:

* `intents` (default): Home Assistant's built-in intent tools (HassTurnOn, HassLightSet, HassSetPosition, ...), which
  address devices by `name` (and optionally `area`/`domain`), as the intents define their slots. Services that no
  built-in intent covers (toggle, stop_cover, set_hvac_mode, ...) are left out of this tool set, so the examples that
  would need them are not generated.
* `services`: one tool per Home Assistant service (`light.turn_on`, ...), addressing devices by `entity_id`.

A row holds `messages` (system, user, the assistant's calls, one `tool` message per call, the final reply) and `tools`
(the JSON schemas of the tools the row's devices can use).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chattune.domains.homeassistant.datagen.devices import SERVICES, ServiceSpec
from chattune.domains.homeassistant.datagen.prompts import opening_turns

if TYPE_CHECKING:
    from chattune.domains.homeassistant.datagen.examples import Example

TOOL_SETS = ("intents", "services")
FAILED_CALL_KIND = "failed_call_recovery"

# --------------------------------------------------------------------------------------------- intent tools


@dataclass(frozen=True)
class Intent:
    """One Home Assistant intent tool: its name, what it does, and its argument schema besides `name`."""

    name: str
    description: str
    parameters: tuple[tuple[str, dict], ...] = ()
    required: tuple[str, ...] = ()


_NAME = ("name", {"type": "string", "description": "Name of a device or entity"})
_AREA = ("area", {"type": "string", "description": "Name of an area"})
_DOMAIN = ("domain", {"type": "array", "items": {"type": "string"}, "description": "Domains of the devices"})
_PERCENT = {"type": "integer", "minimum": 0, "maximum": 100}

INTENTS: dict[str, Intent] = {
    intent.name: intent
    for intent in (
        Intent("HassTurnOn", "Turns on, opens or locks a device or entity", (_NAME, _AREA, _DOMAIN)),
        Intent("HassTurnOff", "Turns off, closes or unlocks a device or entity", (_NAME, _AREA, _DOMAIN)),
        Intent(
            "HassLightSet",
            "Sets the brightness percentage or color of a light",
            (_NAME, _AREA, ("brightness", _PERCENT), ("color", {"type": "string"})),
        ),
        Intent("HassFanSetSpeed", "Sets a fan's speed in percent", (_NAME, _AREA, ("percentage", _PERCENT))),
        Intent(
            "HassSetPosition",
            "Sets the position of a cover in percent",
            (_NAME, _AREA, ("position", _PERCENT)),
            ("position",),
        ),
        Intent(
            "HassClimateSetTemperature",
            "Sets the target temperature of a climate device",
            (_NAME, _AREA, ("temperature", {"type": "number"})),
            ("temperature",),
        ),
        Intent("HassMediaPause", "Pauses a media player", (_NAME, _AREA)),
        Intent("HassMediaUnpause", "Resumes a media player", (_NAME, _AREA)),
        Intent("HassMediaNext", "Skips to the next item on a media player", (_NAME, _AREA)),
        Intent(
            "HassSetVolume",
            "Sets the volume percentage of a media player",
            (_NAME, _AREA, ("volume_level", _PERCENT)),
            ("volume_level",),
        ),
        Intent(
            "HassMediaSearchAndPlay",
            "Searches for media and plays it on a media player",
            (_NAME, _AREA, ("search_query", {"type": "string"})),
            ("search_query",),
        ),
        Intent("HassVacuumStart", "Starts a vacuum", (_NAME, _AREA)),
        Intent("HassVacuumReturnToBase", "Returns a vacuum to its base", (_NAME, _AREA)),
        Intent(
            "HassStartTimer",
            "Starts a timer",
            (
                _NAME,
                ("hours", {"type": "integer", "minimum": 0}),
                ("minutes", {"type": "integer", "minimum": 0}),
                ("seconds", {"type": "integer", "minimum": 0}),
            ),
        ),
        Intent("HassCancelTimer", "Cancels a timer", (_NAME,)),
        Intent("HassListAddItem", "Adds an item to a to-do list", (_NAME, ("item", {"type": "string"})), ("item",)),
    )
}


IntentOf = Callable[[dict, dict], tuple[str, dict]]


def _duration(args: dict, texts: dict) -> tuple[str, dict]:
    hours, minutes, seconds = (int(part) for part in args["duration"].split(":"))
    parts = {"hours": hours, "minutes": minutes, "seconds": seconds}
    return "HassStartTimer", {key: value for key, value in parts.items() if value} or {"seconds": 0}


def _light_on(args: dict, texts: dict) -> tuple[str, dict]:
    """A plain light.turn_on is HassTurnOn; with a brightness or colour it is HassLightSet."""
    if not args:
        return "HassTurnOn", {}
    out: dict[str, Any] = {}
    if "brightness" in args:
        out["brightness"] = args["brightness"]
    if "rgb_color" in args:
        out["color"] = texts.get("color", "")  # the colour as the user said it; Home Assistant resolves names
    return "HassLightSet", out


def _plain(intent: str) -> IntentOf:
    return lambda args, texts: (intent, {})


def _copy(intent: str, source: str, target: str, scale: float = 1) -> IntentOf:
    def convert(args: dict, texts: dict) -> tuple[str, dict]:
        value = args[source]
        return intent, {target: round(value * scale) if scale != 1 else value}

    return convert


# Service -> the intent and its arguments (besides `name`), from the call's arguments and the request's texts.
INTENT_OF_SERVICE: dict[str, IntentOf] = {
    "light.turn_on": _light_on,
    **{f"{domain}.turn_on": _plain("HassTurnOn") for domain in ("switch", "fan")},
    **{f"{domain}.turn_off": _plain("HassTurnOff") for domain in ("light", "switch", "fan")},
    "fan.set_percentage": _copy("HassFanSetSpeed", "percentage", "percentage"),
    "cover.open_cover": _plain("HassTurnOn"),
    "cover.close_cover": _plain("HassTurnOff"),
    "cover.set_cover_position": _copy("HassSetPosition", "position", "position"),
    "lock.lock": _plain("HassTurnOn"),
    "lock.unlock": _plain("HassTurnOff"),
    "climate.set_temperature": _copy("HassClimateSetTemperature", "temperature", "temperature"),
    "media_player.media_play": _plain("HassMediaUnpause"),
    "media_player.media_pause": _plain("HassMediaPause"),
    "media_player.media_next_track": _plain("HassMediaNext"),
    "media_player.volume_set": _copy("HassSetVolume", "volume_level", "volume_level", scale=100),
    "media_player.play_media": _copy("HassMediaSearchAndPlay", "media_content_id", "search_query"),
    "vacuum.start": _plain("HassVacuumStart"),
    "vacuum.return_to_base": _plain("HassVacuumReturnToBase"),
    "timer.start": _duration,
    "timer.cancel": _plain("HassCancelTimer"),
    "todo.add_item": _copy("HassListAddItem", "item", "item"),
}


def services_with_tools(tool_set: str) -> set[str]:
    """The services a tool set can express; examples needing others are not generated for it."""
    if tool_set == "services":
        return {spec.full_name for specs in SERVICES.values() for spec in specs}
    return set(INTENT_OF_SERVICE)


# --------------------------------------------------------------------------------------------- schemas


def _schema(name: str, description: str, properties: dict[str, dict], required: list[str]) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


def intent_schema(intent: Intent) -> dict:
    return _schema(intent.name, intent.description, dict(intent.parameters), list(intent.required))


def service_schema(spec: ServiceSpec) -> dict:
    properties = {"entity_id": {"type": "string", "description": f"A {spec.domain} entity id"}}
    properties.update({arg: _SERVICE_ARG_SCHEMAS.get(arg, {"type": "string"}) for arg in spec.args})
    readable = spec.name.replace("_", " ")
    return _schema(spec.full_name, f"{spec.domain}: {readable}", properties, ["entity_id", *spec.required])


_SERVICE_ARG_SCHEMAS: dict[str, dict] = {
    "brightness": _PERCENT,
    "percentage": _PERCENT,
    "position": _PERCENT,
    "humidity": _PERCENT,
    "rgb_color": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}},
    "temperature": {"type": "number"},
    "volume_level": {"type": "number", "minimum": 0, "maximum": 1},
    "oscillating": {"type": "boolean"},
    "duration": {"type": "string", "description": "HH:MM:SS"},
}


# The intents that act on each domain's devices (Home Assistant's HassTurnOn also opens covers and locks locks).
INTENTS_BY_DOMAIN: dict[str, tuple[str, ...]] = {
    "light": ("HassTurnOn", "HassTurnOff", "HassLightSet"),
    "switch": ("HassTurnOn", "HassTurnOff"),
    "fan": ("HassTurnOn", "HassTurnOff", "HassFanSetSpeed"),
    "cover": ("HassTurnOn", "HassTurnOff", "HassSetPosition"),
    "lock": ("HassTurnOn", "HassTurnOff"),
    "climate": ("HassClimateSetTemperature",),
    "media_player": ("HassMediaPause", "HassMediaUnpause", "HassMediaNext", "HassSetVolume", "HassMediaSearchAndPlay"),
    "vacuum": ("HassVacuumStart", "HassVacuumReturnToBase"),
    "timer": ("HassStartTimer", "HassCancelTimer"),
    "todo": ("HassListAddItem",),
}


def tool_schemas(tool_set: str, domains: set[str]) -> list[dict]:
    """The tools offered in a row: the intents (intents) or services (services) that apply to the listed devices'
    domains, as Home Assistant's LLM API offers only the intents of the entities exposed to it."""
    if tool_set == "intents":
        wanted = {intent for domain in domains for intent in INTENTS_BY_DOMAIN.get(domain, ())}
        return [intent_schema(intent) for name, intent in INTENTS.items() if name in wanted]
    return [service_schema(spec) for domain, specs in SERVICES.items() if domain in domains for spec in specs]


# --------------------------------------------------------------------------------------------- calls


def tool_call(call: dict, texts: dict, device_name: str, tool_set: str) -> tuple[str, dict]:
    """One generator call ({"service", "target_device", args...}) as (tool name, arguments)."""
    service = call["service"]
    args = {key: value for key, value in call.items() if key not in ("service", "target_device")}
    if tool_set == "services":
        return service, {"entity_id": call["target_device"], **args}
    intent, converted = INTENT_OF_SERVICE[service](args, texts)
    return intent, {"name": device_name, **converted}


def call_message(calls: list[tuple[str, dict]], first_id: int) -> dict:
    """The assistant turn that makes `calls`; arguments are JSON strings, as in OpenAI's format."""
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": f"call_{first_id + index}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
            }
            for index, (name, arguments) in enumerate(calls)
        ],
    }


def success_result(device_name: str, entity_id: str) -> dict:
    """What Home Assistant's intent response reports for a device the call acted on."""
    return {"response_type": "action_done", "success": [{"name": device_name, "id": entity_id}], "failed": []}


def error_result(error: str, text: str) -> dict:
    return {"error": error, "error_text": text}


def tool_message(call_id: str, name: str, result: dict) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "name": name, "content": json.dumps(result, ensure_ascii=False)}


# --------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Failure:
    """How a failed-call recovery example goes wrong. `retry`: the first call names a device that is not in the
    list (`wrong_name`, `wrong_entity_id`), the tool says so, and the right call follows. `explain`: the right call
    is made, the device is unavailable, and the final reply (`reply`) says so."""

    mode: str
    wrong_name: str = ""
    wrong_entity_id: str = ""
    reply: str = ""


def tool_call_record(example: Example, tool_set: str, no_system_role: bool = False) -> dict[str, Any]:
    """One row of the tool-calling format for `example` (its calls come from `example.slots`)."""
    calls = [tool_call(slot.call(), slot.texts, slot.device.name, tool_set) for slot in example.slots]
    failure = example.failure
    turns: list[dict] = []
    if failure is not None and failure.mode == "retry":
        name, arguments = calls[0]
        key, value = ("name", failure.wrong_name) if tool_set == "intents" else ("entity_id", failure.wrong_entity_id)
        # The mistake is context, not a target: home-llm V2's `train_on_turn: false` keeps it out of the loss.
        turns.append({**call_message([(name, {**arguments, key: value})], 1), "train_on_turn": False})
        turns.append(tool_message("call_1", name, error_result("MatchFailedError", f"No device named {value}")))
    if calls:
        message = call_message(calls, len(turns) + 1)
        turns.append(message)
        unavailable = failure is not None and failure.mode == "explain"
        for call, (name, _), slot in zip(message["tool_calls"], calls, example.slots):
            result = (
                error_result("DeviceUnavailable", f"{slot.device.name} is unavailable")
                if unavailable
                else success_result(slot.device.name, slot.device.entity_id)
            )
            turns.append(tool_message(call["id"], name, result))
    if failure is not None and failure.mode == "explain":
        final = failure.reply
    else:  # an action's sentence, or the whole reply of a call-free example (status, refusal, merged)
        final = example.sentence if example.slots else example.assistant
    turns.append({"role": "assistant", "content": final})
    return {
        "messages": [*opening_turns(example.system, example.user, no_system_role), *turns],
        "tools": tool_schemas(tool_set, {device.domain for device in example.listed}),
        "language": example.language,
        "kind": example.kind,
    }
