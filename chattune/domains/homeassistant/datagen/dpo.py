"""DPO preference pairs: a correct reply (chosen) against a deliberately broken one (rejected).

Each pair is built from a fresh train-split example, so DPO never sees test devices or phrasings.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from chattune.domains.homeassistant.datagen.devices import SERVICES
from chattune.domains.homeassistant.datagen.errors import DataGenError
from chattune.domains.homeassistant.datagen.examples import ACTION_KINDS, Example, ExampleBuilder, SkipExample
from chattune.domains.homeassistant.datagen.values import HVAC_MODES, draw_value
from chattune.domains.homeassistant.reply_format import format_reply, values_equal

REJECTIONS: tuple[str, ...] = ("wrong_argument", "missing_call", "extra_call", "wrong_persona")
MAX_ATTEMPTS = 100


def build_pair(builder: ExampleBuilder, rejection: str, rng: random.Random) -> dict[str, Any]:
    """One DPO record whose rejected reply shows the given kind of mistake."""
    kinds = [kind for kind in builder.available_kinds() if rejection == "extra_call" or kind in ACTION_KINDS]
    reject = REJECTORS[rejection]
    for _ in range(MAX_ATTEMPTS):
        example = builder.build(rng.choice(kinds))
        rejected = reject(builder, example, rng)
        if rejected is not None and rejected != example.assistant:
            return {
                "system": example.system,
                "question": example.user,
                "chosen": example.assistant,
                "rejected": rejected,
                "language": example.language,
                "kind": example.kind,
                "rejection": rejection,
            }
    raise DataGenError(f"{builder.pile.language}: could not build a {rejection!r} DPO pair")


def _wrong_argument(builder: ExampleBuilder, example: Example, rng: random.Random) -> str | None:
    calls = example.calls
    index = rng.randrange(len(calls))
    call = dict(calls[index])
    args = [key for key in call if key not in ("service", "target_device")]
    if args:
        key = rng.choice(args)
        call[key] = _other_value(key, call[key], builder, rng)
    else:
        # No argument to spoil: target a different device of the same domain instead.
        domain = call["service"].split(".", 1)[0]
        targeted = {c["target_device"] for c in calls}
        others = [d for d in example.listed if d.domain == domain and d.entity_id not in targeted]
        if not others:
            return None
        call["target_device"] = rng.choice(others).entity_id
    if values_equal(call, calls[index]):
        return None
    calls[index] = call
    return format_reply(example.sentence, calls)


def _other_value(key: str, value: Any, builder: ExampleBuilder, rng: random.Random) -> Any:
    if key == "oscillating":
        return not value
    if key == "hvac_mode":
        return rng.choice([mode for mode in HVAC_MODES if mode != value])
    placeholder = {"rgb_color": "color", "volume_level": "volume", "media_content_id": "media"}.get(key, key)
    for _ in range(20):
        _, new = draw_value(placeholder, rng, builder.pile.vocab)
        if not values_equal(new, value):
            return new
    return value


def _missing_call(builder: ExampleBuilder, example: Example, rng: random.Random) -> str | None:
    calls = example.calls
    del calls[rng.randrange(len(calls))]
    return format_reply(example.sentence, calls)


def _extra_call(builder: ExampleBuilder, example: Example, rng: random.Random) -> str | None:
    if example.kind == "refusal":
        # Acting on a device that is not there is exactly the mistake a refusal avoids.
        return format_reply(example.assistant, [example.refused_call])
    if example.kind == "status":
        call = _plain_call(example.target.entity_id, example.target.domain)
        return None if call is None else format_reply(example.assistant, [call])
    targeted = {call["target_device"] for call in example.calls}
    others = [device for device in example.listed if device.entity_id not in targeted]
    rng.shuffle(others)
    for device in others:
        call = _plain_call(device.entity_id, device.domain)
        if call is not None:
            return format_reply(example.sentence, [*example.calls, call])
    return None


def _plain_call(entity_id: str, domain: str) -> dict[str, Any] | None:
    """A call needing no arguments for this domain (its first such service), None if there is none."""
    spec = next((spec for spec in SERVICES[domain] if not spec.required), None)
    return None if spec is None else {"service": spec.full_name, "target_device": entity_id}


def _wrong_persona(builder: ExampleBuilder, example: Example, rng: random.Random) -> str | None:
    others = [persona for persona in builder.personas if persona != example.persona]
    rng.shuffle(others)
    for persona in others:
        try:
            sentence = builder.sentence(persona, example.slots)
        except SkipExample:  # this persona lacks a response for one of the services
            continue
        if sentence != example.sentence:
            return format_reply(sentence, example.calls)
    return None


REJECTORS: dict[str, Callable[[ExampleBuilder, Example, random.Random], str | None]] = {
    "wrong_argument": _wrong_argument,
    "missing_call": _missing_call,
    "extra_call": _extra_call,
    "wrong_persona": _wrong_persona,
}
