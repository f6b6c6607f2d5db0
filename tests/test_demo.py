"""The demo's data augmentation: renamed devices stay consistent inside an example and never leak test names."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)

ROW = {
    "conversations": [
        {
            "role": "system",
            "content": "You are a friendly smart home assistant.\nDevices:\n"
            "light.kitchen_ceiling 'Kitchen Ceiling Light' = off\nlock.front_door 'Front Door Lock' = locked",
        },
        {"role": "user", "content": "Turn on the Kitchen Ceiling Light and unlock the Front Door Lock"},
        {
            "role": "assistant",
            "content": "Turning on the Kitchen Ceiling Light and unlocking the Front Door Lock.\n```homeassistant\n"
            '{"service": "light.turn_on", "target_device": "light.kitchen_ceiling"}\n'
            '{"service": "lock.unlock", "target_device": "lock.front_door"}\n```',
        },
    ]
}


def renamed(tmp_path: Path, seed: int) -> list[dict]:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROW) + "\n")
    demo.rename_devices(path, seed=seed)
    return json.loads(path.read_text())["conversations"]


def test_renamed_devices_are_consistent_across_turns(tmp_path):
    for seed in range(5):
        system, user, assistant = (turn["content"] for turn in renamed(tmp_path, seed))
        listed = {name: f"{domain}.{slug}" for domain, slug, name in demo.DEVICE_LINE.findall(system)}
        assert "Kitchen Ceiling Light" not in system + user + assistant
        assert len(listed) == 2 and all(name.endswith(("Light", "Lock")) for name in listed)
        for name, entity in listed.items():
            assert name in user and name in assistant
            assert f'"target_device": "{entity}"' in assistant
        assert re.fullmatch(r"light\.[a-z0-9_]+", listed[next(n for n in listed if n.endswith("Light"))])


def test_rename_words_exclude_test_device_words():
    words = set(demo.pile_words())
    test_words = {word for name in demo.pile_device_names(split="test") for word in name.split()}
    assert test_words and not words & test_words
    assert len(words) > 1000


def test_names_first_rewrites_only_the_device_lines(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(ROW) + "\n")
    demo.names_first(path)
    system, user, assistant = (turn["content"] for turn in json.loads(path.read_text())["conversations"])
    assert system.splitlines()[2:] == [
        "'Kitchen Ceiling Light' light.kitchen_ceiling = off",
        "'Front Door Lock' lock.front_door = locked",
    ]
    assert (user, assistant) == (ROW["conversations"][1]["content"], ROW["conversations"][2]["content"])
