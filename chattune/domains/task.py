"""The task interface: what evaluation and `--eval_generate` need to know about a kind of reply.

A task reads a model's reply, scores it against the reference, summarises scores into metrics (overall and per
slice), writes a failure record, and can give the grammar that constrains its replies to one prompt. The core
(chattune.evaluation, chattune.training) only talks to this interface; each task lives in a folder of its own
under chattune/domains/ (Home Assistant's block format, tool calling).

`--task` names a task by its registered name, or by `module:Class` / `path/to/file.py:Class` for one defined
elsewhere; `auto` (the default) picks the first registered task whose `detect` accepts the test examples.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from chattune.errors import ChattuneError

if TYPE_CHECKING:  # the examples' type lives with the evaluation inputs; tasks only read its fields
    from chattune.evaluation.inputs import Example


class TaskError(ChattuneError, ValueError):
    """An unknown --task, or one that does not fit the test examples."""


@dataclass(frozen=True)
class Metric:
    """One summary key: its key, its short column name, and which direction is better."""

    key: str
    short: str
    higher_is_better: bool = True


# Metrics every generating task reports from its scores' likelihoods and timings (chattune.domains.metrics).
PERPLEXITY = Metric("perplexity", "ppl", higher_is_better=False)
LATENCY = (
    Metric("latency_mean_s", "lat_s", higher_is_better=False),
    Metric("latency_p95_s", "p95_s", higher_is_better=False),
)


@dataclass
class Score:
    """What every task's score of one example holds; tasks subclass it with their own counts."""

    exact_match: bool
    nll_sum: float | None = field(default=None, kw_only=True)  # summed NLL of the reference, None if not measured
    n_tokens: int = field(default=0, kw_only=True)  # tokens in nll_sum
    seconds: float | None = field(default=None, kw_only=True)  # wall time until the reply (its batch's)


class Task(ABC):
    """One kind of reply. Subclasses set `name`, `metrics` and `slices` and implement the methods."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[Metric, ...]]  # summary keys in table order; the first is the headline metric
    slices: ClassVar[tuple[tuple[str, str], ...]] = (("language", "by_language"), ("kind", "by_kind"))
    # whether the task reads replies with --tool_call_format; evaluate.py refuses the flag for one that does not
    reads_tool_call_format: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        """`options` are the evaluation's settings a task may read (e.g. `tool_call_format`); others are ignored."""
        self.options = options

    @classmethod
    def detect(cls, examples: Sequence[Example]) -> bool:
        """Whether these test examples are this task's (used by `--task auto`)."""
        return False

    @abstractmethod
    def parse(self, reply: str) -> Any:
        """What the reply says, as the task reads it; never raises on malformed model output."""

    @abstractmethod
    def score(self, example: Example, reply: str) -> Score:
        """One reply against the example's reference."""

    @abstractmethod
    def summarize(self, examples: Sequence[Example], scores: Sequence[Score]) -> dict[str, Any]:
        """Overall metrics (every key of `metrics`) and each slice's under its summary key."""

    def failure_record(self, row: int, example: Example, reply: str, score: Score) -> dict[str, Any]:
        """What eval_failures.jsonl keeps of a reply that is not an exact match."""
        return {
            "row": row,
            "prompt": example.prompt,
            "expected": example.reference,
            "got": reply,
            "language": example.language,
            "kind": example.kind,
        }

    def reference_reply(self, example: Example) -> str:
        """The reference as the model would write it: what a perfect reply scores (which metrics apply)."""
        return example.reference

    def grammar(self, example: Example) -> str | None:
        """GBNF that allows exactly the replies this example's prompt permits; None: no constraint for it."""
        return None

    @classmethod
    def metric_keys(cls) -> tuple[str, ...]:
        return tuple(metric.key for metric in cls.metrics)

    def short_names(self) -> dict[str, str]:
        return {metric.key: metric.short for metric in self.metrics}

    def higher_is_better(self, key: str) -> bool:
        return next((metric.higher_is_better for metric in self.metrics if metric.key == key), True)


# Registered tasks, in detection order: the first whose detect() accepts the examples is `auto`'s choice.
REGISTERED = {
    "tool_calls": "chattune.domains.tool_calling.task:ToolCallingTask",
    "homeassistant": "chattune.domains.homeassistant.task:HomeAssistantTask",
}
DEFAULT_TASK = "homeassistant"


def task_class(spec: str) -> type[Task]:
    """The task class `spec` names: a registered name, `module:Class` or `file.py:Class`."""
    target = REGISTERED.get(spec, spec)
    if ":" not in target:
        raise TaskError(f"--task {spec}: unknown; one of auto, {', '.join(REGISTERED)}, or module:Class")
    where, _, name = target.rpartition(":")
    try:
        module = _load_module(where)
    except (ImportError, OSError, SyntaxError) as error:
        raise TaskError(f"--task {spec}: cannot import {where} ({error})") from None
    found = getattr(module, name, None)
    if not (isinstance(found, type) and issubclass(found, Task)):
        raise TaskError(f"--task {spec}: {where} has no Task subclass named {name}")
    return found


def _load_module(where: str) -> Any:
    if not where.endswith(".py"):
        return importlib.import_module(where)
    path = Path(where)
    spec = importlib.util.spec_from_file_location(f"chattune_task_{path.stem}", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ImportError(f"no such file: {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (and pickling) look the module up by name while it runs
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


def check_task_name(spec: str) -> None:
    """Refuse an unknown --task before any model loads."""
    if spec != "auto":
        task_class(spec)


def resolve_task(spec: str, examples: Sequence[Example], **options: Any) -> Task:
    """The task `spec` names, or with `auto` the first registered one that recognises `examples`; `options` go
    to its constructor."""
    if spec != "auto":
        return task_class(spec)(**options)
    for name in REGISTERED:
        cls = task_class(name)
        if cls.detect(examples):
            return cls(**options)
    return task_class(DEFAULT_TASK)(**options)
