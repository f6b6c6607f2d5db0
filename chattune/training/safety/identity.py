"""What a run is: its fingerprint, recorded when it starts and compared when it is resumed.

The fingerprint holds what decides what is trained: the training data (each source's content hash, path,
format, split, revision and weight), --ctx_size, how rows become tokens and labels (--prompt_template_file's
content, --train_on_prompts, --prefix_ids/--suffix_ids, --packing), the tokens added to the vocabulary, the
method, the LoRA set-up (rank, alpha, modules, layers, modules trained in full, DoRA, rsLoRA, initialisation), the
base model's identity (shape and weights fingerprint, as chattune.training.safety.resume computes it) and the step
budget. It is written to `runs/<run>/run.json` (atomically) when training starts, and into every checkpoint's
trainer_state.json (RunRecord), so a checkpoint is compared with the settings it was trained with.

On resume, a difference is refused before the data is prepared, in one line that lists every change and what
to do: data changes (content, format, weights, --ctx_size, the preparation flags) are accepted with
--allow_changed_data; the added tokens, the method, the LoRA set-up and the base model cannot change (the
embeddings, the adapter or its optimizer state would not fit, or the weights would mean something else): that is
a new run. A source moved to another path with the same content is the same data: a warning. The budget may
grow; a finished run whose outputs were written is not trained again unless a larger one is asked for
(RunFinished: one line, exit 0), and a budget below the steps already trained is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chattune.atomic import write_text_atomic
from chattune.config.flags import FlagError, TrainFlags
from chattune.data.sources import Source, parse_sources

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
ALLOW_DATA = "--allow_changed_data"
LORA_FLAGS = (
    "use_lora",
    "lora_rank",
    "lora_alpha",
    "lora_modules",
    "lora_layers",
    "lora_modules_to_save",
    "use_dora",
    "use_rslora",
    "lora_init",
)
# How rows become tokens and labels: another value trains on other examples, as other data does.
PREPARATION_FLAGS = ("train_on_prompts", "prefix_ids", "suffix_ids", "packing")
# Tokens added to the vocabulary: another set gives the embeddings another shape.
TOKEN_FLAGS = ("add_pad_token", "add_chatml_tokens", "add_tool_calling_tokens")
# What identifies a source's rows; its path is left out: a copy elsewhere is the same data.
SOURCE_CONTENT = ("sha256", "kind", "split", "revision", "weight")
HASH_CHUNK = 1 << 20


class RunFinished(Exception):  # noqa: N818 - not an error: the run is done, the command exits 0
    """The checkpoint ends the run and its outputs were written; the message says so and how to train further."""


@dataclass(frozen=True)
class Change:
    """One fingerprinted setting that differs: how it changed, and the flag that accepts it (None: nothing can)."""

    text: str
    accepted_by: str | None = None
    fix: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# Taking the fingerprint


def run_fingerprint(flags: TrainFlags) -> dict[str, Any]:
    """The fingerprint of the run `flags` describe. Reads every local training file once, to hash it."""
    return {
        "data": [source_identity(source) for source in parse_sources(flags.train_dataset)],
        "ctx_size": flags.ctx_size,
        "preparation": {
            **{name: getattr(flags, name) for name in PREPARATION_FLAGS},
            "prompt_template_file": template_hash(flags.prompt_template_file),
        },
        "tokens": {name: getattr(flags, name) for name in TOKEN_FLAGS},
        "method": flags.method,
        "lora": {name: getattr(flags, name) for name in LORA_FLAGS} if flags.use_lora else {"use_lora": False},
        "base": base_model_identity(flags.base_model),
        "budget": budget(flags),
    }


def budget(flags: TrainFlags) -> dict[str, Any]:
    return {"max_steps": flags.max_steps, "epochs": flags.epochs, "time_budget": flags.time_budget}


def source_identity(source: Source) -> dict[str, Any]:
    """A source's spelling, absolute location, format and weight, and a hash of its content (none for a hub
    dataset: its id, split and revision name it)."""
    local = source.kind != "hub"
    return {
        "source": source.text,
        "location": str(Path(source.location).resolve()) if local else source.location,
        "kind": source.kind,
        "split": source.split,
        "revision": source.revision,
        "weight": source.weight,
        "sha256": content_hash(Path(source.location)) if local else None,
    }


def content_hash(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (their relative paths and bytes, in sorted order)."""
    digest = hashlib.sha256()
    files = sorted(file for file in path.rglob("*") if file.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(f"{file.relative_to(path)}\0".encode())
        with file.open("rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def template_hash(path: str | None) -> str | None:
    """The chat template's content: the same file edited renders other prompts."""
    return content_hash(Path(path))[:16] if path else None


def base_model_identity(name: str) -> dict[str, Any]:
    from chattune.training.safety.resume import base_identity

    try:
        return base_identity(name)
    except OSError:  # a hub id whose config is not at hand: loading the model will say why
        return {"name": name, "config": None, "weights": None}


# ---------------------------------------------------------------------------------------------------------------
# Storing it with the run


def record_start(run_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Write the run's fingerprint when training starts (again on resume: it holds what the run trains on now)."""
    write_run_file(run_dir, {"fingerprint": fingerprint, "finished_at_step": None})


def record_finished(run_dir: Path, step: int) -> None:
    """Note that the run's outputs were written from step `step`: a resume with the same budget has nothing to do."""
    run = read_run_file(run_dir)
    if run is not None:
        write_run_file(run_dir, {**run, "finished_at_step": step})


def write_run_file(run_dir: Path, content: dict[str, Any]) -> None:
    write_text_atomic(Path(run_dir) / RUN_FILE, json.dumps(content, indent=2, sort_keys=True) + "\n")


def read_run_file(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RUN_FILE
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def recorded_fingerprint(checkpoint: Path) -> dict[str, Any] | None:
    """The fingerprint `checkpoint` was trained with: its own record, else its run's file (older checkpoints)."""
    from chattune.training.safety.resume import recorded

    own = recorded(checkpoint).get("fingerprint")
    if own is not None:
        return own
    run = read_run_file(checkpoint.parent)
    return run.get("fingerprint") if run else None


# ---------------------------------------------------------------------------------------------------------------
# Comparing on resume


def check_same_run(flags: TrainFlags, checkpoint: Path, current: dict[str, Any]) -> None:
    """Refuse to resume `checkpoint` with settings that change what is trained, unless a flag accepts them; then
    refuse a budget below what it trained, and stop (RunFinished) when there is nothing left to train."""
    saved = recorded_fingerprint(checkpoint)
    if saved is None:
        logger.warning("%s records no fingerprint of its run; cannot check what changed since it started", checkpoint)
        return
    found = differences(saved, current)
    allowed = {ALLOW_DATA} if flags.allow_changed_data else set()
    refused = [change for change in found if change.accepted_by not in allowed]
    if refused:
        raise FlagError(refusal(checkpoint, found, refused))
    for change in found:
        logger.warning("%s: %s, accepted by %s", checkpoint, change.text, change.accepted_by)
    warn_moved_data(checkpoint, saved.get("data"), current["data"])
    check_budget(checkpoint, saved.get("budget"), current["budget"])


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[Change]:
    """Every fingerprinted setting that differs (settings an older fingerprint lacks are not compared)."""
    found = []
    if "data" in saved and content_of(saved["data"]) != content_of(current["data"]):
        found.append(Change(describe_data(saved["data"], current["data"]), accepted_by=ALLOW_DATA))
    if "ctx_size" in saved and saved["ctx_size"] != current["ctx_size"]:
        found.append(Change(f"--ctx_size {saved['ctx_size']} -> {current['ctx_size']}", accepted_by=ALLOW_DATA))
    found += flag_changes(saved.get("preparation"), current["preparation"], accepted_by=ALLOW_DATA)
    vocabulary = "the embeddings would have another shape: start a new run (another --run_name)"
    found += flag_changes(saved.get("tokens"), current["tokens"], fix=vocabulary)
    if "method" in saved and saved["method"] != current["method"]:
        fix = "start a new run with another --run_name (with this run's result as its --base_model, to build on it)"
        found.append(Change(f"--method {saved['method']} -> {current['method']}", fix=fix))
    found += lora_changes(saved.get("lora"), current["lora"])
    found += base_changes(saved.get("base"), current["base"])
    return found


def content_of(data: list[dict[str, Any]]) -> list[tuple]:
    return [tuple(source.get(key) for key in SOURCE_CONTENT) for source in data]


def describe_data(saved: list[dict[str, Any]], current: list[dict[str, Any]]) -> str:
    if len(saved) != len(current):
        return f"--train_dataset {' '.join(s['source'] for s in saved)} -> {' '.join(s['source'] for s in current)}"
    parts = []
    for was, now in zip(saved, current):
        changed = [key for key in SOURCE_CONTENT if was.get(key) != now.get(key)]
        named = ", ".join(
            "other content" if key == "sha256" else f"{key} {was.get(key)} -> {now.get(key)}" for key in changed
        )
        if named:
            parts.append(f"--train_dataset {now['source']}: {named}")
    return ", ".join(parts)


def lora_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[Change]:
    if saved is None:
        return []
    fix = (
        "the adapter and its optimizer state would not fit another LoRA set-up: start a new run (another "
        "--run_name, or --overwrite_output_dir)"
    )
    if not (saved.get("use_lora") and current.get("use_lora")):  # full <-> LoRA: the rest does not apply to both
        return flag_changes({"use_lora": saved.get("use_lora")}, {"use_lora": current.get("use_lora")}, fix=fix)
    return flag_changes(saved, current, fix=fix)


def flag_changes(saved: dict[str, Any] | None, current: dict[str, Any], **how: str) -> list[Change]:
    """A Change (with `how`: accepted_by or fix) for each flag whose value differs; none for a group an older
    fingerprint lacks."""
    if saved is None:
        return []
    names = dict.fromkeys([*saved, *current])
    return [
        Change(f"--{name} {shown(saved.get(name))} -> {shown(current.get(name))}", **how)
        for name in names
        if saved.get(name) != current.get(name)
    ]


def base_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[Change]:
    if saved is None or saved.get("config") is None or current.get("config") is None:
        return []
    fix = f"resume with --base_model {saved['name']}, or start a new run"
    shape = [key for key, value in saved["config"].items() if current["config"].get(key) != value]
    if shape:
        changed = ", ".join(f"{key} {saved['config'][key]} -> {current['config'].get(key)}" for key in shape)
        return [Change(f"--base_model {saved['name']} -> {current['name']} ({changed})", fix=fix)]
    if saved["weights"] and current["weights"] and saved["weights"] != current["weights"]:
        weights = f"weights {saved['weights']} -> {current['weights']}"
        return [Change(f"--base_model {saved['name']} -> {current['name']} ({weights})", fix=fix)]
    return []


def shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "unset" if value is None else str(value)


def refusal(checkpoint: Path, found: list[Change], refused: list[Change]) -> str:
    """One line: every change, then what to do about each kind."""
    fixes = list(dict.fromkeys(change.fix for change in refused if change.fix))
    accepting = sorted({change.accepted_by for change in found if change.accepted_by})
    if fixes:
        todo = "; ".join(fixes)
        if accepting:
            todo += f" ({', '.join(accepting)} would accept the rest)"
    else:
        todo = f"if that is meant, resume with {', '.join(accepting)}; else resume with the settings it started with"
    listed = "; ".join(change.text for change in found)
    return f"{checkpoint} was trained with other settings: {listed}; {todo}"


def warn_moved_data(checkpoint: Path, saved: list[dict[str, Any]] | None, current: list[dict[str, Any]]) -> None:
    for was, now in zip(saved or [], current):
        if was.get("location") != now["location"] and content_of([was]) == content_of([now]):
            logger.warning(
                "%s: %s moved to %s, with the same content; resuming", checkpoint, was["location"], now["location"]
            )


# ---------------------------------------------------------------------------------------------------------------
# The step budget


def check_budget(checkpoint: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """A budget below the steps trained is refused; a finished run whose outputs exist stops here (RunFinished)
    unless a larger budget is asked for. A finished run without outputs (the final save failed) goes on: it
    trains nothing and writes them."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    done, planned = state.get("global_step", 0), state.get("max_steps", 0)
    if 0 < current["max_steps"] < done:
        raise FlagError(
            f"--max_steps {current['max_steps']} is below the {done} steps {checkpoint} has trained; give "
            f"--max_steps {done} or more, or start a new run"
        )
    if saved is None or done < planned or asks_for_more(saved, current, done):
        return
    run = read_run_file(checkpoint.parent) or {}
    if run.get("finished_at_step") == done:
        raise RunFinished(
            f"{checkpoint.parent.name} already finished at step {done} of {planned} and its outputs are written; "
            "nothing was trained: raise --max_steps or --epochs to train further"
        )


def asks_for_more(saved: dict[str, Any], current: dict[str, Any], done: int) -> bool:
    """Whether `current` asks for more steps than a run that finished at step `done` under `saved` trained."""
    if current["max_steps"] > 0:
        return current["max_steps"] > done
    if saved["max_steps"] > 0:
        return True  # now counted in epochs: the trainer works out the steps
    return current["epochs"] > saved["epochs"] or bool(saved["time_budget"] and not current["time_budget"])
