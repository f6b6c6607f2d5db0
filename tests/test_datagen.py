"""The Home Assistant dataset generator: content checks on a --medium set for every language folder,
determinism, error reporting for bad piles and bad merge files, and the alternative output formats."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from chattune.domains.homeassistant.datagen import DataGenError, GenerateConfig, PileError, generate
from chattune.domains.homeassistant.datagen.devices import DOMAINS, SERVICE_BY_NAME, STATE_VALUES, look_alike_score
from chattune.domains.homeassistant.datagen.leakage import (
    Normaliser,
    describe,
    near_copies,
    pile_fillers,
    pile_near_copies,
)
from chattune.domains.homeassistant.datagen.piles import PILES_DIR, discover_languages, load_language
from chattune.domains.homeassistant.datagen.templates import LEFTOVER_RE, placeholder_names, template_regex
from chattune.domains.homeassistant.reply_format import parse_reply

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "data" / "generate_home_assistant_data.py"
PILES = PILES_DIR
LANGUAGES = discover_languages(PILES)
ACTION_KINDS = {"specific_action", "template_action", "multi_device_action"}
ALL_KINDS = ACTION_KINDS | {"status", "refusal"}
DEVICE_LINE = re.compile(r"^(\S+) '(.*)' = (.*)$")
REJECTIONS = {"wrong_argument", "missing_call", "extra_call", "wrong_persona"}


# ------------------------------------------------------------------------------------------ helpers


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def parse_system(system: str) -> tuple[set[str], dict[str, tuple[str, str]]]:
    """Services offered and {entity_id: (friendly name, state text)} from a system prompt."""
    lines = system.split("\n")
    services_line = next(line for line in lines if line.startswith("Services: "))
    services = {item.split("(")[0] for item in services_line.removeprefix("Services: ").split(", ")}
    devices = {}
    for line in lines[lines.index("Devices:") + 1 :]:
        match = DEVICE_LINE.match(line)
        assert match, f"bad device line {line!r}"
        devices[match.group(1)] = (match.group(2), match.group(3))
    return services, devices


def turns(record: dict) -> tuple[str, str, str]:
    conversation = record["conversations"]
    assert [turn["role"] for turn in conversation] == ["system", "user", "assistant"]
    return tuple(turn["content"] for turn in conversation)


def copy_piles(tmp_path: Path) -> Path:
    piles = tmp_path / "piles"
    shutil.copytree(PILES / "english", piles / "english")
    return piles


def small_config(tmp_path: Path, **overrides) -> GenerateConfig:
    values = {"output_dir": tmp_path / "out", "piles_dir": PILES, "train_count": 300, "progress": False}
    return GenerateConfig(**{**values, **overrides})


# ------------------------------------------------------------------------------------------ medium set


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> dict[str, dict[str, list[dict]]]:
    """A --medium train and test set for every language folder, generated once: {split: {language: rows}}."""
    out = tmp_path_factory.mktemp("medium")
    config = GenerateConfig(output_dir=out, piles_dir=PILES, languages=LANGUAGES, size="medium", progress=False)
    generate(config)
    result: dict[str, dict[str, list[dict]]] = {}
    for split in ("train", "test"):
        rows = read_jsonl(out / f"home_assistant_{split}.jsonl")
        result[split] = {language: [row for row in rows if row["language"] == language] for language in LANGUAGES}
    return result


def test_languages_are_discovered():
    assert "english" in LANGUAGES


def test_the_piles_ship_inside_the_package():
    """The generator reads package data, not a checkout's data/ folder, so an installed chattune finds them."""
    import chattune

    assert PILES.is_relative_to(Path(chattune.__file__).resolve().parent)
    assert set(LANGUAGES) == {"english", "french", "german", "polish", "spanish"}


