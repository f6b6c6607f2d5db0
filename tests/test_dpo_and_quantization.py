"""Preference training (DPO, SimPO, ORPO, KTO) and quantized bases (QLoRA 4-bit, 8-bit, GPTQ guard), on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from chattune.config.flags import FlagError, parse_flags
from chattune.data.formats import DataError
from chattune.models.loading import quantization_config
from chattune.training.trainers.preference import check_method, load_pairs, load_preferences
from conftest import TRAIN, chat_rows, generates, run_script, train_argv, write_jsonl


def pairs(n: int = 16) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append(
            {
                "system": "You control the house.",
                "question": f"Turn on the kitchen light {i}",
                "chosen": f'Turning it on.\n```homeassistant\n{{"service": "light.turn_on", "n": {i}}}\n```',
                "rejected": "I cannot help with that.",
            }
        )
    return rows


def run(tmp_path, base, data, *extra, steps: int = 12):
    result = run_script(
        TRAIN,
        *train_argv(
            base, data, tmp_path, *extra, max_steps=steps, learning_rate="2e-3", logging_steps=1, save_steps=steps
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((tmp_path / "runs" / "run" / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry], result.stderr


def test_dpo_raises_the_reward_margin(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs())
    logs, _ = run(tmp_path, tiny_model_dir, data, "--dpo", "--beta", "0.1", "--dpo_loss", "sigmoid", steps=24)
    margins = [entry["rewards/margins"] for entry in logs]
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the first step
    assert sum(margins[-4:]) / 4 > 0.5
    assert all(entry["rewards/accuracies"] == 1.0 for entry in logs[-4:])
    assert logs[-1]["num_input_tokens_seen"] > logs[0]["num_input_tokens_seen"] > 0  # the summary's "tokens seen"
    generates(tmp_path / "models" / "run")


def test_dpo_lora_merge_on_trl_conversational_pairs(tiny_model_dir, tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": r["question"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in pairs()
    ]
    data = write_jsonl(tmp_path / "trl.jsonl", rows)
    logs, _ = run(
        tmp_path,
        tiny_model_dir,
        data,
        "--dpo",
        "--dpo_loss",
        "ipo",
        "--use_lora",
        "--lora_merge",
        "--learning_rate",
        "1e-2",
    )
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
    assert (tmp_path / "loras" / "run" / "adapter_config.json").is_file()
    generates(tmp_path / "models" / "run")


def test_simpo_runs_reference_free(tiny_model_dir, tmp_path):
    rows = [{"prompt": r["question"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in pairs()]
    logs, _ = run(
        tmp_path,
        tiny_model_dir,
        write_jsonl(tmp_path / "plain.jsonl", rows),
        "--dpo",
        "--simpo",
        "--beta",
        "2.0",
        "--simpo_gamma",
        "0.5",
        steps=6,
    )
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]


def conversations(row: dict, answer: str) -> list[dict]:
    return [
        {"role": "system", "content": row["system"]},
        {"role": "user", "content": row["question"]},
        {"role": "assistant", "content": row[answer]},
    ]


def implicit_prompt_pairs() -> list[dict]:
    """TRL's implicit-prompt pairs: whole conversations whose shared first messages are the prompt."""
    return [{"chosen": conversations(r, "chosen"), "rejected": conversations(r, "rejected")} for r in pairs()]


def unpaired_rows() -> list[dict]:
    """KTO's rows: one completion each, labelled good (the chosen answer) or bad (the rejected one)."""
    return [
        {
            "prompt": conversations(r, "chosen")[:2],
            "completion": [conversations(r, answer)[2]],
            "label": answer == "chosen",
        }
        for r in pairs()
        for answer in ("chosen", "rejected")
    ]


