"""train.py that SIGKILLs itself at the Nth call of one function: tests/test_faults.py's fault injection.

KILL_AT="POINT:N" with POINT one of
  step    transformers' Trainer.training_step (mid-step: weights, optimizer and data order half-way)
  save    torch.save (mid-checkpoint-save: the weights are written to the staging folder, the optimizer not yet)
  rename  os.replace of a finished checkpoint into place (staging complete, not renamed)
  rotate  the deletion of an old checkpoint (the new one renamed into place, the old one not yet deleted)
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import signal
import sys
from pathlib import Path

import torch
import transformers

POINT, COUNT = os.environ["KILL_AT"].split(":")
calls = 0


def killing(original, applies=lambda *args, **kwargs: True):
    def wrapper(*args, **kwargs):
        global calls
        if applies(*args, **kwargs):
            calls += 1
            if calls == int(COUNT):
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    return wrapper


def names_a_checkpoint(*args, **kwargs) -> bool:
    return re.fullmatch(r"checkpoint-\d+", Path(args[-1] if args else "").name) is not None


if POINT == "step":
    transformers.Trainer.training_step = killing(transformers.Trainer.training_step)
elif POINT == "save":
    torch.save = killing(torch.save)
elif POINT == "rename":
    os.replace = killing(os.replace, names_a_checkpoint)
elif POINT == "rotate":

    def an_old_checkpoint(path, *args, **kwargs) -> bool:  # not the staging copy cleared before a save
        return names_a_checkpoint(path) and Path(path).is_dir() and Path(path).parent.name != ".staging"

    shutil.rmtree = killing(shutil.rmtree, an_old_checkpoint)
else:
    raise SystemExit(f"unknown kill point {POINT}")

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # as if train.py were run: the repository, not tests/, comes first
sys.argv = [str(REPO / "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
