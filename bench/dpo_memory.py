#!/usr/bin/env python3
"""DPO memory: TRL's default DPOTrainer against chattune's --precompute_ref_log_probs, and chattune's SFT.

    python3 bench/dpo_memory.py --shape toy --steps 2           # a quick check (about a minute on 2 CPU cores)
    python3 bench/dpo_memory.py --shape smollm2-135m --method both --steps 6 --repeats 3

Everything is built here: synthetic smart-home preference pairs (fixed seed), a byte-level BPE tokenizer trained
on them (chattune.data.build_tokenizer, ChatML template) and a random-weight Llama of the chosen shape. Nothing is
downloaded. Shapes:

* toy: 2 layers, width 128, 4 heads (2 KV heads), intermediate 256, the tokenizer's vocabulary, tied.
* smollm2-135m: SmolLM2-135M's shape: 30 layers, width 576, 9 heads (3 KV heads), intermediate 1536, tied
  49,152-row vocabulary (the tokenizer uses the first rows only).

Arms, each in its own subprocess (its peak RSS is its own), for --method full (all weights) and/or lora:

* trl: the DPOTrainer of TRL's documentation with no ref_model, so TRL holds the reference: a second copy loaded
  from the model folder (full), or the adapter switched off for a reference pass each micro-batch (LoRA). TRL's
  DPOConfig defaults, except the optimisation settings, precision and activation checkpointing, which follow
  this script's options so that the arms differ in how they treat the reference.
* chattune-dpo: train.py --method dpo --precompute_ref_log_probs (a fresh `datasets` cache: the reference pass
  runs and is timed as precompute_s). Each pair's prompt runs once, both answers branching from it
  (chattune.training.kernels.shared_prefix; `shared_prompts` in the report).
* chattune-sft: train.py's SFT on the same prompts and chosen answers, same model and --micro_batch_size
  (an SFT micro-batch holds a prompt and one answer per example; a DPO one a prompt and two answers).

`--arms` runs a subset; ratios that need a left-out arm are null.

chattune's arms run with the malloc train.py would restart with (oneTBB's on a Linux host without a GPU, see
chattune/allocator.py), TRL's with glibc's, as a TRL script runs. Each arm reports peak RSS (and peak GPU memory
on a GPU) and real (non-padding) tokens/s over steps 2..N; each run is printed to stderr as one JSON line as soon
as it lands, and the report, one JSON line on stdout, ends with ratios against the arms measured in this run
(target: chattune DPO peak RSS <= 1.2x SFT's). A failed arm reports its name and error; the others still report.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.arms import arm_list  # noqa: E402  (after REPO is on sys.path)
from bench.harness import Probe, medians, peaks, repeated, run_in_subprocess, succeeded  # noqa: E402
from bench.random_llama import SMOLLM2_135M, save_random_llama  # noqa: E402

ARMS = ("trl", "chattune-dpo", "chattune-sft")
METHODS = ("full", "lora")
SHAPES: dict[str, dict[str, Any]] = {
    "toy": dict(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256
    ),
    "smollm2-135m": SMOLLM2_135M,
}
TARGET_DPO_OVER_SFT = 1.2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=(*METHODS, "both"), default="full")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="toy")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per arm (one micro-batch each)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every arm; the report gives medians")
    parser.add_argument("--micro_batch_size", type=int, default=4, help="pairs (DPO) or conversations (SFT)")
    parser.add_argument("--ctx_size", type=int, default=512)
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tokenizer_vocab", type=int, default=1024, help="BPE vocabulary trained on the pairs")
    parser.add_argument("--bf16", action="store_true", help="compute in bfloat16 (every arm)")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="activation checkpointing (every arm)")
    parser.add_argument(
        "--arms",
        type=arm_list(ARMS),
        default=ARMS,
        help=f"comma-separated arms to run (default: all of {','.join(ARMS)})",
    )
    parser.add_argument("--workdir", default=None, help="keep data, model and logs here (default: a temp dir)")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # in a subprocess
    parser.add_argument("--arm_method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- the data and the model ----------------------------------------------------------------------------------

ROOMS = ("kitchen", "bedroom", "office", "garage", "hallway", "living room", "bathroom", "attic")
DEVICES = ("light", "fan", "blinds", "heater", "speaker", "lamp", "door lock", "air purifier")


def make_pairs(count: int, seed: int) -> list[dict]:
    """Smart-home pairs of varied lengths: the right service call against a refusal or a wrong call."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        room, device = rng.choice(ROOMS), rng.choice(DEVICES)
        devices = ", ".join(
            f"{rng.choice(DEVICES)}.{rng.choice(ROOMS).replace(' ', '_')}" for _ in range(rng.randint(3, 12))
        )
        entity = f"{device.replace(' ', '_')}.{room.replace(' ', '_')}"
        call = json.dumps({"service": f"{device.split()[0]}.turn_on", "target_device": entity, "n": index})
        chatter = " ".join(rng.choice(ROOMS + DEVICES) for _ in range(rng.randint(0, 30)))
        wrong = json.dumps({"service": f"{device.split()[0]}.turn_off", "target_device": entity})
        rows.append(
            {
                "system": f"You control the house. Devices: {devices}",
                "question": f"Please turn on the {device} in the {room}. {chatter}".strip(),
                "chosen": f"Turning on the {device} in the {room}.\n```homeassistant\n{call}\n```",
                "rejected": rng.choice(["I cannot help with that.", f"Done.\n```homeassistant\n{wrong}\n```"]),
            }
        )
    return rows


