"""Loading and validating one language's piles (piles/<language>/ of this domain, documented in data/README.md).

Every check that can fail because of a pile writer's mistake happens here, at load time, with the
file:line of the offending row, so that generation itself only fails on generator bugs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from chattune.domains.homeassistant.datagen.csvfiles import SPLITS, Row, read_csv, read_key_values, read_txt
from chattune.domains.homeassistant.datagen.devices import (
    DOMAINS,
    SERVICE_BY_NAME,
    SERVICES,
    STATE_VALUES,
    STATES,
    Device,
    ServiceSpec,
    ValueVocab,
)
from chattune.domains.homeassistant.datagen.errors import PileError
from chattune.domains.homeassistant.datagen.templates import PLACEHOLDER_RE, fill, parse_placeholder
from chattune.domains.homeassistant.datagen.values import (
    ARG_OF_PLACEHOLDER,
    PLACEHOLDER_OF_ARG,
    parse_arguments,
    placeholders_for,
)

# The piles shipped with chattune, package data of chattune.domains.homeassistant.
PILES_DIR = Path(__file__).resolve().parents[1] / "piles"
ANY_PERSONA = "*"
DEVICE_COLUMNS = ("entity_id", "friendly_name", "type", "split")
FORM_COLUMN_RE = re.compile(r"^[a-z][a-z0-9_]*$")
SLUG_RE = re.compile(r"^[a-z0-9_]+$")
DATE_PLACEHOLDERS = ("weekday", "day", "month", "year", "hour", "hour12", "minute", "ampm")
DATETIME_KEYS = (
    *(f"month_{n}" for n in range(1, 13)),
    *(f"weekday_{n}" for n in range(1, 8)),
    "am",
    "pm",
    "date_line",
)
GRAMMAR_KEYS = ("and", "list_separator", "sentence_end")
# Optional: rooms, and the devices every room may have, composed into devices of every domain (see
# data/README.md). A language without them has only the devices_*.csv devices.
ROOMS_FILE = "rooms.csv"
ROOM_DEVICES_FILE = "room_devices.csv"
ROOM_DEVICE_COLUMNS = ("domain", "type", "entity_id", "friendly_name")
ROOM_ID_PLACEHOLDERS = ("room", "alias")
ROOM_NAME_PLACEHOLDERS = ("room_name",)


@dataclass(frozen=True)
class Room:
    """A rooms.csv row: `slug` and `alias` go into entity ids (regular and irregular ones), `name` into names."""

    slug: str
    name: str
    alias: str
    split: str


@dataclass(frozen=True)
class ActionTemplate:
    service: ServiceSpec
    arguments: dict[str, Any]
    request: str
    split: str
    where: str


@dataclass(frozen=True)
class MultiTemplate:
    services: tuple[str, ...]  # per device slot: "domain.service", or a bare service name for any domain
    request: str
    split: str
    where: str


@dataclass(frozen=True)
class SpecificAction:
    device_type: str
    service: ServiceSpec
    arguments: dict[str, Any]
    persona: str
    request: str
    response: str
    split: str
    where: str


@dataclass(frozen=True)
class StatusTemplate:
    domain: str
    state: str
    persona: str
    question: str
    answer: str
    split: str
    where: str


@dataclass(frozen=True)
class ResponseTemplate:
    persona: str
    service: ServiceSpec
    arguments: dict[str, Any]
    text: str
    where: str


@dataclass(frozen=True)
class RefusalTemplate:
    persona: str
    text: str
    where: str

    @property
    def names_near_miss(self) -> bool:
        """Whether the sentence names the listed look-alike ({device2}) besides the missing device."""
        return "{device2" in self.text


@dataclass
class LanguagePile:
    """Everything generated text in one language is made of."""

    language: str
    root: Path
    personas: dict[str, str]
    devices: dict[str, tuple[Device, ...]]
    actions: tuple[ActionTemplate, ...]
    multi: tuple[MultiTemplate, ...]
    specific: tuple[SpecificAction, ...]
    status: tuple[StatusTemplate, ...]
    responses: tuple[ResponseTemplate, ...]
    refusals: tuple[RefusalTemplate, ...]
    vocab: ValueVocab
    datetime: dict[str, str]
    grammar: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    # Replies to a failed tool call (tool-calling format only); tool_errors.csv is optional.
    tool_errors: tuple[RefusalTemplate, ...] = ()


def discover_languages(piles_dir: Path) -> list[str]:
    """Language folders under `piles_dir`, sorted so the listing never depends on the file system."""
    if not piles_dir.is_dir():
        return []
    return sorted(path.name for path in piles_dir.iterdir() if path.is_dir() and not path.name.startswith("."))


TOOL_ERRORS_FILE = "tool_errors.csv"


def load_language(piles_dir: Path, language: str) -> LanguagePile:
    """Load and validate piles_dir/<language>/ (raises PileError naming file:line)."""
    root = piles_dir / language
    personas = _load_personas(root / "system_prompts.csv")
    devices = {domain: _load_devices(root / f"devices_{domain}.csv", domain) for domain in DOMAINS}
    rooms = _load_rooms(root)
    devices = _with_room_devices(devices, rooms, _load_room_devices(root, rooms))
    _check_device_files(root, devices)
    types = {device.type for domain_devices in devices.values() for device in domain_devices}
    pile = LanguagePile(
        language=language,
        root=root,
        personas=personas,
        devices=devices,
        actions=_load_actions(root / "actions.csv"),
        multi=_load_multi(root / "multi_actions.csv"),
        specific=_load_specific(root / "specific_actions.csv", personas, types),
        status=_load_status(root / "status_questions.csv", personas),
        responses=_load_responses(root / "responses.csv", personas),
        refusals=_load_refusals(root / "refusals.csv", personas, near_miss_slot=True),
        vocab=_load_vocab(root),
        datetime=_load_datetime(root / "datetime.csv"),
        grammar=read_key_values(root / "grammar.csv", GRAMMAR_KEYS),
    )
    if (root / TOOL_ERRORS_FILE).exists():
        pile.tool_errors = _load_refusals(root / TOOL_ERRORS_FILE, personas)
    _check_forms(pile)
    _check_specific_devices(pile)
    pile.warnings.extend(_coverage_warnings(pile))
    return pile


# ---------------------------------------------------------------- placeholders


def _check_template(where: str, template: str, allowed_values: Iterable[str], device_slots: Iterable[Any]) -> None:
    """Every placeholder must be well-formed and allowed here; stray braces are errors too."""
    allowed = set(allowed_values)
    slots = set(device_slots)
    for name in PLACEHOLDER_RE.findall(template):
        if name in allowed:
            continue
        placeholder = parse_placeholder(name)
        if placeholder is None:
            raise PileError(f"{where}: malformed placeholder {{{name}}}")
        if not (placeholder.is_device and placeholder.slot in slots):
            raise PileError(
                f"{where}: placeholder {{{name}}} is not allowed here (allowed: {_describe(allowed, slots)})"
            )
    if "{" in PLACEHOLDER_RE.sub("", template) or "}" in PLACEHOLDER_RE.sub("", template):
        raise PileError(f"{where}: unbalanced brace in {template!r}")


def _describe(allowed: set[str], slots: set[Any]) -> str:
    devices = sorted("{device}" if slot is None else f"{{device{slot}}}" for slot in slots)
    return ", ".join([*devices, *sorted(f"{{{name}}}" for name in allowed)]) or "none"


def _value_names(template: str) -> set[str]:
    names = set()
    for name in PLACEHOLDER_RE.findall(template):
        placeholder = parse_placeholder(name)
        if placeholder and not placeholder.is_device:
            names.add(name)
    return names


def _forms_used(template: str) -> set[str]:
    forms = set()
    for name in PLACEHOLDER_RE.findall(template):
        placeholder = parse_placeholder(name)
        if placeholder and placeholder.is_device and placeholder.form:
            forms.add(placeholder.form)
    return forms


def _service(where: str, name: str) -> ServiceSpec:
    if name not in SERVICE_BY_NAME:
        raise PileError(f"{where}: unknown service {name!r} (known: {', '.join(SERVICE_BY_NAME)})")
    return SERVICE_BY_NAME[name]


def _persona(where: str, name: str, personas: dict[str, str], allow_any: bool) -> str:
    if name in personas or (allow_any and name == ANY_PERSONA):
        return name
    known = ", ".join([*personas, *([ANY_PERSONA] if allow_any else [])])
    raise PileError(f"{where}: unknown persona {name!r} (known from system_prompts.csv: {known})")


def _check_required_args(where: str, spec: ServiceSpec, given: Iterable[str]) -> None:
    missing = [arg for arg in spec.required if arg not in set(given)]
    if missing:
        raise PileError(f"{where}: {spec.full_name} needs {', '.join(missing)} (a placeholder or the arguments column)")


def _require_splits(path: Path, what: str, splits_by_key: dict[str, set[str]], keys: Iterable[str]) -> None:
    for key in keys:
        missing = [split for split in SPLITS if split not in splits_by_key.get(key, set())]
        if missing:
            raise PileError(f"{path}: {what} {key!r} has no {' or '.join(missing)} rows (every one needs both)")


# ---------------------------------------------------------------- files


def _load_personas(path: Path) -> dict[str, str]:
    _, rows = read_csv(path, ("persona", "prompt"))
    personas: dict[str, str] = {}
    for row in rows:
        if not SLUG_RE.match(row["persona"]) or row["persona"] in personas:
            raise PileError(f"{row.where}: persona must be a unique lower_case name, got {row['persona']!r}")
        _check_template(row.where, row["prompt"], (), ())
        personas[row["persona"]] = row["prompt"]
    return personas


def _load_devices(path: Path, domain: str) -> tuple[Device, ...]:
    header, rows = read_csv(path, DEVICE_COLUMNS, extra_columns=True)
    form_columns = [column for column in header if column not in DEVICE_COLUMNS]
    for column in form_columns:
        if not FORM_COLUMN_RE.match(column):
            raise PileError(f"{path}: form column {column!r} must be a lower_case name")
    devices = tuple(_device(row, domain, form_columns) for row in rows)
    splits = {domain: {device.split for device in devices}}
    _require_splits(path, "domain", splits, [domain])
    return devices


def _device(row: Row, domain: str, form_columns: list[str]) -> Device:
    entity_id, name = row["entity_id"], row["friendly_name"]
    if not re.match(rf"^{domain}\.[a-z0-9_]+$", entity_id):
        raise PileError(f"{row.where}: entity_id must look like {domain}.lower_case_ascii, got {entity_id!r}")
    if "' =" in name or "{" in name or "}" in name:
        raise PileError(f'{row.where}: friendly_name may not contain braces or the sequence "\' ="')
    if not SLUG_RE.match(row["type"]):
        raise PileError(f"{row.where}: type must be a lower_case name, got {row['type']!r}")
    forms = tuple((column, row[column]) for column in form_columns if row[column])
    return Device(entity_id, name, row["type"], row["split"], forms)


def _check_device_files(root: Path, devices: dict[str, tuple[Device, ...]]) -> None:
    for path in sorted(root.glob("devices_*.csv")):
        domain = path.stem.removeprefix("devices_")
        if domain not in DOMAINS:
            raise PileError(f"{path}: unknown domain {domain!r} (known: {', '.join(DOMAINS)})")
    seen: dict[str, str] = {}
    for domain_devices in devices.values():
        for device in domain_devices:
            for key in (device.entity_id, device.name.casefold()):
                if key in seen:
                    raise PileError(f"{root}: {key!r} is used by two devices ({seen[key]} and {device.entity_id})")
                seen[key] = device.entity_id


def _load_rooms(root: Path) -> tuple[Room, ...]:
    if not (root / ROOMS_FILE).exists():
        if (root / ROOM_DEVICES_FILE).exists():
            raise PileError(f"{root / ROOM_DEVICES_FILE}: needs {ROOMS_FILE} beside it (the rooms to compose)")
        return ()
    _, rows = read_csv(root / ROOMS_FILE, ("room", "name", "alias", "split"))
    rooms = []
    for row in rows:
        if not SLUG_RE.match(row["room"]) or not SLUG_RE.match(row["alias"]):
            raise PileError(f"{row.where}: room and alias must be lower_case ascii slugs (they go into entity ids)")
        if "{" in row["name"] or "}" in row["name"]:
            raise PileError(f"{row.where}: a room name may not contain braces")
        rooms.append(Room(row["room"], row["name"], row["alias"], row["split"]))
    _require_splits(root / ROOMS_FILE, "file", {ROOMS_FILE: {room.split for room in rooms}}, [ROOMS_FILE])
    return tuple(rooms)


def _load_room_devices(root: Path, rooms: tuple[Room, ...]) -> list[Device]:
    """Every room's devices: one per (room, room_devices.csv row), in file order, in the room's split."""
    if not rooms:
        return []
    header, rows = read_csv(root / ROOM_DEVICES_FILE, ROOM_DEVICE_COLUMNS, extra_columns=True)
    form_columns = [column for column in header if column not in ROOM_DEVICE_COLUMNS]
    devices = []
    for row in rows:
        if row["domain"] not in DOMAINS:
            raise PileError(f"{row.where}: unknown domain {row['domain']!r} (known: {', '.join(DOMAINS)})")
        _check_template(row.where, row["entity_id"], ROOM_ID_PLACEHOLDERS, ())
        for column in ("friendly_name", *form_columns):
            _check_template(row.where, row[column], ROOM_NAME_PLACEHOLDERS, ())
        devices.extend(_room_device(row, room, form_columns) for room in rooms)
    return devices


def _room_device(row: Row, room: Room, form_columns: list[str]) -> Device:
    values = {"room": room.slug, "alias": room.alias, "room_name": room.name}
    texts = {column: fill(row[column], values, row.where) for column in ("entity_id", "friendly_name", *form_columns)}
    composed = Row(row.where, {**texts, "type": row["type"], "split": room.split})
    return replace(_device(composed, row["domain"], form_columns), room=room.slug)


def _with_room_devices(
    devices: dict[str, tuple[Device, ...]], rooms: tuple[Room, ...], composed: list[Device]
) -> dict[str, tuple[Device, ...]]:
    """The device piles' devices, each given the room its name starts with, followed by the composed ones."""
    by_length = sorted(rooms, key=lambda room: -len(room.name))

    def room_of(device: Device) -> str:
        name = device.name.casefold()
        return next((room.slug for room in by_length if name.startswith(room.name.casefold() + " ")), "")

    # A composed device whose id or name a device pile already has is left out: that device is the room's.
    taken = set().union(*(_identity(device) for group in devices.values() for device in group))
    kept = [device for device in composed if not _identity(device) & taken]
    return {
        domain: tuple(
            [replace(device, room=room_of(device)) for device in domain_devices]
            + [device for device in kept if device.domain == domain]
        )
        for domain, domain_devices in devices.items()
    }