@pytest.mark.parametrize("language", LANGUAGES)
def test_sizes_and_kinds(medium, language):
    train, test = medium["train"][language], medium["test"][language]
    assert 5000 <= len(train) <= 20000
    assert 0.05 * len(train) <= len(test) <= 0.10 * len(train)
    for rows in (train, test):
        assert {row["kind"] for row in rows} == ALL_KINDS
        assert all(set(row) == {"conversations", "language", "kind"} for row in rows)


@pytest.mark.parametrize("language", LANGUAGES)
def test_calls_use_listed_services_and_devices(medium, language):
    for split in ("train", "test"):
        for row in medium[split][language]:
            system, _, assistant = turns(row)
            services, devices = parse_system(system)
            parsed = parse_reply(assistant)
            assert parsed.sentence.strip(), assistant
            if row["kind"] not in ACTION_KINDS:
                assert not parsed.has_block and not parsed.calls, assistant
                continue
            assert parsed.has_block and parsed.json_valid, assistant
            expected = (2, 3) if row["kind"] == "multi_device_action" else (1,)
            assert len(parsed.calls) in expected, assistant
            assert len({call["target_device"] for call in parsed.calls}) == len(parsed.calls)
            for call in parsed.calls:
                assert call["service"] in services, (call, services)
                assert call["target_device"] in devices, call
                assert call["service"].split(".")[0] == call["target_device"].split(".")[0], call


@pytest.mark.parametrize("language", LANGUAGES)
def test_no_unfilled_placeholder(medium, language):
    for split in ("train", "test"):
        for row in medium[split][language]:
            for text in turns(row):
                assert not LEFTOVER_RE.search(text), text


def _value_shown(name: str, value: str, state_text: str) -> bool:
    """Whether an answer's quoted value is what the device line shows."""
    fields = state_text.split(";")
    if name == "volume":
        return f"vol={int(value) / 100:g}" in fields
    if name == "minutes":
        return f"00:{int(value):02d}:00" in fields
    if name == "count":
        return state_text == value
    return any(field in (value, f"{value}%", f"{value}°C") or field.startswith(f"{value} (") for field in fields)


def _status_row_fits(row, question: str, answer: str, listed: dict, devices: dict) -> bool:
    question_match = template_regex(row.question).fullmatch(question)
    answer_match = template_regex(row.answer).fullmatch(answer)
    if not question_match or not answer_match:
        return False
    groups = {**question_match.groupdict(), **answer_match.groupdict()}
    for entity_id, (_, state_text) in listed.items():
        device = devices[entity_id]
        names = device.placeholder_values()
        if device.domain != row.domain or any(groups[key] != names.get(key) for key in groups if key in names):
            continue
        if any(key.startswith("device") and key not in names for key in groups):
            continue
        state = "count" if row.domain == "todo" and state_text.isdigit() else state_text.split(";")[0]
        values = {key: value for key, value in groups.items() if not key.startswith("device")}
        if state == row.state and all(_value_shown(k, v, state_text) for k, v in values.items()):
            return True
    return False


@pytest.mark.parametrize("language", LANGUAGES)
def test_status_answers_match_listed_state(medium, language):
    pile = load_language(PILES, language)
    devices = {device.entity_id: device for group in pile.devices.values() for device in group}
    for split in ("train", "test"):
        rows = [row for row in medium[split][language] if row["kind"] == "status"]
        assert rows
        for row in rows:
            system, question, answer = turns(row)
            _, listed = parse_system(system)
            fits = [t for t in pile.status if _status_row_fits(t, question, answer, listed, devices)]
            assert fits, f"no status phrasing explains {question!r} -> {answer!r} with the listed states"


def test_status_answers_quote_every_attribute_in_both_splits(medium):
    """Brightness, colour, speed, position, setpoint, humidity, title, volume, time left and item count are each
    asked about and answered from the device line, in train and in test."""
    pile = load_language(PILES, "english")
    attributes = {value for values in STATE_VALUES.values() for value in values}
    for split in ("train", "test"):
        quoted = {name for row in pile.status if row.split == split for name in placeholder_names(row.answer)}
        assert attributes <= quoted, split
        answers = [turns(row)[2] for row in medium[split]["english"] if row["kind"] == "status"]
        assert sum(bool(re.search(r"\d", answer)) for answer in answers) >= 0.3 * len(answers)