TOKENIZER_ROWS = 256  # pairs the tokenizer is trained on; the arms train on the first steps x micro-batch


def write_data(work: Path, args: argparse.Namespace) -> list[dict]:
    """The pairs the arms train on: one epoch is --steps micro-batches, so every arm (and chattune's reference
    pass) sees the same rows. All TOKENIZER_ROWS are returned for the tokenizer."""
    corpus = make_pairs(TOKENIZER_ROWS, args.seed)
    rows = corpus[: args.steps * args.micro_batch_size]
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(data / "pairs.jsonl", rows)
    write_jsonl(data / "trl_pairs.jsonl", [trl_row(row) for row in rows])
    write_jsonl(data / "sft.jsonl", [{"conversations": conversation(row)} for row in rows])
    return corpus


def conversation(row: dict) -> list[dict]:
    return [
        {"from": "system", "value": row["system"]},
        {"from": "human", "value": row["question"]},
        {"from": "gpt", "value": row["chosen"]},
    ]


def trl_row(row: dict) -> dict:
    """The pair as TRL's documentation writes a conversational one."""
    prompt = [{"role": "system", "content": row["system"]}, {"role": "user", "content": row["question"]}]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def build_base_model(work: Path, args: argparse.Namespace, rows: list[dict]) -> dict:
    """Tokenizer trained on the pairs, random-weight Llama of --shape; saved to work/base."""
    from chattune.data.build_tokenizer import train_bpe_tokenizer

    texts = (text for row in rows for text in row.values())
    tokenizer = train_bpe_tokenizer(texts, vocab_size=args.tokenizer_vocab)
    shape = {"vocab_size": len(tokenizer), **SHAPES[args.shape]}
    model = save_random_llama(work / "base", shape, tokenizer, args.seed, max_positions=2048)
    return {"shape": args.shape, "model_vocab": model.config.vocab_size, "parameters": model.num_parameters()}


# --- the subprocess side: one arm, instrumented --------------------------------------------------------------


