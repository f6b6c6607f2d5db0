"""Crash safety: atomic checkpoints and a clean stop on Ctrl-C / SIGTERM.

* Checkpoints are written into a staging folder and renamed into place once every process has finished
  writing, so `checkpoint-N` either is complete or does not exist.
* The first SIGINT/SIGTERM asks the trainer to save a checkpoint at the end of the current step and
  stop; the run then exits non-zero and says how to resume. A second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

STAGING = ".staging"


class AtomicCheckpointMixin:
    """Mixed into a transformers Trainer: `_save_checkpoint` writes to a staging folder, then renames."""

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = Path(self._get_output_dir(trial=trial))
        staging_root = run_dir / STAGING
        name = f"checkpoint-{self.state.global_step}"
        if self.is_world_process_zero():
            shutil.rmtree(staging_root / name, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = str(run_dir)
        self.accelerator.wait_for_everyone()
        best = getattr(self.state, "best_model_checkpoint", None)
        if best and Path(best).parent == staging_root:  # recorded while output_dir pointed at the staging root
            self.state.best_model_checkpoint = str(run_dir / Path(best).name)
        if self.is_world_process_zero():
            target = run_dir / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging_root / name, target)
            # TRL's trainers also write a model card into what they take for the run folder: the staging root
            shutil.rmtree(staging_root, ignore_errors=True)
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=getattr(self.state, "best_model_checkpoint", None),
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


def clear_staging(run_dir: Path) -> None:
    """Remove the leftovers of a save that a kill interrupted."""
    shutil.rmtree(Path(run_dir) / STAGING, ignore_errors=True)


class GracefulStop(TrainerCallback):
    """Turns SIGINT/SIGTERM into "save a checkpoint now and stop"; never prompts."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            print("\nsecond interrupt: exiting now without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signal_name = signal.Signals(signum).name
        print(
            f"\n{self.signal_name}: saving a checkpoint after this step (interrupt again to quit at once)",
            file=sys.stderr,
            flush=True,
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_process_stopping():
            control.should_save = True
            control.should_training_stop = True
        return control

    def _any_process_stopping(self) -> bool:
        """All processes must agree to stop at the same step, or the next collective call hangs."""
        stopping = torch.tensor([1 if self.signal_name else 0])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_backend() == "nccl":
                stopping = stopping.cuda()
            torch.distributed.all_reduce(stopping, op=torch.distributed.ReduceOp.MAX)
            if stopping.item() and self.signal_name is None:
                self.signal_name = "SIGTERM"
        return bool(stopping.item())

    @property
    def stopped(self) -> bool:
        return self.signal_name is not None