@pytest.mark.parametrize("language", LANGUAGES)
def test_refusals_name_a_device_that_is_not_listed(medium, language):
    """Every domain and persona is refused; the refused name is never listed; a named look-alike always is."""
    pile = load_language(PILES, language)
    domain_of = {device.name: device.domain for group in pile.devices.values() for device in group}
    patterns = [template_regex(refusal.text) for refusal in pile.refusals]
    refused_domains, personas = set(), set()
    for row in (r for r in medium["train"][language] if r["kind"] == "refusal"):
        system, _, answer = turns(row)
        listed_names = {name for name, _ in parse_system(system)[1].values()}
        matches = [m for m in (p.fullmatch(answer) for p in patterns) if m and "device" in m.groupdict()]
        assert matches, answer
        fits = [m for m in matches if m["device"] in domain_of and m["device"] not in listed_names]
        assert fits, answer
        assert any(m.groupdict().get("device2") in {None, *listed_names} for m in fits), answer  # a look-alike
        refused_domains.add(domain_of[fits[0]["device"]])
        personas.add(next(name for name, prompt in pile.personas.items() if system.startswith(prompt)))
    assert refused_domains == set(DOMAINS)
    assert personas == set(pile.personas)


def test_implied_requests_cover_every_device_type_and_every_service_with_arguments():
    pile = load_language(PILES, "english")
    types = {device.type for group in pile.devices.values() for device in group}
    with_arguments = {name for name, spec in SERVICE_BY_NAME.items() if spec.args}
    for split in ("train", "test"):
        rows = [row for row in pile.specific if row.split == split]
        assert with_arguments <= {row.service.full_name for row in rows}, split
        split_types = {device.type for group in pile.devices.values() for device in group if device.split == split}
        assert {row.device_type for row in rows} == split_types, split
    assert types == {row.device_type for row in pile.specific}
    assert sum(row.split == "train" for row in pile.specific) >= 225  # three times the 75 of 2026-12


def _refused_and_acted(rows: list[dict]) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    refusals = {turns(row)[1]: row for row in rows if row["kind"] == "refusal"}
    actions: dict[str, list[dict]] = {}
    for row in rows:
        if row["kind"] == "template_action":
            actions.setdefault(turns(row)[1], []).append(row)
    return refusals, actions


@pytest.mark.parametrize("split", ["train", "test"])
def test_refused_requests_are_also_carried_out_when_listed(medium, split):
    """Contrastive pairs: the same request is refused in one example and carried out, on the device it names,
    in another of the same split, whose listing adds that device to the refusal's."""
    refusals, actions = _refused_and_acted(medium[split]["english"])
    paired = 0
    for request, refusal in refusals.items():
        refused_listing = parse_system(turns(refusal)[0])[1]
        for action in actions.get(request, []):
            listing = parse_system(turns(action)[0])[1]
            (call,) = parse_reply(turns(action)[2]).calls
            assert call["target_device"] not in refused_listing
            name = listing[call["target_device"]][0]
            assert name in turns(refusal)[2] and name in request
            paired += len(set(listing) - set(refused_listing)) == 1
    assert paired >= 0.4 * len(refusals)


def test_refusals_usually_list_look_alikes_of_the_missing_device(medium):
    """Near misses: the listing shares a name word or the domain with the refused device."""
    pile = load_language(PILES, "english")
    by_name = {device.name: device for group in pile.devices.values() for device in group}
    refusals = [row for row in medium["train"]["english"] if row["kind"] == "refusal"]
    near = 0
    for row in refusals:
        system, request, _ = turns(row)
        missing = max((name for name in by_name if name in request), key=len)
        listing = parse_system(system)[1]
        near += any(
            look_alike_score(by_name[missing], by_name[name]) for name, _ in listing.values() if name in by_name
        )
    assert near >= 0.6 * len(refusals)