def dpo_result(probe: Probe) -> dict:
    """What a DPO memory arm reports; its rate is over steps 2..N (bench.harness.Probe.timing)."""
    timing = probe.timing()
    return {
        "tokens_per_s": timing["tokens_per_s"],
        "steps": timing["steps"],
        "timed_s": timing["timed_s"],
        "real_tokens_timed": timing["real_tokens_timed"],
        "precompute_s": round(probe.seconds.get("precompute", 0.0), 3),
        "activation_checkpointing": probe.activation_checkpointing(),
        "reference": reference_kind(probe.trainer),
        "shared_prompts": shares_prompts(probe.trainer),
    }


def reference_kind(trainer: Any) -> str:
    """How the trainer had its reference while training."""
    if getattr(trainer, "ref_model", None) is not None:
        return "model copy in memory"
    if getattr(trainer, "precompute_ref_logps", False):
        return "precomputed"
    if hasattr(trainer, "ref_model"):  # DPO on an adapter
        return "adapter off, a pass per micro-batch"
    return "none (SFT)"


def shares_prompts(trainer: Any) -> bool:
    """chattune's DPO runs each pair's prompt once (chattune.training.kernels.shared_prefix); TRL's runs it twice."""
    from chattune.training.kernels.shared_prefix import LeanDPO, packable_backbone

    return isinstance(trainer, LeanDPO) and packable_backbone(trainer.model) is not None


def instrument(probe: Probe) -> None:
    """Attach the probe when training starts; time chattune's reference pass."""
    from chattune.training.trainers import reference

    probe.attach_when_training()
    precompute = reference.PrecomputedReference._precompute_ref_logps
    reference.PrecomputedReference._precompute_ref_logps = probe.timed("precompute", precompute)


def run_chattune(args: argparse.Namespace, work: Path, dpo: bool) -> None:
    from chattune.commands import train as run

    data = work / "data" / ("pairs.jsonl" if dpo else "sft.jsonl")
    argv = [
        *("--run_name", "bench", "--base_model", str(work / "base"), "--train_dataset", str(data)),
        *("--output_dir", str(work / f"out-{args.arm}-{args.arm_method}"), "--overwrite_output_dir"),
        *("--max_steps", str(args.steps), "--batch_size", str(args.micro_batch_size)),
        *("--micro_batch_size", str(args.micro_batch_size), "--learning_rate", str(args.learning_rate)),
        *("--ctx_size", str(args.ctx_size), "--seed", str(args.seed), "--logging_steps", "1"),
        *("--save_steps", str(args.steps + 1000), "--report_to", "none"),
        *(["--method", "dpo", "--precompute_ref_log_probs"] if dpo else []),
        *(["--use_lora"] if args.arm_method == "lora" else []),
        *(["--bf16"] if args.bf16 else []),
        *(["--gradient_checkpointing"] if args.gradient_checkpointing else []),
    ]
    code = run.main(argv)
    if code != 0:
        raise SystemExit(f"train.py failed with exit code {code}")


def run_trl(args: argparse.Namespace, work: Path) -> None:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=dtype)
    dataset = load_dataset("json", data_files=str(work / "data" / "trl_pairs.jsonl"), split="train")
    config = DPOConfig(
        output_dir=str(work / f"out-trl-{args.arm_method}"),
        per_device_train_batch_size=args.micro_batch_size,
        max_steps=args.steps,
        max_length=args.ctx_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",  # chattune's defaults, so that every arm takes the same steps
        weight_decay=0.1,
        max_grad_norm=1.0,
        seed=args.seed,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
    )
    peft_config = None
    if args.arm_method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    trainer.train()


def run_arm(args: argparse.Namespace) -> int:
    work = Path(args.workdir)
    probe = Probe()
    instrument(probe)
    if args.arm == "trl":
        run_trl(args, work)
    else:
        run_chattune(args, work, dpo=args.arm == "chattune-dpo")
    result = {**dpo_result(probe), **peaks()}
    Path(args.result).write_text(json.dumps(result))
    return 0


# --- the parent side: build everything, run the arms, compare ----------------------------------------------


