"""Preference training on TRL's trainers: DPO (and its loss variants), SimPO, ORPO and KTO.

Accepted rows (their formats are entries of chattune.data.formats' registry):
* the data generator's pairs: {"system", "question", "chosen", "rejected"} (system optional)
* TRL's pairs: {"prompt", "chosen", "rejected"}, as plain strings or as lists of chat messages
* TRL's pairs with an implicit prompt: {"chosen", "rejected"} conversations whose common first messages are the
  prompt
* KTO only: unpaired rows {"prompt", "completion", "label"}, label true for a good completion, false for a bad one

KTO reads its rows in a fixed order (TRL's KTOTrainer samples sequentially: the KL term pairs each completion with
its neighbour's prompt), so they are shuffled once with --seed, pairs being split into a good and a bad row first;
otherwise the order of the file, or every good answer before every bad one, would be the order of training.
"""

from __future__ import annotations

import copy
import importlib
import logging
import re
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset

from chattune.config.flags import FlagError, TrainFlags
from chattune.data import formats
from chattune.data.errors import DataError
from chattune.data.sources import Source, read_sources
from chattune.training.kernels.shared_prefix import LeanDPO, share_prompts
from chattune.training.safety.checkpoints import AtomicCheckpointMixin
from chattune.training.trainers.arguments import training_args

logger = logging.getLogger(__name__)

# Where TRL keeps each method's config and trainer, newest layout first: TRL moves trainers between its stable
# API and trl.experimental from one release to the next.
TRL_CLASSES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "dpo": (("trl", "DPOConfig", "DPOTrainer"),),
    "simpo": (("trl.experimental.cpo", "CPOConfig", "CPOTrainer"), ("trl", "CPOConfig", "CPOTrainer")),
    "orpo": (("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer"), ("trl", "ORPOConfig", "ORPOTrainer")),
    "kto": (("trl", "KTOConfig", "KTOTrainer"), ("trl.experimental.kto", "KTOConfig", "KTOTrainer")),
}


def trl_classes(method: str) -> tuple[type, type]:
    """The installed TRL's config and trainer classes for `method`; a FlagError naming the TRL version if absent."""
    import trl

    places = TRL_CLASSES[method]
    for module_name, config_name, trainer_name in places:
        try:
            module = importlib.import_module(module_name)
            return getattr(module, config_name), getattr(module, trainer_name)
        except (ImportError, AttributeError):
            continue
    _, config_name, trainer_name = places[0]
    looked = " and ".join(sorted({module for module, _, _ in places}))
    raise FlagError(
        f"--method {method} needs TRL's {config_name} and {trainer_name}, which the installed TRL {trl.__version__} "
        f"does not have (looked in {looked}); install a TRL release that has them, or choose another --method"
    )


def dpo_loss_types() -> list[str]:
    """The loss types the installed TRL's DPOConfig documents (empty when it documents none readably)."""
    from trl import DPOConfig

    field = DPOConfig.__dataclass_fields__.get("loss_type")
    return re.findall(r"`'([a-z0-9_]+)'`", field.metadata.get("help", "")) if field else []


def check_method(flags: TrainFlags) -> None:
    """Before any work: the method's TRL classes exist, and --dpo_loss is one TRL knows."""
    if not flags.preference:
        return
    trl_classes(flags.method)
    if flags.method == "dpo":
        known = dpo_loss_types()
        if known and flags.dpo_loss not in known:
            raise FlagError(f"--dpo_loss {flags.dpo_loss!r} is not a TRL DPO loss; choose one of {', '.join(known)}")


def load_preferences(
    specs: str | Sequence[str], method: str = "dpo", seed: int = 42, flag: str = "--train_dataset"
) -> Dataset:
    """Preference rows in TRL's format: pairs for DPO, SimPO and ORPO; unpaired rows, shuffled, for KTO.

    Each source (chattune.data.sources) is read in its own format, from the registry of chattune.data.formats
    (PAIRS, and UNPAIRED for KTO); several are then mixed or concatenated. Pairs whose chosen and rejected
    answers are identical are dropped, with a count in the log.
    """

    def prepare_source(rows: Dataset, source: Source) -> Dataset:
        return _preference_rows(rows, source.text, method)

    rows = read_sources(specs, prepare_source, seed=seed, flag=flag)
    if method == "kto":
        rows = rows.shuffle(seed=seed).flatten_indices()
    return rows


