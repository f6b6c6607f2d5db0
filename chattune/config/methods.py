"""The training methods, one table: everything `--method` changes, in one `Method` entry per method.

An entry says which row formats the method trains on (the uses of chattune.data.formats' registry), where TRL
keeps its config and trainer classes, the config arguments of its own, the method-specific flags that apply to
it, and how its trainer is built (a reference model, chattune's parts, a check before any work). train.py's flag
checks (chattune.config.flags), the reading of preference rows and the building of the trainer
(chattune.training.trainers.preference) and the best-checkpoint check (chattune.training.trainers.task_metrics) read
this table, so adding a method is one `register(Method(...))` plus tests.

train.py resolves --method before torch or TRL is imported (its refusals answer in a fraction of a second), so
this module imports neither: classes and hooks are named by import path and imported when a trainer is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

# What a row is for, the uses of chattune.data.formats' registry: named here, below the data layer, since train.py's
# flags read this table before any data is (chattune.data.formats takes them from here).
CHAT, TEXT, PAIRS, UNPAIRED = "chat", "text", "pairs", "unpaired"

if TYPE_CHECKING:  # the flags are read first (chattune.config.flags), and read this table
    from chattune.config.flags import TrainFlags

# (module, config class, trainer class): where one TRL release keeps a method's classes
TRLPlace = tuple[str, str, str]


@dataclass(frozen=True)
class Method:
    name: str
    formats: tuple[str, ...]  # the row formats' uses it accepts (chattune.data.formats)
    trains_on: str  # the use its trainer takes; rows of another accepted use are converted (KTO splits pairs)
    trl: tuple[TRLPlace, ...]  # where TRL keeps its config and trainer, newest layout first (TRL moves them)
    # The config arguments of its own, beside the TrainingArguments all methods share (chattune.training.
    # arguments) and max_length; None where the method's module builds the config (SFT's depends on batching).
    config: Callable[[TrainFlags], dict[str, Any]] | None
    flags: tuple[str, ...] = ()  # the method-specific flags (SCOPED_FLAGS) that apply to it
    reference: bool = False  # trained against the starting model: a frozen copy, or LoRA's adapter switched off
    # "module:function" (flags, model) -> trainer mixins (outermost first): chattune's changes to TRL's trainer
    trainer_parts: str | None = None
    check: str | None = None  # "module:function" (flags) -> None: refuses a bad setting before any work
    min_micro_batch_size: int = 1
    min_micro_batch_why: str = ""
    shuffled_once: bool = False  # its trainer reads rows in order, so they are shuffled once with --seed
    eval_metrics: tuple[str, ...] = ()  # what its trainer logs at every evaluation besides eval_loss

    @property
    def preference(self) -> bool:
        """Trained on preference rows (pairs, or answers labelled good or bad) rather than conversations."""
        return self.trains_on in (PAIRS, UNPAIRED)


def load(path: str) -> Any:
    """The object an entry names as "module:attribute"."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


# ---------------------------------------------------------------------------------------------------------------
# Flags that only some methods use. Given (set away from its default) to a method whose entry does not list it, a
# flag is refused before any work with its message; flags that share a message are named together in one.
# Placeholders: {given} the flags given, {method} the method, {owners} the methods that take them, {reference}
# what the method has instead of a reference model, {flags} the flags themselves.

_SFT_BATCHES = "{given} shape(s) SFT batches and labels; --method {method} does not use them"
SCOPED_FLAGS: dict[str, str] = {
    "packing": _SFT_BATCHES,
    "group_by_length": _SFT_BATCHES,
    "train_on_prompts": _SFT_BATCHES,
    "prefix_ids": _SFT_BATCHES,
    "suffix_ids": _SFT_BATCHES,
    "loss_reduction": "--loss_reduction averages the SFT loss; --method {method} has its own loss",
    "eval_generate": "--eval_generate scores replies to chat prompts; --method {method} evaluates on preference "
    "rows (score its model afterwards with evaluate.py)",
    "dpo_loss": "--dpo_loss {flags.dpo_loss} applies to --method {owners}, not {method}",
    "simpo_gamma": "--simpo_gamma applies to --method {owners}, not {method}",
    "precompute_ref_log_probs": "--precompute_ref_log_probs scores DPO's reference model; --method {method} "
    "{reference}",
}