@pytest.mark.parametrize(
    "method,rows,extra",
    [
        ("orpo", implicit_prompt_pairs, []),
        ("kto", unpaired_rows, []),
        (
            "kto",
            pairs,
            ["--use_lora", "--learning_rate", "1e-2"],
        ),  # TRL unpairs pairs; the adapter off is the reference
    ],
    ids=["orpo-implicit-prompt", "kto-unpaired", "kto-pairs-lora"],
)
def test_orpo_and_kto_prefer_the_chosen_answer(tiny_model_dir, tmp_path, method, rows, extra):
    data = write_jsonl(tmp_path / f"{method}.jsonl", rows())
    logs, _ = run(tmp_path, tiny_model_dir, data, "--method", method, *extra, steps=8)
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    margins = [entry["rewards/margins"] for entry in logs if "rewards/margins" in entry]  # KTO: both labels seen
    assert len(margins) >= 4 and margins[-1] > margins[0]
    if method == "orpo":
        assert "log_odds_ratio" in logs[-1] and logs[-1]["loss"] < logs[0]["loss"]
    final = tmp_path / ("loras" if "--use_lora" in extra else "models") / "run"
    assert (final / ("adapter_config.json" if "--use_lora" in extra else "model.safetensors")).is_file()


def test_implicit_prompt_is_the_shared_first_messages(tmp_path):
    row = load_preferences(str(write_jsonl(tmp_path / "p.jsonl", implicit_prompt_pairs()[:1])), "orpo")[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["chosen"] == [{"role": "assistant", "content": pairs()[0]["chosen"]}]
    assert row["rejected"] == [{"role": "assistant", "content": "I cannot help with that."}]


def test_kto_rows_are_split_from_pairs_and_shuffled_once(tmp_path):
    data = str(write_jsonl(tmp_path / "pairs.jsonl", pairs(8)))
    rows = load_preferences(data, "kto", seed=1)
    assert len(rows) == 16 and sum(rows["label"]) == 8
    assert rows["label"] != [True] * 8 + [False] * 8  # not every good answer before every bad one
    assert rows["completion"] == load_preferences(data, "kto", seed=1)["completion"]  # the same order for a seed


@pytest.mark.parametrize(
    "rows,method,message",
    [
        (unpaired_rows()[:2], "dpo", "unpaired .KTO's format.; train them with --method kto"),
        ([{**unpaired_rows()[0], "label": 1}], "kto", "row 1: label must be true"),
        ([{"chosen": "a b", "rejected": "a c"}], "dpo", "row 1: chosen and rejected without a prompt must be"),
        (
            [{"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]}],
            "dpo",
            "share no first message",
        ),
        (
            [{"chosen": implicit_prompt_pairs()[0]["chosen"][:2], "rejected": implicit_prompt_pairs()[0]["rejected"]}],
            "simpo",
            "each needs a reply of its own",
        ),
        ([{"prompt": "p", "completion": "c"}], "kto", r"lacks column\(s\) \['label'\] of the unpaired format"),
    ],
    ids=["unpaired-for-dpo", "label-not-bool", "plain-text-no-prompt", "no-shared-prompt", "no-reply", "no-label"],
)
def test_preference_rows_that_cannot_work_are_named(tmp_path, rows, method, message):
    with pytest.raises(DataError, match=message):
        load_preferences(str(write_jsonl(tmp_path / "rows.jsonl", rows)), method)


def test_a_method_the_installed_trl_lacks_is_refused_with_its_version(monkeypatch):
    import dataclasses

    import trl

    from chattune.config.methods import METHODS

    missing = dataclasses.replace(METHODS["orpo"], trl=(("trl", "NoSuchConfig", "NoSuchTrainer"),))
    monkeypatch.setitem(METHODS, "orpo", missing)
    flags = parse_flags(["--run_name", "r", "--base_model", "m", "--train_dataset", "d.jsonl", "--method", "orpo"])
    with pytest.raises(FlagError, match=f"TRL {trl.__version__} does not have"):
        check_method(flags)


def test_an_unknown_dpo_loss_is_refused_before_any_work():
    flags = parse_flags(["--run_name", "r", "--base_model", "m", "--train_dataset", "d.jsonl", "--dpo"])
    check_method(flags)
    flags.dpo_loss = "sigmod"
    with pytest.raises(FlagError, match="not a TRL DPO loss; choose one of sigmoid, hinge, ipo"):
        check_method(flags)


def test_preference_data_errors(tmp_path):
    with pytest.raises(DataError, match=r"lacks column\(s\) \['rejected'\]"):
        load_pairs(str(write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "chosen": "c"}])))
    same = [*pairs(3), {"question": "q", "chosen": "same", "rejected": "same"}]
    assert len(load_pairs(str(write_jsonl(tmp_path / "b.jsonl", same)))) == 3