def _identity(device: Device) -> set[str]:
    """What must be unique to a device within a language: its entity_id and its name, case-insensitively."""
    return {device.entity_id, device.name.casefold()}


def _load_actions(path: Path) -> tuple[ActionTemplate, ...]:
    _, rows = read_csv(path, ("service", "request", "split"), ("arguments",))
    templates = []
    for row in rows:
        spec = _service(row.where, row["service"])
        arguments = parse_arguments(row["arguments"], spec, row.where)
        allowed = [name for name in placeholders_for(spec) if name not in _placeholders_of(arguments)]
        _check_template(row.where, row["request"], allowed, [None])
        if "{device" not in row["request"]:
            raise PileError(f"{row.where}: request must name the device with {{device}}")
        _check_required_args(row.where, spec, [*arguments, *_args_of(_value_names(row["request"]))])
        templates.append(ActionTemplate(spec, arguments, row["request"], row["split"], row.where))
    splits: dict[str, set[str]] = {}
    for template in templates:
        splits.setdefault(template.service.full_name, set()).add(template.split)
    _require_splits(path, "service", splits, SERVICE_BY_NAME)
    return tuple(templates)


def _placeholders_of(arguments: dict[str, Any]) -> set[str]:
    return {PLACEHOLDER_OF_ARG[arg] for arg in arguments if arg in PLACEHOLDER_OF_ARG}


