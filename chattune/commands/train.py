"""The training recipe behind train.py, top to bottom: flags -> tokenizer -> data -> model -> train -> save."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers import EarlyStoppingCallback

from chattune.allocator import active_allocator
from chattune.cli import entry_point, report_progress
from chattune.config.flags import FlagError, TrainFlags, check_quantization_packages, parse_flags
from chattune.data import formats, tokenization
from chattune.data.masking import ChatMasker, trim_suffix_overlap
from chattune.data.sources import Source, read_sources
from chattune.models.gguf import find_gguf, resolve_model
from chattune.models.loading import (
    check_precision_hardware,
    choose_attention,
    choose_dtype,
    describe_quantization,
    load_model,
    quantization_config,
    quantized_device_map,
    weight_dtype,
)
from chattune.models.tokenizer import NO_TEMPLATE_HELP, add_tokens, load_tokenizer, resize_embeddings, set_stop_tokens
from chattune.training.adapters.loftq import check_loftq_weights, init_loftq
from chattune.training.adapters.lora import lora_config, upcast_trainable_parameters
from chattune.training.kernels.batching import plan_batching
from chattune.training.safety.budget import TimeBudget
from chattune.training.safety.checkpoints import GracefulStop, clear_staging
from chattune.training.safety.identity import (
    RunFinished,
    check_same_run,
    record_finished,
    record_start,
    run_fingerprint,
)
from chattune.training.safety.launcher import check_launch_precision
from chattune.training.safety.lock import run_lock
from chattune.training.safety.outputs import (
    check_export,
    check_outputs_are_free,
    clear_old_checkpoints,
    final_checkpoint,
    finish_hint,
    save_outputs,
)
from chattune.training.safety.preflight import check_inputs
from chattune.training.safety.progress import ThroughputCallback, run_first, summary
from chattune.training.safety.resume import ContinueSchedule, resolve_resume, run_record
from chattune.training.trainers.arguments import check_integrations, check_optimizer, set_warmup_epochs
from chattune.training.trainers.preference import build_preference_trainer, check_method, load_preferences
from chattune.training.trainers.sft import build_trainer
from chattune.training.trainers.task_metrics import plan_evaluations

logger = logging.getLogger("chattune")


@entry_point
def main(argv: list[str] | None = None) -> int:
    return start(parse_flags(argv))


def start(flags: TrainFlags) -> int:
    """Train with flags already read (train.py reads them before the allocator restart: chattune.train_entry)."""
    # Without a GPU, processes started by torchrun/accelerate talk over gloo (accelerate's MULTI_CPU).
    import torch

    state = PartialState(cpu=not torch.cuda.is_available())
    setup_logging(state.is_main_process)
    try:
        return train(flags, state)  # once training runs, Ctrl-C saves a checkpoint instead (GracefulStop)
    except RunFinished as finished:  # not an error: what was asked is done
        if state.is_main_process:
            print(finished, file=sys.stderr, flush=True)
        return 0


def train(flags: TrainFlags, state: PartialState) -> int:
    started = time.time()
    report_progress("preparing the run (tokenizer, data, model)", "nothing was saved")
    logger.info("memory allocator: %s", active_allocator())
    check_integrations(flags)
    check_method(flags)
    check_inputs(flags)
    check_precision_hardware(flags)
    check_quantization_packages(flags)
    dtype = choose_dtype(flags.bf16, flags.fp16)  # the compute dtype; trained weights may stay float32 (weight_dtype)
    check_launch_precision(flags, str(dtype).removeprefix("torch."))
    check_optimizer(flags)
    generation_plan = plan_evaluations(flags)
    with run_lock(flags.run_dir, flags.run_name, state):  # held until the command ends, however it ends
        return train_locked(flags, state, started, generation_plan, dtype)


def train_locked(flags: TrainFlags, state: PartialState, started: float, generation_plan: Any, dtype: Any) -> int:
    """The run once its lock is held: resume or start, prepare, train, save."""
    with state.main_process_first():  # a GGUF file is converted once, by the main process
        base_folder = resolve_model(flags.base_model)
    gguf_source = find_gguf(flags.base_model) if base_folder != flags.base_model else None
    flags = dataclasses.replace(flags, base_model=base_folder)
    check_loftq_weights(flags)
    report_progress("reading the run's fingerprint (data hashes, base model)")
    fingerprint = run_fingerprint(flags)
    resume = resolve_resume(flags, lambda checkpoint: check_same_run(flags, checkpoint, fingerprint))
    if resume is None:
        check_outputs_are_free(flags)
    accumulation = flags.gradient_accumulation_steps(state.num_processes)

    # 1. tokenizer and chat template
    tokenizer = load_tokenizer(flags.base_model)
    new_tokens = add_tokens(
        tokenizer,
        pad=flags.add_pad_token,
        chatml=flags.add_chatml_tokens,
        tool_calls=flags.add_tool_calling_tokens,
        template_file=flags.prompt_template_file,
    )
    masker = ChatMasker(tokenizer) if tokenizer.chat_template else None
    check_export(flags, tokenizer)

    # 2. data: tokenized and masked once, on the main process first; other ranks read the cache
    with state.main_process_first():
        train_data = read_data(flags, tokenizer, masker, flags.train_dataset, "--train_dataset")
        full_eval = None
        if flags.test_dataset:
            full_eval = read_data(flags, tokenizer, masker, flags.test_dataset, "--test_dataset")
    eval_data = sample_eval(full_eval, flags.eval_fraction, flags.seed)

    # 3. model
    report_progress(f"loading the model {flags.base_model}")
    model = load_base_model(flags, weight_dtype(flags, dtype))
    model.name_or_path = model.config._name_or_path = recorded_base(flags.base_model, gguf_source)
    grew = resize_embeddings(model, tokenizer)
    set_stop_tokens(model, tokenizer, masker.end_of_turn_token() if masker else None)
    peft_config = lora_config(flags, model, tokens_added=grew or bool(new_tokens)) if flags.use_lora else None
    if flags.quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=flags.gradient_checkpointing)
    logger.info(
        "effective batch %d = %d per micro-batch x %d accumulation x %d process(es)",
        flags.batch_size,
        flags.micro_batch_size,
        accumulation,
        state.num_processes,
    )

    # 4. train; Ctrl-C or SIGTERM saves a checkpoint and stops
    stop = GracefulStop()
    throughput = ThroughputCallback(model.num_parameters(), state.num_processes, flags.flops_baseline)
    callbacks = [stop, throughput, run_record(flags, state.num_processes, fingerprint)]
    if flags.time_budget:  # before ContinueSchedule: a resumed budgeted run's schedule is rebuilt first
        callbacks.append(TimeBudget(flags.time_budget, already_spent=time.time() - started))
    callbacks.append(ContinueSchedule())
    if flags.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=flags.early_stopping_patience))
    if flags.preference:
        held_out = full_eval if full_eval is not eval_data else None  # evaluated whole after training
        trainer = build_preference_trainer(
            flags, model, tokenizer, train_data, eval_data, dtype, peft_config, callbacks=callbacks, held_out=held_out
        )
    else:
        # an explicit --attn_implementation is taken as asked; by default SDPA attends per example
        plan = plan_batching(model, flags.packing, per_example_attention=flags.attn_implementation is None)
        logger.info("batching: %s", plan.reason)
        trainer = build_trainer(
            flags, model, tokenizer, train_data, eval_data, plan, dtype, peft_config, callbacks=callbacks
        )
        trainer.generation_plan = generation_plan
    finish_set_up(trainer, flags, dtype, fresh_start=resume is None, num_processes=state.num_processes)
    run_first(trainer, throughput)
    if state.is_main_process:
        clear_staging(flags.run_dir)
        if resume is None and flags.overwrite_output_dir:
            clear_old_checkpoints(flags.run_dir)
        record_start(flags.run_dir, fingerprint)
    state.wait_for_everyone()
    trainer.train(resume_from_checkpoint=resume)
    if stop.stopped:
        logger.error(
            "%s: stopped at step %d after saving %s; continue with the same command plus "
            "--resume_from_checkpoint latest",
            stop.signal_name,
            trainer.state.global_step,
            flags.run_dir / f"checkpoint-{trainer.state.global_step}",
        )
        return 130 if stop.signal_name == "SIGINT" else 143

    report_progress("evaluating on the full test set", finish_hint(final_checkpoint(flags, trainer)))
    final_eval = trainer.evaluate(full_eval) if full_eval is not None and eval_data is not full_eval else None

    # 5. save
    outputs = save_outputs(flags, trainer, tokenizer, dtype)
    if state.is_main_process:
        record_finished(flags.run_dir, trainer.state.global_step)
    if flags.push_to_hub and state.is_main_process:
        trainer.push_to_hub()
    if state.is_main_process:
        print(summary(trainer.state, trainer.args, started, outputs, final_eval))
    return 0


def finish_set_up(trainer: Any, flags: TrainFlags, dtype: Any, fresh_start: bool, num_processes: int) -> None:
    """What needs the trainer's PEFT model or prepared data: LoftQ's start, float16 scaling, warm-up epochs."""
    import torch

    if flags.lora_init == "loftq" and fresh_start:  # a resumed run loads its trained adapter instead
        init_loftq(trainer.model, flags.base_model)
    if dtype == torch.float16:
        upcast_trainable_parameters(trainer.model)
    set_warmup_epochs(trainer, flags, num_processes)


def recorded_base(base_model: str, gguf_source: Path | None) -> str:
    """The base model adapters (and saved configs) name: a local folder as an absolute path, so the adapter loads
    from any working directory; a GGUF file itself, not its converted copy; a hub id as given."""
    if gguf_source:
        return str(gguf_source.resolve())
    return str(Path(base_model).resolve()) if Path(base_model).exists() else base_model


def sample_eval(dataset: Any, fraction: float, seed: int) -> Any:
    """The periodic evaluations see a fixed random share of the test set; the end of the run sees all of it."""
    if dataset is None or fraction >= 1:
        return dataset
    size = max(1, math.ceil(len(dataset) * fraction))
    return dataset.shuffle(seed=seed).select(range(size))


def read_data(flags: TrainFlags, tokenizer: Any, masker: ChatMasker | None, specs: Sequence[str], flag: str) -> Any:
    """Preference rows for TRL's preference trainers, or conversations tokenized and masked for SFT; from one
    source or a mixture of several (chattune.data.sources), each read in its own format."""
    if flags.preference:
        return load_preferences(specs, flags.method, flags.seed, flag)

    def prepare_source(rows: Any, source: Source) -> Any:
        return prepare(flags, tokenizer, masker, rows, source.text)

    return read_sources(specs, prepare_source, seed=flags.seed, flag=flag)


def prepare(flags: TrainFlags, tokenizer: Any, masker: ChatMasker | None, rows: Any, source: str) -> Any:
    """One source's rows tokenized and masked, with a summary of what was kept in the log."""
    report_progress(f"tokenizing {source}")
    if formats.detect_format(rows, source).use != formats.TEXT and masker is None:
        raise FlagError(NO_TEMPLATE_HELP.format(model=flags.base_model))
    prefix, suffix = explicit_ids(flags)
    dataset, counts = tokenization.tokenize_dataset(
        rows,
        tokenizer,
        masker,
        source=source,
        ctx_size=flags.ctx_size,
        num_proc=flags.dataset_processing_threads or default_processes(),
        prefix_ids=prefix,
        suffix_ids=suffix,
        train_on_prompts=flags.train_on_prompts,
    )
    logger.info("%s", tokenization.summarize(counts, source))
    if len(dataset) == 0:
        hint = (
            f"--prefix_ids {flags.prefix_ids} never matched; check them with `python3 find_split.py "
            f"{flags.base_model}` or drop them to use automatic masking"
            if prefix
            else "check the data format (docs/data.md) and --ctx_size"
        )
        raise formats.DataError(f"{source}: no usable example left; {hint}")
    return dataset


