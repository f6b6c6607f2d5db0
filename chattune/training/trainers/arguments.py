"""Flags into the TrainingArguments that SFT and preference training share, and the integrations they need."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from chattune.config.flags import FlagError, TrainFlags

logger = logging.getLogger(__name__)

# The Trainer logs every evaluation metric under this prefix (--metric_for_best_model names it with or without).
PREFIX = "eval_"
# A metric named so is better lower; every other (accuracies, rates, BLEU, ROUGE) is better higher.
LOWER_IS_BETTER = ("loss", "perplexity", "distance", "error", "latency", "seconds")


def report_targets(report_to: str) -> list[str]:
    return [] if report_to.strip().lower() == "none" else [t.strip() for t in report_to.split(",") if t.strip()]


def check_integrations(flags: TrainFlags) -> None:
    """Fail before any work when a logger's package or Hub credentials are missing."""
    import importlib.util

    for target in report_targets(flags.report_to):
        package = LOGGER_PACKAGES.get(target, target)
        if importlib.util.find_spec(package) is None:
            raise FlagError(f"--report_to {target} needs the {package} package: pip install {package}")
    if flags.push_to_hub:
        from huggingface_hub import get_token

        if get_token() is None:
            raise FlagError("--push_to_hub needs Hub credentials: run `hf auth login` or set HF_TOKEN")


LOGGER_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "clearml": "clearml",
    "neptune": "neptune",
    "dvclive": "dvclive",
    "trackio": "trackio",
    "swanlab": "swanlab",
    "azure_ml": "azureml",
}


def optimizer_args(flags: TrainFlags) -> dict[str, Any]:
    """transformers' optimizer by name; without --optimizer, its default (fused AdamW where PyTorch has it)."""
    return {"optim": flags.optimizer} if flags.optimizer else {}


def schedule_args(flags: TrainFlags) -> dict[str, Any]:
    """The schedule; a minimum learning rate turns cosine into transformers' cosine_with_min_lr."""
    if flags.min_learning_rate is not None:
        return {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": flags.min_learning_rate}}
    if flags.min_learning_rate_ratio is not None:
        return {
            "lr_scheduler_type": "cosine_with_min_lr",
            "lr_scheduler_kwargs": {"min_lr_rate": flags.min_learning_rate_ratio},
        }
    return {"lr_scheduler_type": flags.learning_rate_schedule}


def check_optimizer(flags: TrainFlags) -> None:
    """Fail before any work when the optimizer's package (bitsandbytes, torchao, ...) is missing: transformers'
    own optimizer factory is asked for the class, as the trainer will ask it later."""
    if not flags.optimizer:
        return
    from transformers import Trainer

    try:
        Trainer.get_optimizer_cls_and_kwargs(default_training_args(optim=flags.optimizer), model=None)
    except (ImportError, ValueError) as error:
        if "model" in str(error):  # LOMO and friends are built from the model; their package check passed
            return
        raise FlagError(f"--optimizer {flags.optimizer}: {error}") from None


def default_training_args(**values: Any) -> Any:
    """TrainingArguments' defaults as a plain object: a real TrainingArguments would set up (and, under torchrun,
    reset) the distributed state before the run has made its own."""
    import dataclasses
    from types import SimpleNamespace

    from transformers import TrainingArguments

    defaults = {
        field.name: field.default
        for field in dataclasses.fields(TrainingArguments)
        if field.default is not dataclasses.MISSING
    }
    return SimpleNamespace(**{**defaults, **values})


def set_warmup_epochs(trainer: Any, flags: TrainFlags, num_processes: int) -> None:
    """--warmup_epochs as whole optimizer steps, counted as transformers counts an epoch's steps (after packing)."""
    if flags.warmup_epochs is None:
        return
    args = trainer.args
    batches = math.ceil(len(trainer.train_dataset) / (args.per_device_train_batch_size * num_processes))
    steps_per_epoch = max(1, math.ceil(batches / args.gradient_accumulation_steps))
    # a whole number of steps: transformers reads a warmup_steps below 1 as a fraction of all steps
    args.warmup_steps = max(1, round(flags.warmup_epochs * steps_per_epoch)) if flags.warmup_epochs > 0 else 0
    logger.info(
        "warm-up: %g epoch(s) = %d of %d steps per epoch", flags.warmup_epochs, args.warmup_steps, steps_per_epoch
    )


def best_metric_key(name: str) -> str:
    """The metric's key in the Trainer's evaluation metrics: `service_call_exact_match` -> its eval_ key."""
    return name if name.startswith(PREFIX) else PREFIX + name


def greater_is_better(key: str) -> bool:
    return not key.endswith(LOWER_IS_BETTER)


def evaluation_args(flags: TrainFlags, has_eval: bool) -> dict[str, Any]:
    if not has_eval:
        return {"eval_strategy": "no"}
    # The Trainer tracks the best evaluation by this metric at every evaluation, and the rotation of
    # checkpoints always keeps the best one.
    metric = best_metric_key(flags.metric_for_best_model)
    best = {"metric_for_best_model": metric, "greater_is_better": greater_is_better(metric)}
    load_best = flags.load_best_model_at_end or flags.early_stopping_patience is not None
    if not load_best:
        return {"eval_strategy": "steps" if flags.eval_steps else "epoch", "eval_steps": flags.eval_steps, **best}
    # The best checkpoint is loaded at the end, so every evaluation must land on a saved step.
    eval_steps = flags.eval_steps or flags.save_steps
    if flags.save_steps % eval_steps:
        wants = "--early_stopping_patience" if flags.early_stopping_patience is not None else "--load_best_model_at_end"
        raise FlagError(
            f"{wants} needs --save_steps ({flags.save_steps}) to be a multiple of --eval_steps ({eval_steps:g})"
        )
    return {"eval_strategy": "steps", "eval_steps": eval_steps, "load_best_model_at_end": True, **best}


def training_args(flags: TrainFlags, dtype: torch.dtype, has_eval: bool) -> dict[str, Any]:
    """The TrainingArguments shared by SFT and preference training."""
    return dict(
        output_dir=str(flags.run_dir),
        run_name=flags.run_name,
        seed=flags.seed,
        # batch: micro-batch x accumulation x processes = --batch_size
        per_device_train_batch_size=flags.micro_batch_size,
        per_device_eval_batch_size=flags.micro_batch_size,
        gradient_accumulation_steps=flags.gradient_accumulation_steps(),
        num_train_epochs=flags.epochs,
        max_steps=flags.max_steps,
        # optimizer and schedule
        learning_rate=flags.learning_rate,
        **optimizer_args(flags),
        **schedule_args(flags),
        warmup_steps=flags.learning_rate_warmup,  # --warmup_epochs is set once the steps per epoch are known
        weight_decay=flags.weight_decay,
        max_grad_norm=flags.gradient_clip,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,  # autocast with dynamic loss scaling (accelerate's GradScaler)
        use_cpu=not torch.cuda.is_available(),  # transformers wants this said outright for bf16 on a CPU
        activation_checkpointing=flags.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if flags.gradient_checkpointing else None,
        dataloader_num_workers=0,
        # checkpoints, evaluation, logging
        save_strategy="steps",
        save_steps=flags.save_steps,
        save_total_limit=flags.save_total_limit,
        **evaluation_args(flags, has_eval),
        logging_steps=flags.logging_steps,
        logging_first_step=True,
        report_to=report_targets(flags.report_to),
        disable_tqdm=False,
        push_to_hub=flags.push_to_hub,
        hub_model_id=flags.hub_model_id or (flags.run_name if flags.push_to_hub else None),
    )
