"""evaluate.py's results: the summary table, eval_results.json and eval_failures.jsonl, written atomically."""

from __future__ import annotations

import errno
import json
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chattune.atomic import write_text_atomic
from chattune.domains.homeassistant.scoring import METRIC_KEYS, ExampleScore
from chattune.evaluation.inputs import EvalError, Example

RESULTS_FILE = "eval_results.json"
FAILURES_FILE = "eval_failures.jsonl"


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
    "rougeL": "rougeL",
    "n_examples": "n",
}


def format_table(summary: dict) -> str:
    """One row per group (overall, each language, each kind); '-' where a metric does not apply."""
    rows = [("overall", summary)]
    rows += [(f"language={name}", metrics) for name, metrics in summary["by_language"].items()]
    rows += [(f"kind={name}", metrics) for name, metrics in summary["by_kind"].items()]
    width = max(len(name) for name, _ in rows) + 2
    lines = ["".ljust(width) + "".join(f" {SHORT_NAMES[k]:>8}" for k in METRIC_KEYS)]
    for name, metrics in rows:
        lines.append(name.ljust(width) + "".join(f" {_cell(k, metrics[k]):>8}" for k in METRIC_KEYS))
    legend = ", ".join(f"{short}={key}" for key, short in SHORT_NAMES.items())
    notes = f"columns: {legend}; '-' = no applicable example; bleu on a 0-100 scale"
    return "\n".join([*lines, "", *textwrap.wrap(notes, width=120)])


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "n_examples":
        return str(value)
    if key in ("perplexity", "bleu"):
        return f"{value:.2f}" if value < 1e5 else f"{value:.2e}"
    return f"{value:.3f}"
