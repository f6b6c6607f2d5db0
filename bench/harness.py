"""What the benchmarks share: the probe an arm's subprocess measures with, the subprocess that runs one arm, the
repeats, and the median summary.

Each arm runs in its own process, so that its peak RSS is its own; it writes its result as JSON to a file the
parent names, and a failed arm comes back as its error and the last lines of its log, so the others still run.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# --- the subprocess side: one arm, instrumented ---------------------------------------------------------------


class Probe:
    """What one arm measures: seconds spent in timed calls, tokens per micro-batch, the clock at each step's end."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.batches: list[tuple[int, int, int]] = []  # (real tokens, tokens incl. padding, labelled tokens)
        self.step_ends: list[float] = []
        self.trainer: Any = None

    def timed(self, name: str, function: Any) -> Any:
        """`function`, adding the seconds of each call to `seconds[name]` (patched in place of a method)."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    def counting(self, collator: Any) -> Any:
        """`collator`, counting the tokens of every micro-batch it makes."""
        from chattune.data.masking import IGNORE_INDEX

        def collate(examples: list[dict]) -> dict:
            batch = collator(examples)
            ids, labels, mask = batch["input_ids"], batch.get("labels"), batch.get("attention_mask")
            real = int(mask.sum()) if mask is not None else ids.numel()
            labelled = int((labels[:, 1:] != IGNORE_INDEX).sum()) if labels is not None else 0
            self.batches.append((real, ids.numel(), labelled))
            return batch

        return collate

    def attach(self, trainer: Any) -> None:
        from transformers import TrainerCallback

        probe = self

        class StepClock(TrainerCallback):
            def on_step_end(self, *args: Any, **kwargs: Any) -> None:
                probe.step_ends.append(time.perf_counter())

        self.trainer = trainer
        trainer.data_collator = self.counting(trainer.data_collator)
        trainer.add_callback(StepClock())

    def attach_when_training(self) -> None:
        """Attach to whichever trainer starts training in this process (the arm builds it)."""
        import transformers

        original_train, probe = transformers.Trainer.train, self

        def train(trainer: Any, *args: Any, **kwargs: Any) -> Any:
            probe.attach(trainer)
            return original_train(trainer, *args, **kwargs)

        transformers.Trainer.train = train

    def timing(self, accumulation: int = 1) -> dict:
        """Steps 2..N only: the first step pays for lazy initialisation (optimizer state, kernels)."""
        steps = len(self.step_ends)
        window = self.batches[accumulation : accumulation * steps]
        real = sum(batch[0] for batch in window)
        elapsed = self.step_ends[-1] - self.step_ends[0] if steps > 1 else float("nan")
        return {
            "tokens_per_s": round(real / elapsed, 1) if steps > 1 else None,
            "steps": steps,
            "timed_s": round(elapsed, 3),
            "real_tokens_timed": real,
            "labelled_tokens_timed": sum(batch[2] for batch in window),
        }

    def activation_checkpointing(self) -> bool:
        """Whether the trainer recomputed activations: asked in its arguments, or switched on in the model."""
        args, model = self.trainer.args, self.trainer.model
        asked = getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False)
        return bool(asked or getattr(model, "is_gradient_checkpointing", False))


def peaks() -> dict:
    """Read at the very end of an arm: the peak RSS of the whole arm, training included, the peak GPU memory on a
    GPU, and the malloc it ran with."""
    import torch

    from chattune.allocator import active_allocator

    result = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    result["allocator"] = active_allocator()
    return result


# --- the parent side: run the arms, repeat them, summarise -----------------------------------------------------


def run_in_subprocess(
    script: Path, arm: str, arguments: Sequence[str], work: Path, name: str, environment: dict[str, str], keep_log: bool
) -> dict:
    """One arm: `script` with `arguments` plus `--result FILE`, in its own process, logging to work/<name>.log. Its
    result, or {"arm", "error"} with the last lines of its log (and the log's path when `keep_log`) if it failed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    # a fresh datasets cache per run: a cached tokenization (or reference pass) would fake the time it takes
    env["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix=f"cache-{name}-", dir=work)
    env.update(environment)
    result_file, log = work / f"{name}.json", work / f"{name}.log"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, str(script), *arguments, "--result", str(result_file)]
    with log.open("w") as output:
        code = subprocess.run(command, env=env, stdout=output, stderr=subprocess.STDOUT).returncode
    shutil.rmtree(env["HF_DATASETS_CACHE"], ignore_errors=True)
    if code != 0 or not result_file.is_file():
        sys.stderr.write(f"arm {arm} failed (exit status {code}); log: {log}\n")
        kept = {"log": str(log)} if keep_log else {}  # a temporary work folder is removed at the end
        return {"arm": arm, "error": f"exit status {code}: {last_lines(log)}", **kept}
    return json.loads(result_file.read_text())


def last_lines(log: Path, count: int = 6) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(lines[-count:])[-1500:]


def repeated(
    arms: Sequence[str], repeats: int, run_one: Callable[[str, int], dict], label: dict
) -> dict[str, list[dict]]:
    """Every arm `repeats` times, alternating, so that a slow phase of the machine hits all arms alike. Each run is
    printed to stderr as one JSON line as soon as it lands (with `label`), so a stopped benchmark keeps it."""
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for repeat in range(repeats):
        for arm in arms:
            runs[arm].append(run_one(arm, repeat))
            print(json.dumps({**label, "arm": arm, "run": repeat + 1, **runs[arm][-1]}), file=sys.stderr, flush=True)
    return runs


def succeeded(runs: Sequence[dict]) -> tuple[list[dict], list[str]]:
    """The runs that succeeded, and the errors of the others."""
    return [run for run in runs if "error" not in run], [run["error"] for run in runs if "error" in run]


def median_run(runs: Sequence[dict], key: str) -> dict:
    """The run whose `key` is the median (the upper one of an even count): its figures belong together."""
    return dict(sorted(runs, key=lambda run: run[key])[len(runs) // 2])


def medians(runs: Sequence[dict], keys: Sequence[str]) -> dict:
    """The median of each of `keys` that every run measured."""
    return {
        key: statistics.median(run[key] for run in runs)
        for key in keys
        if all(run.get(key) is not None for run in runs)
    }


def spread(runs: Sequence[dict], key: str) -> list:
    values = [run[key] for run in runs]
    return [min(values), max(values)]
