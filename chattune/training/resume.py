"""Resuming a run: the checkpoint --resume_from_checkpoint names (or the latest one), refused when it holds
another model or another LoRA set-up. `latest` skips a damaged checkpoint for the newest whole one; a damaged
checkpoint named explicitly is refused."""

from __future__ import annotations

import logging
from pathlib import Path

from chattune.config.flags import FlagError, TrainFlags
from chattune.training.safety import checkpoint_problem, checkpoints_newest_first

logger = logging.getLogger(__name__)


def resolve_resume(flags: TrainFlags) -> str | None:
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
    check_checkpoint_matches(flags, path)
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
    import json

    adapter_file = checkpoint / "adapter_config.json"
    if flags.use_lora != adapter_file.is_file():
        kind = "a LoRA adapter" if adapter_file.is_file() else "full model weights"
        raise FlagError(f"{checkpoint} holds {kind}, but this run is {'LoRA' if flags.use_lora else 'full'} training")
    if flags.use_lora:
        saved = json.loads(adapter_file.read_text())
        wanted = {"r": flags.lora_rank, "lora_alpha": flags.lora_alpha}
        for key, value in wanted.items():
            if saved.get(key) != value:
                raise FlagError(f"{checkpoint} was trained with LoRA {key}={saved.get(key)}, this run asks for {value}")
        return
    from transformers import AutoConfig

    saved, base = AutoConfig.from_pretrained(checkpoint), AutoConfig.from_pretrained(flags.base_model)
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if getattr(saved, key, None) != getattr(base, key, None):
            raise FlagError(
                f"{checkpoint} is from another model: {key}={getattr(saved, key, None)}, but --base_model "
                f"{flags.base_model} has {getattr(base, key, None)}"
            )
