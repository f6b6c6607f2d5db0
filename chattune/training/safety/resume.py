"""Resuming a run: the checkpoint --resume_from_checkpoint names (or the latest one), refused when it holds
another model, another LoRA set-up, a LoRA adapter of another base model, or another effective batch. `latest` skips
a damaged checkpoint for the newest whole one; a damaged checkpoint named explicitly is refused.

Each checkpoint records what an exact resume needs to match (RunRecord, stored in its trainer_state.json): the
batch arithmetic and, for LoRA, the identity of the base model (its shape and a fingerprint of its weight files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from chattune.config.flags import FlagError, TrainFlags
from chattune.models.hub_cache import cached_hub_model
from chattune.training.safety.checkpoints import checkpoint_problem, checkpoints_newest_first

logger = logging.getLogger(__name__)

# What a checkpoint's base model must have in common with --base_model: its shape ...
SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
# ... and its weights, compared by sampling their files: enough to tell two trainings of one architecture apart
# without reading gigabytes.
SAMPLES_PER_FILE, SAMPLE_BYTES = 32, 4096
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")

BASE_REWRITING_INITS = ("pissa", "olora")


def resolve_resume(flags: TrainFlags, same_run: Callable[[Path], None] | None = None) -> str | None:
    """The checkpoint to resume from, or None for a fresh start. With `same_run` (the comparison of the checkpoint's
    fingerprint with the run's: chattune.training.safety.identity.check_same_run, passed in by the recipe so that
    the two modules do not import each other), the checkpoint is checked by it first."""
    if not flags.resume_from_checkpoint:
        return None
    if flags.resume_from_checkpoint == "latest":
        path = newest_complete_checkpoint(flags.run_dir)
    else:
        path = Path(flags.resume_from_checkpoint)
        if not (path / "trainer_state.json").is_file():
            found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
            raise FlagError(
                f"--resume_from_checkpoint {path} is not a checkpoint (no trainer_state.json); "
                f"found: {found or 'nothing'}"
            )
        refuse_damaged(path)
    if same_run is not None:
        same_run(path)
    check_checkpoint_matches(flags, path)
    check_same_batch(flags, path)
    return str(path)


def newest_complete_checkpoint(run_dir: Path) -> Path:
    """`latest`: the newest checkpoint that is whole; damaged newer ones are skipped, each with a warning."""
    skipped = []
    for checkpoint in checkpoints_newest_first(run_dir):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        logger.warning("skipping %s: %s; trying the one before", checkpoint, problem)
        skipped.append(f"{checkpoint.name} ({problem})")
    if skipped:
        raise FlagError(
            f"--resume_from_checkpoint latest: no complete checkpoint in {run_dir}: {'; '.join(skipped)}; "
            "start over with --overwrite_output_dir"
        )
    raise FlagError(f"--resume_from_checkpoint latest: no checkpoint-* folder in {run_dir}")


def refuse_damaged(checkpoint: Path) -> None:
    """An explicitly named checkpoint is used as named or not at all; the error names a whole one to use instead."""
    problem = checkpoint_problem(checkpoint)
    if problem is None:
        return
    others = [c for c in checkpoints_newest_first(checkpoint.parent) if c != checkpoint]
    whole = next((c for c in others if checkpoint_problem(c) is None), None)
    instead = f"resume from {whole} instead" if whole else "no other checkpoint beside it is complete"
    raise FlagError(f"--resume_from_checkpoint {checkpoint}: {problem}, so it cannot be resumed; {instead}")


def check_checkpoint_matches(flags: TrainFlags, checkpoint: Path) -> None:
    """Refuse to resume a checkpoint of another model or LoRA set-up: it would load, then train nonsense."""
    adapter_file = checkpoint / "adapter_config.json"
    if flags.use_lora != adapter_file.is_file():
        kind = "a LoRA adapter" if adapter_file.is_file() else "full model weights"
        raise FlagError(f"{checkpoint} holds {kind}, but this run is {'LoRA' if flags.use_lora else 'full'} training")
    if flags.use_lora:
        saved = json.loads(adapter_file.read_text())
        wanted = {
            "r": flags.lora_rank,
            "lora_alpha": flags.lora_alpha,
            "use_dora": flags.use_dora,
            "use_rslora": flags.use_rslora,
            # pissa and olora rewrite the base weights the adapter was trained against; other inits only start it
            "init_lora_weights": flags.lora_init if flags.lora_init in BASE_REWRITING_INITS else "default",
        }
        if saved.get("init_lora_weights") not in BASE_REWRITING_INITS:
            saved["init_lora_weights"] = "default"
        for key, value in wanted.items():
            if saved.get(key, False) != value:  # an older adapter_config.json may lack a key: peft's default, off
                raise FlagError(
                    f"{checkpoint} was trained with LoRA {key}={saved.get(key, False)}, this run asks for {value}"
                )
        check_same_base(flags.base_model, checkpoint, saved.get("base_model_name_or_path"))
        return
    from transformers import AutoConfig

    saved, base = AutoConfig.from_pretrained(checkpoint), AutoConfig.from_pretrained(flags.base_model)
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if getattr(saved, key, None) != getattr(base, key, None):
            raise FlagError(
                f"{checkpoint} is from another model: {key}={getattr(saved, key, None)}, but --base_model "
                f"{flags.base_model} has {getattr(base, key, None)}"
            )


def recorded(checkpoint: Path) -> dict:
    """What the run that wrote `checkpoint` recorded about itself (empty for checkpoints older than the record, or
    without a trainer state: whether such a checkpoint can be resumed is decided elsewhere)."""
    path = checkpoint / "trainer_state.json"
    if not path.is_file():
        return {}
    state = json.loads(path.read_text(encoding="utf-8"))
    return state.get("stateful_callbacks", {}).get(RunRecord.__name__, {}).get("args", {}).get("record", {})


def check_same_base(base_model: str, checkpoint: Path, recorded_path: str | None) -> None:
    """A LoRA adapter only means something on the base it was trained on: refuse another one, even of the same
    shape (it would load and silently train on top of other weights)."""
    saved = recorded(checkpoint).get("base")
    if saved is None:  # an older checkpoint: compare with the base its adapter config names, if it is still there
        folder = Path(recorded_path).expanduser() if recorded_path else None
        if folder is None or not folder.is_dir():
            logger.warning("%s does not record its base model; cannot check --base_model against it", checkpoint)
            return
        saved = base_identity(str(folder.resolve()))
    current = base_identity(base_model)
    for key, value in saved["config"].items():
        if current["config"].get(key) != value:
            raise FlagError(
                f"{checkpoint} is a LoRA adapter of another model: its base {saved['name']} has {key}={value}, "
                f"--base_model {base_model} has {current['config'].get(key)}; resume with --base_model {saved['name']}"
            )
    if saved["weights"] and current["weights"] and saved["weights"] != current["weights"]:
        raise FlagError(
            f"{checkpoint} is a LoRA adapter trained on {saved['name']} (weights {saved['weights']}), but --base_model "
            f"{base_model} holds other weights ({current['weights']}) of the same shape; resume with the same base "
            "model, or start a new run"
        )


def check_same_batch(flags: TrainFlags, checkpoint: Path) -> None:
    """An exact resume needs the effective batch of the checkpoint's run: another one changes which examples make
    each step from the checkpoint on. Another split of the same batch (micro-batch, processes) only rounds."""
    saved = recorded(checkpoint).get("batch")
    if saved is None:
        return
    if saved["batch_size"] != flags.batch_size:
        raise FlagError(
            f"{checkpoint} was trained with --batch_size {saved['batch_size']}, this run asks for {flags.batch_size}; "
            f"resume with --batch_size {saved['batch_size']} (an exact resume keeps the effective batch), or start "
            "a new run"
        )
    current = batch_record(flags, int(os.environ.get("WORLD_SIZE", "1")))  # the launcher's process count
    if saved != current:
        logger.warning(
            "%s was trained with micro-batches of %d on %d process(es), this run uses %d on %d; the effective batch "
            "is the same %d examples, so the resumed run differs from an uninterrupted one only by rounding",
            checkpoint,
            saved["micro_batch_size"],
            saved["processes"],
            current["micro_batch_size"],
            current["processes"],
            flags.batch_size,
        )


def batch_record(flags: TrainFlags, processes: int) -> dict:
    return {"batch_size": flags.batch_size, "micro_batch_size": flags.micro_batch_size, "processes": processes}


def model_folder(name_or_path: str) -> Path | None:
    """The local folder of a model: the path itself, or a hub id's copy in the Hugging Face cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    return cached_hub_model(name_or_path)


