"""Crash safety: atomic checkpoints and a clean stop on Ctrl-C / SIGTERM.

* Checkpoints are written into a staging folder and renamed into place once every process has finished
  writing, so `checkpoint-N` either is complete or does not exist.
* While the trainer trains, the first SIGINT/SIGTERM asks it to save a checkpoint at the end of the current step
  and stop; the run then exits non-zero and says how to resume. A second signal exits at once. Before and after
  training, chattune.cli's handlers are in place: a signal stops the command at once with a line that says what
  was saved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from chattune.atomic import DiskFullError, disk_full_reason
from chattune.cli import raise_if_signalled

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
        except Exception as error:
            if self.is_world_process_zero():
                shutil.rmtree(staging_root / name, ignore_errors=True)  # give back the space it took
            raise_if_disk_full(error, run_dir / name)
            raise
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
            with contextlib.suppress(OSError):
                staging_root.rmdir()
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=getattr(self.state, "best_model_checkpoint", None),
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


def raise_if_disk_full(error: Exception, checkpoint: Path) -> None:
    """A checkpoint save that ran out of disk: say so, and which checkpoint is still there to resume from."""
    reason = disk_full_reason(error)
    if reason is None:
        return
    from transformers.trainer_utils import get_last_checkpoint

    previous = get_last_checkpoint(str(checkpoint.parent))
    kept = (
        f"the previous checkpoint {previous} is intact; free some space, then rerun the same command plus "
        "--resume_from_checkpoint latest"
        if previous
        else "there is no earlier checkpoint; free some space and run again"
    )
    raise DiskFullError(f"disk full while writing {checkpoint} ({reason}); {kept}") from error


def clear_staging(run_dir: Path) -> None:
    """Remove the leftovers of a save that a kill interrupted."""
    shutil.rmtree(Path(run_dir) / STAGING, ignore_errors=True)


class GracefulStop(TrainerCallback):
    """Turns SIGINT/SIGTERM into "save a checkpoint now and stop"; never prompts."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.previous: dict[int, Any] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        raise_if_signalled()  # one that came before and whose exception was lost
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        # The final evaluation and the saves come after: a signal there must stop them, not wait for a step.
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

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
