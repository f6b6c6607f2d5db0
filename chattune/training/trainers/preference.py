"""Preference training on TRL's trainers: DPO (and its loss variants), SimPO, ORPO, KTO, and any other method of
chattune.config.methods' table that trains on preference rows.

Accepted rows (their formats are entries of chattune.data.formats' registry):
* the data generator's pairs: {"system", "question", "chosen", "rejected"} (system optional)
* TRL's pairs: {"prompt", "chosen", "rejected"}, as plain strings or as lists of chat messages
* TRL's pairs with an implicit prompt: {"chosen", "rejected"} conversations whose common first messages are the
  prompt
* KTO only: unpaired rows {"prompt", "completion", "label"}, label true for a good completion, false for a bad one

A method that trains on unpaired rows (KTO) gets pairs split into a good and a bad row. KTO reads its rows in a
fixed order (TRL's KTOTrainer samples sequentially: the KL term pairs each completion with its neighbour's prompt),
so they are shuffled once with --seed; otherwise the order of the file, or every good answer before every bad one,
would be the order of training.
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
from chattune.config.methods import METHODS, Method, load
from chattune.data import formats
from chattune.data.errors import DataError
from chattune.data.sources import Source, read_sources
from chattune.training.kernels.shared_prefix import LeanDPO, share_prompts
from chattune.training.safety.checkpoints import AtomicCheckpointMixin
from chattune.training.trainers.arguments import training_args

logger = logging.getLogger(__name__)


def trl_classes(method: Method) -> tuple[type, type]:
    """The installed TRL's config and trainer classes for `method`; a FlagError naming the TRL version if absent.
    TRL moves trainers between its stable API and trl.experimental from one release to the next, so the entry
    lists every place, newest first."""
    import trl

    places = method.trl
    for module_name, config_name, trainer_name in places:
        try:
            module = importlib.import_module(module_name)
            return getattr(module, config_name), getattr(module, trainer_name)
        except (ImportError, AttributeError):
            continue
    _, config_name, trainer_name = places[0]
    looked = " and ".join(sorted({module for module, _, _ in places}))
    raise FlagError(
        f"--method {method.name} needs TRL's {config_name} and {trainer_name}, which the installed TRL "
        f"{trl.__version__} "
        f"does not have (looked in {looked}); install a TRL release that has them, or choose another --method"
    )


def dpo_loss_types() -> list[str]:
    """The loss types the installed TRL's DPOConfig documents (empty when it documents none readably)."""
    from trl import DPOConfig

    field = DPOConfig.__dataclass_fields__.get("loss_type")
    return re.findall(r"`'([a-z0-9_]+)'`", field.metadata.get("help", "")) if field else []


def check_method(flags: TrainFlags) -> None:
    """Before any work: the method's TRL classes exist, and its own check (DPO's: --dpo_loss is one TRL knows)."""
    method = METHODS[flags.method]
    trl_classes(method)
    if method.check:
        load(method.check)(flags)


def check_dpo_loss(flags: TrainFlags) -> None:
    known = dpo_loss_types()
    if known and flags.dpo_loss not in known:
        raise FlagError(f"--dpo_loss {flags.dpo_loss!r} is not a TRL DPO loss; choose one of {', '.join(known)}")


def load_preferences(
    specs: str | Sequence[str], method: str = "dpo", seed: int = 42, flag: str = "--train_dataset"
) -> Dataset:
    """Preference rows in TRL's format: pairs for DPO, SimPO and ORPO; unpaired rows, shuffled, for KTO (the
    method's entry in chattune.config.methods says which).

    Each source (chattune.data.sources) is read in its own format, from the registry of chattune.data.formats
    (the formats the method accepts); several are then mixed or concatenated. Pairs whose chosen and rejected
    answers are identical are dropped, with a count in the log.
    """
    entry = METHODS[method]

    def prepare_source(rows: Dataset, source: Source) -> Dataset:
        return _preference_rows(rows, source.text, entry)

    rows = read_sources(specs, prepare_source, seed=seed, flag=flag)
    if entry.shuffled_once:
        rows = rows.shuffle(seed=seed).flatten_indices()
    return rows


def _preference_rows(rows: Dataset, source: str, method: Method) -> Dataset:
    """One source's rows as TRL preference rows (pairs split into a good and a bad row for unpaired methods)."""
    uses = method.formats
    if formats.UNPAIRED not in uses and formats.FORMATS["unpaired"].detects(rows.column_names):
        if not any(f.detects(rows.column_names) for f in formats.FORMATS.values() if f.use == formats.PAIRS):
            takers = [entry.name for entry in METHODS.values() if formats.UNPAIRED in entry.formats]
            raise DataError(
                f"{source}: {{prompt, completion, label}} rows are unpaired (KTO's format); train them with "
                f"--method {' or '.join(takers)}, or give --method {method.name} pairs; {formats.formats_help(uses)}"
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
    if method.trains_on == formats.UNPAIRED and data_format.use == formats.PAIRS:
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
    """The TRL trainer of --method, built from its entry in chattune.config.methods: DPO and KTO against the
    starting model, SimPO and ORPO reference-free.

    `held_out` is a test set evaluated only after training (train.py's whole --test_dataset when the periodic
    evaluations see a sample of it); with --precompute_ref_log_probs its reference log-probs are computed
    before training, while the starting model still exists.
    """
    method = METHODS[flags.method]
    config_class, trl_trainer = trl_classes(method)
    mixins: tuple[type, ...] = load(method.trainer_parts)(flags, model) if method.trainer_parts else ()
    common = dict(**training_args(flags, dtype, has_eval=eval_data is not None), max_length=flags.ctx_size)
    config = config_class(**common, **method.config(flags))
    shared = dict(
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    if flags.precompute_ref_log_probs:  # a flag of the methods with a reference (dpo): the flags refuse it elsewhere
        return _precomputed_dpo_trainer(trl_trainer, mixins, flags, model, dtype, config, shared, held_out)
    trainer_class = with_atomic_checkpoints(trl_trainer, *mixins)
    if not method.reference:
        return trainer_class(model=model, args=config, **shared)
    # The reference is the starting model. With LoRA, TRL disables the adapter instead of keeping a copy.
    reference = None if peft_config is not None else _frozen_copy(model)
    return trainer_class(model=model, ref_model=reference, args=config, **shared)


def lean_dpo(flags: TrainFlags, model: Any) -> tuple[type, ...]:
    """DPO's parts: each pair's prompt runs once where the model's attention allows (chattune.training.
    shared_prefix); by default SDPA attends per example, an explicit --attn_implementation is kept."""
    share_prompts(model, per_example_attention=flags.attn_implementation is None)
    return (LeanDPO,)


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