def _args_of(names: Iterable[str]) -> list[str]:
    return [ARG_OF_PLACEHOLDER[parse_placeholder(name).base] for name in names]


def slot_domains(service: str) -> list[str]:
    """Domains a multi-device slot can target: `light.turn_off` -> [light]; `turn_off` -> all offering it."""
    if "." in service:
        return [service.split(".", 1)[0]]
    return [domain for domain, specs in SERVICES.items() if any(spec.name == service for spec in specs)]


def _load_multi(path: Path) -> tuple[MultiTemplate, ...]:
    _, rows = read_csv(path, ("services", "request", "split"))
    templates = []
    for row in rows:
        services = tuple(row["services"].split())
        if not 2 <= len(services) <= 3:
            raise PileError(f"{row.where}: services must list 2 or 3 services separated by spaces")
        allowed: list[str] = []
        for slot, service in enumerate(services, 1):
            allowed.extend(f"{name}{slot}" for name in _multi_slot_placeholders(row.where, service))
        _check_template(row.where, row["request"], allowed, range(1, len(services) + 1))
        for slot in range(1, len(services) + 1):
            if f"{{device{slot}" not in row["request"]:
                raise PileError(f"{row.where}: request must name every device: {{device{slot}}} is missing")
        templates.append(MultiTemplate(services, row["request"], row["split"], row.where))
    _require_splits(
        path, "file", {"multi_actions.csv": {template.split for template in templates}}, ["multi_actions.csv"]
    )
    return tuple(templates)


