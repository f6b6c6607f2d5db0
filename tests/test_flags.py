"""The flag surface: every home-llm flag documented, dash spellings, strict parsing, batch arithmetic."""

from __future__ import annotations

import pytest
import torch

from chattune.config.flags import FlagError, TrainFlags, flag_names, parse_flags, unused_evaluation_flags
from chattune.models.loading import weight_dtype

REQUIRED = ["--run_name", "r", "--base_model", "m", "--train_dataset", "d.jsonl"]
HOME_LLM_FLAGS = (
    "run_name base_model train_dataset test_dataset dataset_processing_threads ctx_size bf16 batch_size "
    "micro_batch_size epochs learning_rate learning_rate_schedule learning_rate_warmup weight_decay gradient_clip "
    "resume_from_checkpoint eval_steps save_steps save_total_limit logging_steps group_by_length "
    "gradient_checkpointing add_pad_token add_chatml_tokens add_tool_calling_tokens prompt_template_file "
    "prefix_ids suffix_ids use_lora lora_rank lora_alpha lora_dropout lora_modules lora_modules_to_save "
    "lora_merge seed output_dir"
).split()


def test_every_home_llm_flag_exists_and_is_documented(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_flags(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for name in flag_names():
        assert f"--{name}" in help_text
    assert set(HOME_LLM_FLAGS) <= set(flag_names())
    for field in TrainFlags.__dataclass_fields__.values():
        assert field.metadata.get("help"), f"--{field.name} has no help text"


def test_dash_spellings_of_prefix_and_suffix_ids():
    flags = parse_flags([*REQUIRED, "--prefix-ids", "1,2,3", "--suffix-ids", "4"])
    assert flags.prefix_id_list == [1, 2, 3]
    assert flags.suffix_id_list == [4]


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_flags([*REQUIRED, "--lora_rnak", "8"])
    assert exit_info.value.code == 2
    assert "--lora_rnak" in capsys.readouterr().err


@pytest.mark.parametrize(
    "batch,micro,world,expected",
    [(32, 8, 1, 4), (64, 2, 1, 32), (64, 2, 4, 8), (8, 8, 1, 1)],
)
def test_gradient_accumulation_keeps_the_effective_batch(batch, micro, world, expected):
    flags = parse_flags([*REQUIRED, "--batch_size", str(batch), "--micro_batch_size", str(micro)])
    assert flags.gradient_accumulation_steps(world) == expected


def test_batch_size_that_does_not_divide_is_refused():
    flags = parse_flags([*REQUIRED, "--batch_size", "10", "--micro_batch_size", "4"])
    with pytest.raises(FlagError, match="not a multiple"):
        flags.gradient_accumulation_steps(1)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--load_in_4bit"], "--use_lora"),
        (["--use_lora", "--load_in_4bit", "--load_in_8bit"], "at most one"),
        (["--prefix_ids", "1,x"], "comma-separated integers"),
        (["--suffix_ids", "5"], "--prefix_ids"),
        (["--method", "sft", "--dpo"], "--dpo contradicts --method sft"),
        (["--method", "dpo", "--simpo"], "--simpo contradicts --method dpo"),
        (["--method", "kto", "--dpo"], "--dpo contradicts --method kto"),
        (["--method", "orpo", "--simpo"], "--simpo contradicts --method orpo"),
        (["--method", "ppo"], "invalid choice: 'ppo'"),
        (["--dpo_loss", "ipo"], "--dpo_loss ipo applies to --method dpo, not sft"),
        (["--method", "orpo", "--dpo_loss", "ipo"], "applies to --method dpo, not orpo"),
        (["--dpo", "--simpo_gamma", "1"], "--simpo_gamma applies to --method simpo, not dpo"),
        (["--simpo", "--packing", "--group_by_length"], "--packing, --group_by_length shape(s) SFT batches"),
        (["--method", "kto", "--train_on_prompts"], "--train_on_prompts shape(s) SFT"),
        (["--dpo", "--prefix_ids", "1", "--suffix_ids", "2"], "--prefix_ids, --suffix_ids shape(s) SFT"),
        (["--method", "kto", "--micro_batch_size", "1", "--batch_size", "4"], "--micro_batch_size of at least 2"),
    ],
)
def test_contradictory_flags_are_refused(extra, message, capsys):
    with pytest.raises(SystemExit):
        parse_flags([*REQUIRED, *extra])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,method",
    [
        ([], "sft"),
        (["--dpo"], "dpo"),
        (["--simpo"], "simpo"),  # home-llm's alias alone: SimPO, no longer plain SFT
        (["--dpo", "--simpo"], "simpo"),  # home-llm's documented spelling of SimPO
        (["--method", "simpo", "--dpo"], "simpo"),
        (["--method", "dpo", "--dpo"], "dpo"),
        (["--method", "orpo"], "orpo"),
        (["--method", "kto"], "kto"),
    ],
)
def test_one_training_method(extra, method):
    flags = parse_flags([*REQUIRED, *extra])
    assert flags.method == method and flags.preference == (method != "sft")


