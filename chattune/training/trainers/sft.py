"""Wiring flags into TRL's SFTTrainer: its config, and the trainer class with chattune's checkpoints and loss."""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from chattune.config.flags import TrainFlags
from chattune.training.kernels.batching import BatchingPlan
from chattune.training.kernels.loss import LabelledLogitsLossMixin
from chattune.training.safety.checkpoints import AtomicCheckpointMixin
from chattune.training.trainers.arguments import training_args
from chattune.training.trainers.task_metrics import TaskMetricsMixin


def sft_config(flags: TrainFlags, plan: BatchingPlan, dtype: torch.dtype, has_eval: bool) -> SFTConfig:
    return SFTConfig(
        **training_args(flags, dtype, has_eval),
        # data: already tokenized and masked by chattune.data.tokenization; TRL packs or flattens it
        max_length=flags.ctx_size if plan.packing else None,  # rows were truncated to ctx_size already
        packing=plan.packing,
        packing_strategy="bfd",
        padding_free=plan.padding_free,
        train_sampling_strategy="group_by_length" if flags.group_by_length else "random",
        shuffle_dataset=plan.packing,  # shuffle before packing so rows mix examples; the sampler does the rest
        include_num_input_tokens_seen="non_padding",
    )


class SFTTrainerWithAtomicCheckpoints(AtomicCheckpointMixin, TaskMetricsMixin, LabelledLogitsLossMixin, SFTTrainer):
    pass


def build_trainer(
    flags: TrainFlags,
    model: Any,
    tokenizer: Any,
    train_data: Dataset,
    eval_data: Dataset | None,
    plan: BatchingPlan,
    dtype: torch.dtype,
    peft_config: Any | None = None,
    callbacks: list | None = None,
) -> SFTTrainer:
    config = sft_config(flags, plan, dtype, has_eval=eval_data is not None)
    return SFTTrainerWithAtomicCheckpoints(
        model=model,
        args=config,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
        loss_reduction=flags.loss_reduction,
    )