@pytest.mark.parametrize("language", LANGUAGES)
def test_train_and_test_are_disjoint(medium, language):
    train, test = medium["train"][language], medium["test"][language]
    assert not {json.dumps(row) for row in train} & {json.dumps(row) for row in test}

    def device_names(rows: list[dict]) -> set[str]:
        names = set()
        for row in rows:
            for entity_id, (name, _) in parse_system(turns(row)[0])[1].items():
                names |= {entity_id, name}
        return names

    assert not device_names(train) & device_names(test)


# ------------------------------------------------------------------------------------------ held-out phrasings


def test_near_copies_ignore_case_punctuation_placeholders_and_device_names():
    normalise = Normaliser(["Kitchen Light", "warm white"])
    train = [("actions.csv:2", "Turn on the {device}, please!"), ("actions.csv:3", "Make the {device} {color}")]
    test = [
        ("a:1", "turn ON the Kitchen Light please"),  # the same phrasing, filled in
        ("a:2", "Make the {device} warm white."),  # a filled placeholder is a placeholder
        ("a:3", "Turn on that {device} please"),  # a near copy (ratio >= 90)
        ("a:4", "Let some daylight in through the {device}"),
    ]
    assert normalise("Dim the Kitchen Light to 40%!") == "dim the SLOT to SLOT"
    assert [copy.test_where for copy in near_copies(train, test, normalise)] == ["a:1", "a:2", "a:3"]


@pytest.mark.parametrize("language", LANGUAGES)
def test_no_test_phrasing_nearly_copies_a_train_phrasing(language):
    copies = pile_near_copies(load_language(PILES, language))
    assert not copies, "test phrasings that nearly copy train ones:\n" + describe(copies)


@pytest.mark.parametrize("language", LANGUAGES)
def test_no_generated_test_request_nearly_copies_a_train_request(medium, language):
    normalise = Normaliser(pile_fillers(load_language(PILES, language)))
    train = [("train", turns(row)[1]) for row in medium["train"][language]]
    test = [("test", turns(row)[1]) for row in medium["test"][language]]
    copies = near_copies(train, test, normalise)
    assert not copies, describe(copies[:20])


# ------------------------------------------------------------------------------------------ houses


def test_rooms_compose_regular_and_irregular_ids_across_domains():
    pile = load_language(PILES, "english")
    den = {device.entity_id: device.name for group in pile.devices.values() for device in group if device.room == "den"}
    assert den["light.den"] == "Den Light" and den["light.snug_ceiling"] == "Den Ceiling Light"
    assert {"fan.den", "media_player.den", "climate.den"} <= set(den)
    # a device pile's device is in the room its name starts with, and stands in for a composed one of that name
    living_room = [device for device in pile.devices["light"] if device.name == "Living Room Lamp"]
    assert [(device.entity_id, device.room) for device in living_room] == [("light.living_room_lamp", "living_room")]
    for language in LANGUAGES:  # rooms are optional: a language without rooms.csv has only its device piles
        assert load_language(PILES, language).devices


def test_houses_mix_small_and_large_and_put_one_room_in_several_domains(tmp_path):
    generate(small_config(tmp_path, max_devices=32, train_count=600))
    pile = load_language(PILES, "english")
    room_of = {device.entity_id: device.room for group in pile.devices.values() for device in group}
    rows = read_jsonl(tmp_path / "out" / "home_assistant_train.jsonl")
    sizes, mixed_rooms, targets_with_room_mates, actions = [], 0, 0, 0
    for row in rows:
        system, _, assistant = turns(row)
        listed = parse_system(system)[1]
        sizes.append(len(listed))
        domains_by_room: dict[str, set[str]] = {}
        for entity_id in listed:
            domains_by_room.setdefault(room_of[entity_id], set()).add(entity_id.split(".")[0])
        mixed_rooms += any(len(domains) >= 3 for room, domains in domains_by_room.items() if room)
        if row["kind"] == "template_action":
            target = parse_reply(assistant).calls[0]["target_device"]
            actions += 1
            targets_with_room_mates += any(
                room_of[other] == room_of[target] != "" and other.split(".")[0] != target.split(".")[0]
                for other in listed
            )
    assert max(sizes) == 32 and sum(size <= 6 for size in sizes) >= 0.2 * len(rows)
    assert sum(size >= 20 for size in sizes) >= 0.4 * len(rows)
    assert mixed_rooms >= 0.4 * len(rows)  # light.den, fan.den, media_player.den in one prompt
    assert targets_with_room_mates >= 0.4 * actions  # the target's id must be told from its room-mates'