def test_missing_required_flag_names_it(capsys):
    with pytest.raises(SystemExit):
        parse_flags(["--run_name", "r"])
    err = capsys.readouterr().err
    assert "--base_model" in err and "--train_dataset" in err


def test_docs_flag_reference_is_current():
    from chattune.config.flags import flags_markdown
    from conftest import REPO

    assert (REPO / "docs" / "flags.md").read_text() == flags_markdown(), "regenerate: python3 -m chattune.config.flags"


def test_missing_logger_package_and_hub_credentials(monkeypatch):
    import importlib.util

    from chattune.training.trainers.arguments import check_integrations

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(FlagError, match="pip install wandb"):
        check_integrations(parse_flags([*REQUIRED, "--report_to", "tensorboard,wandb"]))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(FlagError, match="hf auth login"):
        check_integrations(parse_flags([*REQUIRED, "--report_to", "none", "--push_to_hub"]))


@pytest.mark.parametrize("save_steps,aligned", [(50, False), (40, True)])
def test_early_stopping_needs_aligned_steps(save_steps, aligned):
    from chattune.training.trainers.arguments import evaluation_args

    flags = parse_flags(
        [*REQUIRED, "--test_dataset", "t.jsonl", "--early_stopping_patience", "2", "--eval_steps", "20"]
        + ["--save_steps", str(save_steps)]
    )
    if aligned:
        assert evaluation_args(flags, has_eval=True)["load_best_model_at_end"] is True
    else:
        with pytest.raises(FlagError, match="multiple"):
            evaluation_args(flags, has_eval=True)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], torch.float32),  # full fine-tuning: float32 master weights under bf16 autocast
        (["--pure_bf16"], torch.bfloat16),
        (["--use_lora"], torch.bfloat16),  # frozen base weights
    ],
)
def test_trained_weights_stay_float32_under_bf16_compute(extra, expected):
    flags = parse_flags([*REQUIRED, "--bf16", *extra])
    assert weight_dtype(flags, torch.bfloat16) is expected
    assert weight_dtype(flags, torch.float32) is torch.float32


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--time_budget", "0"], "--time_budget is a number of seconds above 0"),
        (["--test_dataset", "t.jsonl", "--eval_steps", "2.5"], "whole number of steps or a fraction below 1"),
        (
            ["--test_dataset", "t.jsonl", "--eval_steps", "0.25", "--load_best_model_at_end"],
            "need --eval_steps in whole steps",
        ),
    ],
    ids=["no-time", "half-step", "fraction-with-best-checkpoint"],
)
def test_time_budget_and_fractional_evaluations_are_checked(extra, message, capsys):
    with pytest.raises(SystemExit):
        parse_flags([*REQUIRED, *extra])
    assert message in capsys.readouterr().err


def test_evaluations_as_a_fraction_of_the_run():
    flags = parse_flags([*REQUIRED, "--test_dataset", "t.jsonl", "--eval_steps", "0.25", "--time_budget", "600"])
    assert flags.eval_steps == 0.25 and flags.time_budget == 600


@pytest.mark.parametrize(
    "extra, unused",
    [
        (["--eval_steps", "100"], ["--eval_steps"]),  # as home-llm's StableLM Zephyr commands pass it
        (["--eval_steps", "100", "--eval_fraction", "0.1"], ["--eval_steps", "--eval_fraction"]),
        (["--eval_steps", "100", "--test_dataset", "t.jsonl"], []),
    ],
    ids=["eval-steps", "both", "with-test-set"],
)
def test_evaluation_flags_without_a_test_set_are_a_warning_not_a_refusal(extra, unused, caplog):
    from chattune.training.trainers.task_metrics import plan_evaluations

    flags = parse_flags([*REQUIRED, *extra])
    assert unused_evaluation_flags(flags) == unused
    with caplog.at_level("WARNING"):
        plan_evaluations(flags)
    warned = [record.getMessage() for record in caplog.records if "without --test_dataset" in record.getMessage()]
    assert warned == ([f"{' and '.join(unused)}: no evaluation runs without --test_dataset; ignored"] if unused else [])