def _multi_slot_placeholders(where: str, service: str) -> list[str]:
    domains = slot_domains(service)
    if not domains:
        raise PileError(f"{where}: no domain offers service {service!r}")
    specs = [SERVICE_BY_NAME.get(f"{domain}.{service.split('.')[-1]}") for domain in domains]
    if any(spec is None for spec in specs):
        raise PileError(f"{where}: unknown service {service!r}")
    names = [set(placeholders_for(spec)) for spec in specs]
    common = sorted(set.intersection(*names))
    if any(spec.required for spec in specs) and len(domains) > 1:
        raise PileError(f"{where}: {service!r} needs arguments: name it with its domain, e.g. light.{service}")
    for spec in specs:
        if any(arg not in _args_of(common) for arg in spec.required):
            raise PileError(f"{where}: {spec.full_name} needs arguments that multi_actions.csv cannot give")
    return common


def _load_specific(path: Path, personas: dict[str, str], types: set[str]) -> tuple[SpecificAction, ...]:
    columns = ("device_type", "service", "persona", "request", "response", "split")
    _, rows = read_csv(path, columns, ("arguments",))
    actions = []
    for row in rows:
        spec = _service(row.where, row["service"])
        if row["device_type"] not in types:
            raise PileError(f"{row.where}: no device has type {row['device_type']!r} (see the devices_*.csv files)")
        arguments = parse_arguments(row["arguments"], spec, row.where)
        allowed = [name for name in placeholders_for(spec) if name not in _placeholders_of(arguments)]
        _check_template(row.where, row["request"], allowed, [None])
        _check_template(row.where, row["response"], _value_names(row["request"]), [None])
        _check_required_args(row.where, spec, [*arguments, *_args_of(_value_names(row["request"]))])
        persona = _persona(row.where, row["persona"], personas, allow_any=True)
        actions.append(
            SpecificAction(
                row["device_type"],
                spec,
                arguments,
                persona,
                row["request"],
                row["response"],
                row["split"],
                row.where,
            )
        )
    _require_splits(
        path, "file", {"specific_actions.csv": {action.split for action in actions}}, ["specific_actions.csv"]
    )
    return tuple(actions)