# ------------------------------------------------------------------------------------------ CLI


def test_cli_same_seed_is_byte_identical_and_prints_counts(tmp_path):
    args = ["--train", "--test", "--sample", "--dpo", "--seed", "7"]
    first = run_cli(*args, "--output_dir", str(tmp_path / "a"), env={"PYTHONHASHSEED": "1"})
    second = run_cli(*args, "--output_dir", str(tmp_path / "b"), env={"PYTHONHASHSEED": "2"})
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    names = sorted(path.name for path in (tmp_path / "a").iterdir())
    assert names == [f"home_assistant_{part}.jsonl" for part in ("dpo", "sample", "test", "train")]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    train = read_jsonl(tmp_path / "a" / "home_assistant_train.jsonl")
    assert "home_assistant_train.jsonl:" in first.stdout
    total_line = first.stdout.split("home_assistant_train.jsonl:")[1].split("\n\n")[0].splitlines()[-1]
    assert total_line.split()[0] == "total" and int(total_line.split()[-1]) == len(train)
    for kind, count in Counter(row["kind"] for row in train).items():
        assert kind in first.stdout and str(count) in first.stdout
    assert 24 <= len(read_jsonl(tmp_path / "a" / "home_assistant_sample.jsonl")) <= 100


def test_per_language_files_split_the_merged_file_by_language(tmp_path):
    result = run_cli(
        "--train", "--test", "--per_language_files", "--language", "english", "german", "--output_dir", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    for part in ("train", "test"):
        merged = read_jsonl(tmp_path / f"home_assistant_{part}.jsonl")
        per_language = {
            lang: read_jsonl(tmp_path / f"home_assistant_{part}_{lang}.jsonl") for lang in ("english", "german")
        }
        for language, rows in per_language.items():
            assert rows and {row["language"] for row in rows} == {language}
            assert rows == [row for row in merged if row["language"] == language]  # the same rows, in the same order
        assert f"wrote {tmp_path / f'home_assistant_{part}_german.jsonl'}" in result.stdout
    assert not (tmp_path / "home_assistant_train_french.jsonl").exists()


def test_different_seed_gives_different_data(tmp_path):
    generate(small_config(tmp_path / "a", seed=1))
    generate(small_config(tmp_path / "b", seed=2))
    first = (tmp_path / "a" / "out" / "home_assistant_train.jsonl").read_bytes()
    assert first != (tmp_path / "b" / "out" / "home_assistant_train.jsonl").read_bytes()


def test_unknown_language_exits_2_listing_known_ones(tmp_path):
    result = run_cli("--train", "--language", "klingon", "--output_dir", str(tmp_path))
    assert result.returncode == 2
    assert "klingon" in result.stderr
    for language in LANGUAGES:
        assert language in result.stderr
    assert not list(tmp_path.iterdir())


def test_malformed_pile_row_names_file_and_line(tmp_path):
    piles = copy_piles(tmp_path)
    actions = piles / "english" / "actions.csv"
    lines = actions.read_text(encoding="utf-8").splitlines()
    lines.insert(3, "light.turn_on,,Turn on the {device},train,surplus")
    actions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(PileError) as error:
        generate(small_config(tmp_path, piles_dir=piles))
    assert "actions.csv:4" in str(error.value)
    assert "expected 4 columns (service,arguments,request,split)" in str(error.value)
    result = run_cli("--train", "--piles_dir", str(piles), "--output_dir", str(tmp_path / "cli"))
    assert result.returncode == 2 and "actions.csv:4" in result.stderr


@pytest.mark.parametrize(
    ("file_name", "bad_row", "message"),
    [
        ("devices_fan.csv", "fan.wobbly,Wobbly Fan,fan,someday", "split must be train or test"),
        ("devices_fan.csv", "light.sneaky,Sneaky Fan,fan,train", "entity_id must look like fan."),
        ("actions.csv", "light.turn_on,,Set the {device} to {percentage}%,train", "not allowed here"),
        ("actions.csv", "light.fly,,Fly the {device},train", "unknown service"),
        ("responses.csv", "captain,light.turn_on,,aye", "unknown persona"),
        ("status_questions.csv", "light,dim,*,Is it dim?,It is.,train", "state of light must be"),
        ("colors.csv", "ultraviolet,400,0,0", "0-255"),
        ("rooms.csv", "Wine Cellar,Wine Cellar,cellar,train", "slugs"),
        ("room_devices.csv", "light,light,light.{floor},{room_name} Light", "not allowed here"),
        ("room_devices.csv", "light,light,switch.{room},{room_name} Switch", "entity_id must look like light."),
    ],
)
def test_bad_pile_values_name_file_and_line(tmp_path, file_name, bad_row, message):
    piles = copy_piles(tmp_path)
    path = piles / "english" / file_name
    line_number = len(path.read_text(encoding="utf-8").splitlines()) + 1
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(bad_row + "\n")
    with pytest.raises(PileError) as error:
        generate(small_config(tmp_path, piles_dir=piles))
    assert f"{file_name}:{line_number}" in str(error.value) and message in str(error.value)


def test_persona_without_responses_is_warned_once_and_skipped(tmp_path):
    piles = copy_piles(tmp_path)
    responses = piles / "english" / "responses.csv"
    kept = [
        line
        for line in responses.read_text(encoding="utf-8").splitlines()
        if not line.startswith("robot,fan.oscillate")
    ]
    responses.write_text("\n".join(kept) + "\n", encoding="utf-8")
    warnings: list[str] = []
    generate(small_config(tmp_path, piles_dir=piles, train_count=1500, dpo=True), warn=warnings.append)
    robot_warnings = [message for message in warnings if "'robot'" in message]
    assert len(robot_warnings) == 1 and "fan.oscillate" in robot_warnings[0]
    robot_prompt = load_language(piles, "english").personas["robot"]
    rows = read_jsonl(tmp_path / "out" / "home_assistant_train.jsonl")
    robot_rows = [row for row in rows if turns(row)[0].startswith(robot_prompt)]
    assert robot_rows
    for row in robot_rows:
        if row["kind"] in ("template_action", "multi_device_action"):
            services = [call["service"] for call in parse_reply(turns(row)[2]).calls]
            assert "fan.oscillate" not in services


def _add_form_column(piles: Path, form: str) -> None:
    """Give every device a grammatical form: its name upper-cased after "THE " (easy to spot)."""
    paths = sorted((piles / "english").glob("devices_*.csv")) + [piles / "english" / "room_devices.csv"]
    for path in paths:
        lines, name_column = [], None
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                cells = next(csv.reader([line]))
                if name_column is None:
                    name_column, value = cells.index("friendly_name"), form
                else:
                    value = "THE " + cells[name_column].upper().replace("{ROOM_NAME}", "{room_name}")
                line = f"{line},{value}"
            lines.append(line)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _use_form_in_actions(piles: Path) -> int:
    """Rewrite every "the {device}" in actions.csv as {device_acc}; returns the first changed line."""
    actions = piles / "english" / "actions.csv"
    lines = actions.read_text(encoding="utf-8").splitlines()
    changed = [index for index, line in enumerate(lines) if "the {device}" in line]
    lines = [line.replace("the {device}", "{device_acc}") for line in lines]
    actions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return changed[0] + 1


def test_grammatical_form_columns_fill_form_placeholders(tmp_path):
    piles = copy_piles(tmp_path)
    _add_form_column(piles, "acc")
    _use_form_in_actions(piles)
    generate(small_config(tmp_path, piles_dir=piles))
    rows = read_jsonl(tmp_path / "out" / "home_assistant_train.jsonl")
    used = [row for row in rows if row["kind"] == "template_action" and "THE " in turns(row)[1]]
    assert len(used) > 50
    for row in used:
        system, user, assistant = turns(row)
        target = parse_reply(assistant).calls[0]["target_device"]
        name = parse_system(system)[1][target][0]
        # the form in the request (a room device's form upper-cases all but the room), the plain name in the list
        assert re.search(f"THE (?i:{re.escape(name)})", user), (user, name)


def test_form_placeholder_without_form_column_is_an_error(tmp_path):
    piles = copy_piles(tmp_path)
    line = _use_form_in_actions(piles)
    with pytest.raises(PileError) as error:
        generate(small_config(tmp_path, piles_dir=piles))
    assert f"actions.csv:{line}" in str(error.value) and "'acc'" in str(error.value)


def test_missing_pile_file_is_an_error(tmp_path):
    piles = copy_piles(tmp_path)
    (piles / "english" / "grammar.csv").unlink()
    with pytest.raises(PileError, match="grammar.csv"):
        generate(small_config(tmp_path, piles_dir=piles))


# ------------------------------------------------------------------------------------------ merge


def test_merge_adds_alpaca_examples(tmp_path):
    merge = tmp_path / "alpaca.jsonl"
    records = [
        {"instruction": "Name a primary color.", "input": "", "output": "Red."},
        {"instruction": "Summarize:", "input": "The cat sat on the mat.", "output": "A cat sat."},
    ]
    merge.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    generate(small_config(tmp_path, merge=merge))
    rows = read_jsonl(tmp_path / "out" / "home_assistant_train.jsonl")
    merged = [row for row in rows if row["kind"] == "merged"]
    assert len(merged) == 2 and all(row["language"] == "english" for row in merged)
    users = {turns(row)[1] for row in merged}
    assert users == {"Name a primary color.", "Summarize:\n\nThe cat sat on the mat."}
    json_list = tmp_path / "alpaca.json"
    json_list.write_text(json.dumps(records, indent=2), encoding="utf-8")
    generate(small_config(tmp_path, merge=json_list, output_dir=tmp_path / "list"))
    rows = read_jsonl(tmp_path / "list" / "home_assistant_train.jsonl")
    assert sum(row["kind"] == "merged" for row in rows) == 2


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        ('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "a", oops}\n', 2, "bad JSON"),
        (
            '{"instruction": "a", "input": "", "output": "b"}\n\n{"input": "x", "output": "y"}\n',
            3,
            "instruction",
        ),
        ('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]\n', 3, "output"),
        ('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": \n]\n', 4, "bad JSON"),
    ],
)
def test_bad_merge_file_names_file_and_line(tmp_path, content, line, message):
    merge = tmp_path / "bad.json"
    merge.write_text(content, encoding="utf-8")
    with pytest.raises(DataGenError) as error:
        generate(small_config(tmp_path, merge=merge))
    assert f"{merge}:{line}" in str(error.value) and message in str(error.value)
    result = run_cli("--train", "--merge", str(merge), "--output_dir", str(tmp_path / "cli"))
    assert result.returncode == 2 and f"{merge}:{line}" in result.stderr


