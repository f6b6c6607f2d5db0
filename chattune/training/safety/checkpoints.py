"""Crash safety: atomic checkpoints and a clean stop on Ctrl-C / SIGTERM.

* Checkpoints are written into a staging folder and renamed into place once every process has finished
  writing, so `checkpoint-N` either is complete or does not exist. Their files follow the umask, as the other
  outputs do (chattune.atomic.follow_umask).
* While the trainer trains, the first SIGINT/SIGTERM asks it to save a checkpoint at the end of the current step
  and stop; the run then exits non-zero and says how to resume. A second signal exits at once. Before and after
  training, chattune.cli's handlers are in place: a signal stops the command at once with a line that says what
  was saved.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from chattune.atomic import DiskFullError, disk_full_reason, follow_umask
from chattune.cli import install_handler, raise_if_signalled
from chattune.training.safety.lock import release_held_locks

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
            if self.is_world_process_zero():  # give back the space it took; TRL's model card goes with it
                shutil.rmtree(staging_root, ignore_errors=True)
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
            follow_umask(staging_root / name)  # safetensors leaves its weights 0600 (see chattune.atomic)
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
        else "there is no earlier checkpoint; free some space, then run the same command again"
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
            self.previous[sig] = install_handler(sig, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        # The final evaluation and the saves come after: a signal there must stop them, not wait for a step.
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            print("\nsecond interrupt: exiting now without saving", file=sys.stderr, flush=True)
            release_held_locks()  # os._exit skips the cleanup that would release the run's lock
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


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    from transformers.trainer_utils import sort_checkpoints

    return [Path(path) for path in reversed(sort_checkpoints(str(run_dir)))] if Path(run_dir).is_dir() else []


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None. Checkpoints are renamed into place complete, so this is
    about damage afterwards (a copy cut short, a disk error): every JSON file must parse, every safetensors file
    be as long as its header says, every torch zip file end with its directory. Reads headers, not the weights."""
    if not (checkpoint / "trainer_state.json").is_file():
        return "no trainer_state.json"
    for file in sorted(checkpoint.rglob("*")):
        check = FILE_CHECKS.get(file.suffix)
        problem = check(file) if check and file.is_file() else None
        if problem:
            return f"{file.relative_to(checkpoint)} {problem}"
    return None


def _json_problem(file: Path) -> str | None:
    try:
        json.loads(file.read_bytes())
    except ValueError as error:
        return f"is not valid JSON ({error})"
    return None


def _safetensors_problem(file: Path) -> str | None:
    size = file.stat().st_size
    with file.open("rb") as stream:
        head = stream.read(8)
        header_size = int.from_bytes(head, "little") if len(head) == 8 else size
        if 8 + header_size > size:
            return f"is cut short ({size} bytes, not even its header)"
        try:
            header = json.loads(stream.read(header_size))
        except ValueError:
            return "has an unreadable header"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_size + max(ends, default=0)
    return None if size == expected else f"is cut short ({size} bytes of {expected})"


def _torch_zip_problem(file: Path) -> str | None:
    with file.open("rb") as stream:
        if stream.read(4) != b"PK\x03\x04":  # not a zip: an older pickle format, left to torch to read
            return "is empty" if file.stat().st_size == 0 else None
    try:
        zipfile.ZipFile(file).close()  # reads the directory at the end: gone when the file is cut short
    except zipfile.BadZipFile as error:
        return f"is cut short or damaged ({error})"
    return None


FILE_CHECKS = {
    ".json": _json_problem,
    ".safetensors": _safetensors_problem,
    ".pt": _torch_zip_problem,
    ".pth": _torch_zip_problem,
    ".bin": _torch_zip_problem,
}