def _load_status(path: Path, personas: dict[str, str]) -> tuple[StatusTemplate, ...]:
    _, rows = read_csv(path, ("domain", "state", "persona", "question", "answer", "split"))
    templates = []
    for row in rows:
        domain, state = row["domain"], row["state"]
        if domain not in DOMAINS:
            raise PileError(f"{row.where}: unknown domain {domain!r} (known: {', '.join(DOMAINS)})")
        if state not in STATES[domain]:
            raise PileError(f"{row.where}: state of {domain} must be one of {', '.join(STATES[domain])}")
        _check_template(row.where, row["question"], (), [None])
        _check_template(row.where, row["answer"], STATE_VALUES.get((domain, state), ()), [None])
        persona = _persona(row.where, row["persona"], personas, allow_any=True)
        templates.append(
            StatusTemplate(domain, state, persona, row["question"], row["answer"], row["split"], row.where)
        )
    splits: dict[str, set[str]] = {}
    states: set[tuple[str, str]] = set()
    for template in templates:
        splits.setdefault(template.domain, set()).add(template.split)
        states.add((template.domain, template.state))
    _require_splits(path, "domain", splits, DOMAINS)
    for domain in DOMAINS:
        for state in STATES[domain]:
            if (domain, state) not in states:
                raise PileError(f"{path}: no row for domain {domain!r} in state {state!r}")
    return tuple(templates)


def _load_responses(path: Path, personas: dict[str, str]) -> tuple[ResponseTemplate, ...]:
    _, rows = read_csv(path, ("persona", "service", "response"), ("arguments",))
    responses = []
    for row in rows:
        persona = _persona(row.where, row["persona"], personas, allow_any=False)
        spec = _service(row.where, row["service"])
        arguments = parse_arguments(row["arguments"], spec, row.where)
        _check_template(row.where, row["response"], placeholders_for(spec), [None])
        responses.append(ResponseTemplate(persona, spec, arguments, row["response"], row.where))
    return tuple(responses)