def _preference_rows(rows: Dataset, source: str, method: str) -> Dataset:
    """One source's rows as TRL preference rows (KTO's pairs split into a good and a bad row)."""
    uses = (formats.PAIRS, formats.UNPAIRED) if method == "kto" else (formats.PAIRS,)
    if method != "kto" and formats.FORMATS["unpaired"].detects(rows.column_names):
        if not any(f.detects(rows.column_names) for f in formats.FORMATS.values() if f.use == formats.PAIRS):
            raise DataError(
                f"{source}: {{prompt, completion, label}} rows are unpaired (KTO's format); train them with "
                f"--method kto, or give --method {method} pairs; {formats.formats_help(uses)}"
            )
    data_format = formats.detect_format(rows, source, uses)
    rows = rows.map(
        lambda row, index: data_format.convert(row, f"{source}: row {index + 1}: "),
        with_indices=True,
        remove_columns=rows.column_names,
        desc="Reading preference rows",
    )
    if data_format.use == formats.PAIRS:
        same = rows.filter(lambda row: row["chosen"] == row["rejected"])
        if len(same):
            logger.warning("%s: skipped %d pair(s) whose chosen and rejected answers are identical", source, len(same))
            rows = rows.filter(lambda row: row["chosen"] != row["rejected"])
    if len(rows) == 0:
        raise DataError(f"{source}: no usable preference row left")
    logger.info("%s: %d preference %s", source, len(rows), "pairs" if data_format.use == formats.PAIRS else "rows")
    if method == "kto" and data_format.use == formats.PAIRS:
        rows = rows.map(_unpair, batched=True, remove_columns=rows.column_names, desc="Splitting pairs for KTO")
    return rows


def load_pairs(source: str) -> Dataset:
    """Preference pairs for DPO, SimPO and ORPO."""
    return load_preferences(source, "dpo")


def _unpair(batch: dict[str, list]) -> dict[str, list]:
    """Each pair becomes two KTO rows: the chosen answer labelled good, the rejected one bad."""
    n = len(batch["prompt"])
    return {
        "prompt": batch["prompt"] * 2,
        "completion": batch["chosen"] + batch["rejected"],
        "label": [True] * n + [False] * n,
    }


def build_preference_trainer(
    flags: TrainFlags,
    model: Any,
    tokenizer: Any,
    train_data: Dataset,
    eval_data: Dataset | None,
    dtype: torch.dtype,
    peft_config: Any | None = None,
    callbacks: list | None = None,
    held_out: Dataset | None = None,
) -> Any:
    """The TRL trainer of --method: DPO and KTO against the starting model, SimPO and ORPO reference-free.

    `held_out` is a test set evaluated only after training (train.py's whole --test_dataset when the periodic
    evaluations see a sample of it); with --precompute_ref_log_probs its reference log-probs are computed
    before training, while the starting model still exists.
    """
    config_class, trl_trainer = trl_classes(flags.method)
    mixins: tuple[type, ...] = ()
    if flags.method == "dpo":
        share_prompts(model, per_example_attention=flags.attn_implementation is None)
        mixins = (LeanDPO,)
    trainer_class = with_atomic_checkpoints(trl_trainer, *mixins)
    common = dict(**training_args(flags, dtype, has_eval=eval_data is not None), max_length=flags.ctx_size)
    shared = dict(
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    if flags.method == "simpo":  # CPO's trainer with the SimPO loss and no behaviour-cloning term
        config = config_class(
            **common, loss_type="simpo", cpo_alpha=0.0, beta=flags.beta, simpo_gamma=flags.simpo_gamma
        )
        return trainer_class(model=model, args=config, **shared)
    if flags.method == "orpo":  # SFT loss on the chosen answer plus beta x the odds-ratio term
        return trainer_class(model=model, args=config_class(**common, beta=flags.beta), **shared)
    if flags.method == "kto":
        config = config_class(**common, beta=flags.beta)
    else:  # DPO's batches carry input_ids and attention_mask, so the trainer can count the tokens it trains on
        config = config_class(
            **common,
            beta=flags.beta,
            loss_type=[flags.dpo_loss],
            include_num_input_tokens_seen="non_padding",
            precompute_ref_log_probs=flags.precompute_ref_log_probs,
        )
        if flags.precompute_ref_log_probs:
            return _precomputed_dpo_trainer(trl_trainer, mixins, flags, model, dtype, config, shared, held_out)
    # The reference is the starting model. With LoRA, TRL disables the adapter instead of keeping a copy.
    reference = None if peft_config is not None else _frozen_copy(model)
    return trainer_class(model=model, ref_model=reference, args=config, **shared)


def _precomputed_dpo_trainer(
    trl_trainer: type,
    mixins: tuple[type, ...],
    flags: TrainFlags,
    model: Any,
    dtype: torch.dtype,
    config: Any,
    shared: dict,
    held_out: Dataset | None,
) -> Any:
    """DPO whose reference log-probs are read from the cache or computed before training (chattune.training.
    reference). No reference model is passed: TRL then scores the pairs with the model itself before the first
    step (with LoRA, with the adapter off) and keeps nothing besides the policy."""
    from chattune.training.trainers.reference import PrecomputedReference, reference_identity

    trainer_class = with_atomic_checkpoints(trl_trainer, PrecomputedReference, *mixins)
    return trainer_class(
        model=model,
        ref_model=None,
        args=config,
        reference_identity=reference_identity(flags, model, dtype),
        held_out=held_out,
        **shared,
    )


def with_atomic_checkpoints(trainer_class: type, *mixins: type) -> type:
    """`trainer_class` with atomic checkpoints and `mixins` (outermost first), under its own name."""
    return type(trainer_class.__name__, (AtomicCheckpointMixin, *mixins, trainer_class), {})


def _frozen_copy(model: Any) -> Any:
    """A copy of the starting weights: reloading from the hub id would miss tokens added to this model."""
    reference = copy.deepcopy(model).eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    return reference
