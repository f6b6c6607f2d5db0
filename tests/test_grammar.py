"""Constrained decoding: the grammar a task builds for one prompt, and both runtimes that apply it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chattune.domains.homeassistant.datagen.devices import SERVICES
from chattune.domains.homeassistant.grammar import House, house_from_text, house_grammar
from chattune.domains.homeassistant.reply_format import format_reply, parse_reply
from chattune.domains.homeassistant.task import HomeAssistantTask
from chattune.domains.tool_calling.grammar import tools_grammar
from chattune.evaluation import inputs
from chattune.evaluation.inputs import Example
from chattune.evaluation.runtime import generation_tokenizer, open_model
from chattune.models.folders import inspect_model_folder
from conftest import run_script, write_jsonl

llguidance = pytest.importorskip("llguidance", reason="the grammar engine llguidance is not installed")
REPO = Path(__file__).resolve().parents[1]
HANDWRITTEN = REPO / "data" / "home_assistant_handwritten.jsonl"


@pytest.fixture(scope="module")
def ll_tokenizer(test_tokenizer):
    import llguidance.hf

    return llguidance.hf.from_tokenizer(test_tokenizer)


def accepts(grammar: str, text: str, tokenizer, ll_tokenizer) -> bool:
    """Whether `grammar` accepts the whole of `text` (then a stop): the question every decoding step asks."""
    matcher = llguidance.LLMatcher(ll_tokenizer, llguidance.grammar_from("gbnf", grammar))
    assert not matcher.is_error(), matcher.get_error()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return matcher.consume_tokens(ids) and matcher.is_accepting()


def prompt(devices: list[tuple[str, str, str]], services: str | None = None) -> str:
    listed = services if services is not None else ", ".join(
        spec.signature() for domain in dict.fromkeys(d[0].split(".")[0] for d in devices) for spec in SERVICES[domain]
    )  # fmt: skip
    lines = [f"{entity} '{name}' = {state}" for entity, name, state in devices]
    return "\n".join(["You are a friendly smart home assistant.", f"Services: {listed}", "Devices:", *lines])


HOUSE = prompt(
    [
        ("light.kitchen", "Kitchen Lights", "on;60%"),
        ("fan.kitchen", "Kitchen Fan", "off"),
        ("media_player.living_room", "Living Room TV", "idle;vol=0.3"),
        ("climate.hall", "Hall Thermostat", "heat;20°C;40%"),
        ("timer.oven", "Oven Timer", "idle"),
    ]
)


def call(service: str, target: str, **args) -> dict:
    return {"service": service, "target_device": target, **args}


def test_the_house_is_read_from_its_services_and_devices_lines():
    house = house_from_text(HOUSE)
    assert house.devices == ("light.kitchen", "fan.kitchen", "media_player.living_room", "climate.hall", "timer.oven")
    assert house.services["light.turn_on"] == ("brightness", "rgb_color")
    assert house_from_text("You are a helpful assistant.") is None  # no Devices line: no house, no grammar


@pytest.mark.parametrize(
    "calls",
    [
        [],
        [call("light.turn_on", "light.kitchen")],
        [call("light.turn_on", "light.kitchen", brightness=100, rgb_color=[255, 0, 12])],
        [call("fan.set_percentage", "fan.kitchen", percentage=35), call("light.turn_off", "light.kitchen")],
        [call("media_player.volume_set", "media_player.living_room", volume_level=0.45)],
        [call("climate.set_hvac_mode", "climate.hall", hvac_mode="heat_cool")],
        [call("climate.set_temperature", "climate.hall", temperature=21.5)],
        [call("timer.start", "timer.oven", duration="00:12:30")],
        [call("media_player.play_media", "media_player.living_room", media_content_id='Jazz "live" \\ mix')],
    ],
)
def test_the_grammar_accepts_what_the_house_allows(calls, test_tokenizer, ll_tokenizer):
    reply = format_reply("Done, with an apostrophe's worth of text!", calls)
    assert accepts(house_grammar(house_from_text(HOUSE)), reply, test_tokenizer, ll_tokenizer)


@pytest.mark.parametrize(
    "bad",
    [
        call("light.turn_on", "light.garage"),  # an id that is not listed
        call("light.turn_on", "fan.kitchen"),  # a service of another domain than the entity's
        call("fan.set_speed", "fan.kitchen"),  # a service that is not listed
        call("light.turn_on", "light.kitchen", brightness=140),  # out of range
        call("light.turn_on", "light.kitchen", rgb_color=[256, 0, 0]),  # not a byte
        call("media_player.volume_set", "media_player.living_room", volume_level=40),  # volume is 0-1
        call("climate.set_hvac_mode", "climate.hall", hvac_mode="19"),  # not a mode
        call("timer.start", "timer.oven", duration="12 minutes"),  # not HH:MM:SS
        call("switch.turn_on", "light.kitchen"),  # switch has no listed device
        call("light.turn_on", "light.kitchen", percentage=40),  # an argument light.turn_on does not take
        call("fan.set_percentage", "fan.kitchen"),  # its required argument missing
    ],
)
def test_the_grammar_rejects_what_the_house_does_not_have(bad, test_tokenizer, ll_tokenizer):
    grammar = house_grammar(house_from_text(HOUSE))
    assert not accepts(grammar, format_reply("Sure.", [bad]), test_tokenizer, ll_tokenizer)


def test_an_empty_house_allows_only_a_reply_without_a_block(test_tokenizer, ll_tokenizer):
    grammar = house_grammar(House(services={"light.turn_on": ()}, devices=()))
    assert accepts(grammar, "There is nothing I can control.", test_tokenizer, ll_tokenizer)
    assert not accepts(grammar, format_reply("On.", [call("light.turn_on", "light.x")]), test_tokenizer, ll_tokenizer)


# Entity ids and names as Home Assistant users write them, and the characters that need escaping in GBNF and JSON.
_ID_CHARS = st.sampled_from(list("abcxyz019_") + ["ü", "ł", "é", '"', "\\"])
_NAME_CHARS = st.sampled_from(list("Ab z9_'") + ["Ü", "ñ", "東", '"', "\\"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    devices=st.lists(
        st.tuples(
            st.sampled_from(["light", "switch", "fan", "cover", "lock"]),
            st.text(_ID_CHARS, min_size=1, max_size=12),
            st.text(_NAME_CHARS, min_size=1, max_size=16),
        ),
        min_size=1,
        max_size=6,
        unique_by=lambda d: (d[0], d[1]),
    ),
    pick=st.integers(min_value=0),
)
def test_awkward_ids_and_names_are_escaped(devices, pick, test_tokenizer, ll_tokenizer):
    listed = [(f"{domain}.{object_id}", name, "off") for domain, object_id, name in devices]
    house = house_from_text(prompt(listed))
    assert house is not None and list(house.devices) == [entity for entity, _, _ in listed]
    entity = listed[pick % len(listed)][0]
    service = SERVICES[entity.split(".")[0]][0]
    reply = format_reply("Okay.", [call(service.full_name, entity)])
    grammar = house_grammar(house)
    assert accepts(grammar, reply, test_tokenizer, ll_tokenizer)
    assert not accepts(grammar, reply.replace(json.dumps(entity, ensure_ascii=False), '"light.unlisted"'),
                       test_tokenizer, ll_tokenizer)  # fmt: skip


def test_every_reference_reply_of_the_test_split_and_the_handwritten_set_is_accepted(
    tmp_path, test_tokenizer, ll_tokenizer
):
    run_script(
        "data/generate_home_assistant_data.py", "--test", "--small", "--language", "english", "--compact_prompt",
        "--max_devices", "12", "--output_dir", str(tmp_path),
    )  # fmt: skip
    task = HomeAssistantTask()
    for path in (tmp_path / "home_assistant_test.jsonl", HANDWRITTEN):
        examples = inputs.load_examples(str(path))
        rejected = [
            index + 1
            for index, example in enumerate(examples)
            if not accepts(task.grammar(example), example.reference, test_tokenizer, ll_tokenizer)
        ]
        assert len(examples) > 50 and rejected == [], f"{path.name}: rows {rejected}"


def test_tool_grammar_allows_the_rows_tools_and_their_argument_types(test_tokenizer, ll_tokenizer):
    tools = [
        {"type": "function", "function": {"name": "HassTurnOn", "parameters": {"type": "object", "properties": {
            "name": {"type": "string"}, "domain": {"type": "array", "items": {"type": "string"}}}}}},
        {"type": "function", "function": {"name": "HassLightSet", "parameters": {"type": "object", "properties": {
            "brightness": {"type": "integer", "minimum": 0, "maximum": 100},
            "mode": {"type": "string", "enum": ["warm", "cold"]}}}}},
    ]  # fmt: skip
    grammar = tools_grammar(tools)
    good = '<tool_call>{"name": "HassLightSet", "arguments": {"mode": "warm", "brightness": 40}}</tool_call>'
    assert accepts(grammar, "Dimming.\n" + good, test_tokenizer, ll_tokenizer)
    assert accepts(grammar, '<tool_call>{"name": "HassTurnOn", "arguments": {"domain": ["light"]}}</tool_call>',
                   test_tokenizer, ll_tokenizer)  # fmt: skip
    for bad in (good.replace("HassLightSet", "HassFly"), good.replace('"warm"', '"blue"'), good.replace("40", "400"),
                good.replace('"mode"', '"color"')):  # fmt: skip
        assert not accepts(grammar, bad, test_tokenizer, ll_tokenizer)


def _bias_towards(text: str, tokenizer, strength: float = 50.0):
    """A logits processor that pushes greedy decoding towards `text`'s tokens: a model that wants to misbehave."""
    import torch
    from transformers import LogitsProcessor

    wanted = torch.tensor(sorted(set(tokenizer(text, add_special_tokens=False)["input_ids"])))

    class Bias(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, wanted] += strength
            return scores

    return Bias()


