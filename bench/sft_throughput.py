#!/usr/bin/env python3
"""SFT throughput: chattune's train.py against a plain TRL SFTTrainer script, same model, data and batch.

    python3 bench/sft_throughput.py                 # two arms, one JSON line (~1.5 min on 2 idle CPU cores)
    python3 bench/sft_throughput.py --vocab 150000  # peak RSS of train.py with and without the lean loss

Everything is built here: Home Assistant data from data/generate_home_assistant_data.py, a byte-level BPE
tokenizer trained on it (chattune.data.build_tokenizer) with TRL's Qwen2.5 chat template, and a small
random-weight Llama (fixed seed). Nothing is downloaded.

Arms, each in its own subprocess so that its peak RSS is its own:

* chattune: train.py's code (chattune.training.run.main) with its defaults (padding-free micro-batches, automatic
  assistant masks), --micro_batch_size 8.
* baseline: the SFTTrainer script of TRL's documentation: a conversational `messages` dataset, SFTConfig
  defaults (padded batches), assistant_only_loss=True through TRL's training template for Qwen2.5 (or,
  where TRL cannot patch the template, completion-only loss on prompt/completion rows, said in the output).

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

RESULT_FILE = "result.json"


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
        "on and off (CHATTUNE_LEAN_LOSS=1/0) instead of the two arms",
    )
    parser.add_argument("--compact_prompt", action="store_true", help="short system prompts (generator flag)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--chattune_flags",
        default="",
        help="extra train.py flags for the chattune arm, e.g. --chattune_flags=--gradient_checkpointing (TRL's "
        "SFTConfig turns activation checkpointing on by default; chattune leaves it off)",
    )
    parser.add_argument("--bf16", action="store_true", help="train in bfloat16 (both arms)")
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="the device's peak dense TFLOP/s in the training dtype (H100 SXM bf16: 989); adds `mfu` to each arm",
    )
    parser.add_argument("--workdir", default=None, help="keep data, model and logs here (default: a temp dir)")
    parser.add_argument("--arm", choices=("chattune", "baseline"), help=argparse.SUPPRESS)  # in a subprocess
    args = parser.parse_args(argv)
    # the --vocab mode runs TRL's own loss over a 150k vocabulary on a CPU: about a minute per step
    args.steps = args.steps or (2 if args.vocab else 10)
    args.batch_size = args.batch_size or (8 if args.vocab else 16)
    return args


# --- the subprocess side: one arm, instrumented ---------------------------------------------------------


class Probe:
    """What one arm measures: preprocessing seconds, tokens per micro-batch, the clock at each step's end."""

    def __init__(self) -> None:
        self.preprocess: dict[str, float] = {}
        self.batches: list[tuple[int, int, int]] = []  # (real tokens, tokens incl. padding, labelled tokens)
        self.step_ends: list[float] = []
        self.trainer: Any = None

    def timed(self, name: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.preprocess[name] = self.preprocess.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    def counting(self, collator: Any) -> Any:
        from chattune.data.masking import IGNORE_INDEX

        def collate(examples: list[dict]) -> dict:
            batch = collator(examples)
            ids, labels = batch["input_ids"], batch["labels"]
            real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()
            self.batches.append((real, ids.numel(), int((labels[:, 1:] != IGNORE_INDEX).sum())))
            return batch

        return collate

    def attach(self, trainer: Any) -> None:
        from transformers import TrainerCallback

        probe = self

        class StepClock(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                probe.step_ends.append(time.perf_counter())

        self.trainer = trainer
        trainer.data_collator = self.counting(trainer.data_collator)
        trainer.add_callback(StepClock())

    def result(self, accumulation: int, peak_tflops: float | None = None) -> dict:
        """Steps 2..N only: the first step pays for lazy initialisation (optimizer state, kernels)."""
        steps = len(self.step_ends)
        window = self.batches[accumulation : accumulation * steps]
        real, total, labelled = (sum(column) for column in zip(*window)) if window else (0, 0, 0)
        elapsed = self.step_ends[-1] - self.step_ends[0] if steps > 1 else float("nan")
        losses = [entry["loss"] for entry in self.trainer.state.log_history if "loss" in entry]
        all_real, all_total = sum(b[0] for b in self.batches), sum(b[1] for b in self.batches)
        parameters = self.trainer.model.num_parameters()
        return {
            "tokens_per_s": round(real / elapsed, 1),
            "padding_share": round(1 - all_real / all_total, 4),
            "preprocess_s": round(sum(self.preprocess.values()), 3),
            "preprocess_parts_s": {name: round(seconds, 3) for name, seconds in self.preprocess.items()},
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "final_loss": round(losses[-1], 4) if losses else None,
            "first_loss": round(losses[0], 4) if losses else None,
            "steps": steps,
            "timed_steps": steps - 1,
            "timed_s": round(elapsed, 2),
            "real_tokens_timed": real,
            "labelled_tokens_timed": labelled,
            "micro_batches": len(self.batches),
            "activation_checkpointing": bool(getattr(self.trainer.args, "activation_checkpointing", False)),
            # 6 x parameters x tokens/s: the usual estimate, attention's own FLOPs left out
            "mfu": round(6 * parameters * real / elapsed / (peak_tflops * 1e12), 4) if peak_tflops else None,
        }


def instrument_common(probe: Probe) -> None:
    """Time TRL's dataset preparation and attach the probe when training starts (both arms)."""
    import transformers
    from trl import SFTTrainer

    SFTTrainer._prepare_dataset = probe.timed("trl_prepare_dataset", SFTTrainer._prepare_dataset)
    original_train = transformers.Trainer.train

    def train(trainer: Any, *args: Any, **kwargs: Any) -> Any:
        probe.attach(trainer)
        return original_train(trainer, *args, **kwargs)

    transformers.Trainer.train = train


def run_chattune(args: argparse.Namespace, work: Path) -> dict:
    import chattune.data.tokenization
    from chattune.training import run

    probe = Probe()
    instrument_common(probe)
    # chattune.training.run.prepare calls chattune.data.tokenization.tokenize_dataset:
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
        *shlex.split(args.chattune_flags),
    ]
    code = run.main(argv)
    if code != 0:
        raise SystemExit(f"train.py failed with exit code {code}")
    result = probe.result(args.batch_size // args.micro_batch_size, args.peak_tflops)
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


def run_baseline(args: argparse.Namespace, work: Path) -> dict:
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
    config = SFTConfig(
        output_dir=str(work / "out-baseline"),
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.batch_size // args.micro_batch_size,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        # chattune's defaults for the rest of the optimisation, so both arms take the same steps
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
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    result = probe.result(args.batch_size // args.micro_batch_size, args.peak_tflops)
    result["loss_mask"] = mode
    return result


def run_arm(args: argparse.Namespace) -> int:
    work = Path(args.workdir)
    result = run_chattune(args, work) if args.arm == "chattune" else run_baseline(args, work)
    # refreshed at the very end: the peak of the whole arm, training included
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    import torch

    if torch.cuda.is_available():
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["peak_rss_worker_mb"] = round(children / 1024, 1)  # largest tokenizing worker, if any
    (work / f"{args.arm}-{os.environ.get('CHATTUNE_LEAN_LOSS', 'auto')}-{RESULT_FILE}").write_text(json.dumps(result))
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
    """Tokenizer trained on the data, TRL's Qwen2.5 chat template, a random-weight Llama; saved to work/base."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.chat_template_utils import qwen2_5_chat_template

    from chattune.data.build_tokenizer import train_bpe_tokenizer

    def texts():
        with train_file(work).open(encoding="utf-8") as rows:
            for line in rows:
                for turn in json.loads(line)["conversations"]:
                    yield turn["content"]

    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    tokenizer = train_bpe_tokenizer(
        texts(),
        vocab_size=args.tokenizer_vocab,
        special_tokens=specials,
        pad_token="<|endoftext|>",
        chat_template=qwen2_5_chat_template,
    )
    config = LlamaConfig(
        vocab_size=args.vocab or len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden_size // 64),
        num_key_value_heads=max(1, args.hidden_size // 64),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    return {"tokenizer_vocab": len(tokenizer), "model_vocab": config.vocab_size, "parameters": model.num_parameters()}


def run_subprocess(args: argparse.Namespace, work: Path, arm: str, lean_loss: str | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    # a fresh datasets cache per arm: a cached tokenization from an earlier run would fake the preprocessing time
    env["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix=f"cache-{arm}-", dir=work)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if lean_loss is not None:
        env["CHATTUNE_LEAN_LOSS"] = lean_loss
    command = [sys.executable, str(Path(__file__).resolve()), *args.argv, "--workdir", str(work), "--arm", arm]
    log = work / f"{arm}-{lean_loss or 'auto'}.log"
    with log.open("w") as output:
        code = subprocess.run(command, env=env, stdout=output, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"arm {arm} failed (exit {code}); log: {log}")
    return json.loads((work / f"{arm}-{lean_loss or 'auto'}-{RESULT_FILE}").read_text())


def targets(chattune: dict, baseline: dict) -> dict:
    """The acceptance targets, measured against this run's figures (nothing here is hard-coded)."""
    throughput = chattune["tokens_per_s"] / baseline["tokens_per_s"]
    padding = baseline["padding_share"]
    zero_padding_limit = 1 / (1 - padding)
    wanted = 2.0 if padding >= 0.5 else 0.9 * zero_padding_limit
    loss_gap = abs(chattune["final_loss"] - baseline["final_loss"]) / baseline["final_loss"]
    return {
        "throughput_ratio": round(throughput, 3),
        "preprocess_ratio": round(baseline["preprocess_s"] / chattune["preprocess_s"], 3),
        "zero_padding_limit": round(zero_padding_limit, 3),
        "targets": {
            f"throughput_ratio >= {wanted:.2f}": throughput >= wanted,
            "chattune padding_share <= 2%": chattune["padding_share"] <= 0.02,
            "preprocess_ratio >= 2": baseline["preprocess_s"] >= 2 * chattune["preprocess_s"],
            "peak_rss not higher": chattune["peak_rss_mb"] <= baseline["peak_rss_mb"],
            # on a GPU the memory that limits the batch is the device's
            **(
                {"peak_gpu_mb not higher": chattune["peak_gpu_mb"] <= baseline["peak_gpu_mb"]}
                if "peak_gpu_mb" in chattune and "peak_gpu_mb" in baseline
                else {}
            ),
            "final losses within 2%": loss_gap <= 0.02,
        },
        "final_loss_gap": round(loss_gap, 4),
        # both arms saw the same examples in the same order: the same real tokens in the timed steps
        "same_examples": chattune["real_tokens_timed"] == baseline["real_tokens_timed"],
    }


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
            report = {
                "chattune_lean_loss": lean,
                "chattune_trl_loss": trl_loss,
                "peak_rss_ratio": round(trl_loss["peak_rss_mb"] / lean["peak_rss_mb"], 3),
                "throughput_ratio": round(lean["tokens_per_s"] / trl_loss["tokens_per_s"], 3),
            }
        else:
            chattune = run_subprocess(args, work, "chattune")
            baseline = run_subprocess(args, work, "baseline")
            report = {"chattune": chattune, "baseline": baseline, **targets(chattune, baseline)}
        report["setup"] = {**setup, **config_summary(args), "wall_s": round(time.perf_counter() - start, 1)}
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
        "max_devices": args.max_devices,
        "compact_prompt": args.compact_prompt,
        "chattune_flags": args.chattune_flags,
        "cpu_count": os.cpu_count(),
    }


if __name__ == "__main__":
    sys.exit(main())