def check_scoped_flags(flags: TrainFlags) -> str | None:
    """The refusal for the first group of method-specific flags given to a method that does not use them."""
    method = METHODS[flags.method]
    defaults = {field.name: field.default for field in fields(flags)}
    given = [name for name in SCOPED_FLAGS if name not in method.flags and getattr(flags, name) != defaults[name]]
    if not given:
        return None
    message = SCOPED_FLAGS[given[0]]
    same = [name for name in given if SCOPED_FLAGS[name] == message]
    owners = ", ".join(entry.name for entry in METHODS.values() if set(same) <= set(entry.flags)) or "none"
    reference = f"is not supported with it ({owners} only)" if method.reference else "has no reference model"
    given_text = ", ".join(f"--{name}" for name in same)
    return message.format(given=given_text, method=method.name, owners=owners, reference=reference, flags=flags)


# ---------------------------------------------------------------------------------------------------------------
# The table

METHODS: dict[str, Method] = {}


def register(entry: Method) -> Method:
    """Add a method to the table: --method takes its name from then on."""
    unknown = sorted(set(entry.flags) - set(SCOPED_FLAGS))
    if unknown:
        raise ValueError(f"method {entry.name!r} names flags that are not method-specific: {unknown}")
    METHODS[entry.name] = entry
    return entry


def _dpo_config(flags: TrainFlags) -> dict[str, Any]:
    # DPO's batches carry input_ids and attention_mask, so the trainer can count the tokens it trains on
    return dict(
        beta=flags.beta,
        loss_type=[flags.dpo_loss],
        include_num_input_tokens_seen="non_padding",
        precompute_ref_log_probs=flags.precompute_ref_log_probs,
    )


def _beta_only(flags: TrainFlags) -> dict[str, Any]:
    return dict(beta=flags.beta)


register(
    Method(
        name="sft",
        formats=(CHAT, TEXT),
        trains_on=CHAT,
        trl=(("trl", "SFTConfig", "SFTTrainer"),),
        config=None,  # chattune.training.trainers.sft.sft_config: packing and padding-free come from the batching plan
        flags=(
            *(name for name, message in SCOPED_FLAGS.items() if message == _SFT_BATCHES),
            *("loss_reduction", "eval_generate"),
        ),
        eval_metrics=("eval_mean_token_accuracy",),
    )
)
register(
    Method(
        name="dpo",
        formats=(PAIRS,),
        trains_on=PAIRS,
        trl=(("trl", "DPOConfig", "DPOTrainer"),),
        config=_dpo_config,
        flags=("dpo_loss", "precompute_ref_log_probs"),
        reference=True,
        trainer_parts="chattune.training.trainers.preference:lean_dpo",
        check="chattune.training.trainers.preference:check_dpo_loss",
    )
)
register(
    Method(  # CPO's trainer with the SimPO loss and no behaviour-cloning term
        name="simpo",
        formats=(PAIRS,),
        trains_on=PAIRS,
        trl=(("trl.experimental.cpo", "CPOConfig", "CPOTrainer"), ("trl", "CPOConfig", "CPOTrainer")),
        config=lambda flags: dict(loss_type="simpo", cpo_alpha=0.0, beta=flags.beta, simpo_gamma=flags.simpo_gamma),
        flags=("simpo_gamma",),
    )
)
register(
    Method(  # SFT loss on the chosen answer plus beta x the odds-ratio term
        name="orpo",
        formats=(PAIRS,),
        trains_on=PAIRS,
        trl=(("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer"), ("trl", "ORPOConfig", "ORPOTrainer")),
        config=_beta_only,
    )
)
register(
    Method(
        name="kto",
        formats=(PAIRS, UNPAIRED),
        trains_on=UNPAIRED,
        trl=(("trl", "KTOConfig", "KTOTrainer"), ("trl.experimental.kto", "KTOConfig", "KTOTrainer")),
        config=_beta_only,
        reference=True,
        min_micro_batch_size=2,
        min_micro_batch_why="its KL estimate pairs each completion with another prompt of the same micro-batch",
        # TRL's KTOTrainer samples sequentially (the KL term pairs each completion with its neighbour's prompt)
        shuffled_once=True,
    )
)
