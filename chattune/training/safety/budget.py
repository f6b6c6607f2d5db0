"""--time_budget: a run that sizes itself to the wall time it is given.

The budget counts from the start of the run (train.py's preparation: tokenizing, loading the model) to the end of
its last optimizer step, periodic evaluations included; the final save and export come after it. After
MEASURED_STEPS optimizer steps (the first step of the process is not measured: it pays for allocations and kernel
selection), TimeBudget measures the wall time of one step, picks the number of steps whose remainder fits what is
left, and makes that the run's length: `state.max_steps`, the fractional logging/eval/save intervals that depend on
it, and the learning-rate schedule, rebuilt by transformers' own `get_scheduler` for the new length so that warm-up
and decay follow it. It re-plans after every evaluation, once the cost of one is measured, and every REPLAN_EVERY
steps from the median of the recent ones. The length never exceeds
what --max_steps (or --epochs) asked for and never ends before the next step.

Resuming: the chosen plan is stored in every checkpoint (an ExportableState). A run resumed with --time_budget
finishes the steps its budget chose, on the schedule it was following, without measuring again: it is the run the
interruption cut short, not a new one. A checkpoint without a stored plan gets the budget anew for what is left.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from chattune.training.safety.resume import follow_schedule

logger = logging.getLogger(__name__)

MEASURED_STEPS = 3
# The plan is revisited every REPLAN_EVERY steps from the median of the last WINDOW steps: the first measurement can
# be taken while something else shares the cores (or before a slower stretch), and a plan kept from it would end the
# run far from its budget, on either side.
REPLAN_EVERY = 5
WINDOW = 10


@dataclass
class BudgetPlan:
    """What the budget chose, and the measurements it chose it from."""

    steps: int  # the run's length
    asked_steps: int  # what --max_steps / --epochs asked for: the upper limit
    decided_at_step: int
    seconds_per_step: float
    seconds_per_evaluation: float | None  # None until an evaluation was measured
    tokens_per_second: float | None  # None where the trainer does not count tokens (TRL's SimPO, ORPO, KTO)
    budget_seconds: float
    spent_seconds: float  # at the decision, preparation included


def fit_steps(
    done: int,
    asked: int,
    seconds_left: float,
    seconds_per_step: float,
    seconds_per_evaluation: float,
    evaluations: Callable[[int], int],
) -> int:
    """The most steps (at most `asked`, at least `done + 1`) whose `n - done` remaining steps and the
    `evaluations(n)` evaluations they bring fit in `seconds_left`."""

    def cost(n: int) -> float:
        return (n - done) * seconds_per_step + evaluations(n) * seconds_per_evaluation

    low, high = done + 1, max(asked, done + 1)
    if cost(high) <= seconds_left:
        return high
    while high - low > 1:  # cost grows with n: bisect for the last n that fits
        middle = (low + high) // 2
        low, high = (middle, high) if cost(middle) <= seconds_left else (low, middle)
    return low


def evaluations_between(done: int, n: int, interval: float | None) -> int:
    """Evaluations a run of `n` steps makes after step `done`, every `interval` steps (a fraction below 1 of the
    run's length, as transformers reads --eval_steps) plus the one the trainer adds at a last step off the grid."""
    if not interval:
        return 0
    every = math.ceil(n * interval) if interval < 1 else int(interval)
    return n // every - done // every + (1 if n % every else 0)


class TimeBudget(TrainerCallback, ExportableState):
    """Lowers the run's length so that its last step ends `seconds` after the run started (see the module)."""

    def __init__(
        self,
        seconds: float,
        already_spent: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        measured_steps: int = MEASURED_STEPS,
    ) -> None:
        self.seconds = seconds
        self.clock = clock
        self.measured_steps = measured_steps
        self.deadline = clock() + seconds - already_spent
        self.plan: BudgetPlan | None = None
        self._step_seconds: list[float] = []
        self._tokens = 0
        self._tokens_at_start = 0
        self._evaluation_seconds: list[float] = []
        self._since_step = 0.0  # evaluation time since the last step ended: not part of the next step's
        self._last_end = clock()
        self._first_step = 0

    def state(self) -> dict:
        return {"args": {"seconds": self.seconds}, "attributes": {"plan": asdict(self.plan) if self.plan else None}}

    def on_train_begin(self, args, state, control, lr_scheduler=None, optimizer=None, **kwargs):
        self._first_step = state.global_step
        self._last_end = self.clock()
        stored = stored_plan(state)
        if state.global_step and stored:
            self.plan = BudgetPlan(**{**stored, "steps": min(stored["steps"], state.max_steps)})
            set_length(self.plan.steps, args, state, lr_scheduler, optimizer)
            logger.info(
                "--time_budget: resumed at step %d of the %d steps the budget chose (measured %.1f s a step); "
                "finishing them without measuring again",
                state.global_step,
                self.plan.steps,
                self.plan.seconds_per_step,
            )

    def on_step_end(self, args, state, control, **kwargs):
        now = self.clock()
        step_seconds = now - self._last_end - self._since_step
        self._last_end, self._since_step = now, 0.0
        if state.global_step - self._first_step <= 1:  # the first step of the process pays for warm-up
            self._tokens_at_start = state.num_input_tokens_seen
            return
        self._step_seconds.append(step_seconds)
        self._tokens = state.num_input_tokens_seen - self._tokens_at_start
        if self.plan is None and len(self._step_seconds) >= self.measured_steps:
            self.replan(args, state, **kwargs)
        elif (
            self.plan is not None
            and state.global_step - self.plan.decided_at_step >= REPLAN_EVERY
            and state.global_step < state.max_steps  # the run's last step: nothing left to plan
        ):
            self.replan(args, state, **kwargs)

    def on_evaluate(self, args, state, control, **kwargs):
        seconds = self.clock() - self._last_end - self._since_step
        self._since_step += seconds
        if state.global_step == state.max_steps or not self._step_seconds:
            return  # the run's end (or its start): nothing left to plan
        self._evaluation_seconds.append(seconds)
        if self.plan is not None and self.plan.decided_at_step < state.global_step:
            self.replan(args, state, **kwargs)

    def replan(self, args, state, lr_scheduler=None, optimizer=None, **kwargs) -> None:
        """Choose the run's length from the measurements so far, and make it the run's length."""
        per_step = statistics.median(self._step_seconds[-WINDOW:])
        per_evaluation = max(self._evaluation_seconds) if self._evaluation_seconds else None
        per_step, per_evaluation_or_0, left = agree([per_step, per_evaluation or 0.0, self.deadline - self.clock()])
        asked = self.plan.asked_steps if self.plan else state.max_steps
        steps = fit_steps(
            state.global_step,
            asked,
            left,
            per_step,
            per_evaluation_or_0,
            lambda n: evaluations_between(state.global_step, n, evaluation_interval(args)),
        )
        first = self.plan is None
        changed = first or steps != self.plan.steps
        self.plan = BudgetPlan(
            steps=steps,
            asked_steps=asked,
            decided_at_step=state.global_step,
            seconds_per_step=round(per_step, 3),
            seconds_per_evaluation=round(per_evaluation, 3) if per_evaluation is not None else None,
            tokens_per_second=round(self._tokens / sum(self._step_seconds), 1) if self._tokens else None,
            budget_seconds=self.seconds,
            spent_seconds=round(self.seconds - left, 1),
        )
        if changed:
            set_length(steps, args, state, lr_scheduler, optimizer)
            logger.info("%s", describe(self.plan, first))


def describe(plan: BudgetPlan, first: bool) -> str:
    """The log line that says what the budget chose and from what."""
    speed = f", {plan.tokens_per_second:,.0f} tokens/s" if plan.tokens_per_second else ""
    evaluation = (
        f", {plan.seconds_per_evaluation:.1f} s an evaluation"
        if plan.seconds_per_evaluation is not None
        else " (evaluations not measured yet: re-planned after the first)"
    )
    limit = "all the steps asked for" if plan.steps == plan.asked_steps else f"of {plan.asked_steps} asked for"
    verb = "trains" if first else "now trains"
    return (
        f"--time_budget {plan.budget_seconds:g} s: {plan.spent_seconds:.0f} s spent by step {plan.decided_at_step}, "
        f"measured {plan.seconds_per_step:.2f} s a step{speed}{evaluation}; the run {verb} {plan.steps} steps "
        f"({limit}), learning-rate schedule rescaled to that length"
    )


def evaluation_interval(args: Any) -> float | None:
    """The run's evaluation interval in steps (or as a fraction of its length); None without step evaluations."""
    strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
    return args.eval_steps if strategy == "steps" else None


def stored_plan(state: Any) -> dict | None:
    """The plan a resumed checkpoint stored (its trainer_state.json's stateful_callbacks), if it has one."""
    stored = (state.stateful_callbacks or {}).get(TimeBudget.__name__)
    return (stored or {}).get("attributes", {}).get("plan") if isinstance(stored, dict) else None


def set_length(steps: int, args: Any, state: Any, lr_scheduler: Any, optimizer: Any) -> None:
    """Make `steps` the run's length: the state the trainer's loop and DefaultFlowCallback read, the fractional
    intervals derived from it (transformers' own compute_steps), and the learning-rate schedule."""
    state.max_steps = steps
    state.compute_steps(args, steps)
    if lr_scheduler is not None and optimizer is not None:
        rescale_schedule(lr_scheduler, optimizer, args, steps)


def rescale_schedule(lr_scheduler: Any, optimizer: Any, args: Any, steps: int) -> bool:
    """Give the running scheduler the step -> factor functions transformers builds for a run of `steps` (warm-up as
    a fraction re-measured on it), and set this step's learning rate from them. False for a scheduler that is not a
    function of the step (reduce_lr_on_plateau), which is left as it is."""
    import torch
    from transformers import get_scheduler

    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
    if not hasattr(scheduler, "lr_lambdas"):
        logger.warning("--time_budget: the %s schedule does not follow the run's length", args.lr_scheduler_type)
        return False
    # a stand-in optimizer with as many groups: get_scheduler's LambdaLR steps it once, the real one is untouched
    stand_in = torch.optim.SGD([{"params": [torch.zeros(1)]} for _ in scheduler.lr_lambdas], lr=1.0)
    fresh = get_scheduler(
        args.lr_scheduler_type,
        optimizer=stand_in,
        num_warmup_steps=args.get_warmup_steps(steps),
        num_training_steps=steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
    )
    scheduler.lr_lambdas = fresh.lr_lambdas
    follow_schedule(scheduler, optimizer)
    return True


def agree(values: list[float]) -> list[float]:
    """The largest of each value over the processes, so that every process plans the same length (processes that
    stopped at different steps would wait for each other forever)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    import torch

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()
