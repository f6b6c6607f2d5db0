"""Flags into the TrainingArguments that SFT and preference training share, and the integrations they need."""

from __future__ import annotations

from typing import Any

import torch

from chattune.config.flags import FlagError, TrainFlags


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


def evaluation_args(flags: TrainFlags, has_eval: bool) -> dict[str, Any]:
    if not has_eval:
        return {"eval_strategy": "no"}
    from chattune.training.task_metrics import best_metric_key, greater_is_better

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
            f"{wants} needs --save_steps ({flags.save_steps}) to be a multiple of --eval_steps ({eval_steps})"
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
        lr_scheduler_type=flags.learning_rate_schedule,
        warmup_steps=flags.learning_rate_warmup,
        weight_decay=flags.weight_decay,
        max_grad_norm=flags.gradient_clip,
        bf16=dtype == torch.bfloat16,
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
