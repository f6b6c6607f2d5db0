"""Builders for each example kind, drawing only on one split's devices and phrasings.

All randomness comes from the `random.Random` handed in, and every pool is a list in pile order,
so the same seed always yields the same examples.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chattune.domains.homeassistant.datagen.devices import (
    LIKELY_BEFORE,
    SERVICE_BY_NAME,
    STATES,
    Device,
    DeviceState,
    ServiceSpec,
    look_alike_score,
    random_state,
    state_placeholder_values,
)
from chattune.domains.homeassistant.datagen.errors import DataGenError
from chattune.domains.homeassistant.datagen.piles import (
    ANY_PERSONA,
    ActionTemplate,
    LanguagePile,
    RefusalTemplate,
    ResponseTemplate,
    slot_domains,
)
from chattune.domains.homeassistant.datagen.prompts import system_prompt
from chattune.domains.homeassistant.datagen.templates import check_filled, fill, parse_placeholder, placeholder_names
from chattune.domains.homeassistant.datagen.tool_calls import FAILED_CALL_KIND, Failure, services_with_tools
from chattune.domains.homeassistant.datagen.values import (
    ARG_OF_PLACEHOLDER,
    PLACEHOLDER_OF_ARG,
    draw_value,
    text_for_argument,
)
from chattune.domains.homeassistant.reply_format import format_reply, values_equal

KINDS: tuple[str, ...] = ("specific_action", "template_action", "multi_device_action", "status", "refusal")
MERGED_KIND = "merged"
ACTION_KINDS: tuple[str, ...] = ("specific_action", "template_action", "multi_device_action")
# Chance that a target starts in the state the request implies (a light that is off gets turned on).
LIKELY_STATE_CHANCE = 0.8
# Chance that a listing leads with look-alikes of the devices a request is about (same words in the name):
# without them a model can pick "the light in the list" instead of reading which one was asked for.
LOOK_ALIKE_CHANCE = 0.75
MAX_LOOK_ALIKES = 3
# House sizes: this share of prompts lists a small house (up to SMALL_HOUSE_MAX devices), the rest between half
# the --max_devices cap and the cap. Real installs range from a few devices to dozens.
SMALL_HOUSE_SHARE = 0.3
SMALL_HOUSE_MAX = 6
# A house is filled a room at a time; each room keeps this share of its devices, so that rooms differ in what they
# have (a garage with a light but no fan) and the same room shows up across domains (light.den, fan.den).
ROOM_DEVICE_KEEP = 0.6
MAX_ATTEMPTS = 200

Listing = list[tuple[Device, DeviceState]]


class SkipExample(Exception):
    """This draw cannot make a valid example (e.g. the persona lacks a response); draw again."""


@dataclass
class Slot:
    """One device acted upon: the call to make and the texts a response may quote."""

    device: Device
    spec: ServiceSpec
    args: dict[str, Any]
    texts: dict[str, str]

    def call(self) -> dict[str, Any]:
        return {"service": self.spec.full_name, "target_device": self.device.entity_id, **self.args}


@dataclass
class Example:
    """One conversation plus what it was built from (the DPO builder needs the latter)."""

    system: str
    user: str
    assistant: str
    language: str
    kind: str
    persona: str = ""
    sentence: str = ""
    slots: list[Slot] = field(default_factory=list)
    listed: list[Device] = field(default_factory=list)
    target: Device | None = None  # the device asked about (status) or missing (refusal)
    refused_call: dict[str, Any] | None = None
    failure: Failure | None = None  # tool-calling format: how a failed-call recovery example fails

    @property
    def calls(self) -> list[dict[str, Any]]:
        return [slot.call() for slot in self.slots]


def _group(items: list, key: Callable) -> dict:
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


class ExampleBuilder:
    """Builds examples of every kind for one language and one split."""

    def __init__(
        self,
        pile: LanguagePile,
        split: str,
        rng: random.Random,
        max_devices: int,
        compact: bool = False,
        tool_set: str | None = None,
    ) -> None:
        self.compact, self.tool_set = compact, tool_set
        # The tool-calling format can only express the services its tool set covers.
        usable = services_with_tools(tool_set) if tool_set else None
        self.pile, self.split, self.rng = pile, split, rng
        self.max_devices = max(1, max_devices)
        self.personas = list(pile.personas)
        self.devices = {domain: [d for d in devices if d.split == split] for domain, devices in pile.devices.items()}
        self.all_devices = [device for devices in self.devices.values() for device in devices]
        self.actions = _group(
            [t for t in pile.actions if t.split == split and _usable(t.service.full_name, usable)],
            lambda t: t.service.full_name,
        )
        self.services = list(self.actions)
        self.multi = [
            t
            for t in pile.multi
            if t.split == split
            and len(t.services) <= self.max_devices
            and all(
                _usable(f"{domain}.{service.split('.')[-1]}", usable)
                for service in t.services
                for domain in slot_domains(service)
            )
        ]
        self.specific = [a for a in pile.specific if a.split == split and _usable(a.service.full_name, usable)]
        self.status = _group([t for t in pile.status if t.split == split], lambda t: t.domain)
        self.status_domains = list(self.status)
        self.responses = _group(list(pile.responses), lambda r: (r.persona, r.service.full_name))
        self.refusals = _group(list(pile.refusals), lambda r: r.persona)
        self.builders: dict[str, Callable[[], Example]] = {
            "specific_action": self._specific_action,
            "template_action": self._template_action,
            "multi_device_action": self._multi_device_action,
            "status": self._status,
            "refusal": self._refusal,
            FAILED_CALL_KIND: self._failed_call_recovery,
        }

    def available_kinds(self) -> list[str]:
        """Kinds this split can produce (multi-device needs room for 2+ devices in the prompt; failed-call
        recovery exists only in the tool-calling format)."""
        kinds = [kind for kind in KINDS if kind != "multi_device_action" or self.multi]
        return [*kinds, FAILED_CALL_KIND] if self.tool_set else kinds

    def build(self, kind: str) -> Example:
        return _retry(self.builders[kind], f"{self.pile.language}/{self.split}: {kind} example")

    def build_contrastive_pair(self) -> tuple[Example, Example]:
        """One request twice, in the same split: carried out while its device is listed (a template_action),
        refused in a listing without it (a refusal). Only the device's presence differs, so a model cannot
        learn to refuse, or to act, from the wording alone."""
        return _retry(self._contrastive_pair, f"{self.pile.language}/{self.split}: contrastive pair")

    # ------------------------------------------------------------ kinds

    def _template_action(self) -> Example:
        template = self._pick_action_template()
        persona = self.rng.choice(self.personas)
        device = self.rng.choice(self.devices[template.service.domain])
        slot, texts = self._make_slot(device, template.service, template.arguments, template.request)
        request = fill(template.request, {**device.placeholder_values(), **texts}, template.where)
        return self._action_example("template_action", persona, request, self.sentence(persona, [slot]), [slot])

    def _specific_action(self) -> Example:
        row = self.rng.choice(self.specific)
        persona = self.rng.choice(self.personas) if row.persona == ANY_PERSONA else row.persona
        candidates = [d for d in self.devices[row.service.domain] if d.type == row.device_type]
        device = self.rng.choice(candidates)
        slot, texts = self._make_slot(device, row.service, row.arguments, row.request)
        values = {**device.placeholder_values(), **texts}
        request = fill(row.request, values, row.where)
        sentence = fill(row.response, values, row.where)
        # A request that does not name its device ("I need coffee") is only unambiguous with one such device.
        exclude = None if "{device" in row.request else (lambda d: d.type == row.device_type)
        return self._action_example("specific_action", persona, request, sentence, [slot], exclude=exclude)

    def _multi_device_action(self) -> Example:
        template = self.rng.choice(self.multi)
        persona = self.rng.choice(self.personas)
        slots: list[Slot] = []
        values: dict[str, str] = {}
        for number, service in enumerate(template.services, 1):
            spec, device = self._pick_slot_device(service, {slot.device.entity_id for slot in slots})
            slot, texts = self._make_slot(device, spec, {}, template.request, number)
            slots.append(slot)
            values.update(device.placeholder_values(f"device{number}"))
            values.update(texts)
        request = fill(template.request, values, template.where)
        return self._action_example("multi_device_action", persona, request, self.sentence(persona, slots), slots)

    def _status(self) -> Example:
        row = self.rng.choice(self.status[self.rng.choice(self.status_domains)])
        persona = self.rng.choice(self.personas) if row.persona == ANY_PERSONA else row.persona
        device = self.rng.choice(self.devices[row.domain])
        state = random_state(row.domain, self.rng, self.pile.vocab, row.state)
        values = {**device.placeholder_values(), **state_placeholder_values(state)}
        question = fill(row.question, values, row.where)
        answer = fill(row.answer, values, row.where)
        listed = self._listing([device], {device.entity_id: state})
        example = self._finish("status", persona, question, answer, listed)
        example.target = device
        return example

    def _refusal(self) -> Example:
        return self._refused_request()[0]

    def _refused_request(self) -> tuple[Example, Slot, Listing]:
        """A refusal plus what its contrastive twin needs: the call it did not make and its listing."""
        personas = [persona for persona in self.personas if persona in self.refusals]
        if not personas:
            raise DataGenError(f"{self.pile.language}: no persona has refusals in refusals.csv")
        persona = self.rng.choice(personas)
        template = self._pick_action_template()
        missing = self.rng.choice(self.devices[template.service.domain])
        slot, texts = self._make_slot(missing, template.service, template.arguments, template.request)
        request = fill(template.request, {**missing.placeholder_values(), **texts}, template.where)
        listed = self._listing([], {}, lambda d: d.entity_id == missing.entity_id, near=[missing])
        answer = self._refusal_sentence(persona, missing, [device for device, _ in listed])
        example = self._finish("refusal", persona, request, answer, listed)
        example.target, example.refused_call = missing, slot.call()
        return example, slot, listed

    def _refusal_sentence(self, persona: str, missing: Device, listed: list[Device]) -> str:
        """A refusal naming the missing device and, when one is listed, possibly the look-alike the user may
        have meant ("There is no Garage Fan; the Garage Light is the closest I have")."""
        scores = [look_alike_score(missing, device) for device in listed]
        rows: list[RefusalTemplate] = [row for row in self.refusals[persona] if any(scores) or not row.names_near_miss]
        row = self.rng.choice(rows)
        values = missing.placeholder_values()
        if row.names_near_miss:
            values.update(listed[scores.index(max(scores))].placeholder_values("device2"))
        return fill(row.text, values, row.where)

    def _contrastive_pair(self) -> tuple[Example, Example]:
        refusal, slot, listed = self._refused_request()
        sentence = self.sentence(refusal.persona, [slot])
        with_device = self._with_device(listed, slot)
        action = self._action_example("template_action", refusal.persona, refusal.user, sentence, [slot], with_device)
        return action, refusal

    def _with_device(self, listed: Listing, slot: Slot) -> Listing:
        """`listed` with the slot's device put in at a random place; at the size cap it takes the place of a
        device that does not look like it, so the look-alikes that made the refusal hard stay."""
        result = list(listed)
        if len(result) >= self.max_devices:
            unlike = [i for i, (device, _) in enumerate(result) if not look_alike_score(slot.device, device)]
            del result[self.rng.choice(unlike or range(len(result)))]
        result.insert(self.rng.randint(0, len(result)), (slot.device, self._target_state(slot)))
        return result

    def _failed_call_recovery(self) -> Example:
        """A single-device action whose call fails once: half retry after naming a device that is not listed,
        half explain that the (right) device is unavailable."""
        example = self._template_action()
        example.kind = FAILED_CALL_KIND
        device = example.slots[0].device
        if self.rng.random() < 0.5:
            listed = {listed.entity_id for listed in example.listed}
            others = [d for d in self.devices[device.domain] if d.entity_id not in listed]
            if not others:
                raise SkipExample
            wrong = self.rng.choice(others)
            example.failure = Failure("retry", wrong.name, wrong.entity_id)
            return example
        replies = [row for row in self.pile.tool_errors if row.persona == example.persona]
        if not replies:
            raise SkipExample
        row = self.rng.choice(replies)
        example.failure = Failure("explain", reply=fill(row.text, device.placeholder_values(), row.where))
        return example

    # ------------------------------------------------------------ pieces

    def _pick_action_template(self) -> ActionTemplate:
        # Uniform over services first, so services with many phrasings do not crowd out the rest.
        return self.rng.choice(self.actions[self.rng.choice(self.services)])

    def _pick_slot_device(self, service: str, used: set[str]) -> tuple[ServiceSpec, Device]:
        domain = self.rng.choice(slot_domains(service))
        spec = SERVICE_BY_NAME[f"{domain}.{service.split('.')[-1]}"]
        candidates = [device for device in self.devices[domain] if device.entity_id not in used]
        if not candidates:
            raise SkipExample
        return spec, self.rng.choice(candidates)

    def _make_slot(
        self,
        device: Device,
        spec: ServiceSpec,
        fixed: dict[str, Any],
        request: str,
        number: int | None = None,
    ) -> tuple[Slot, dict[str, str]]:
        """Draw values for the request's placeholders of this slot; returns the slot and the request texts."""
        request_texts: dict[str, str] = {}
        args: dict[str, Any] = {}
        texts: dict[str, str] = {}
        for name in placeholder_names(request):
            placeholder = parse_placeholder(name)
            if placeholder is None or placeholder.is_device or placeholder.slot != number:
                continue
            text, value = draw_value(placeholder.base, self.rng, self.pile.vocab)
            request_texts[name] = text
            texts[placeholder.base] = text
            args[ARG_OF_PLACEHOLDER[placeholder.base]] = value
        for arg, value in fixed.items():
            args[arg] = value
            text = text_for_argument(arg, value, self.pile.vocab)
            if text is not None and arg in PLACEHOLDER_OF_ARG:
                texts[PLACEHOLDER_OF_ARG[arg]] = text
        ordered = {arg: args[arg] for arg in spec.args if arg in args}
        return Slot(device, spec, ordered, texts), request_texts

    def sentence(self, persona: str, slots: list[Slot]) -> str:
        """The persona's reply sentence: short per-device forms joined with the language's "and"."""
        return self.join_sentence([self._fragment(persona, slot) for slot in slots])

    def join_sentence(self, fragments: list[str]) -> str:
        grammar = self.pile.grammar
        parts = [fragment.rstrip(" .!?") for fragment in fragments]
        body = parts[-1]
        if len(parts) > 1:
            body = f"{(grammar['list_separator'] + ' ').join(parts[:-1])} {grammar['and']} {parts[-1]}"
        return body[:1].upper() + body[1:] + grammar["sentence_end"]

    def _fragment(self, persona: str, slot: Slot) -> str:
        candidates = self._matching_responses(persona, slot)
        if not candidates:
            raise SkipExample
        best = max(score for score, _ in candidates)
        response = self.rng.choice([row for score, row in candidates if score == best])
        return fill(response.text, {**slot.device.placeholder_values(), **slot.texts}, response.where)

    def _matching_responses(self, persona: str, slot: Slot) -> list[tuple[int, ResponseTemplate]]:
        """Responses usable for this call, scored so that the most specific ones (quoting values) win."""
        matches = []
        for row in self.responses.get((persona, slot.spec.full_name), []):
            if any(not values_equal(slot.args.get(key), value) for key, value in row.arguments.items()):
                continue
            names = [n for n in placeholder_names(row.text) if not parse_placeholder(n).is_device]
            if all(name in slot.texts for name in names):
                matches.append((len(row.arguments) + len(names), row))
        return matches

    def _target_state(self, slot: Slot) -> DeviceState:
        likely = LIKELY_BEFORE.get(slot.spec.name)
        domain = slot.device.domain
        forced = likely if likely in STATES[domain] and self.rng.random() < LIKELY_STATE_CHANCE else None
        return random_state(domain, self.rng, self.pile.vocab, forced)

    def _listing(
        self,
        targets: list[Device],
        states: dict[str, DeviceState],
        exclude: Callable[[Device], bool] | None = None,
        near: list[Device] | None = None,
    ) -> Listing:
        """Targets plus other devices of this split, shuffled, each with a state; usually led by look-alikes of
        the devices the request is about (`near`, by default the targets)."""
        wanted = self._house_size(len(targets)) - len(targets)
        taken = {device.entity_id for device in targets}
        pool = [d for d in self.all_devices if d.entity_id not in taken and not (exclude and exclude(d))]
        near = targets if near is None else near
        alike = self._look_alikes(pool, near, wanted)
        alike_ids = {device.entity_id for device in alike}
        rest = [device for device in pool if device.entity_id not in alike_ids]
        listed = targets + alike + self._by_rooms(rest, near + alike, wanted - len(alike))
        self.rng.shuffle(listed)
        return [
            (device, states.get(device.entity_id) or random_state(device.domain, self.rng, self.pile.vocab))
            for device in listed
        ]

    def _house_size(self, targets: int) -> int:
        """How many devices a prompt lists: a small house or a large one (see SMALL_HOUSE_SHARE), never fewer
        than the targets."""
        high = max(self.max_devices, targets)
        if self.rng.random() < SMALL_HOUSE_SHARE:
            return self.rng.randint(max(targets, 1), max(targets, min(high, SMALL_HOUSE_MAX)))
        return self.rng.randint(max(targets, math.ceil(high / 2), 1), high)

    def _by_rooms(self, pool: list[Device], chosen: list[Device], count: int) -> list[Device]:
        """`count` devices of `pool`, a room at a time: the rooms of `chosen` first (where the request is about),
        then others in random order (a device without a room is a room of its own), each keeping ROOM_DEVICE_KEEP
        of its devices."""
        groups = _group(pool, lambda device: device.room or device.entity_id)
        first = list(dict.fromkeys(device.room for device in chosen if device.room in groups))
        others = [key for key in groups if key not in first]
        self.rng.shuffle(others)
        picked: list[Device] = []
        for key in first + others:
            if len(picked) >= count:
                break
            picked.extend(device for device in groups[key] if self.rng.random() < ROOM_DEVICE_KEEP)
        if len(picked) < count:  # too few kept: top up from what the rooms left out
            picked_ids = {device.entity_id for device in picked}
            left = [device for device in pool if device.entity_id not in picked_ids]
            picked.extend(self.rng.sample(left, min(count - len(picked), len(left))))
        return picked[:count]

    def _look_alikes(self, pool: list[Device], near: list[Device], wanted: int) -> list[Device]:
        """Up to MAX_LOOK_ALIKES devices of `pool` that look like a device of `near` (look_alike_score: a shared
        name word or the same domain), or none (1 - LOOK_ALIKE_CHANCE of the time)."""
        candidates = [device for device in pool if any(look_alike_score(other, device) for other in near)]
        if not candidates or wanted < 1 or self.rng.random() >= LOOK_ALIKE_CHANCE:
            return []
        return self.rng.sample(candidates, self.rng.randint(1, min(len(candidates), wanted, MAX_LOOK_ALIKES)))

    def _action_example(
        self,
        kind: str,
        persona: str,
        request: str,
        sentence: str,
        slots: list[Slot],
        listed: Listing | None = None,
        exclude: Callable[[Device], bool] | None = None,
    ) -> Example:
        """An action example; `listed` gives the listing (a contrastive twin's), otherwise one is drawn."""
        if listed is None:
            states = {slot.device.entity_id: self._target_state(slot) for slot in slots}
            listed = self._listing([slot.device for slot in slots], states, exclude)
        reply = format_reply(sentence, [slot.call() for slot in slots])
        example = self._finish(kind, persona, request, reply, listed)
        example.sentence, example.slots = sentence, slots
        return example

    def _finish(self, kind: str, persona: str, user: str, assistant: str, listed: Listing) -> Example:
        system = system_prompt(self.pile, persona, listed, self.rng, self.compact, tools=self.tool_set is not None)
        for text in (system, user, assistant):
            check_filled(text, f"{self.pile.language} {kind}")
        sentence = assistant if kind in ("status", "refusal") else ""
        return Example(
            system,
            user,
            assistant,
            self.pile.language,
            kind,
            persona,
            sentence,
            listed=[device for device, _ in listed],
        )


def _retry(build: Callable[[], Any], what: str) -> Any:
    """Call `build` until it does not skip (a draw can miss, e.g. a persona without a needed response)."""
    for _ in range(MAX_ATTEMPTS):
        try:
            return build()
        except SkipExample:
            continue
    raise DataGenError(f"{what}: none built in {MAX_ATTEMPTS} tries (check the warnings about missing responses)")


def _usable(service: str, usable: set[str] | None) -> bool:
    return usable is None or service in usable
