"""Preference training (DPO, its loss variants, SimPO) on TRL's trainers.

Accepted rows:
* the data generator's pairs: {"system", "question", "chosen", "rejected"} (system optional)
* TRL's format: {"prompt", "chosen", "rejected"}, as plain strings or as lists of chat messages
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from datasets import Dataset

from chattune.config.flags import TrainFlags
from chattune.data.formats import DataError, load_rows
from chattune.training.arguments import training_args
from chattune.training.safety import AtomicCheckpointMixin

logger = logging.getLogger(__name__)

GENERATOR_COLUMNS = ("question", "chosen", "rejected")
TRL_COLUMNS = ("prompt", "chosen", "rejected")


def load_pairs(source: str) -> Dataset:
    """Load preference pairs in TRL's conversational format; identical chosen/rejected pairs are dropped."""
    rows = load_rows(source)
    columns = set(rows.column_names)
    if "question" in columns or "system" in columns:
        wanted, convert = GENERATOR_COLUMNS, _from_generator
    else:
        wanted, convert = TRL_COLUMNS, _from_trl
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise DataError(
            f"{source}: preference data lacks column(s) {missing}; expected {{system, question, chosen, rejected}} "
            "or {prompt, chosen, rejected}"
        )
    pairs = rows.map(convert, remove_columns=rows.column_names, desc="Reading preference pairs")
    same = pairs.filter(lambda row: row["chosen"] == row["rejected"])
    if len(same):
        logger.warning("%s: skipped %d pair(s) whose chosen and rejected answers are identical", source, len(same))
        pairs = pairs.filter(lambda row: row["chosen"] != row["rejected"])
    if len(pairs) == 0:
        raise DataError(f"{source}: no usable preference pair left")
    logger.info("%s: %d preference pairs", source, len(pairs))
    return pairs


def _assistant(text: Any) -> list[dict]:
    return text if isinstance(text, list) else [{"role": "assistant", "content": str(text)}]


def _from_generator(row: dict) -> dict:
    prompt = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    prompt.append({"role": "user", "content": row["question"]})
    return {"prompt": prompt, "chosen": _assistant(row["chosen"]), "rejected": _assistant(row["rejected"])}


def _from_trl(row: dict) -> dict:
    prompt = row["prompt"]
    if isinstance(prompt, str):  # plain text pairs stay plain text for TRL
        return {"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]}
    return {"prompt": prompt, "chosen": _assistant(row["chosen"]), "rejected": _assistant(row["rejected"])}


def build_preference_trainer(
    flags: TrainFlags,
    model: Any,
    tokenizer: Any,
    train_data: Dataset,
    eval_data: Dataset | None,
    dtype: torch.dtype,
    peft_config: Any | None = None,
    callbacks: list | None = None,
) -> Any:
    """DPO by default; SimPO (reference-free, length-normalised, margin gamma) with --simpo."""
    common = training_args(flags, dtype, has_eval=eval_data is not None)
    shared = dict(
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    if flags.simpo:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        config = CPOConfig(
            **common,
            loss_type="simpo",
            cpo_alpha=0.0,
            beta=flags.beta,
            simpo_gamma=flags.simpo_gamma,
            max_length=flags.ctx_size,
        )
        return with_atomic_checkpoints(CPOTrainer)(model=model, args=config, **shared)
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(**common, beta=flags.beta, loss_type=[flags.dpo_loss], max_length=flags.ctx_size)
    # The reference is the starting model. With LoRA, TRL disables the adapter instead of keeping a copy.
    reference = None if peft_config is not None else _frozen_copy(model)
    return with_atomic_checkpoints(DPOTrainer)(model=model, ref_model=reference, args=config, **shared)


def with_atomic_checkpoints(trainer_class: type) -> type:
    return type(trainer_class.__name__, (AtomicCheckpointMixin, trainer_class), {})


def _frozen_copy(model: Any) -> Any:
    """A copy of the starting weights: reloading from the hub id would miss tokens added to this model."""
    reference = copy.deepcopy(model).eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    return reference