def explicit_ids(flags: TrainFlags) -> tuple[list[int] | None, list[int] | None]:
    prefix, suffix = flags.prefix_id_list, flags.suffix_id_list
    if prefix and suffix:
        trimmed = trim_suffix_overlap(prefix, suffix)
        if not trimmed:
            raise FlagError("--suffix_ids only repeat --prefix_ids; they must contain the end-of-turn token(s)")
        if trimmed != suffix:
            logger.warning(
                "--suffix_ids %s end with the response header %s; using %s as the end of turn so the header "
                "of the next turn is never trained",
                suffix,
                suffix[len(trimmed) :],
                trimmed,
            )
        suffix = trimmed
    return prefix, suffix


def default_processes() -> int:
    import os

    return max(1, min(4, (os.cpu_count() or 1)))


def load_base_model(flags: TrainFlags, dtype: Any) -> Any:
    """The base model to train, its weights in `dtype`, with the attention kernel and quantization the flags ask."""
    quantization = quantization_config(flags, dtype)
    attention = choose_attention(flags.attn_implementation)
    model = load_model(flags.base_model, dtype, attention, quantization, quantized_device_map(flags))
    if quantization is not None:
        logger.info("loaded %s with %s", flags.base_model, describe_quantization(flags))
    model.config.use_cache = False  # the KV cache only costs memory during training
    return model


def setup_logging(main_process: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    import datasets
    import transformers

    transformers.logging.set_verbosity_warning()
    # bitsandbytes warns at import about optional CPU kernels it can do without
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    datasets.logging.set_verbosity_warning()
