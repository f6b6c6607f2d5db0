"""evaluate.py's results: the summary table, eval_results.json and eval_failures.jsonl, written atomically; for
several models, the comparison table (one row per model) and its eval_table.json and eval_table.csv."""

from __future__ import annotations

import csv
import errno
import io
import json
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chattune.atomic import write_text_atomic
from chattune.domains.homeassistant.scoring import METRIC_KEYS, ExampleScore
from chattune.evaluation import tool_calls
from chattune.evaluation.inputs import EvalError, Example

RESULTS_FILE = "eval_results.json"
FAILURES_FILE = "eval_failures.jsonl"
TABLE_FILES = ("eval_table.json", "eval_table.csv")
TABLE_COLUMNS = ("model", "step", "path", "reused")


def failure_records(examples: Sequence[Example], replies: Sequence[str], scores: Sequence[ExampleScore]) -> list:
    return [
        {
            "row": index + 1,
            "prompt": example.prompt,
            "expected": example.reference,
            "got": reply,
            "expected_calls": score.expected_calls,
            "got_calls": score.predicted_calls,
            "json_valid": score.json_valid,
            "language": example.language,
            "kind": example.kind,
        }
        for index, (example, reply, score) in enumerate(zip(examples, replies, scores))
        if not score.exact_match
    ]


def check_writable(folder: Path, fix: str) -> None:
    """Refuse, before any generation, a results folder that cannot be written: the results would be lost at the end.

    The folder (or, when it does not exist yet, the nearest folder above it) must take a new file; `fix` says how
    to choose another."""
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise EvalError(
            f"{folder}: cannot write the results there ({error.strerror or error}); {fix} to write them elsewhere"
        ) from None


def write_outputs(folder: Path, summary: dict, settings: dict, failures: list) -> tuple[Path, Path]:
    results_path, failures_path = folder / RESULTS_FILE, folder / FAILURES_FILE
    write_text_atomic(
        results_path, json.dumps({"summary": summary, "settings": settings}, indent=2, ensure_ascii=False)
    )
    write_text_atomic(failures_path, "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures))
    return results_path, failures_path


SHORT_NAMES = {
    "service_call_exact_match": "exact",
    "call_precision": "prec",
    "call_recall": "recall",
    "entity_accuracy": "entity",
    "json_valid_rate": "json_ok",
    "no_call_accuracy": "no_call",
    "perplexity": "ppl",
    "bleu": "bleu",
    "rouge1": "rouge1",
    "rouge2": "rouge2",
    "rougeL": "rougeL",
    "meteor": "meteor",
    "edit_distance": "edit",
    "latency_mean_s": "lat_s",
    "latency_p95_s": "p95_s",
    "n_examples": "n",
    "tool_call_exact_match": "exact",
    "function_name_accuracy": "func",
    "argument_accuracy": "args",
    "final_reply_rougeL": "final_rL",
    "n_turns": "turns",
}
SLICES = (("language", "by_language"), ("kind", "by_kind"), ("devices", "by_devices"))


def metric_keys(summary: dict) -> tuple[str, ...]:
    """The overall metrics of a summary's task: Home Assistant replies, or tool-calling turns."""
    return tool_calls.METRIC_KEYS if summary.get("task") == tool_calls.TASK else METRIC_KEYS


def format_table(summary: dict) -> str:
    """One row per group (overall, each language, kind and device-count bucket); '-' where a metric does not
    apply."""
    rows = [("overall", summary)]
    for prefix, key in SLICES:
        rows += [(f"{prefix}={name}", metrics) for name, metrics in summary.get(key, {}).items()]
    return _grid(rows, [])


def format_comparison(rows: Sequence[dict], skipped: Sequence[dict] = ()) -> str:
    """One line per model of a sweep or comparison: its label, step ('final' for a run's final folder, '-' for a
    model that is not a checkpoint), then the overall metrics; then the checkpoints left out, and why."""
    labelled = [(row["model"], row) for row in rows]
    steps = [_step(row) for row in rows]
    return "\n".join([_grid(labelled, steps), *(f"skipped {s['model']}: {s['reason']}" for s in skipped)])


def _step(row: dict) -> str:
    if row["step"] is not None:
        return str(row["step"])
    return "final" if row.get("final") else "-"


def _grid(rows: Sequence[tuple[str, dict]], steps: Sequence[str]) -> str:
    width = max(len(name) for name, _ in rows) + 2
    step_width = max((len(step) for step in steps), default=0)
    header = "".ljust(width) + (f"{'step':>{step_width}}" if steps else "")
    keys = metric_keys(rows[0][1])
    lines = [header + "".join(f" {SHORT_NAMES[k]:>8}" for k in keys)]
    for index, (name, metrics) in enumerate(rows):
        step = f"{steps[index]:>{step_width}}" if steps else ""
        lines.append(name.ljust(width) + step + "".join(f" {_cell(k, metrics.get(k)):>8}" for k in keys))
    legend = ", ".join(f"{SHORT_NAMES[key]}={key}" for key in keys)
    notes = f"columns: {legend}; '-' = no applicable example; bleu on a 0-100 scale; edit: lower is better"
    return "\n".join([*lines, "", *textwrap.wrap(notes, width=120)])


def write_table(folder: Path, rows: Sequence[dict], skipped: Sequence[dict], settings: dict) -> tuple[Path, Path]:
    """eval_table.json ({"rows", "skipped", "settings"}) and eval_table.csv (the rows, overall metrics only)."""
    json_path, csv_path = folder / TABLE_FILES[0], folder / TABLE_FILES[1]
    document = {"rows": list(rows), "skipped": list(skipped), "settings": settings}
    write_text_atomic(json_path, json.dumps(document, indent=2, ensure_ascii=False))
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer,
        fieldnames=[*TABLE_COLUMNS, *metric_keys(rows[0] if rows else {})],
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