def base_identity(name_or_path: str) -> dict:
    """A base model's name (absolute when local), shape (SHAPE_KEYS of its config) and weights fingerprint."""
    from transformers import AutoConfig

    folder = model_folder(name_or_path)
    config = AutoConfig.from_pretrained(folder or name_or_path)
    return {
        "name": str(folder.resolve()) if folder and Path(name_or_path).expanduser().is_dir() else name_or_path,
        "config": {key: getattr(config, key, None) for key in SHAPE_KEYS},
        "weights": weights_fingerprint(folder) if folder else None,
    }


def weights_fingerprint(folder: Path) -> str | None:
    """A hash of the weight files' names, sizes and SAMPLES_PER_FILE evenly spaced blocks of their bytes."""
    files = sorted({file for pattern in WEIGHT_PATTERNS for file in folder.glob(pattern)})
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size};".encode())
        with file.open("rb") as handle:
            for index in range(SAMPLES_PER_FILE):
                handle.seek(max(0, size - SAMPLE_BYTES) * index // (SAMPLES_PER_FILE - 1))
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]


class RunRecord(TrainerCallback, ExportableState):
    """Stores `record` (the batch, the run's fingerprint and, for LoRA, the base model's identity) in every
    checkpoint's trainer_state.json, where resolve_resume reads it back."""

    def __init__(self, record: dict) -> None:
        self.record = record

    def state(self) -> dict:
        return {"args": {"record": self.record}, "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        # A state read from an older checkpoint lacks this callback's entry, which the trainer's save expects.
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())


