"""evaluate.py: the pure scorer checked by hand, then the CLI end to end on a tiny random model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chattune.domains.homeassistant.reply_format import format_reply
from chattune.domains.homeassistant.scoring import METRIC_KEYS, ExampleScore, aggregate, score_example, summarize
from chattune.domains.metrics import bleu, rouge_l
from conftest import REPO, run_script, write_jsonl

KITCHEN_ON = {"service": "light.turn_on", "target_device": "light.kitchen"}
FAN_ON = {"service": "fan.turn_on", "target_device": "fan.bedroom"}
BEDROOM_ON = {"service": "light.turn_on", "target_device": "light.bedroom"}
RATE_KEYS = (
    "service_call_exact_match",
    "call_precision",
    "call_recall",
    "entity_accuracy",
    "json_valid_rate",
    "no_call_accuracy",
)


def block(*lines: str) -> str:
    return "Done.\n```homeassistant\n" + "\n".join(lines) + "\n```"


# --- one example -----------------------------------------------------------------------------------------


def test_call_order_is_ignored():
    score = score_example(format_reply("Done.", [KITCHEN_ON, FAN_ON]), format_reply("Done.", [FAN_ON, KITCHEN_ON]))
    assert score.exact_match
    assert (score.n_correct, score.n_predicted, score.n_expected) == (2, 2, 2)
    assert (score.n_entities_found, score.n_entities_expected) == (2, 2)


def test_whitespace_and_key_order_are_ignored():
    reply = block('  { "target_device" :"light.kitchen",   "service":"light.turn_on" }  ', "")
    score = score_example(format_reply("Done.", [KITCHEN_ON]), reply)
    assert score.exact_match and score.json_valid and score.n_correct == 1


def test_wrong_entity_counts_wrong():
    score = score_example(format_reply("On.", [KITCHEN_ON]), format_reply("On.", [BEDROOM_ON]))
    assert not score.exact_match
    assert (score.n_correct, score.n_predicted, score.n_expected) == (0, 1, 1)
    assert (score.n_entities_found, score.n_entities_expected) == (0, 1)
    metrics = aggregate([score])
    assert metrics["call_precision"] == 0.0 and metrics["call_recall"] == 0.0
    assert metrics["entity_accuracy"] == 0.0 and metrics["service_call_exact_match"] == 0.0


def test_right_entity_wrong_service_keeps_entity_credit():
    wrong_service = {"service": "light.turn_off", "target_device": "light.kitchen"}
    score = score_example(format_reply("On.", [KITCHEN_ON, FAN_ON]), format_reply("On.", [wrong_service, FAN_ON]))
    assert not score.exact_match
    assert (score.n_correct, score.n_predicted, score.n_expected) == (1, 2, 2)
    assert (score.n_entities_found, score.n_entities_expected) == (2, 2)


def test_extra_call_lowers_precision_not_recall():
    metrics = aggregate([score_example(format_reply("On.", [KITCHEN_ON]), format_reply("On.", [KITCHEN_ON, FAN_ON]))])
    assert metrics["service_call_exact_match"] == 0.0
    assert metrics["call_precision"] == 0.5 and metrics["call_recall"] == 1.0


def test_no_call_reference():
    right = score_example("The kitchen light is on.", "The kitchen light is on.")
    assert right.exact_match and not right.expects_call and not right.makes_call
    wrong = score_example("The kitchen light is on.", format_reply("Turning it on.", [KITCHEN_ON]))
    assert not wrong.exact_match and wrong.makes_call
    metrics = aggregate([right, wrong])
    assert metrics["no_call_accuracy"] == 0.5
    assert metrics["call_precision"] == 0.0  # one predicted call, none correct
    assert metrics["call_recall"] is None  # nothing was expected
    assert metrics["entity_accuracy"] is None


def test_malformed_json_is_invalid_and_never_raises():
    reply = block('{"service": "light.turn_on", "target_device": "light.kitchen"}', '{"service": light.turn_on')
    score = score_example(format_reply("Done.", [KITCHEN_ON]), reply)
    assert score.has_block and not score.json_valid
    assert not score.exact_match  # the readable line matches, but the block as a whole is broken
    assert score.n_correct == 1  # ... and that line still earns precision/recall credit
    assert aggregate([score])["json_valid_rate"] == 0.0


def test_malformed_block_is_not_a_correct_no_call():
    score = score_example("It is sunny.", "It is sunny.\n```homeassistant\n{not json}\n```")
    assert not score.json_valid and score.makes_call and not score.exact_match
    assert aggregate([score])["no_call_accuracy"] == 0.0


def test_unclosed_block_is_invalid():
    score = score_example(format_reply("On.", [KITCHEN_ON]), 'On.\n```homeassistant\n{"service": "light.tu')
    assert score.has_block and not score.json_valid and not score.exact_match


def test_replies_without_block_are_left_out_of_json_valid_rate():
    scores = [score_example("Hi.", "Hi."), score_example(format_reply("On.", [KITCHEN_ON]), "On.")]
    assert aggregate(scores)["json_valid_rate"] is None
    scores.append(score_example("Hi.", block("{oops")))
    assert aggregate(scores)["json_valid_rate"] == 0.0


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_any_model_output_scores_without_raising(reply):
    for text in (reply, "```homeassistant\n" + reply, "x\n```homeassistant\n" + reply + "\n```"):
        score = score_example(format_reply("On.", [KITCHEN_ON]), text)
        metrics = aggregate([score])
        assert all(metrics[key] is None or 0.0 <= metrics[key] <= 1.0 for key in RATE_KEYS)


# --- groups ----------------------------------------------------------------------------------------------


def hand_made_group() -> tuple[list[ExampleScore], list[str], list[str]]:
    """Five pairs whose expected numbers are worked out in the test below."""
    pairs = [
        # english / action: exact, 1 of 1 correct
        (format_reply("Turning on the kitchen light.", [KITCHEN_ON]), block(json.dumps(KITCHEN_ON))),
        # english / action: wrong device, 0 of 1 correct, entity missed
        (format_reply("Turning on the kitchen light.", [KITCHEN_ON]), format_reply("Turning on.", [BEDROOM_ON])),
        # english / status: no call expected, none made
        ("The fan is off.", "The fan is off."),
        # german / action: two expected, one right, one broken line
        (format_reply("Beides an.", [KITCHEN_ON, FAN_ON]), block(json.dumps(FAN_ON), '{"service": ')),
        # german / status: no call expected, one made
        ("Die Küche ist hell.", format_reply("Mache an.", [KITCHEN_ON])),
    ]
    scores = [score_example(reference, reply) for reference, reply in pairs]
    for score, (nll, tokens) in zip(scores, [(2.0, 2), (4.0, 2), (1.0, 1), (3.0, 3), (0.0, 2)]):
        score.nll_sum, score.n_tokens = nll, tokens
    languages = ["english", "english", "english", "german", "german"]
    kinds = ["action", "action", "status", "action", None]
    return scores, languages, kinds


def test_summary_by_language_and_kind_hand_checked():
    summary = summarize(*hand_made_group())
    assert set(METRIC_KEYS) | {"by_language", "by_kind"} == set(summary)
    assert summary["n_examples"] == 5
    assert summary["service_call_exact_match"] == pytest.approx(2 / 5)
    assert summary["call_precision"] == pytest.approx(2 / 4)  # correct: kitchen, fan; predicted: 1+1+1+1
    assert summary["call_recall"] == pytest.approx(2 / 4)  # expected: 1+1+2
    assert summary["entity_accuracy"] == pytest.approx(2 / 4)  # kitchen(yes) kitchen(no) kitchen(no) fan(yes)
    assert summary["json_valid_rate"] == pytest.approx(3 / 4)  # four replies with a block, one broken
    assert summary["no_call_accuracy"] == pytest.approx(1 / 2)
    assert summary["perplexity"] == pytest.approx(math.exp(10 / 10))

    english, german = summary["by_language"]["english"], summary["by_language"]["german"]
    assert english["n_examples"] == 3 and german["n_examples"] == 2
    assert english["service_call_exact_match"] == pytest.approx(2 / 3)
    assert english["call_precision"] == 0.5 and english["call_recall"] == 0.5
    assert english["json_valid_rate"] == 1.0 and english["no_call_accuracy"] == 1.0
    assert english["perplexity"] == pytest.approx(math.exp(7 / 5))
    assert german["service_call_exact_match"] == 0.0
    assert german["call_precision"] == 0.5 and german["call_recall"] == 0.5 and german["entity_accuracy"] == 0.5
    assert german["json_valid_rate"] == 0.5 and german["no_call_accuracy"] == 0.0
    assert german["perplexity"] == pytest.approx(math.exp(3 / 5))

    by_kind = summary["by_kind"]
    assert sorted(by_kind) == ["action", "status", "unknown"]  # a missing kind is grouped as "unknown"
    assert by_kind["action"]["no_call_accuracy"] is None  # every action expects a call
    assert by_kind["status"]["call_precision"] is None and by_kind["status"]["call_recall"] is None
    assert by_kind["status"]["service_call_exact_match"] == 1.0
    assert by_kind["unknown"]["call_precision"] == 0.0 and by_kind["unknown"]["entity_accuracy"] is None
    for group in [summary, *summary["by_language"].values(), *by_kind.values()]:
        assert set(METRIC_KEYS) <= set(group)
        assert all(group[key] is None or 0.0 <= group[key] <= 1.0 for key in RATE_KEYS)


def test_table_shows_every_group_and_dashes_for_none():
    from chattune.domains.homeassistant.task import HomeAssistantTask
    from chattune.evaluation.report import format_table

    table = format_table(summarize(*hand_made_group()), HomeAssistantTask())
    for row in ("overall", "language=english", "language=german", "kind=action", "kind=status", "kind=unknown"):
        assert row in table
    status_row = next(line for line in table.splitlines() if line.startswith("kind=status"))
    assert status_row.split()[2:4] == ["-", "-"]  # precision and recall: nothing predicted, nothing expected


def test_empty_group_is_all_none():
    metrics = aggregate([])
    assert metrics["n_examples"] == 0
    assert all(metrics[key] is None for key in METRIC_KEYS if key != "n_examples")


def test_text_metrics():
    assert bleu(["the kitchen light is on"], ["the kitchen light is on"]) == pytest.approx(100.0)
    assert rouge_l(["Die Küche ist hell"], ["die küche ist hell"]) == pytest.approx(1.0)  # umlauts kept
    assert rouge_l(["Zażółć gęślą"], ["jaźń"]) == 0.0
    assert rouge_l([""], [""]) == 1.0


# --- loading ---------------------------------------------------------------------------------------------


def test_load_examples_accepts_every_chat_format(tmp_path):
    from chattune.evaluation.inputs import load_examples

    sharegpt = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]
    openai = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "c"},
    ]
    write_jsonl(tmp_path / "s.jsonl", [{"conversations": sharegpt, "language": "german"}])
    write_jsonl(tmp_path / "o.jsonl", [{"messages": openai, "kind": "status"}])
    (first,) = load_examples(str(tmp_path / "s.jsonl"))
    assert first.reference == "b" and [m["role"] for m in first.prompt] == ["user", "assistant"]
    assert (first.language, first.kind) == ("german", "unknown")
    (second,) = load_examples(str(tmp_path / "o.jsonl"))
    assert second.reference == "c" and len(second.prompt) == 2 and second.kind == "status"


def test_unknown_path_exits_2(tmp_path, capsys):
    from chattune.commands.evaluate import main

    assert main([str(tmp_path / "missing"), "--test_dataset", str(tmp_path / "t.jsonl")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


# --- the model parts, in process -------------------------------------------------------------------------


def conversations(n: int = 6) -> list[dict]:
    rows = []
    for i in range(n):
        if i % 2 == 0:
            answer = format_reply("Turning on the kitchen light.", [KITCHEN_ON])
        else:
            answer = "The fan is off."
        rows.append(
            {
                "conversations": [
                    {"role": "system", "content": "You control the house. Devices: light.kitchen, fan.bedroom"},
                    {"role": "user", "content": "Turn on the kitchen light" + " please" * i},
                    {"role": "assistant", "content": answer},
                ],
                "language": "english" if i < 4 else "german",
                "kind": "template_action" if i % 2 == 0 else "status",
            }
        )
    return rows


@pytest.fixture(scope="module")
def loaded_tiny(tiny_model_dir):
    import torch

    from chattune.evaluation.runtime import generation_tokenizer, open_model
    from chattune.models.folders import inspect_model_folder

    source = inspect_model_folder(tiny_model_dir)
    tokenizer = generation_tokenizer(source)
    return tokenizer, open_model(source, tokenizer, "cpu", torch.float32)


def test_batched_perplexity_matches_one_at_a_time(loaded_tiny, tmp_path):
    import torch

    from chattune.data.masking import IGNORE_INDEX, ChatMasker
    from chattune.evaluation import generation, inputs

    tokenizer, model = loaded_tiny
    examples = inputs.load_examples(str(write_jsonl(tmp_path / "t.jsonl", conversations())))
    batched = generation.reference_nll(model, tokenizer, examples, 4, "cpu")
    masker = ChatMasker(tokenizer)
    for example, (nll, tokens) in zip(examples, batched):
        ids, labels = generation.reference_token_ids(masker, example)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        targets = torch.tensor(labels[1:])
        expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        assert tokens == int((targets != IGNORE_INDEX).sum())
        assert nll == pytest.approx(float(expected), rel=1e-4)


def test_batched_generation_matches_one_at_a_time(loaded_tiny, tmp_path):
    from chattune.evaluation import generation, inputs

    tokenizer, model = loaded_tiny
    examples = inputs.load_examples(str(write_jsonl(tmp_path / "t.jsonl", conversations(4))))
    prompts = generation.render_prompts(tokenizer, examples)
    batched, _ = generation.generate_replies(model, tokenizer, prompts, 4, 6, "cpu")
    assert batched == generation.generate_replies(model, tokenizer, prompts, 1, 6, "cpu")[0]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation.stop_token_ids(model, tokenizer)


def test_generation_from_the_reference_pass_matches_plain_generation(loaded_tiny, tmp_path):
    """Replies generated from the cache of the prompt+reference pass are the plain replies, and the NLLs
    that pass yields are the separate teacher-forced ones."""
    from chattune.data.masking import ChatMasker
    from chattune.evaluation import generation, inputs

    tokenizer, model = loaded_tiny
    examples = inputs.load_examples(str(write_jsonl(tmp_path / "t.jsonl", conversations())))
    prompts = generation.render_prompts(tokenizer, examples)
    continuations = generation.reference_continuations(ChatMasker(tokenizer), examples, prompts)
    assert all(c is not None for c in continuations)
    plain, no_nlls = generation.generate_replies(model, tokenizer, prompts, 3, 8, "cpu")
    replies, nlls = generation.generate_replies(model, tokenizer, prompts, 3, 8, "cpu", continuations)
    assert replies == plain and no_nlls == [None] * len(examples)
    separate = generation.reference_nll(model, tokenizer, examples, 3, "cpu")
    for (nll, tokens), (expected, expected_tokens) in zip(nlls, separate):
        assert tokens == expected_tokens
        assert nll == pytest.approx(expected, rel=1e-4)


def test_a_shared_system_prompt_is_computed_once_with_the_same_replies(loaded_tiny, tmp_path, monkeypatch):
    """Rows that open with one long system prompt (one house) run it once for the batch: the replies and the
    reference NLLs are those of each row run alone, with and without references, and rows of other lengths
    are padded between the shared head and their own tail."""
    from chattune.data.masking import ChatMasker
    from chattune.evaluation import generation, inputs

    tokenizer, model = loaded_tiny
    rows = conversations()
    house = "You control the house. Devices: " + ", ".join(f"light.room_{i} 'Room {i} light' = off" for i in range(12))
    for row in rows:
        row["conversations"][0]["content"] = house
    examples = inputs.load_examples(str(write_jsonl(tmp_path / "t.jsonl", rows)))
    prompts = generation.render_prompts(tokenizer, examples)
    assert generation.shared_prefix_length(prompts) >= generation.MIN_SHARED_PREFIX
    continuations = generation.reference_continuations(ChatMasker(tokenizer), examples, prompts)
    heads = []
    real_prefill = generation.prefill

    def spy(model, ids, mask, wanted, pad_id, prefix=0):
        heads.append(prefix)
        return real_prefill(model, ids, mask, wanted, pad_id, prefix)

    monkeypatch.setattr(generation, "prefill", spy)
    alone, alone_nlls = generation.generate_replies(model, tokenizer, prompts, 1, 8, "cpu", continuations)
    assert heads and not any(heads)  # one row a batch: nothing is shared
    heads.clear()
    shared, shared_nlls = generation.generate_replies(model, tokenizer, prompts, 6, 8, "cpu", continuations)
    assert heads and all(head >= generation.MIN_SHARED_PREFIX for head in heads)
    assert shared == alone
    for (nll, tokens), (expected, expected_tokens) in zip(shared_nlls, alone_nlls):
        assert tokens == expected_tokens
        assert nll == pytest.approx(expected, rel=1e-4)
    assert generation.generate_replies(model, tokenizer, prompts, 6, 8, "cpu")[0] == alone


def test_shared_prefix_leaves_every_row_a_token_of_its_own():
    from chattune.evaluation import generation

    assert generation.shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert generation.shared_prefix_length([[1, 2, 3, 4], [1, 2]]) == 1
    assert generation.shared_prefix_length([[1, 2], [3, 2]]) == 0
    ids, mask = generation.pad_after_prefix([[1, 2, 3, 4], [1, 2, 5]], 2, 0, "cpu")
    assert ids.tolist() == [[1, 2, 3, 4], [1, 2, 0, 5]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 1]]


def test_reply_budget_follows_the_longest_reference(loaded_tiny, tmp_path):
    from chattune.evaluation import generation, inputs

    tokenizer, _ = loaded_tiny
    examples = inputs.load_examples(str(write_jsonl(tmp_path / "t.jsonl", conversations())))
    longest = max(len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in examples)
    assert generation.auto_max_new_tokens(tokenizer, examples) == longest * 5 // 4 + 8


# --- the CLI, end to end ---------------------------------------------------------------------------------


def check_run(result, folder: Path) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(METRIC_KEYS) | {"by_language", "by_kind"} <= set(summary)
    assert summary["n_examples"] == 6
    assert all(summary[key] is None or 0.0 <= summary[key] <= 1.0 for key in RATE_KEYS)
    assert math.isfinite(summary["perplexity"]) and summary["perplexity"] > 1
    assert 0.0 <= summary["bleu"] <= 100.0 and 0.0 <= summary["rougeL"] <= 1.0
    assert set(summary["by_language"]) == {"english", "german"}
    assert set(summary["by_kind"]) == {"template_action", "status"}
    saved = json.loads((folder / "eval_results.json").read_text(encoding="utf-8"))
    assert saved["summary"] == summary and saved["settings"]["n_examples"] == 6
    failures = [json.loads(line) for line in (folder / "eval_failures.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(failures) == round((1 - summary["service_call_exact_match"]) * 6)
    for failure in failures:
        assert {"prompt", "expected", "got", "language", "kind"} <= set(failure)
    return summary


@pytest.mark.slow
def test_cli_full_model(tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    data = write_jsonl(tmp_path / "test.jsonl", conversations())
    result = run_script(
        "evaluate.py",
        str(model),
        "--test_dataset",
        str(data),
        "--batch_size",
        "4",
        "--max_new_tokens",
        "8",
        "--json",
        "--device",
        "cpu",
    )
    check_run(result, model)


@pytest.mark.slow
def test_cli_lora_adapter(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(adapter_config["base_model_name_or_path"]) == Path(tiny_model_dir)

    data = write_jsonl(tmp_path / "test.jsonl", conversations())
    result = run_script(
        "evaluate.py", str(adapter), "--test_dataset", str(data), "--batch_size", "3", "--max_new_tokens", "8", "--json"
    )
    check_run(result, adapter)
    assert json.loads((adapter / "eval_results.json").read_text())["settings"]["model_kind"] == "adapter"


def save_to_hf_cache(model_dir: Path, hf_home: Path, repo_id: str) -> Path:
    """A copy of `model_dir` laid out as the Hugging Face cache holds a downloaded model (refs/main names the
    snapshot of one commit)."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_a_hub_id_not_in_the_cache_is_named(tmp_path, capsys):
    from chattune.commands.evaluate import main

    data = write_jsonl(tmp_path / "test.jsonl", conversations(1))
    assert main(["chattune-tests/never-downloaded", "--test_dataset", str(data)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "chattune-tests/never-downloaded: no such folder, and not a hub model in the local" in line
    assert "hf download chattune-tests/never-downloaded" in line


@pytest.mark.slow
def test_cli_reads_a_hub_id_from_the_local_cache_offline(tiny_model_dir, tmp_path, monkeypatch):
    snapshot = save_to_hf_cache(tiny_model_dir, tmp_path / "hf", "chattune-tests/tiny-llama")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    data = write_jsonl(tmp_path / "test.jsonl", conversations())
    work = tmp_path / "work"
    work.mkdir()
    evaluate = [str(REPO / "evaluate.py"), "chattune-tests/tiny-llama", "--max_new_tokens", "8", "--json"]
    # run_script sets HF_HUB_OFFLINE=1: nothing may come from the network
    result = run_script(*evaluate, "--test_dataset", str(data), cwd=work)
    results = work / "chattune-tests--tiny-llama-eval"
    check_run(result, results)
    assert json.loads((results / "eval_results.json").read_text())["settings"]["model"] == "chattune-tests/tiny-llama"
    assert not (snapshot / "eval_results.json").exists()  # nothing written into the cache


@pytest.mark.slow
def test_cli_rejects_folder_that_is_not_a_model(tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    data = write_jsonl(tmp_path / "test.jsonl", conversations(1))
    result = run_script("evaluate.py", str(folder), "--test_dataset", str(data))
    assert result.returncode == 2
    for expected in ("config.json", "model.safetensors", "adapter_config.json", "notes.txt"):
        assert expected in result.stderr


@pytest.mark.slow
def test_cli_rejects_wrong_columns(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "wrong.jsonl", [{"prompt": "hi", "completion": "there"}])
    result = run_script("evaluate.py", str(tiny_model_dir), "--test_dataset", str(data))
    assert result.returncode == 2
    assert "wrong.jsonl" in result.stderr and "conversations" in result.stderr and "messages" in result.stderr
    assert not (tiny_model_dir / "eval_results.json").exists()
