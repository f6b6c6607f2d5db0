"""The shared reply format: rendering and parsing ```homeassistant blocks, comparing call lists."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from chattune.domains.homeassistant.reply_format import (
    calls_equal,
    format_calls,
    format_reply,
    normalize_call,
    parse_reply,
)

KITCHEN_ON = {"service": "light.turn_on", "target_device": "light.kitchen", "brightness": 80}
FAN_OFF = {"service": "fan.turn_off", "target_device": "fan.bedroom"}
VOLUME = {"service": "media_player.volume_set", "target_device": "media_player.kitchen", "volume_level": 0.4}


def test_format_calls_renders_one_json_line_per_call():
    assert format_calls([KITCHEN_ON, FAN_OFF]) == (
        "```homeassistant\n"
        '{"service": "light.turn_on", "target_device": "light.kitchen", "brightness": 80}\n'
        '{"service": "fan.turn_off", "target_device": "fan.bedroom"}\n'
        "```"
    )


def test_round_trip():
    reply = format_reply("Turning on the light and off the fan.", [KITCHEN_ON, FAN_OFF])
    parsed = parse_reply(reply)
    assert parsed.sentence == "Turning on the light and off the fan."
    assert parsed.calls == [KITCHEN_ON, FAN_OFF]
    assert parsed.json_valid and parsed.has_block


def test_reply_without_calls_has_no_block():
    assert format_reply("The light is on.", []) == "The light is on."
    parsed = parse_reply("The light is on.")
    assert parsed.sentence == "The light is on." and parsed.calls == []
    assert parsed.json_valid and not parsed.has_block


def test_calls_equal_ignores_call_order():
    assert calls_equal([KITCHEN_ON, FAN_OFF], [FAN_OFF, KITCHEN_ON])


def test_calls_equal_ignores_key_order_and_json_whitespace():
    text = (
        'ok\n```homeassistant\n{ "brightness":80,"target_device" : "light.kitchen",   "service":"light.turn_on" }\n```'
    )
    assert calls_equal(parse_reply(text).calls, [KITCHEN_ON])


def test_calls_equal_numbers_with_tolerance():
    assert calls_equal([VOLUME], [{**VOLUME, "volume_level": 0.40}])
    assert calls_equal([KITCHEN_ON], [{**KITCHEN_ON, "brightness": 80.0}])
    assert not calls_equal([VOLUME], [{**VOLUME, "volume_level": 0.45}])


def test_calls_equal_is_a_multiset_comparison():
    assert not calls_equal([FAN_OFF, FAN_OFF], [FAN_OFF])
    assert not calls_equal([FAN_OFF, FAN_OFF], [FAN_OFF, KITCHEN_ON])
    assert calls_equal([], [])


def test_wrong_entity_is_not_equal():
    assert not calls_equal([KITCHEN_ON], [{**KITCHEN_ON, "target_device": "light.kitchen_island"}])
    assert not calls_equal([KITCHEN_ON], [{**KITCHEN_ON, "service": "light.turn_off"}])


def test_booleans_are_not_numbers():
    oscillate = {"service": "fan.oscillate", "target_device": "fan.bedroom", "oscillating": True}
    assert not calls_equal([oscillate], [{**oscillate, "oscillating": 1}])


def test_malformed_json_line_is_counted_invalid_without_raising():
    text = 'Done.\n```homeassistant\n{"service": "fan.turn_off", "target_device": "fan.bedroom"}\n{oops\n```'
    parsed = parse_reply(text)
    assert parsed.has_block and not parsed.json_valid
    assert parsed.calls == [FAN_OFF]  # the good line is still returned


def test_non_object_json_and_unclosed_block_are_invalid():
    assert not parse_reply("x\n```homeassistant\n[1, 2]\n```").json_valid
    unclosed = parse_reply('x\n```homeassistant\n{"service": "fan.turn_off", "target_device": "fan.bedroom"}')
    assert unclosed.has_block and not unclosed.json_valid and unclosed.calls == [FAN_OFF]


def test_normalize_call_is_canonical():
    shuffled = {"brightness": 80.0, "service": "light.turn_on", "target_device": " light.kitchen"}
    assert normalize_call(shuffled) == normalize_call(KITCHEN_ON)
    assert normalize_call(VOLUME) == normalize_call(json.loads(json.dumps(VOLUME)))


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300))
def test_parse_reply_never_raises(text):
    for candidate in (text, "```homeassistant\n" + text, "a\n```homeassistant\n" + text + "\n```"):
        parsed = parse_reply(candidate)
        assert isinstance(parsed.calls, list)
        assert all(isinstance(call, dict) for call in parsed.calls)