def run_subprocess(args: argparse.Namespace, work: Path, arm: str, method: str, repeat: int) -> dict:
    """One arm in its own process; its result, or its name and error when it failed."""
    arguments = [*args.argv, "--workdir", str(work), "--arm", arm, "--arm_method", method]
    name = f"{arm}-{method}-{repeat}"
    script = Path(__file__).resolve()
    return run_in_subprocess(script, arm, arguments, work, name, allocator_environment(arm), bool(args.workdir))


def allocator_environment(arm: str) -> dict[str, str]:
    """chattune's arms get the malloc train.py would restart with; TRL's keep glibc's."""
    from chattune.allocator import preload_environment

    return {} if arm == "trl" else preload_environment(os.environ)


def summarize(runs: list[dict]) -> dict:
    """One arm's repeats: the median of every figure, every peak RSS, or the errors when none succeeded."""
    done, failed = succeeded(runs)
    if not done:
        return {"error": "; ".join(failed)}
    summary = medians(done, ("peak_rss_mb", "tokens_per_s", "precompute_s", "peak_gpu_mb"))
    summary["peak_rss_mb_runs"] = [run["peak_rss_mb"] for run in done]
    summary["reference"] = done[0]["reference"]
    summary["shared_prompts"] = done[0].get("shared_prompts", False)
    summary["activation_checkpointing"] = done[0]["activation_checkpointing"]
    return {**summary, **({"errors": failed} if failed else {})}


def ratio(numerator: dict, denominator: dict, key: str) -> float | None:
    if key not in numerator or key not in denominator or not denominator[key]:
        return None
    return round(numerator[key] / denominator[key], 3)


def compare(arms: dict[str, dict]) -> dict:
    """Ratios against this run's own arms; None where an arm failed."""
    trl, dpo, sft = (arms.get(arm, {}) for arm in ARMS)  # an arm left out by --arms compares as None
    dpo_over_sft = ratio(dpo, sft, "peak_rss_mb")
    comparison = {
        "chattune_dpo_rss_over_sft": dpo_over_sft,
        "trl_dpo_rss_over_chattune_dpo": ratio(trl, dpo, "peak_rss_mb"),
        "chattune_dpo_tokens_per_s_over_trl": ratio(dpo, trl, "tokens_per_s"),
        "chattune_dpo_gpu_over_sft": ratio(dpo, sft, "peak_gpu_mb"),
        "trl_dpo_gpu_over_chattune_dpo": ratio(trl, dpo, "peak_gpu_mb"),
    }
    comparison = {key: value for key, value in comparison.items() if value is not None or "gpu" not in key}
    target = f"chattune DPO peak RSS <= {TARGET_DPO_OVER_SFT}x SFT"
    comparison["targets"] = {target: None if dpo_over_sft is None else dpo_over_sft <= TARGET_DPO_OVER_SFT}
    return comparison


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.arm:
        return run_arm(args)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # handed on to the arms (a later --workdir wins)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        setup = build_base_model(work, args, write_data(work, args))
        methods = METHODS if args.method == "both" else (args.method,)
        report: dict[str, Any] = {}
        for method in methods:

            def run_one(arm: str, repeat: int, method: str = method) -> dict:
                return run_subprocess(args, work, arm, method, repeat)

            runs = repeated(args.arms, args.repeats, run_one, {"method": method})
            arms = {arm: summarize(results) for arm, results in runs.items()}
            report[method] = {"arms": arms, **compare(arms)}
        report["setup"] = {**setup, **settings(args), "wall_s": round(time.perf_counter() - start, 1)}
        print(json.dumps(report))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def settings(args: argparse.Namespace) -> dict:
    import torch

    return {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "dtype": "bf16" if args.bf16 else "fp32",
        "steps": args.steps,
        "repeats": args.repeats,
        "micro_batch_size": args.micro_batch_size,
        "ctx_size": args.ctx_size,
        "gradient_checkpointing": args.gradient_checkpointing,
        "cpu_count": os.cpu_count(),
    }


if __name__ == "__main__":
    sys.exit(main())