# ------------------------------------------------------------------------------------------ formats


def test_raw_corpus_text_is_what_train_py_renders_with_its_chatml_template(test_tokenizer, tmp_path):
    from chattune.models.chatml import CHATML_TEMPLATE, render_chatml

    generate(small_config(tmp_path, fmt="raw_corpus", output_dir=tmp_path / "raw"))
    generate(small_config(tmp_path, output_dir=tmp_path / "chat"))
    raw = read_jsonl(tmp_path / "raw" / "home_assistant_train.jsonl")
    chat = read_jsonl(tmp_path / "chat" / "home_assistant_train.jsonl")
    assert len(raw) == len(chat)
    for line, row in zip(raw[:20], chat):
        rendered = test_tokenizer.apply_chat_template(
            row["conversations"], chat_template=CHATML_TEMPLATE, tokenize=False
        )
        assert line["text"] == rendered == render_chatml(row["conversations"])
    prompt = chat[0]["conversations"][:2]
    assert render_chatml(prompt, add_generation_prompt=True) == test_tokenizer.apply_chat_template(
        prompt, chat_template=CHATML_TEMPLATE, tokenize=False, add_generation_prompt=True
    )


def test_raw_corpus_format(tmp_path):
    generate(small_config(tmp_path, fmt="raw_corpus"))
    rows = read_jsonl(tmp_path / "out" / "home_assistant_train.jsonl")
    assert {row["kind"] for row in rows} == ALL_KINDS
    for row in rows:
        assert set(row) == {"text", "language", "kind"}
        text = row["text"]
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n")
        assert text.count("<|im_start|>") == 3 and text.count("<|im_end|>") == 3
        assert "<|im_end|>\n<|im_start|>user\n" in text and "<|im_end|>\n<|im_start|>assistant\n" in text