def _load_refusals(path: Path, personas: dict[str, str], near_miss_slot: bool = False) -> tuple[RefusalTemplate, ...]:
    """Refusal sentences; with `near_miss_slot` a row may also name {device2}, a listed device the user may
    have meant (such rows are used only when the prompt lists one)."""
    _, rows = read_csv(path, ("persona", "response"))
    refusals = []
    for row in rows:
        persona = _persona(row.where, row["persona"], personas, allow_any=False)
        _check_template(row.where, row["response"], (), [None, 2] if near_miss_slot else [None])
        refusals.append(RefusalTemplate(persona, row["response"], row.where))
    return tuple(refusals)


def _load_vocab(root: Path) -> ValueVocab:
    _, color_rows = read_csv(root / "colors.csv", ("name", "r", "g", "b"))
    colors = tuple((row["name"], _rgb(row)) for row in color_rows)
    _, duration_rows = read_csv(root / "durations.csv", ("phrase", "duration"))
    durations = []
    for row in duration_rows:
        if not re.match(r"^\d{2}:[0-5]\d:[0-5]\d$", row["duration"]):
            raise PileError(f"{row.where}: duration must be HH:MM:SS, got {row['duration']!r}")
        durations.append((row["phrase"], row["duration"]))
    media = tuple(read_txt(root / "media_names.txt"))
    items = tuple(read_txt(root / "todo_items.txt"))
    return ValueVocab(colors, media, tuple(durations), items)


def _rgb(row: Row) -> tuple[int, int, int]:
    try:
        red, green, blue = (int(row[channel]) for channel in ("r", "g", "b"))
    except ValueError as exc:
        raise PileError(f"{row.where}: r, g and b must be whole numbers 0-255") from exc
    if not all(0 <= value <= 255 for value in (red, green, blue)):
        raise PileError(f"{row.where}: r, g and b must be whole numbers 0-255")
    return red, green, blue


def _load_datetime(path: Path) -> dict[str, str]:
    values = read_key_values(path, DATETIME_KEYS)
    _check_template(f"{path} (date_line)", values["date_line"], DATE_PLACEHOLDERS, ())
    return values


# ---------------------------------------------------------------- cross-file checks


def _check_forms(pile: LanguagePile) -> None:
    """A grammatical form used by any phrasing must be filled in for every device of every domain.

    (Checking per domain would allow a form only where it is used, but one simple rule is easier for
    pile writers: add a form column to all devices_*.csv files or to none.)
    """
    texts: list[tuple[str, str]] = [(t.where, t.request) for t in pile.actions]
    texts += [(t.where, t.request) for t in pile.multi]
    texts += [(t.where, t.request) for t in pile.specific] + [(t.where, t.response) for t in pile.specific]
    texts += [(t.where, t.question) for t in pile.status] + [(t.where, t.answer) for t in pile.status]
    texts += [(t.where, t.text) for t in pile.responses] + [(t.where, t.text) for t in pile.refusals]
    first_use: dict[str, str] = {}
    for where, text in texts:
        for form in sorted(_forms_used(text)):
            first_use.setdefault(form, where)
    for form, where in first_use.items():
        for device in (device for devices in pile.devices.values() for device in devices):
            if form not in dict(device.forms):
                raise PileError(
                    f"{where}: uses {{device_{form}}} but device {device.entity_id} has no '{form}' value "
                    f"(add a '{form}' column to every devices_*.csv file, and room_devices.csv if there is one, "
                    "and fill it for every row)"
                )


def _check_specific_devices(pile: LanguagePile) -> None:
    for action in pile.specific:
        candidates = [
            device
            for device in pile.devices[action.service.domain]
            if device.type == action.device_type and device.split == action.split
        ]
        if not candidates:
            raise PileError(
                f"{action.where}: no {action.split} device of type {action.device_type!r} "
                f"in devices_{action.service.domain}.csv"
            )


def _coverage_warnings(pile: LanguagePile) -> list[str]:
    """Personas lacking responses or refusals: reported once, and such examples are skipped."""
    warnings = []
    have = {(response.persona, response.service.full_name) for response in pile.responses}
    for persona in pile.personas:
        missing = [name for name in SERVICE_BY_NAME if (persona, name) not in have]
        if missing:
            warnings.append(
                f"{pile.language}: persona {persona!r} has no responses for {', '.join(missing)} "
                "in responses.csv; examples needing them are skipped"
            )
        if not any(refusal.persona == persona for refusal in pile.refusals):
            warnings.append(f"{pile.language}: persona {persona!r} has no refusals; refusal examples skip it")
    return warnings