@pytest.mark.parametrize(
    "quantization,logged,merge,steps",
    [("--load_in_4bit", "4-bit NF4", True, 12), ("--load_in_8bit", "8-bit weights", False, 8)],
    ids=["qlora-4bit-and-merge", "lora-on-8bit"],
)
def test_lora_on_a_quantized_base(tiny_model_dir, tmp_path, quantization, logged, merge, steps):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(1) * 8)
    extra = ["--use_lora", quantization, "--learning_rate", "1e-2", "--epochs", "100"]
    logs, log = run(tmp_path, tiny_model_dir, data, *extra, *(["--lora_merge"] if merge else []), steps=steps)
    assert logged in log
    losses = [entry["loss"] for entry in logs]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    if merge:  # QLoRA's merge reloads the base in full precision: a plain model folder
        merged = tmp_path / "models" / "run"
        assert not json.loads((merged / "config.json").read_text()).get("quantization_config")
        generates(merged)


@pytest.mark.parametrize(
    "absent,flag,message",
    [
        ({"bitsandbytes"}, "--load_in_4bit", "--load_in_4bit/--load_in_8bit needs bitsandbytes, not installed: pip"),
        ({"gptqmodel", "optimum"}, "--load_as_gptq", "--load_as_gptq needs gptqmodel and optimum, not installed"),
        ({"optimum"}, "--load_as_gptq", "--load_as_gptq needs optimum, not installed: pip install -e '.[gptq]'"),
    ],
    ids=["bitsandbytes", "gptq-both", "gptq-optimum-only"],
)
def test_missing_quantization_packages_are_each_named_with_the_install(monkeypatch, absent, flag, message):
    import importlib.util

    real = importlib.util.find_spec
    checked = {"bitsandbytes", "gptqmodel", "optimum"}  # the others found or not as `absent` says, installed or not

    def find_spec(name, *args):
        if name in checked:
            return None if name in absent else object()
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    common = ["--run_name", "r", "--base_model", "m", "--train_dataset", "d.jsonl", "--use_lora"]
    with pytest.raises(FlagError) as raised:
        quantization_config(parse_flags([*common, flag]), torch.float32)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


# --- --precompute_ref_log_probs: the reference scored once, before training, and cached ---------------------------


