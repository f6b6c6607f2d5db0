"""What a run reports while it trains (throughput, MFU) and when it ends (the summary)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class ThroughputCallback(TrainerCallback):
    """Adds `tokens_per_second` (non-padding tokens through the model) and, given the hardware's peak
    FLOP/s, `mfu` (model FLOPs utilisation: 6 x parameters x tokens/s / peak) to every log line."""

    def __init__(self, n_parameters: int, processes: int, flops_baseline: float | None = None) -> None:
        self.n_parameters = n_parameters
        self.processes = processes
        self.flops_baseline = flops_baseline
        self._last: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._last is None:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        elapsed, seen = now - self._last[0], tokens - self._last[1]
        self._last = (now, tokens)
        if elapsed <= 0 or seen <= 0:
            return
        extra = {"tokens_per_second": round(seen / elapsed, 1)}
        if self.flops_baseline:
            per_device = seen / elapsed / self.processes
            extra["mfu"] = round(6 * self.n_parameters * per_device / self.flops_baseline, 4)
        logs.update(extra)  # what the loggers that run after this callback see
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)  # the trainer stored its copy before calling back


def run_first(trainer: Any, callback: TrainerCallback) -> None:
    """Move `callback` ahead of the reporting callbacks (TensorBoard, W&B) so they log what it adds."""
    trainer.callback_handler.callbacks.remove(callback)
    trainer.callback_handler.callbacks.insert(0, callback)


def summary(state: Any, args: Any, started: float, outputs: list[Path], final_eval: dict | None) -> str:
    """The lines printed when a run ends."""
    eval_losses = [entry["eval_loss"] for entry in state.log_history if "eval_loss" in entry]
    train_losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    lines = [f"steps:          {state.global_step}"]
    if state.num_input_tokens_seen:  # SFT and DPO count them; TRL's SimPO, ORPO and KTO trainers do not
        lines.append(f"tokens seen:    {state.num_input_tokens_seen:,}")
    lines.append(f"wall time:      {(time.time() - started) / 60:.1f} min")
    if train_losses:
        lines.append(f"last loss:      {train_losses[-1]:.4f}")
    if eval_losses:
        lines.append(f"best eval loss: {min(eval_losses):.4f}")
    lines += best_step_lines(state, args)
    if final_eval and "eval_loss" in final_eval:
        lines.append(f"final eval loss (whole test set): {final_eval['eval_loss']:.4f}")
    lines += [f"saved: {path}" for path in outputs]
    return "\n".join(lines)


def best_step_lines(state: Any, args: Any) -> list[str]:
    """Which evaluation won by --metric_for_best_model, with every score it logged, and whether it is the final
    model."""
    metric, step = args.metric_for_best_model, state.best_global_step
    scores = next((e for e in state.log_history if e.get("step") == step and metric in e), None) if step else None
    if scores is None:
        return []
    where = f" ({Path(state.best_model_checkpoint).name})" if state.best_model_checkpoint else ""
    shown = ", ".join(f"{key} {value:.4f}" for key, value in scores.items() if _is_score(key, value))
    lines = [f"best step:      {step}{where} by {metric} = {scores[metric]:.4f}", f"  its scores:   {shown}"]
    if args.load_best_model_at_end:
        lines.append(f"final model:    the best step's weights ({step}), by --load_best_model_at_end")
    return lines


def _is_score(key: str, value: Any) -> bool:
    bookkeeping = key.endswith(("_runtime", "_per_second", "_num_tokens"))
    return key.startswith("eval_") and not bookkeeping and isinstance(value, int | float)
