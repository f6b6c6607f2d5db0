"""A run's output folders: which ones it writes, refusing to overwrite them, and the final save into them."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from chattune.atomic import DiskFullError
from chattune.cli import report_progress
from chattune.config.flags import FlagError, TrainFlags
from chattune.export.merge import merge_adapter
from chattune.export.save import save_model
from chattune.models.loading import quantization_config
from chattune.training.safety.identity import RUN_FILE

logger = logging.getLogger(__name__)


def check_outputs_are_free(flags: TrainFlags) -> None:
    if flags.overwrite_output_dir:
        return
    for folder in planned_outputs(flags):
        if holds_results(folder, flags.run_dir):
            raise FlagError(
                f"{folder} exists and is not empty; pass --overwrite_output_dir to replace it, or "
                "--resume_from_checkpoint latest to continue the run"
            )


# What a run that stopped before its first checkpoint (a full disk, a crash) leaves in its run folder: TensorBoard's
# event files, the staging folder of a save a kill interrupted, and the run's fingerprint
# (chattune.training.safety.identity). Running the same command again, as that run's error says, is not refused for
# them.
LEFT_BEFORE_THE_FIRST_CHECKPOINT = {"runs", ".staging", RUN_FILE}


def holds_results(folder: Path, run_dir: Path) -> bool:
    """Whether a new run would replace something of value in `folder`."""
    ignored = LEFT_BEFORE_THE_FIRST_CHECKPOINT if folder == run_dir else set()
    return folder.is_dir() and any(path.name not in ignored for path in folder.iterdir())


def clear_old_checkpoints(run_dir: Path) -> None:
    """--overwrite_output_dir starts the run afresh: the checkpoints of the run it replaces go, so that neither the
    rotation (which keeps the highest step numbers) nor a later `--resume_from_checkpoint latest` picks them."""
    old = sorted(run_dir.glob("checkpoint-*"), key=lambda path: (len(path.name), path.name))  # by step
    for checkpoint in old:
        shutil.rmtree(checkpoint)
    if old:
        logger.warning(
            "--overwrite_output_dir: removed the %d checkpoint(s) of the previous run in %s: %s",
            len(old),
            run_dir,
            ", ".join(path.name for path in old),
        )


def check_export(flags: TrainFlags, tokenizer: Any) -> None:
    """--export_gguf: refuse, before any training, a base model whose architecture, RoPE scaling or tokenizer the
    GGUF exporter cannot write (fine-tuning changes none of them)."""
    if not flags.export_gguf:
        return
    from transformers import AutoConfig

    from chattune.export.gguf import check_exportable

    config = AutoConfig.from_pretrained(flags.base_model).to_dict()
    check_exportable(config, tokenizer, where=f"--export_gguf {flags.export_gguf} of {flags.base_model}")


def planned_outputs(flags: TrainFlags) -> list[Path]:
    folders = [flags.run_dir]
    if flags.use_lora:
        folders.append(flags.lora_dir)
    if not flags.use_lora or flags.lora_merge:
        folders.append(flags.model_dir)
    return folders


def save_outputs(flags: TrainFlags, trainer: Any, tokenizer: Any, dtype: Any) -> list[Path]:
    """Full model -> models/<run>; LoRA -> loras/<run> (+ merged -> models/<run> with --lora_merge)."""
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    # Every process takes part in gathering the weights (FSDP and ZeRO-3 shard them); rank 0 writes. Under DeepSpeed
    # only the engine (model_wrapped; trainer.model is the bare module) can gather ZeRO-3's partitions.
    state_dict = accelerator.get_state_dict(trainer.model_wrapped)
    model = accelerator.unwrap_model(trainer.model)
    outputs: list[Path] = []
    if trainer.is_world_process_zero():
        checkpoint = final_checkpoint(flags, trainer)
        reload = flags.quantized or accelerator.num_processes > 1  # the local copy holds no full weights
        try:
            write_outputs(flags, model, state_dict, tokenizer, (reload, dtype), checkpoint, outputs)
        except DiskFullError as error:  # the run is not lost: its last checkpoint holds the weights
            raise DiskFullError(f"{error}; free some space: {finish_hint(checkpoint)}") from error
    accelerator.wait_for_everyone()
    return outputs


def write_outputs(
    flags: TrainFlags,
    model: Any,
    state_dict: dict,
    tokenizer: Any,
    merge_reload: tuple[bool, Any],
    checkpoint: Path,
    outputs: list[Path],
) -> None:
    """The saves, in order, each appended to `outputs` once written (a signal's message lists them).
    `merge_reload`: whether merging loads the base again (see merge_adapter), and in which dtype."""
    target = flags.lora_dir if flags.use_lora else flags.model_dir
    saving(f"writing {target}", outputs, checkpoint)
    outputs.append(save_model(model, tokenizer, target, state_dict))
    if flags.use_lora and flags.lora_merge:
        saving(f"merging the adapter into {flags.model_dir}", outputs, checkpoint)
        reload, dtype = merge_reload
        # LoftQ's adapter learned the quantization error, and a GPTQ checkpoint has no other weights: the adapter
        # is merged onto the quantized weights it trained with
        on_quantized = flags.lora_init == "loftq" or flags.load_as_gptq
        quantization = quantization_config(flags, dtype) if on_quantized else None
        merged = merge_adapter(
            model, flags.base_model, reload, dtype, flags.lora_dir, trained_on_quantization=quantization
        )
        merged.generation_config = model.generation_config
        outputs.append(save_model(merged, tokenizer, flags.model_dir))
    if flags.export_gguf:
        from chattune.export.gguf import export_gguf

        saving(f"exporting {flags.model_dir} to GGUF", outputs, checkpoint)
        # Into the model folder just written whole (save_model replaces it): it holds no earlier GGUF file or
        # Modelfile, so there is nothing to overwrite, and the exporter's refusal to replace a file stays on.
        outputs.append(export_gguf(flags.model_dir, outtype=flags.export_gguf, overwrite=False))
        saving(f"writing an Ollama Modelfile beside {outputs[-1]}", outputs, checkpoint)
        outputs.append(write_ollama_modelfile(flags, outputs[-1]))


def write_ollama_modelfile(flags: TrainFlags, gguf_path: Path) -> Path:
    """The Modelfile for the exported file, with the tokenizer saved in the model folder (the one the GGUF file
    holds) and, as SYSTEM, the system prompt every training row starts with, if there is one."""
    from chattune.export.ollama import training_system_prompt, write_modelfile
    from chattune.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(flags.model_dir)
    return write_modelfile(gguf_path, tokenizer, training_system_prompt(flags.train_dataset))


def final_checkpoint(flags: TrainFlags, trainer: Any) -> Path:
    """The checkpoint the trainer saved at its last step (save_strategy "steps" always saves the last one)."""
    return flags.run_dir / f"checkpoint-{trainer.state.global_step}"


def finish_hint(checkpoint: Path) -> str:
    return (
        f"the trained weights are in {checkpoint}; rerun the same command plus --resume_from_checkpoint latest "
        "to finish"
    )


def saving(step: str, written: list[Path], checkpoint: Path) -> None:
    """Report the save step now under way, for a signal's message: what is already written, what is not."""
    done = f"wrote {', '.join(map(str, written))}; " if written else ""
    report_progress(step, f"{done}nothing is left half-written; {finish_hint(checkpoint)}")