def test_a_constrained_greedy_decode_never_names_an_unlisted_id(tiny_model_dir, test_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    from chattune.evaluation.constrained import GrammarCompiler, GrammarLogitsProcessor
    from chattune.evaluation.generation import stop_token_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    grammar = house_grammar(house_from_text(HOUSE))
    stops = stop_token_ids(model, test_tokenizer)
    compiler = GrammarCompiler(test_tokenizer, model.get_output_embeddings().weight.shape[0], stops)
    ids = test_tokenizer("Turn on the garage light", return_tensors="pt")["input_ids"]
    temptation = '```homeassistant\n{"service": "light.turn_on", "target_device": "light.garage"}'
    for strength in (0.0, 5.0, 50.0):
        bias = _bias_towards(temptation, test_tokenizer, strength)
        processors = LogitsProcessorList([bias, GrammarLogitsProcessor([compiler.matcher(grammar)], stops)])
        with torch.inference_mode():
            out = model.generate(
                ids, max_new_tokens=60, do_sample=False, logits_processor=processors, eos_token_id=stops
            )
        reply = test_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        parsed = parse_reply(reply)
        assert "light.garage" not in reply
        assert all(c.get("target_device") in house_from_text(HOUSE).devices for c in parsed.calls)
    assert parsed.has_block  # the strongest push did open a block: the grammar, not the model, kept the ids right


def test_a_prompt_without_devices_is_generated_free_and_counted(tiny_model_dir, test_tokenizer, tmp_path):
    import torch

    from chattune.evaluation.scored import generate_and_score

    rows = [
        {"conversations": [{"role": "system", "content": HOUSE}, {"role": "user", "content": "lights on"},
                           {"role": "assistant", "content": "On."}]},
        {"conversations": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi."}]},
    ]  # fmt: skip
    examples = inputs.load_examples(str(write_jsonl(tmp_path / "t.jsonl", rows)))
    source = inspect_model_folder(tiny_model_dir)
    model = open_model(source, test_tokenizer, "cpu", torch.float32)
    scored = generate_and_score(model, test_tokenizer, examples, HomeAssistantTask(), 2, "cpu", 16, constrain=True)
    assert scored.unconstrained_rows == [2]
    assert len(scored.replies) == 2


def test_evaluate_without_the_grammar_engine_says_so_before_loading(monkeypatch, tmp_path):
    import sys

    from chattune.commands.evaluate import parse_args

    monkeypatch.setitem(sys.modules, "llguidance", None)  # as if not installed
    with pytest.raises(inputs.EvalError, match="llguidance, which is not installed: pip install llguidance"):
        parse_args([str(tmp_path / "no-model"), "--constrain", "--gguf_runtime", "transformers"])


def test_grammar_command_writes_a_house_file(tmp_path):
    out = tmp_path / "house.gbnf"
    result = run_script("scripts/house_grammar.py", str(HANDWRITTEN), "--row", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text(encoding="utf-8")
    assert text.startswith("root ::=") and '"\\"light.bedroom_2\\""' in text
    missing = run_script("scripts/house_grammar.py", str(tmp_path / "none.txt"))
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error: ")


def test_both_runtimes_decode_the_same_under_the_grammar(tiny_model_dir, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp)")
    import torch

    from chattune.evaluation import generation
    from chattune.evaluation.llama_cpp import LlamaCppModel
    from chattune.export.gguf import export_gguf

    gguf_file = export_gguf(tiny_model_dir, "f32", out=tmp_path / "tiny-f32.gguf")
    rows = [
        {"conversations": [{"role": "system", "content": HOUSE}, {"role": "user", "content": f"request {i}"},
                           {"role": "assistant", "content": "x"}]}
        for i in range(4)
    ]  # fmt: skip
    examples = [Example(r["conversations"][:2], "x", "english", "action") for r in rows]
    source = inspect_model_folder(tiny_model_dir)
    tokenizer = generation_tokenizer(source)
    hf_model = open_model(source, tokenizer, "cpu", torch.float32)
    # Forced into the block, so the grammar decides the structure and the model only which id and service.
    grammars = [house_grammar(house_from_text(HOUSE)).replace("root ::= text block?", "root ::= block")] * len(rows)
    prompts = generation.render_prompts(tokenizer, examples)
    texts = generation.render_prompt_texts(tokenizer, examples)
    # Enough tokens to finish the block: llguidance only allows the canonical tokens of text the grammar forces
    # (`{"` as one token where it is one), llama.cpp any spelling of it, so on random weights llama.cpp takes more
    # tokens for the same text. A trained model writes the canonical tokens either way.
    expected, _ = generation.generate_replies(hf_model, tokenizer, prompts, 2, 120, "cpu", grammars=grammars)
    gguf = open_model(inspect_model_folder(gguf_file, gguf_runtime="llama.cpp"), tokenizer, "cpu", None)
    assert isinstance(gguf, LlamaCppModel)
    replies, _ = gguf.generate_replies(texts, prompts, 120, progress=False, grammars=grammars)
    gguf.close()
    assert replies == expected
    assert all(reply.startswith("```homeassistant") and reply.endswith("```") for reply in replies)
