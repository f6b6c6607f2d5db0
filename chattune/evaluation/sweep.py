"""Several models in one evaluation: every checkpoint of a run (`--all_checkpoints`), or the MODELs named on the
command line, and the results stored beside each of them that a later evaluation of the same test set reuses.

A run's layout is train.py's (chattune.training.safety.outputs): `<root>/runs/<run>/checkpoint-N` while training, then
`<root>/models/<run>` (a full or merged model) and/or `<root>/loras/<run>` (an adapter).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chattune.evaluation.inputs import EvalError, Example
from chattune.evaluation.report import RESULTS_FILE
from chattune.models.errors import ModelError
from chattune.models.folders import ModelSource, inspect_model_folder

logger = logging.getLogger("chattune.evaluate")

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
# The final folder a run leaves, in the order looked for: a merged model loads without its base model.
FINAL_FOLDERS = ("models", "loras")


@dataclass
class Target:
    """One model of a sweep or comparison: its table label, folder, and training step (None: not a checkpoint)."""

    label: str
    source: ModelSource
    step: int | None = None
    final: bool = False  # the run's final folder, models/<run> or loras/<run>


@dataclass
class Targets:
    found: list[Target]
    skipped: list[dict]  # {"model": folder, "reason": why it was left out}


def checkpoint_targets(run_dir: str | Path) -> Targets:
    """Every complete `checkpoint-N` of a run by step, then its final folder. An incomplete one (killed while
    saving: no or truncated weights) is skipped with a warning; no checkpoint and no final folder is an error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvalError(f"--all_checkpoints {run_dir}: no such folder; pass a run folder, runs/<run>")
    folders = [(int(match[1]), path) for path, match in _checkpoint_folders(run_dir)]
    candidates = [(f"checkpoint-{step}", path, step) for step, path in sorted(folders)]
    final = final_folder(run_dir)
    if final is not None:
        candidates.append((f"{final.parent.name}/{final.name}", final, None))
    if not candidates:
        finals = " or ".join(str(path) for path in _final_candidates(run_dir)) or "none: it is not in a runs/ folder"
        raise EvalError(
            f"--all_checkpoints {run_dir}: no checkpoint-N folder in it, and no final model ({finals}); "
            "pass the run folder train.py wrote, <output_dir>/runs/<run>"
        )
    found, skipped = [], []
    for label, path, step in candidates:
        try:
            found.append(Target(label, inspect_model_folder(path), step, final=path == final))
        except ModelError as error:  # a damaged checkpoint is left out of the sweep, not the end of it
            skip(skipped, path, error)
    return Targets(found, skipped)


def skip(skipped: list[dict], path: Path, error: Exception) -> None:
    """Leave a checkpoint out of a sweep: a warning, and a `skipped` entry with the reason on one line."""
    reason = " ".join(str(error).split())
    logger.warning("skipping %s: %s", path, reason)
    skipped.append({"model": str(path), "reason": reason})


def _checkpoint_folders(run_dir: Path) -> list[tuple[Path, re.Match]]:
    matches = [(path, CHECKPOINT_RE.fullmatch(path.name)) for path in run_dir.iterdir() if path.is_dir()]
    return [(path, match) for path, match in matches if match]


def final_folder(run_dir: Path) -> Path | None:
    """models/<run> or loras/<run> beside the run's runs/ folder, whichever exists first in FINAL_FOLDERS."""
    return next((path for path in _final_candidates(run_dir) if path.is_dir()), None)


def _final_candidates(run_dir: Path) -> list[Path]:
    run_dir = run_dir.resolve()
    if run_dir.parent.name != "runs":  # not train.py's layout: there is no final folder to find
        return []
    return [run_dir.parent.parent / kind / run_dir.name for kind in FINAL_FOLDERS]


def named_targets(paths: Sequence[str], gguf_runtime: str = "transformers") -> Targets:
    """The MODELs named on the command line, labelled by the shortest path tails that tell them apart. A folder
    that is not a model is an error here, before any model loads: the user asked for it by name."""
    sources = [inspect_model_folder(path, gguf_runtime) for path in paths]
    labels = distinct_labels([source.path for source in sources])
    return Targets([Target(label, source) for label, source in zip(labels, sources)], [])


def distinct_labels(paths: Sequence[Path]) -> list[str]:
    """`run` for models/run, unless another path also ends in `run`: then `models/run` and `loras/run`."""
    parts = [Path(path).resolve().parts for path in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{index + 1}:{label}" for index, label in enumerate(labels)]  # the same folder named twice


def results_folder(target: Target, output_dir: str | None) -> Path:
    """Where a target's eval_results.json goes: its own folder, or <output_dir>/<label> when one is given."""
    return Path(output_dir) / target.label if output_dir else target.source.results_dir


def reuse_key(
    source: ModelSource, examples: Sequence[Example], max_new_tokens: int | None, scoring: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What must not have changed for stored results to stand: the test examples, the reply budget asked for,
    the weight files (name, size, modification time), and how replies were made and read (`scoring`: the task,
    constrained decoding)."""
    scored = [{k: v for k, v in dataclasses.asdict(e).items() if k != "row"} for e in examples]
    text = json.dumps(scored, sort_keys=True, ensure_ascii=False)
    weights = [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in source.weight_files]
    return {
        "examples_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "max_new_tokens_requested": max_new_tokens,
        "weights": weights,
        **(scoring or {}),
    }


def stored_summary(folder: Path, key: dict[str, Any]) -> dict | None:
    """The summary of `folder`'s eval_results.json if it was computed under the same reuse key, else None."""
    path = folder / RESULTS_FILE
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        logger.warning("%s: unreadable (%s); scoring again", path, error)
        return None
    if not isinstance(stored, dict) or stored.get("settings", {}).get("reuse_key") != key:
        logger.info("%s: from another test set, reply budget or weights; scoring again", path)
        return None
    return stored.get("summary")
