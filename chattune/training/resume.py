"""Resuming a run: the checkpoint --resume_from_checkpoint names (or the latest one), refused when it holds
another model or another LoRA set-up."""

from __future__ import annotations

from pathlib import Path

from chattune.config.flags import FlagError, TrainFlags

BASE_REWRITING_INITS = ("pissa", "olora")


def resolve_resume(flags: TrainFlags) -> str | None:
    if not flags.resume_from_checkpoint:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    path = Path(flags.resume_from_checkpoint)
    if flags.resume_from_checkpoint == "latest":
        last = get_last_checkpoint(str(flags.run_dir)) if flags.run_dir.is_dir() else None
        if last is None:
            raise FlagError(f"--resume_from_checkpoint latest: no checkpoint-* folder in {flags.run_dir}")
        path = Path(last)
    if not (path / "trainer_state.json").is_file():
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        raise FlagError(
            f"--resume_from_checkpoint {path} is not a checkpoint (no trainer_state.json); found: {found or 'nothing'}"
        )
    check_checkpoint_matches(flags, path)
    return str(path)


def check_checkpoint_matches(flags: TrainFlags, checkpoint: Path) -> None:
    """Refuse to resume a checkpoint of another model or LoRA set-up: it would load, then train nonsense."""
    import json

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
        return
    from transformers import AutoConfig

    saved, base = AutoConfig.from_pretrained(checkpoint), AutoConfig.from_pretrained(flags.base_model)
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if getattr(saved, key, None) != getattr(base, key, None):
            raise FlagError(
                f"{checkpoint} is from another model: {key}={getattr(saved, key, None)}, but --base_model "
                f"{flags.base_model} has {getattr(base, key, None)}"
            )