def run_record(flags: TrainFlags, processes: int, fingerprint: dict | None = None) -> RunRecord:
    record: dict[str, Any] = {"batch": batch_record(flags, processes)}
    if fingerprint is not None:
        record["fingerprint"] = fingerprint
    if flags.use_lora:
        record["base"] = base_identity(flags.base_model)
    return RunRecord(record)


class ContinueSchedule(TrainerCallback):
    """On resume, the first step's learning rate comes from this run's schedule.

    The optimizer state holds the learning rate the checkpoint's schedule set for the next step. When --max_steps
    (or --epochs) grew, the schedule is longer now; the scheduler follows it from the next step on, but the first
    resumed step would still run at the old rate: 0 at the end of a cosine schedule. Unchanged, the two are equal.
    """

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate may wrap it
        if state.global_step == 0 or optimizer is None or not hasattr(scheduler, "lr_lambdas"):
            return
        was = [group["lr"] for group in optimizer.param_groups]
        rates = follow_schedule(scheduler, optimizer)
        if rates != was:
            logger.info(
                "resumed at step %d of %d: learning rate %.3g from this run's schedule (the checkpoint's had set %.3g)",
                state.global_step,
                state.max_steps,
                rates[0],
                was[0],
            )


def follow_schedule(scheduler: Any, optimizer: Any) -> list[float]:
    """Set each parameter group's learning rate for the scheduler's current step from its step -> factor functions
    (LambdaLR's lr_lambdas), as if the schedule had always been this one; returns the rates."""
    step = scheduler.last_epoch
    rates = [base * schedule(step) for schedule, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates  # what the trainer logs as this step's learning rate (get_last_lr)
    return rates
