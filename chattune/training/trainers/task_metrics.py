"""Task metrics while training (--eval_generate) and the metric that picks the best checkpoint.

At every evaluation the trainer generates greedy replies for a fixed sample of test examples and scores them
with evaluate.py's own path (chattune.evaluation.scored). The metrics join eval_loss in the metrics of
`Trainer.evaluate`, from inside its `evaluation_loop`: so they are logged in the same entry (TensorBoard, W&B),
and the Trainer's best-checkpoint choice and EarlyStoppingCallback see them like eval_loss.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

from chattune.config.flags import FlagError, TrainFlags, unused_evaluation_flags
from chattune.config.methods import METHODS
from chattune.domains.task import Task, check_task_name, resolve_task
from chattune.evaluation.inputs import Example, load_examples
from chattune.training.trainers.arguments import PREFIX, best_metric_key, evaluation_args

logger = logging.getLogger(__name__)

LOSS = "eval_loss"
# Scorer keys that are counts or not measured while training (no reference likelihood pass), never a score.
# Not logged while training: counts, perplexity (not measured then), and wall times, which differ run to run and
# would make a resumed run's log differ from an uninterrupted one's.
NOT_SCORES = ("n_examples", "n_turns", "perplexity", "latency_mean_s", "latency_p95_s")


def task_metric_names(summary: dict[str, Any]) -> list[str]:
    """The overall scores in a scorer summary (slices and counts left out): what --eval_generate logs."""
    return [
        key
        for key, value in summary.items()
        if isinstance(value, Real) and not isinstance(value, bool) and key not in NOT_SCORES
    ]


def load_generation_sample(sources: str | Sequence[str], size: int, seed: int) -> list[Example]:
    """The fixed sample of test examples every evaluation generates for: drawn once with --seed from all the
    --test_dataset sources (in their order), kept in file order."""
    paths = [sources] if isinstance(sources, str) else list(sources)
    examples = [example for path in paths for example in load_examples(path)]
    if size > len(examples):
        named = ", ".join(paths)
        logger.warning("--eval_generate %d: %s has %d examples; generating for all of them", size, named, len(examples))
        size = len(examples)
    chosen = sorted(random.Random(seed).sample(range(len(examples)), size))
    return [examples[index] for index in chosen]


@dataclass
class GenerationPlan:
    """What --eval_generate generates for at every evaluation, and how its replies are read."""

    sample: list[Example]
    task: Task
    constrain: bool = False


def check_best_metric(flags: TrainFlags, plan: GenerationPlan | None) -> None:
    """Refuse, before any training, a --metric_for_best_model that no evaluation of this run will log."""
    key = best_metric_key(flags.metric_for_best_model)
    if key == LOSS:
        return
    sample = plan.sample if plan else None
    measurable = _measurable_task_metrics(plan) if plan else []
    # the method's trainer logs its own metrics at every evaluation too; a selection by them needs no generation
    valid = [LOSS, *METHODS[flags.method].eval_metrics, *(PREFIX + name for name in measurable)]
    if key in valid:
        return
    hint = _why_not_logged(key[len(PREFIX) :], sample, flags)
    raise FlagError(
        f"--metric_for_best_model {flags.metric_for_best_model}: this run never logs {key}{hint}; "
        f"valid names: {', '.join(valid)}"
    )


def _why_not_logged(name: str, sample: Sequence[Example] | None, flags: TrainFlags) -> str:
    if name == "perplexity":
        return "; perplexity is not measured while training: eval_loss is its logarithm"
    if name in NOT_SCORES or not _is_task_metric(name, flags):
        return ""
    if sample is None:
        return f"; {name} is a task metric: add --eval_generate N to log it"
    return (
        f"; {name} cannot be measured on the {len(sample)} sampled test examples (none of them has what it "
        "counts, e.g. an expected call or entity): raise --eval_generate or pick another metric"
    )


def _is_task_metric(name: str, flags: TrainFlags) -> bool:
    """Whether `name` is a metric of --eval_task (any registered task's, with auto)."""
    from chattune.domains.task import REGISTERED, task_class

    names = REGISTERED if flags.eval_task == "auto" else [flags.eval_task]
    return any(name in task_class(spec).metric_keys() for spec in names)


def _measurable_task_metrics(plan: GenerationPlan) -> list[str]:
    """The task metrics a perfect model would get a value for on the sample: the ones its references make
    applicable (a sample without a no-call reference has no no-call accuracy, whatever the model does)."""
    task = plan.task
    perfect = [task.score(example, task.reference_reply(example)) for example in plan.sample]
    return task_metric_names(task.summarize(plan.sample, perfect))


def refuse_sharded_generation(flags: TrainFlags) -> None:
    """Generation needs whole weights on every process; FSDP and DeepSpeed ZeRO-3 shard them (untested here)."""
    from accelerate.utils import parse_flag_from_env

    if not flags.eval_generate:
        return
    zero3 = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    if parse_flag_from_env("ACCELERATE_USE_FSDP") or zero3:
        raise FlagError(
            f"--eval_generate under {'FSDP' if not zero3 else 'DeepSpeed ZeRO-3'}: generation needs whole weights on "
            "every process and is not supported with sharded ones; drop --eval_generate and score the "
            "checkpoints afterwards with evaluate.py, or train with DDP"
        )


@contextlib.contextmanager
def untouched_training_state(model: Any) -> Iterator[None]:
    """Eval mode (no dropout) inside; on the way out the model's mode and every RNG are as they were, so the
    run continues, and resumes, exactly as without the generation."""
    import numpy as np
    import torch

    was_training = model.training
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class TaskMetricsMixin:
    """Mixed into chattune's SFT trainer: with `generation_plan` set, every evaluation adds the task metrics."""

    generation_plan: GenerationPlan | None = None
    _max_new_tokens: int | None = None

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.generation_plan and description == "Evaluation":  # not Trainer.predict
            output.metrics.update(self.task_metrics(metric_key_prefix))
        return output

    def task_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Generate for this process's share of the sample, gather every score, summarise on every process."""
        from accelerate.utils import gather_object

        from chattune.evaluation.generation import auto_max_new_tokens
        from chattune.evaluation.scored import generate_and_score

        plan, tokenizer = self.generation_plan, self.processing_class
        sample = plan.sample
        if self._max_new_tokens is None:  # one budget for the whole sample, the same on every process
            self._max_new_tokens = auto_max_new_tokens(tokenizer, sample)
        mine = list(range(self.accelerator.process_index, len(sample), self.accelerator.num_processes))
        with untouched_training_state(self.model):
            scored = generate_and_score(
                self.model,
                tokenizer,
                [sample[i] for i in mine],
                plan.task,
                self.args.per_device_eval_batch_size,
                self.args.device,
                self._max_new_tokens,
                reference_likelihood=False,  # eval_loss already measures the references
                progress=False,  # a second bar would break the training's own
                constrain=plan.constrain,
            )
        gathered = sorted(gather_object(list(zip(mine, scored.scores))), key=lambda pair: pair[0])
        summary = plan.task.summarize(sample, [score for _, score in gathered])
        return self._logged(summary, prefix)

    def _logged(self, summary: dict[str, Any], prefix: str) -> dict[str, float]:
        """Every measured score under its prefix; the best-model metric, when this evaluation has nothing to
        measure it on (no call predicted: no precision), counts as its worst value."""
        metrics = {f"{prefix}_{name}": float(summary[name]) for name in task_metric_names(summary)}
        key = best_metric_key(self.args.metric_for_best_model or LOSS)
        if key.startswith(f"{prefix}_") and key[len(prefix) + 1 :] in summary and key not in metrics:
            metrics[key] = 0.0 if self.args.greater_is_better else float("inf")
            step, value = self.state.global_step, metrics[key]
            logger.warning("%s: nothing to measure it on at step %d; counted as %s", key, step, value)
        return metrics


def plan_evaluations(flags: TrainFlags) -> GenerationPlan | None:
    """Everything about the evaluations that can fail (the best-model metric, --eval_generate, its task and
    grammar engine, steps that must align), checked before any work; returns what to generate for (None without
    --eval_generate)."""
    unused = unused_evaluation_flags(flags)
    if unused:
        logger.warning("%s: no evaluation runs without --test_dataset; ignored", " and ".join(unused))
    evaluation_args(flags, has_eval=bool(flags.test_dataset))
    refuse_sharded_generation(flags)
    check_task_name(flags.eval_task)
    plan = None
    if flags.eval_generate:
        if flags.eval_constrain:
            from chattune.evaluation.constrained import require_llguidance

            require_llguidance()
        sample = load_generation_sample(flags.test_dataset, flags.eval_generate, flags.seed)
        plan = GenerationPlan(sample, resolve_task(flags.eval_task, sample), flags.eval_constrain)
    check_best_metric(flags, plan)
    return plan
