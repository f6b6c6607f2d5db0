"""Every train.py flag, in one dataclass.

The dataclass is the single source of truth: `--help`, YAML recipes (`--config`) and the docs' flag
reference are all generated from it. Flag names follow home-llm's train.py so its commands run unchanged.
Reading and checking the flags imports neither torch nor transformers (chattune.config.dataclass_parser,
chattune.config.transformers_names): train.py reads them first, so `--help` and a refusal take a fraction of a second.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from chattune.config.dataclass_parser import dataclass_parser, list_fields
from chattune.config.methods import METHODS, check_scoped_flags
from chattune.config.outtypes import (
    ALL_OUTTYPES,
    EMBEDDING_TYPES,
    LLAMA_QUANT_NAMES,
    check_embedding_type,
    require_quantizer,
)
from chattune.config.transformers_names import (
    ATTENTION_KERNELS,
    OPTIMIZERS,
    SCHEDULES,
    installed_attention_kernels,
    installed_optimizers,
    installed_schedules,
    unknown_name,
)
from chattune.errors import ChattuneError

LOSS_REDUCTIONS = ("tokens", "sequences")
LORA_INITS = ("pissa", "olora", "gaussian", "loftq")


def _flag(default, help: str, **metadata):
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainFlags:
    # --- run and data -------------------------------------------------------------------------------
    run_name: str = _flag(None, "Name of the run; outputs go to models/<run_name> and loras/<run_name>.")
    base_model: str = _flag(None, "Model to start from: a hub id or a local folder.")
    train_dataset: list[str] = _flag(
        None,
        "Training data: one or more sources, each a .jsonl/.json/.parquet file, a .txt file (one document per "
        "blank-line-separated block), a folder saved by `datasets`, or a hub dataset id org/name[:split][@revision]; "
        "prefixes jsonl:, text:, local:, hub: say how to read one. A weight per source (a.jsonl:0.8 b.jsonl:0.2) "
        "samples a mixture with --seed; without weights every row of every source is used once (docs/data.md).",
    )
    test_dataset: list[str] | None = _flag(None, "Evaluation data: one or more sources, as for --train_dataset.")
    dataset_processing_threads: int | None = _flag(
        None, "Processes for tokenizing and masking the data (default: up to 4, one per CPU core)."
    )
    ctx_size: int = _flag(2048, "Maximum tokens per example; longer examples are skipped and counted.")
    output_dir: str | None = _flag(None, "Root folder for models/, loras/ and runs/ (default: the current directory).")
    overwrite_output_dir: bool = _flag(
        False,
        "Allow writing into output folders that are not empty; the checkpoints of the run replaced are removed "
        "(and named) when training starts, unless --resume_from_checkpoint continues it.",
    )
    seed: int = _flag(42, "Random seed for weights of new modules, data order and dropout.")

    # --- precision and model loading -------------------------------------------------------------------
    bf16: bool = _flag(
        False,
        "Compute in bfloat16 (falls back to float32 with a warning where unsupported). LoRA and QLoRA keep the "
        "frozen base weights in bfloat16; full fine-tuning keeps float32 master weights under bfloat16 autocast, "
        "because bfloat16 weights round small updates away (see --pure_bf16).",
    )
    fp16: bool = _flag(
        False,
        "Compute in float16 with dynamic loss scaling, for GPUs without bfloat16 (T4, V100); needs a CUDA GPU. "
        "Trained weights stay float32 (LoRA's frozen base weights are float16). See docs/training.md for which "
        "precision suits which hardware.",
    )
    pure_bf16: bool = _flag(
        False,
        "With --bf16 and full fine-tuning: hold the trained weights themselves in bfloat16 (half the memory of "
        "float32 master weights; updates smaller than 1/256 of a weight are lost).",
    )
    attn_implementation: str | None = _flag(
        None,
        "Attention kernel: sdpa, eager or flash_attention_2 (default: flash_attention_2 when installed on a "
        "GPU, else sdpa with each example of a padding-free batch attended on its own; an explicit sdpa keeps "
        "transformers' block-diagonal mask over the whole row).",
    )
    load_in_8bit: bool = _flag(False, "Load the base model in 8 bits with bitsandbytes (implies --use_lora).")
    load_in_4bit: bool = _flag(
        False, "Load the base model in 4-bit NF4 with double quantization (QLoRA; implies --use_lora)."
    )
    load_as_gptq: bool = _flag(
        False, "The base model is a GPTQ checkpoint; train LoRA on it (needs the gptq extra: gptqmodel and optimum)."
    )

    # --- optimisation -------------------------------------------------------------------------------------
    batch_size: int = _flag(
        8, "Effective batch in examples per optimizer step: micro_batch_size x accumulation x processes."
    )
    micro_batch_size: int = _flag(2, "Examples per forward pass on each process.")
    epochs: float = _flag(1.0, "Passes over the training data.")
    max_steps: int = _flag(
        -1,
        "Stop after this many optimizer steps (overrides --epochs). 0 or below (-1, the default): no step limit, "
        "--epochs decides.",
    )
    time_budget: float | None = _flag(
        None,
        "Seconds the run may take, from preparing it to its last step (evaluations during training included; the "
        "final save and export after it are not). After a few steps it measures the time of one, lowers the number "
        "of steps to fit, rescales the learning-rate schedule (warm-up and decay) to the new length, and logs what "
        "it chose; --max_steps or --epochs stays the upper limit. Resumed with --time_budget, a run finishes the "
        "steps its budget chose (stored in the checkpoint) without measuring again; resumed without it, it trains "
        "to --max_steps/--epochs.",
    )
    learning_rate: float = _flag(1e-5, "Peak learning rate.")
    learning_rate_schedule: str = _flag(
        "cosine", "Learning-rate schedule: cosine, linear, constant, constant_with_warmup, …"
    )
    learning_rate_warmup: float = _flag(0.0, "Warm-up: a fraction of all steps when below 1, else a number of steps.")
    warmup_epochs: float | None = _flag(
        None, "Warm-up in epochs (e.g. 0.5), rounded to whole optimizer steps; instead of --learning_rate_warmup."
    )
    min_learning_rate: float | None = _flag(
        None, "Floor of the cosine schedule: the learning rate decays from --learning_rate to this value, not to 0."
    )
    min_learning_rate_ratio: float | None = _flag(
        None,
        "Floor of the cosine schedule as a fraction of --learning_rate (e.g. 0.1); instead of --min_learning_rate.",
    )
    optimizer: str | None = _flag(
        None,
        "Optimizer, by transformers' name: adamw_torch, adamw_torch_fused (the default where PyTorch has it), "
        "adamw_8bit and paged_adamw_8bit (bitsandbytes, 8-bit states, for QLoRA), adafactor, sgd, lion_8bit, ….",
    )
    loss_reduction: str = _flag(
        "tokens",
        "How SFT averages the loss: tokens (every labelled token of the batch weighs the same, so long answers "
        "weigh more) or sequences (each example's mean over its own tokens, then the mean over examples). Both "
        "are exact over padding-free batches, gradient accumulation and processes.",
        choices=LOSS_REDUCTIONS,
    )
    weight_decay: float = _flag(0.1, "AdamW weight decay.")
    gradient_clip: float = _flag(1.0, "Clip the gradient norm to this value (0 disables clipping).")
    gradient_checkpointing: bool = _flag(False, "Recompute activations in the backward pass to save memory.")
    group_by_length: bool = _flag(
        False, "Batch examples of similar length together (padding-free batches, no packing)."
    )
    packing: bool = _flag(
        False,
        "Pack examples into rows of --ctx_size (micro_batch_size then counts rows). Without it, each "
        "micro-batch is already padding-free: its examples are concatenated with attention isolated per example.",
    )

    # --- checkpoints, evaluation and logging -----------------------------------------------------------
    resume_from_checkpoint: str | None = _flag(
        None,
        "Resume from a checkpoint folder, or `latest` for the newest one of this run. The run's settings that decide "
        "what is trained (data and its preparation, --ctx_size, added tokens, --method, LoRA set-up, base model) must "
        "be the ones it started with; "
        "a finished run is not trained again unless --max_steps or --epochs grew.",
    )
    allow_changed_data: bool = _flag(
        False,
        "On resume, accept training data (content, format, mixture weights), a --ctx_size, or a chat template, "
        "--train_on_prompts, --prefix_ids/--suffix_ids or --packing other than the run started with; without it "
        "such a resume is refused.",
    )
    save_steps: int = _flag(500, "Save a checkpoint every N optimizer steps.")
    save_total_limit: int | None = _flag(2, "Keep at most N checkpoints (the newest are kept).")
    eval_steps: float | None = _flag(
        None,
        "Evaluate on --test_dataset every N steps, or, below 1, every such fraction of the run's steps (0.25: four "
        "evaluations, which follow the run's length under --time_budget) (default: at the end of each epoch).",
    )
    eval_fraction: float = _flag(
        1.0, "Share of --test_dataset used by the periodic evaluations (home-llm used 0.1); the end uses all of it."
    )
    early_stopping_patience: int | None = _flag(
        None,
        "Stop after N evaluations without a better --metric_for_best_model, and keep the best checkpoint's weights.",
    )
    eval_generate: int | None = _flag(
        None,
        "At every evaluation, also generate greedy replies for a fixed sample of N --test_dataset examples and log "
        "evaluate.py's task metrics (eval_service_call_exact_match, eval_entity_accuracy, ...) next to eval_loss.",
    )
    eval_task: str = _flag(
        "auto",
        "How --eval_generate reads and scores replies, as evaluate.py's --task: homeassistant, tool_calls, "
        "module:Class or path/file.py:Class, or auto (detected from the test data).",
    )
    eval_constrain: bool = _flag(
        False,
        "With --eval_generate: decode under each prompt's grammar, as evaluate.py --constrain (needs llguidance).",
    )
    metric_for_best_model: str = _flag(
        "eval_loss",
        "The logged metric that picks the best checkpoint (kept by --save_total_limit, loaded by "
        "--load_best_model_at_end, watched by --early_stopping_patience), with or without its eval_ prefix, e.g. "
        "service_call_exact_match with --eval_generate. Losses, perplexity and distances are better lower, "
        "the rest higher.",
    )
    load_best_model_at_end: bool = _flag(
        False,
        "Make the final model (or adapter) the best checkpoint by --metric_for_best_model instead of the last "
        "step; evaluations then land on --save_steps.",
    )
    logging_steps: int = _flag(10, "Log loss, learning rate and throughput every N steps.")
    report_to: str = _flag(
        "tensorboard", "Where to log: tensorboard, wandb, mlflow, trackio, none, … (comma-separated)."
    )
    flops_baseline: float | None = _flag(
        None, "Peak FLOP/s of one accelerator (e.g. 989e12 for an H100 in bf16); logs model FLOPs utilisation (MFU)."
    )
    push_to_hub: bool = _flag(False, "Upload the final model to the Hugging Face Hub (needs `hf auth login`).")
    hub_model_id: str | None = _flag(None, "Hub repository for --push_to_hub, e.g. me/home-qwen2 (default: run_name).")

    # --- tokens and chat template ------------------------------------------------------------------------
    add_pad_token: bool = _flag(False, "Add a dedicated <|pad|> token.")
    add_chatml_tokens: bool = _flag(
        False, "Add <|im_start|> and <|im_end|> (and a ChatML chat template if the tokenizer has none)."
    )
    add_tool_calling_tokens: bool = _flag(False, "Add <tool_call> and </tool_call> tokens.")
    prompt_template_file: str | None = _flag(None, "A Jinja chat template file to use instead of the tokenizer's own.")
    prefix_ids: str | None = _flag(
        None,
        "Token ids that open an assistant response, e.g. 128006,78191,128007,271 (explicit masking; the "
        "default automatic masking needs no ids; see find_split.py).",
    )
    suffix_ids: str | None = _flag(
        None, "Token ids that close an assistant response (explicit masking, with --prefix_ids)."
    )
    train_on_prompts: bool = _flag(
        False,
        "Also compute the loss on system and user turns (the whole conversation), not only on the assistant's "
        "replies: for models trained from random weights or continued pre-training, not for fine-tuning a chat "
        "model.",
    )

    # --- LoRA -------------------------------------------------------------------------------------------------
    use_lora: bool = _flag(False, "Train a LoRA adapter instead of all weights.")
    lora_rank: int = _flag(16, "LoRA rank r.")
    lora_alpha: int = _flag(32, "LoRA alpha (scaling = alpha / rank).")
    lora_dropout: float = _flag(0.05, "Dropout on the LoRA branch: a probability in [0, 1).")
    lora_modules: str | None = _flag(
        None, "Comma-separated module names to adapt (default: every linear projection of the blocks)."
    )
    lora_layers: int | None = _flag(
        None,
        "Adapt only the last N transformer blocks (default: all). The blocks below get no gradient, so the "
        "backward pass stops at the lowest adapted block: with 10 of 30 it costs a third.",
    )
    lora_modules_to_save: str | None = _flag(
        None, "Comma-separated modules trained in full next to the adapter, e.g. embed_tokens,lm_head."
    )
    lora_merge: bool = _flag(False, "Also write the merged model to models/<run_name>.")
    use_dora: bool = _flag(
        False, "DoRA: train a magnitude per output feature besides the LoRA direction (peft; slower steps)."
    )
    use_rslora: bool = _flag(False, "rsLoRA: scale the adapter by alpha / sqrt(rank) instead of alpha / rank.")
    lora_init: str | None = _flag(
        None,
        "Initialise the adapter by peft's pissa or olora (from the base weights, which they rewrite; not on a "
        "quantized base), gaussian, or loftq (with --load_in_4bit: the adapter starts as the quantization error).",
        choices=LORA_INITS,
    )

    export_gguf: str | None = _flag(
        None,
        "Also write a GGUF file of the final model for llama.cpp/Ollama (models/<run_name>/<run_name>-<type>.gguf) "
        "and an Ollama Modelfile beside it (<run_name>-<type>.Modelfile): f16, q8_0, f32, or a k-quant such as "
        "q4_k_m, q5_k_m or q6_k made by "
        "llama.cpp's quantizer (needs llama-cpp-python; all types in docs/export.md).",
    )
    export_embedding_type: str | None = _flag(
        None,
        "With --export_gguf f16, q8_0 or f32: store the token embedding and the output matrix as this type (f16 or "
        "f32) instead. q8_0 with f16 keeps a small model's exact match within a point of f16 (docs/export.md).",
        choices=EMBEDDING_TYPES,
    )

    # --- training method: SFT or preference training ----------------------------------------------------------
    method: str | None = _flag(
        None,
        "What to train: sft (supervised, the default), or on preference data dpo, simpo, orpo (pairs) or kto "
        "(pairs or rows labelled good/bad); see docs/training.md.",
        choices=METHODS,
    )
    dpo: bool = _flag(False, "home-llm's spelling of --method dpo.")
    beta: float = _flag(
        0.1,
        "Preference strength: DPO and KTO's pull towards the reference model, SimPO's reward scale, ORPO's weight "
        "of the odds-ratio term (lambda).",
    )
    dpo_loss: str = _flag("sigmoid", "DPO loss type (any of TRL's: sigmoid, ipo, hinge, robust, …).")
    simpo: bool = _flag(False, "home-llm's spelling of --method simpo (`--dpo --simpo` is SimPO too).")
    simpo_gamma: float = _flag(0.5, "SimPO target reward margin gamma.")
    precompute_ref_log_probs: bool = _flag(
        False,
        "DPO: score every pair with the reference model once, before training, so no reference is held in memory "
        "or run per step (full fine-tuning keeps no frozen copy; LoRA skips the adapter-off pass). The scores are "
        "cached next to the tokenized data and reused while the base model, data and settings are the same.",
    )

    def __post_init__(self) -> None:
        missing = [name for name in ("run_name", "base_model", "train_dataset") if not getattr(self, name)]
        if missing:
            raise FlagError("missing required flag(s): " + ", ".join(f"--{name}" for name in missing))
        self.method = _resolve_method(self)
        # transformers reads 0 as a budget of 0 steps and trains one: 0 means "no step limit", as -1 does
        if self.max_steps <= 0:
            self.max_steps = -1
        if self.micro_batch_size < 1 or self.batch_size < 1:
            raise FlagError("--batch_size and --micro_batch_size must be at least 1")
        if sum([self.load_in_8bit, self.load_in_4bit, self.load_as_gptq]) > 1:
            raise FlagError("choose at most one of --load_in_8bit, --load_in_4bit and --load_as_gptq")
        if (self.load_in_8bit or self.load_in_4bit or self.load_as_gptq) and not self.use_lora:
            raise FlagError(
                "a quantized base model cannot be trained in full: add --use_lora (QLoRA trains an adapter on "
                "top of the frozen quantized weights)"
            )
        if self.lora_layers is not None and (self.lora_layers < 1 or not self.use_lora):
            raise FlagError("--lora_layers needs --use_lora and a number of blocks of at least 1")
        if not 0 < self.eval_fraction <= 1:
            raise FlagError("--eval_fraction must be in (0, 1]")
        _check_evaluation_flags(self)
        if self.export_gguf and self.export_gguf not in ALL_OUTTYPES:
            raise FlagError(f"--export_gguf must be one of {', '.join(ALL_OUTTYPES)}, not {self.export_gguf!r}")
        if self.export_embedding_type:
            if not self.export_gguf:
                raise FlagError("--export_embedding_type needs --export_gguf (the GGUF type of the other weights)")
            try:
                check_embedding_type(self.export_gguf, self.export_embedding_type)
            except ChattuneError as error:
                raise FlagError(f"--export_embedding_type: {error}") from None
        if self.export_gguf in LLAMA_QUANT_NAMES:
            require_quantizer(self.export_gguf)  # a missing llama-cpp-python fails before the training
        if self.export_gguf and self.use_lora and not self.lora_merge:
            raise FlagError("--export_gguf needs a full model: add --lora_merge to export the merged model")
        if bool(self.prefix_ids) != bool(self.suffix_ids) and not self.prefix_ids:
            raise FlagError("--suffix_ids needs --prefix_ids (or drop both to use automatic masking)")
        _parse_ids("--prefix_ids", self.prefix_ids)  # validate the id lists before any work
        _parse_ids("--suffix_ids", self.suffix_ids)
        check_values(self)
        _check_precision(self)
        _check_optimizer_and_schedule(self)
        _check_lora_variants(self)

    # --- derived values ----------------------------------------------------------------------------------
    @property
    def prefix_id_list(self) -> list[int] | None:
        return _parse_ids("--prefix_ids", self.prefix_ids)

    @property
    def suffix_id_list(self) -> list[int] | None:
        return _parse_ids("--suffix_ids", self.suffix_ids)

    @property
    def preference(self) -> bool:
        """Trained on preference data (DPO, SimPO, ORPO, KTO) rather than conversations."""
        return METHODS[self.method].preference

    @property
    def quantized(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit or self.load_as_gptq

    @property
    def output_root(self) -> Path:
        return Path(self.output_dir or ".")

    @property
    def model_dir(self) -> Path:
        """Full or merged model."""
        return self.output_root / "models" / self.run_name

    @property
    def lora_dir(self) -> Path:
        """LoRA adapter."""
        return self.output_root / "loras" / self.run_name

    @property
    def run_dir(self) -> Path:
        """Checkpoints and logs of the run; final artifacts go to model_dir / lora_dir."""
        return self.output_root / "runs" / self.run_name

    def gradient_accumulation_steps(self, world_size: int | None = None) -> int:
        """batch_size = micro_batch_size x accumulation x processes, so the effective batch never changes."""
        world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise FlagError(
                f"--batch_size {self.batch_size} is not a multiple of --micro_batch_size {self.micro_batch_size} "
                f"x {world_size} process(es) = {per_step}; choose a batch size divisible by {per_step}"
            )
        return self.batch_size // per_step


class FlagError(ChattuneError, ValueError):
    """A flag value that cannot work; the message says which and why."""


def check_values(flags: TrainFlags) -> None:
    """Refuse values that cannot work, or would quietly train something else than asked, while nothing has been
    read yet: later they would fail after data preparation and model loading, or not fail at all."""
    if not flags.run_name or flags.run_name in (".", "..") or any(sep and sep in flags.run_name for sep in _SEPARATORS):
        raise FlagError(
            f"--run_name {flags.run_name!r} must be a plain folder name (no path separator, not '.' or '..'): it "
            "becomes models/<run_name>, loras/<run_name> and runs/<run_name>; choose where those go with --output_dir"
        )
    if flags.lora_merge and not flags.use_lora:
        raise FlagError(
            "--lora_merge merges a LoRA adapter into its base: add --use_lora, or drop --lora_merge (full "
            "fine-tuning already writes the whole model to models/<run_name>)"
        )
    if flags.ctx_size < 1:
        raise FlagError(f"--ctx_size must be a number of tokens of at least 1, not {flags.ctx_size}")
    if flags.epochs <= 0 and flags.max_steps <= 0:
        raise FlagError(
            f"--epochs {flags.epochs:g} trains nothing, and the untrained base model would be saved as the result; "
            "give --epochs above 0, or a number of steps with --max_steps"
        )
    if flags.time_budget is not None and flags.time_budget <= 0:
        raise FlagError(f"--time_budget is a number of seconds above 0, not {flags.time_budget:g}")
    if flags.learning_rate < 0:  # 0 is allowed: it measures without learning
        raise FlagError(f"--learning_rate must not be negative, not {flags.learning_rate:g}")
    if flags.use_lora and flags.lora_rank < 1:
        raise FlagError(f"--lora_rank must be at least 1, not {flags.lora_rank}")
    if not 0 <= flags.lora_dropout < 1:  # peft takes a negative one, and 1 or more fails after the model loads
        raise FlagError(f"--lora_dropout is a probability in [0, 1), not {flags.lora_dropout:g}")
    schedules = unknown_name(flags.learning_rate_schedule, SCHEDULES, installed_schedules)
    if schedules is not None:
        raise FlagError(
            f"--learning_rate_schedule {flags.learning_rate_schedule!r} is not one of transformers' schedules: "
            f"{', '.join(schedules)}"
        )
    # a kernel from the Hub (the `kernels` package) is named owner/repo; transformers checks it when loading
    if flags.attn_implementation is not None and "/" not in flags.attn_implementation:
        kernels = unknown_name(flags.attn_implementation, ATTENTION_KERNELS, installed_attention_kernels)
        if kernels is not None:
            raise FlagError(
                f"--attn_implementation {flags.attn_implementation!r} is not an attention kernel; choose one of "
                f"{', '.join(kernels)}"
            )


_SEPARATORS = ("/", "\\", os.sep, os.altsep)


def _resolve_method(flags: TrainFlags) -> str:
    """--method, or home-llm's --dpo/--simpo spelling of it; refuses the combinations that contradict each other
    and the method-specific flags the method does not use (chattune.config.methods)."""
    legacy = "simpo" if flags.simpo else "dpo" if flags.dpo else None
    method = flags.method or legacy or "sft"
    if method not in METHODS:
        raise FlagError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    # home-llm wrote SimPO as `--dpo --simpo`, so --dpo agrees with simpo; every other mix contradicts itself
    if legacy and legacy != method and not (legacy == "dpo" and method == "simpo"):
        raise FlagError(f"--{legacy} contradicts --method {method}; give one of them")
    flags.method = method
    refusal = check_scoped_flags(flags)
    if refusal:
        raise FlagError(refusal)
    entry = METHODS[method]
    if flags.micro_batch_size < entry.min_micro_batch_size:
        raise FlagError(
            f"--method {method} needs --micro_batch_size of at least {entry.min_micro_batch_size}: "
            f"{entry.min_micro_batch_why}"
        )
    return method


def _check_precision(flags: TrainFlags) -> None:
    if flags.fp16 and flags.bf16:
        raise FlagError("--fp16 and --bf16 contradict each other; give one (bf16 where the hardware has it)")
    if flags.fp16 and flags.pure_bf16:
        raise FlagError("--pure_bf16 holds the weights in bfloat16 and contradicts --fp16")


def _check_optimizer_and_schedule(flags: TrainFlags) -> None:
    """Names and numbers only; whether the optimizer's package is installed is checked by the run, before any work."""
    if flags.optimizer is not None:
        names = unknown_name(flags.optimizer, OPTIMIZERS, installed_optimizers)
        if names is not None:
            import difflib

            close = difflib.get_close_matches(flags.optimizer, names, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise FlagError(
                f"--optimizer {flags.optimizer} is not a transformers optimizer; {hint}one of {', '.join(names)}"
            )
    if flags.min_learning_rate is not None and flags.min_learning_rate_ratio is not None:
        raise FlagError("give --min_learning_rate or --min_learning_rate_ratio, not both")
    if flags.min_learning_rate is not None and not 0 <= flags.min_learning_rate < flags.learning_rate:
        raise FlagError(f"--min_learning_rate must be at least 0 and below --learning_rate {flags.learning_rate}")
    if flags.min_learning_rate_ratio is not None and not 0 <= flags.min_learning_rate_ratio < 1:
        raise FlagError("--min_learning_rate_ratio must be in [0, 1)")
    has_floor = flags.min_learning_rate is not None or flags.min_learning_rate_ratio is not None
    if has_floor and flags.learning_rate_schedule != "cosine":
        raise FlagError(
            f"a minimum learning rate is the floor of the cosine schedule; --learning_rate_schedule is "
            f"{flags.learning_rate_schedule}: use cosine or drop the floor"
        )
    if flags.warmup_epochs is not None:
        if flags.learning_rate_warmup:
            raise FlagError("give --warmup_epochs or --learning_rate_warmup, not both")
        if flags.warmup_epochs < 0:
            raise FlagError("--warmup_epochs must be at least 0")


def _check_lora_variants(flags: TrainFlags) -> None:
    given = [name for name, on in (("--use_dora", flags.use_dora), ("--use_rslora", flags.use_rslora)) if on]
    if flags.lora_init:
        given.append(f"--lora_init {flags.lora_init}")
    if given and not flags.use_lora:
        raise FlagError(f"{', '.join(given)} shape(s) a LoRA adapter: add --use_lora")
    if flags.lora_init in ("pissa", "olora") and flags.quantized:
        raise FlagError(
            f"--lora_init {flags.lora_init} rewrites the base weights from their decomposition, which a quantized "
            "base cannot take: drop --load_in_4bit/--load_in_8bit/--load_as_gptq, or use --lora_init loftq with "
            "--load_in_4bit"
        )
    if flags.lora_init == "loftq":
        if not flags.load_in_4bit:
            raise FlagError(
                "--lora_init loftq starts the adapter at the error of 4-bit quantization: add --load_in_4bit"
            )
        if flags.use_dora:
            raise FlagError("--lora_init loftq and --use_dora: DoRA's magnitudes would not match the LoftQ start")


def _check_evaluation_flags(flags: TrainFlags) -> None:
    """The flags that need evaluations, and --eval_generate's own limits; the metric's name is checked once the
    test set is read (chattune.training.trainers.task_metrics)."""
    needs_test_set = {
        "--early_stopping_patience": flags.early_stopping_patience is not None,
        "--eval_generate": flags.eval_generate is not None,
        "--eval_constrain": flags.eval_constrain,
        "--load_best_model_at_end": flags.load_best_model_at_end,
        f"--metric_for_best_model {flags.metric_for_best_model}": flags.metric_for_best_model != "eval_loss",
    }
    given = [name for name, value in needs_test_set.items() if value]
    if given and not flags.test_dataset:
        raise FlagError(f"{', '.join(given)} needs --test_dataset: the evaluations run on it")
    if flags.eval_steps is not None and not (0 < flags.eval_steps < 1 or flags.eval_steps == int(flags.eval_steps)):
        raise FlagError(f"--eval_steps is a whole number of steps or a fraction below 1, not {flags.eval_steps:g}")
    best_checkpoint = flags.load_best_model_at_end or flags.early_stopping_patience is not None
    if flags.eval_steps is not None and flags.eval_steps < 1 and best_checkpoint:
        raise FlagError(
            "--load_best_model_at_end and --early_stopping_patience need --eval_steps in whole steps: every "
            "evaluation must land on a --save_steps checkpoint"
        )
    if flags.eval_generate is not None and flags.eval_generate < 1:
        raise FlagError(f"--eval_generate is a number of test examples, at least 1, not {flags.eval_generate}")


# What each quantized load needs installed: transformers' GPTQ loader calls optimum, which runs gptqmodel's kernels.
QUANTIZATION_PACKAGES = {
    "--load_in_4bit/--load_in_8bit": (("bitsandbytes",), "pip install bitsandbytes"),
    "--load_as_gptq": (("gptqmodel", "optimum"), "pip install -e '.[gptq]' (the gptq extra: gptqmodel and optimum)"),
}


def check_quantization_packages(flags: TrainFlags) -> None:
    """Refuse, before torch is imported, a quantized load whose packages are not installed: one line that names
    every missing package and how to install them (looked up, not imported)."""
    if flags.load_in_4bit or flags.load_in_8bit:
        _require_packages("--load_in_4bit/--load_in_8bit")
    if flags.load_as_gptq:
        _require_packages("--load_as_gptq")


def _require_packages(flag: str) -> None:
    packages, install = QUANTIZATION_PACKAGES[flag]
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise FlagError(f"{flag} needs {' and '.join(missing)}, not installed: {install}")


def unused_evaluation_flags(flags: TrainFlags) -> list[str]:
    """--eval_steps and --eval_fraction given without --test_dataset, where no evaluation runs: they are warned
    about, not refused, because home-llm's published commands (StableLM Zephyr 3B and its DPO runs, TinyLlama's
    DPO run) pass --eval_steps without a test set, and those commands run unchanged."""
    if flags.test_dataset:
        return []
    given = {"--eval_steps": flags.eval_steps is not None, "--eval_fraction": flags.eval_fraction != 1.0}
    return [name for name, value in given.items() if value]


def _parse_ids(flag: str, text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise FlagError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise FlagError(f"{flag} is empty")
    return ids


def flag_names() -> list[str]:
    return [f.name for f in fields(TrainFlags)]


def parse_flags(argv: list[str] | None = None) -> TrainFlags:
    """Parse the command line, after the flags of an optional `--config recipe.yaml`.

    Recipe values become command-line tokens placed before the real ones, so argparse checks their types
    and a flag given on the command line overrides the recipe. Unknown flags and keys are errors.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        namespace, unknown = parser.parse_known_args(_expand_config(argv))
        if unknown:
            parser.error(f"unknown flag {unknown[0]!r}{_suggest(unknown[0].lstrip('-').split('=')[0])}")
        del namespace.config  # already expanded into the flags it holds
        return TrainFlags(**vars(namespace))
    except FlagError as error:
        parser.error(str(error))


def build_parser() -> argparse.ArgumentParser:
    """train.py's parser: a flag per field of TrainFlags, and --config."""
    parser = dataclass_parser(
        TrainFlags,
        prog="train.py",
        description=__doc__.split("\n\n")[0],
        epilog="Environment: " + " ".join(ENVIRONMENT),
    )
    parser.add_argument("--config", help="A YAML recipe of flags (see recipes/); command-line flags override it.")
    return parser


def _expand_config(argv: list[str]) -> list[str]:
    """Replace `--config FILE` (or `--config=FILE`) by the recipe's flags, placed before all the others."""
    found = [i for i, word in enumerate(argv) if word == "--config" or word.startswith("--config=")]
    if not found:
        return argv
    if len(found) > 1:
        raise FlagError("--config is given more than once; a run reads one recipe")
    index = found[0]
    word = argv[index]
    if word.startswith("--config="):
        path, rest = word[len("--config=") :], argv[:index] + argv[index + 1 :]
    elif index + 1 < len(argv):
        path, rest = argv[index + 1], argv[:index] + argv[index + 2 :]
    else:
        path, rest = "", argv
    if not path:
        raise FlagError("--config needs a YAML file")
    return [*config_to_argv(load_recipe(path), path), *rest]


def load_recipe(path: str | os.PathLike) -> dict:
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise FlagError(f"--config {path}: {error.strerror}") from None
    try:
        recipe = yaml.safe_load(text) or {}
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        raise FlagError(f"{path}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {error.problem}") from None
    if not isinstance(recipe, dict):
        raise FlagError(f"{path}: a recipe is a mapping of flag names to values")
    return recipe


def config_to_argv(recipe: dict, source: str = "recipe") -> list[str]:
    known = set(flag_names())
    several = list_fields(TrainFlags)  # flags of nargs="+"
    argv = []
    for key, value in recipe.items():
        if key not in known:
            raise FlagError(f"{source}: unknown key {key!r}{_suggest(key)}")
        if value is None:
            continue
        if key in several:
            items = value if isinstance(value, list) else [value]
            argv += [f"--{key}", *(_source_spec(item, f"{source}: {key}") for item in items)]
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, list):
            value = ",".join(str(v) for v in value)
        argv += [f"--{key}", str(value)]
    return argv


SOURCE_KEYS = ("path", "split", "revision", "weight")


def _source_spec(item: object, where: str) -> str:
    """A recipe's data source: a string as on the command line, or {path, split, revision, weight}."""
    if not isinstance(item, dict):
        return str(item)
    unknown = sorted(set(item) - set(SOURCE_KEYS))
    if unknown or "path" not in item:
        raise FlagError(
            f"{where}: a source is a string or a mapping with `path` and optional split, revision, "
            f"weight; got keys {sorted(item)}"
        )
    spec = str(item["path"])
    spec += f":{item['split']}" if item.get("split") is not None else ""
    spec += f"@{item['revision']}" if item.get("revision") is not None else ""
    spec += f":{item['weight']}" if item.get("weight") is not None else ""
    return spec


def _suggest(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name.replace("-", "_"), flag_names(), n=1)
    return f"; did you mean --{close[0]}?" if close else ""


# What train.py reads from the environment besides its flags (shown by --help and in docs/flags.md).
ENVIRONMENT = (
    "CHATTUNE_ALLOCATOR=auto|tbbmalloc|system picks the malloc: auto restarts train.py with oneTBB's "
    "scalable allocator preloaded on Linux hosts without a GPU when the tbb package is installed (far less memory "
    "on CPU; docs/performance.md), system keeps glibc's.",
    "CHATTUNE_LEAN_LOSS=auto|1|0: the labelled-positions-only loss (auto: everywhere but CUDA/XPU with Triton).",
)


def flags_markdown() -> str:
    """The flag reference in docs/flags.md, generated from the dataclass (a test fails when they drift)."""
    lines = [
        "# train.py flags",
        "",
        "Generated by `python3 -m chattune.config.flags > docs/flags.md` from `chattune/config/flags.py`; the",
        "same text as `python3 train.py --help`. Every flag can also be set in a YAML recipe (`--config recipe.yaml`).",
        "",
        "| flag | default | meaning |",
        "|---|---|---|",
    ]
    for f in fields(TrainFlags):
        default = "required" if f.name in ("run_name", "base_model", "train_dataset") else repr(f.default)
        lines.append(f"| `--{f.name}` | {default} | {f.metadata['help'].replace('|', '/')} |")
    lines += ["", "## Environment", "", *(f"- {variable}" for variable in ENVIRONMENT)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(flags_markdown(), end="")
