"""The system prompt: persona, a localized date line, the Services line and the Devices list."""

from __future__ import annotations

import random
from datetime import date, timedelta

from chattune.domains.homeassistant.datagen.devices import DOMAINS, SERVICES, Device, DeviceState, device_line
from chattune.domains.homeassistant.datagen.piles import LanguagePile
from chattune.domains.homeassistant.datagen.templates import fill

FIRST_DAY = date(2023, 1, 1)
DAYS_SPAN = 4 * 365
SERVICES_LABEL = "Services:"
DEVICES_LABEL = "Devices:"


def date_line(pile: LanguagePile, rng: random.Random) -> str:
    """A random date and time written with the language's own month/weekday names (not the OS locale)."""
    day = FIRST_DAY + timedelta(days=rng.randrange(DAYS_SPAN))
    hour, minute = rng.randrange(24), rng.randrange(60)
    names = pile.datetime
    values = {
        "weekday": names[f"weekday_{day.isoweekday()}"],
        "day": str(day.day),
        "month": names[f"month_{day.month}"],
        "year": str(day.year),
        "hour": f"{hour:02d}",
        "hour12": str(hour % 12 or 12),
        "minute": f"{minute:02d}",
        "ampm": names["am"] if hour < 12 else names["pm"],
    }
    return fill(names["date_line"], values, f"{pile.root}/datetime.csv")


def services_line(domains: set[str]) -> str:
    """`Services: light.turn_on(brightness,rgb_color), ...` for the domains present, in a fixed order."""
    signatures = [spec.signature() for domain in DOMAINS if domain in domains for spec in SERVICES[domain]]
    return f"{SERVICES_LABEL} {', '.join(signatures)}"


def system_prompt(
    pile: LanguagePile,
    persona: str,
    listed: list[tuple[Device, DeviceState]],
    rng: random.Random,
    compact: bool = False,
    tools: bool = False,
) -> str:
    """The whole system prompt for one example.

    `compact` keeps the persona's first sentence, the Services line and the device list: half the tokens,
    for training on a CPU (the demo). The Services line stays because a pretrained model copies the service
    names from it instead of having to learn them by heart.

    `tools` (the tool-calling format) keeps the persona's first sentence, which never mentions the reply format,
    and drops the Services line: the tool schemas describe what can be called.
    """
    first_sentence = pile.personas[persona].split(". ")[0].rstrip(".") + "."
    devices = [DEVICES_LABEL, *(device_line(device, state) for device, state in listed)]
    if tools:
        return "\n".join([first_sentence, *([] if compact else [date_line(pile, rng)]), *devices])
    services = services_line({device.domain for device, _ in listed})
    if compact:
        return "\n".join([first_sentence, services, *devices])
    return "\n".join([pile.personas[persona], date_line(pile, rng), services, *devices])


def opening_turns(system: str, user: str, no_system_role: bool = False) -> list[dict]:
    """The system and user turns of a row; with `no_system_role` the system text opens the user turn instead,
    for chat templates that reject a system message (Gemma's)."""
    if no_system_role:
        return [{"role": "user", "content": f"{system}\n\n{user}"}]
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]