def test_dpo_pairs(tmp_path):
    generate(small_config(tmp_path, dpo=True, train=False, test=False))
    rows = read_jsonl(tmp_path / "out" / "home_assistant_dpo.jsonl")
    assert len(rows) == 150
    assert {row["rejection"] for row in rows} == REJECTIONS
    keys = {"system", "question", "chosen", "rejected", "language", "kind", "rejection"}
    for row in rows:
        assert set(row) == keys and row["chosen"] != row["rejected"]
        assert parse_reply(row["chosen"]).json_valid and parse_reply(row["rejected"]).json_valid
        if row["rejection"] == "wrong_persona":
            assert parse_reply(row["chosen"]).calls == parse_reply(row["rejected"]).calls
        if row["rejection"] == "extra_call":
            assert len(parse_reply(row["rejected"]).calls) == len(parse_reply(row["chosen"]).calls) + 1
        if row["rejection"] == "missing_call":
            assert len(parse_reply(row["rejected"]).calls) == len(parse_reply(row["chosen"]).calls) - 1


def test_dpo_uses_train_devices_only(tmp_path):
    generate(small_config(tmp_path, dpo=True, train=False, test=False))
    pile = load_language(PILES, "english")
    test_ids = {device.entity_id for group in pile.devices.values() for device in group if device.split == "test"}
    for row in read_jsonl(tmp_path / "out" / "home_assistant_dpo.jsonl"):
        assert not set(parse_system(row["system"])[1]) & test_ids


@pytest.mark.parametrize("max_devices", [1, 3])
def test_max_devices_caps_the_device_list(tmp_path, max_devices):
    generate(small_config(tmp_path, max_devices=max_devices))
    rows = read_jsonl(tmp_path / "out" / "home_assistant_train.jsonl")
    for row in rows:
        assert 1 <= len(parse_system(turns(row)[0])[1]) <= max_devices
    kinds = {row["kind"] for row in rows}
    assert ("multi_device_action" in kinds) == (max_devices >= 2)


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import chattune.domains.homeassistant.datagen.writers as writers

    target = tmp_path / "out.jsonl"
    target.write_text("old\n", encoding="utf-8")

    def records():
        yield {"a": 1}
        raise RuntimeError("crash mid-way")

    with pytest.raises(RuntimeError):
        writers.write_jsonl(target, records())
    assert target.read_text(encoding="utf-8") == "old\n"
    assert [path.name for path in tmp_path.iterdir()] == ["out.jsonl"]
