"""evaluate.py's results: the summary table, eval_results.json and eval_failures.jsonl, written atomically."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chattune.atomic import write_text_atomic
from chattune.domains.homeassistant.scoring import METRIC_KEYS, ExampleScore
from chattune.evaluation.inputs import Example

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