class ReferenceSpy:
    """Watches train.py's DPO runs in this process: the trainer, what it holds while training, and every reference
    pass (TRL's per-batch reference scoring, and LoRA's adapter switched off for a reference)."""

    def __init__(self, monkeypatch) -> None:
        import trl.trainer.dpo_trainer as dpo_trainer
        from transformers import TrainerCallback

        from chattune.commands import train as run_module

        self.trainer, self.training = None, False
        self.reference_batches, self.adapter_off_in_training, self.weight_hashes = 0, 0, 0
        self.held: list[tuple[bool, int]] = []  # per step: ref_model is None, models of the policy's class alive
        spy = self

        class Watch(TrainerCallback):
            def on_train_begin(self, *args, **kwargs):
                spy.training = True

            def on_step_begin(self, *args, **kwargs):
                spy.held.append((spy.trainer.ref_model is None, live_models(type(spy.trainer.model))))

            def on_train_end(self, *args, **kwargs):
                spy.training = False

        build, compute, use_adapter, hash_module = (
            run_module.build_preference_trainer,
            dpo_trainer.DPOTrainer.compute_ref_log_probs,
            dpo_trainer.use_adapter,
            dpo_trainer.hash_module,
        )

        def watched_build(*args, **kwargs):
            spy.trainer = build(*args, **kwargs)
            spy.trainer.add_callback(Watch())
            return spy.trainer

        def counted_compute(trainer, model, inputs):
            spy.reference_batches += 1
            return compute(trainer, model, inputs)

        def counted_use_adapter(*args, **kwargs):
            spy.adapter_off_in_training += spy.training
            return use_adapter(*args, **kwargs)

        def counted_hash(module):
            spy.weight_hashes += 1
            return hash_module(module)

        monkeypatch.setattr(run_module, "build_preference_trainer", watched_build)
        monkeypatch.setattr(dpo_trainer, "hash_module", counted_hash)
        monkeypatch.setattr(dpo_trainer.DPOTrainer, "compute_ref_log_probs", counted_compute)
        monkeypatch.setattr(dpo_trainer, "use_adapter", counted_use_adapter)

    def run(self, base, data, out, *extra: str, steps: int = 3) -> list[dict]:
        """train.py in this process; the log entries of its training steps."""
        from chattune.commands import train as run_module

        self.trainer, self.held, self.reference_batches, self.adapter_off_in_training = None, [], 0, 0
        self.weight_hashes = 0
        argv = train_argv(
            base, data, out, *extra, max_steps=steps, learning_rate="2e-3", logging_steps=1, save_steps=1000
        )
        assert run_module.main([*argv, "--dpo", "--overwrite_output_dir"]) == 0
        return [entry for entry in self.trainer.state.log_history if "loss" in entry]


def live_models(model_class: type) -> int:
    import gc

    gc.collect()
    return sum(1 for thing in gc.get_objects() if type(thing) is model_class)


@pytest.fixture
def reference_spy(monkeypatch):
    return ReferenceSpy(monkeypatch)


