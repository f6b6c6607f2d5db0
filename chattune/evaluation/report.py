"""evaluate.py's results: the summary table, eval_results.json and eval_failures.jsonl, written atomically; for
several models, the comparison table (one row per model) and its eval_table.json and eval_table.csv."""

from __future__ import annotations

import csv
import io
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chattune.atomic import creation_problem, write_text_atomic
from chattune.domains.task import Score, Task
from chattune.evaluation.inputs import EvalError, Example

RESULTS_FILE = "eval_results.json"
FAILURES_FILE = "eval_failures.jsonl"
TABLE_FILES = ("eval_table.json", "eval_table.csv")
TABLE_COLUMNS = ("model", "step", "path", "reused")


def failure_records(task: Task, examples: Sequence[Example], replies: Sequence[str], scores: Sequence[Score]) -> list:
    """The task's record of every reply that is not an exact match, with its 1-based row."""
    return [
        task.failure_record(index + 1, example, reply, score)
        for index, (example, reply, score) in enumerate(zip(examples, replies, scores))
        if not score.exact_match
    ]


def check_writable(folder: Path, fix: str) -> None:
    """Refuse, before any generation, a results folder that cannot be written: the results would be lost at the end.

    The folder (or, when it does not exist yet, the nearest folder above it) must take a new file; `fix` says how
    to choose another."""
    problem = creation_problem(folder)
    if problem:
        raise EvalError(f"{folder}: cannot write the results there ({problem}); {fix} to write them elsewhere")


def write_outputs(folder: Path, summary: dict, settings: dict, failures: list) -> tuple[Path, Path]:
    results_path, failures_path = folder / RESULTS_FILE, folder / FAILURES_FILE
    write_text_atomic(
        results_path, json.dumps({"summary": summary, "settings": settings}, indent=2, ensure_ascii=False)
    )
    write_text_atomic(failures_path, "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures))
    return results_path, failures_path


def metric_keys(task: Task) -> tuple[str, ...]:
    """The overall metrics a task's table shows, in order."""
    return task.metric_keys()


def format_table(summary: dict, task: Task) -> str:
    """One row per group (overall, then each of the task's slices); '-' where a metric does not apply."""
    rows = [("overall", summary)]
    for prefix, key in task.slices:
        rows += [(f"{prefix}={name}", metrics) for name, metrics in summary.get(key, {}).items()]
    return _grid(rows, [], task)


def format_comparison(rows: Sequence[dict], task: Task, skipped: Sequence[dict] = ()) -> str:
    """One line per model of a sweep or comparison: its label, step ('final' for a run's final folder, '-' for a
    model that is not a checkpoint), then the overall metrics; then the checkpoints left out, and why."""
    labelled = [(row["model"], row) for row in rows]
    steps = [_step(row) for row in rows]
    return "\n".join([_grid(labelled, steps, task), *(f"skipped {s['model']}: {s['reason']}" for s in skipped)])


def _step(row: dict) -> str:
    if row["step"] is not None:
        return str(row["step"])
    return "final" if row.get("final") else "-"


def _grid(rows: Sequence[tuple[str, dict]], steps: Sequence[str], task: Task) -> str:
    width = max(len(name) for name, _ in rows) + 2
    step_width = max((len(step) for step in steps), default=0)
    header = "".ljust(width) + (f"{'step':>{step_width}}" if steps else "")
    keys, short = task.metric_keys(), task.short_names()
    lines = [header + "".join(f" {short[k]:>8}" for k in keys)]
    for index, (name, metrics) in enumerate(rows):
        step = f"{steps[index]:>{step_width}}" if steps else ""
        lines.append(name.ljust(width) + step + "".join(f" {_cell(k, metrics.get(k)):>8}" for k in keys))
    legend = ", ".join(f"{short[key]}={key}" for key in keys)
    lower = [short[key] for key in keys if not task.higher_is_better(key) and key != "perplexity"]
    notes = f"columns: {legend}; '-' = no applicable example; bleu on a 0-100 scale"
    notes += f"; lower is better: {', '.join(['ppl', *lower])}" if lower else ""
    return "\n".join([*lines, "", *textwrap.wrap(notes, width=120)])


def write_table(
    folder: Path, rows: Sequence[dict], skipped: Sequence[dict], settings: dict, task: Task
) -> tuple[Path, Path]:
    """eval_table.json ({"rows", "skipped", "settings"}) and eval_table.csv (the rows, overall metrics only)."""
    json_path, csv_path = folder / TABLE_FILES[0], folder / TABLE_FILES[1]
    document = {"rows": list(rows), "skipped": list(skipped), "settings": settings}
    write_text_atomic(json_path, json.dumps(document, indent=2, ensure_ascii=False))
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer,
        fieldnames=[*TABLE_COLUMNS, *task.metric_keys()],
        extrasaction="ignore",
        lineterminator="\n",
    )
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(csv_path, buffer.getvalue())
    return json_path, csv_path


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in ("n_examples", "n_turns"):
        return str(value)
    if key in ("perplexity", "bleu"):
        return f"{value:.2f}" if value < 1e5 else f"{value:.2e}"
    return f"{value:.3f}"