def test_precompute_full_finetune_holds_no_reference_and_trains_the_same(tiny_model_dir, tmp_path, reference_spy):
    """The frozen copy is gone while training, and the losses, rewards and the final evaluation of the whole test
    set (its reference log-probs computed before training) equal those of a run with the copy."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs())
    test = write_jsonl(tmp_path / "test.jsonl", pairs(6)[::-1])
    evaluation = ("--test_dataset", str(test), "--eval_fraction", "0.5")
    with_copy = reference_spy.run(tiny_model_dir, data, tmp_path / "copy", *evaluation)
    assert reference_spy.held and all(not none and alive == 2 for none, alive in reference_spy.held)
    copy_eval = reference_spy.trainer.state.log_history[-1]["eval_loss"]

    precomputed = reference_spy.run(tiny_model_dir, data, tmp_path / "lean", *evaluation, "--precompute_ref_log_probs")
    assert reference_spy.held and all(none and alive == 1 for none, alive in reference_spy.held)
    assert reference_spy.reference_batches > 0  # train, periodic eval sample and whole test set, before training
    assert reference_spy.weight_hashes == 0  # TRL's key for its own cache, which chattune's replaces
    for lean, full in zip(precomputed, with_copy, strict=True):
        for key in ("loss", "rewards/margins", "rewards/chosen", "logps/rejected"):
            assert lean[key] == pytest.approx(full[key], rel=1e-4, abs=1e-6), key
    assert precomputed[-1]["rewards/margins"] != 0  # the later steps did compare against the reference
    assert reference_spy.trainer.state.log_history[-1]["eval_loss"] == pytest.approx(copy_eval, rel=1e-4)


def test_precompute_with_lora_switches_no_adapter_off_while_training(tiny_model_dir, tmp_path, reference_spy):
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(8))
    reference_spy.run(tiny_model_dir, data, tmp_path / "per-step", "--use_lora", steps=2)
    assert reference_spy.adapter_off_in_training > 0  # without the flag: a reference pass every micro-batch
    logs = reference_spy.run(tiny_model_dir, data, tmp_path / "lean", "--use_lora", "--precompute_ref_log_probs")
    assert reference_spy.adapter_off_in_training == 0 and reference_spy.reference_batches > 0
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)


def test_precompute_cache_is_reused_and_invalidated(test_tokenizer_dir, tmp_path, reference_spy, caplog):
    """The same model and data reuse the cached log-probs (no reference pass); one row changed, or the model's
    weights, compute them again."""
    from conftest import make_tiny_model

    base = make_tiny_model(test_tokenizer_dir, tmp_path / "base", seed=1)
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(8))

    def run_once() -> tuple[int, str]:
        caplog.clear()
        with caplog.at_level("INFO", logger="chattune.training.trainers.reference"):
            reference_spy.run(base, data, tmp_path / "out", "--precompute_ref_log_probs", steps=1)
        return reference_spy.reference_batches, caplog.text

    batches, log = run_once()
    assert batches == 4 and "computing for 8 pairs" in log and "computed, cached in" in log
    batches, log = run_once()
    assert batches == 0 and "reused the cache" in log
    write_jsonl(data, [*pairs(7), {**pairs(8)[7], "chosen": "Turning the lamp on."}])
    batches, log = run_once()
    assert batches == 4 and "computed, cached in" in log
    make_tiny_model(test_tokenizer_dir, base, seed=2)
    batches, log = run_once()
    assert batches == 4 and "computed, cached in" in log
    assert run_once()[0] == 0


def test_precompute_killed_while_writing_leaves_no_cache(tiny_model_dir, tmp_path, reference_spy, monkeypatch, caplog):
    from chattune.training.trainers import reference

    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(8))
    written = []

    def dies_half_way(path, table):
        path.write_bytes(b"\xff" * 64)  # part of a file, as a killed write leaves it
        written.append(path)
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(reference, "_write_stream", dies_half_way)
    with pytest.raises(RuntimeError, match="killed while writing"):
        reference_spy.run(tiny_model_dir, data, tmp_path / "out", "--precompute_ref_log_probs", steps=1)
    folder = written[0].parent
    assert not written[0].exists() and not list(folder.glob(f"*{reference.CACHE_PREFIX}*"))
    monkeypatch.undo()

    spy = ReferenceSpy(monkeypatch)
    with caplog.at_level("INFO", logger="chattune.training.trainers.reference"):
        spy.run(tiny_model_dir, data, tmp_path / "out", "--precompute_ref_log_probs", steps=1)
    assert spy.reference_batches == 4 and "computed, cached in" in caplog.text
    (cache,) = folder.glob(f"{reference.CACHE_PREFIX}*.arrow")
    cache.write_bytes(cache.read_bytes()[:100])  # a cache cut short some other way is not read either
    caplog.clear()
    with caplog.at_level("INFO", logger="chattune.training.trainers.reference"):
        spy.run(tiny_model_dir, data, tmp_path / "out", "--precompute_ref_log_probs", steps=1)
    assert spy.reference_batches == 4 and "unreadable reference cache" in caplog.text


@pytest.mark.parametrize(
    "method,why",
    [("simpo", "has no reference model"), ("orpo", "has no reference model"), ("sft", "has no reference model"),
     ("kto", "is not supported with it")],
)  # fmt: skip
def test_precompute_is_refused_without_a_dpo_reference(method, why, capsys):
    argv = ["--run_name", "r", "--base_model", "m", "--train_dataset", "d.jsonl", "--method", method]
    with pytest.raises(SystemExit):
        parse_flags([*argv, "--precompute_ref_log_probs"])
    assert f"--method {method} {why}" in capsys.readouterr().err


def test_trl_dpo_still_turns_padding_free_batches_off(tiny_model_dir, tmp_path):
    """docs/training.md says why DPO's micro-batches are padded (TRL 1.16 disables `padding_free`): this fails
    the day a TRL release brings padding-free DPO back, to say that chattune could then use it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = load_pairs(str(write_jsonl(tmp_path / "pairs.jsonl", pairs(2))))
    config = DPOConfig(output_dir=str(tmp_path), padding_free=True, report_to="none", use_cpu=True, max_length=64)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=rows, processing_class=AutoTokenizer.from_pretrained(tiny_model_dir)
    )
    assert trainer.padding_free is False
    assert "position_ids" not in trainer.data_collator([trainer.train_dataset[0]])
