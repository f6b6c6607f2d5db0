"""Crash-safe runs: SIGKILL + resume is exact, SIGINT/SIGTERM save and exit, checkpoints are atomic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from chattune.training.safety.checkpoints import AtomicCheckpointMixin
from conftest import REPO, TRAIN, chat_rows, run_script, train_argv, write_jsonl


def command(base, data, out, *extra):
    return [TRAIN, *train_argv(base, data, out, *extra, learning_rate="3e-3", logging_steps=1, seed=7)]


def popen(args, log: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as sink:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)


def wait_until(ready, process, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "the run never got there"
        time.sleep(0.05)


def final_loss(run_dir: Path, step: int) -> float:
    state = json.loads((run_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if entry.get("step") == step and "loss" in entry][0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", chat_rows(40))


def straight_and_killed_then_resumed(base, data, tmp_path: Path, *flags: str) -> None:
    """The same run twice: straight through into tmp_path/a, and into tmp_path/b SIGKILLed once checkpoint-4
    exists, then resumed from it."""
    straight = run_script(*command(base, data, tmp_path / "a", *flags))
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = popen(command(base, data, tmp_path / "b", *flags), tmp_path / "killed.log")
    checkpoint = tmp_path / "b" / "runs" / "run" / "checkpoint-4"
    wait_until(checkpoint.exists, killed, tmp_path / "killed.log")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert (checkpoint / "trainer_state.json").is_file(), "a checkpoint folder exists only once complete"
    resumed = run_script(*command(base, data, tmp_path / "b", *flags, "--resume_from_checkpoint", str(checkpoint)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_resume_after_sigkill_is_exact(tiny_model_dir, data, tmp_path):
    straight_and_killed_then_resumed(tiny_model_dir, data, tmp_path, "--max_steps", "12", "--save_steps", "4")
    a, b = (load_file(tmp_path / side / "models" / "run" / "model.safetensors") for side in ("a", "b"))
    assert max((a[name] - b[name]).abs().max().item() for name in a) < 1e-6
    assert final_loss(tmp_path / "a" / "runs" / "run", 12) == final_loss(tmp_path / "b" / "runs" / "run", 12)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_exits_nonzero(tiny_model_dir, data, tmp_path, sig, code):
    log = tmp_path / "run.log"
    process = popen(command(tiny_model_dir, data, tmp_path, "--max_steps", "10000", "--save_steps", "5000"), log)
    wait_until(lambda: "'loss'" in log.read_text(), process, log)  # training has begun
    process.send_signal(sig)
    process.wait(timeout=120)
    stderr = log.read_text()
    assert process.returncode == code, stderr[-3000:]
    assert "--resume_from_checkpoint latest" in stderr
    saved = list((tmp_path / "runs" / "run").glob("checkpoint-*/trainer_state.json"))
    assert len(saved) == 1
    step = int(saved[0].parent.name.split("-")[1])
    resumed = run_script(
        *command(
            tiny_model_dir,
            data,
            tmp_path,
            "--max_steps",
            str(step + 2),
            "--save_steps",
            "5000",
            "--resume_from_checkpoint",
            "latest",
        )
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]


class _FailingSave:
    """Stands in for transformers' Trainer: writes part of a checkpoint, then dies."""

    def __init__(self, run_dir: Path):
        self.args = type("Args", (), {"output_dir": str(run_dir), "save_total_limit": 2})()
        self.state = type("State", (), {"global_step": 7})()
        self.accelerator = type("Accelerator", (), {"wait_for_everyone": lambda self: None})()

    def _get_output_dir(self, trial):
        return self.args.output_dir

    def is_world_process_zero(self):
        return True

    def _save_checkpoint(self, model, trial):
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("killed during the save")


def test_a_save_killed_half_way_leaves_no_checkpoint(tmp_path):
    trainer = type("T", (AtomicCheckpointMixin, _FailingSave), {})(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        trainer._save_checkpoint(None, None)
    assert not (tmp_path / "checkpoint-7").exists()
    assert trainer.args.output_dir == str(tmp_path)


def test_resume_refusals(tiny_model_dir, data, tmp_path):
    not_a_checkpoint = tmp_path / "somewhere"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "notes.txt").write_text("x")
    result = run_script(*command(tiny_model_dir, data, tmp_path, "--resume_from_checkpoint", str(not_a_checkpoint)))
    assert result.returncode == 2 and "is not a checkpoint" in result.stderr and "notes.txt" in result.stderr

    first = run_script(*command(tiny_model_dir, data, tmp_path, "--max_steps", "2", "--save_steps", "2"))
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoint = str(tmp_path / "runs" / "run" / "checkpoint-2")
    lora = run_script(*command(tiny_model_dir, data, tmp_path, "--use_lora", "--resume_from_checkpoint", checkpoint))
    assert lora.returncode == 2 and "--use_lora off -> on" in lora.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_atomic_path_replaces_its_target_whole_or_not_at_all(tmp_path, folder):
    from chattune.atomic import atomic_path

    target = tmp_path / "out" / "thing"

    def write(staging: Path, text: str) -> None:
        (staging / "part.txt" if folder else staging).write_text(text)

    for text in ("first", "second"):  # a second write replaces the first
        with atomic_path(target, folder=folder) as staging:
            write(staging, text)
    with pytest.raises(KeyboardInterrupt), atomic_path(target, folder=folder) as staging:
        write(staging, "half")
        raise KeyboardInterrupt
    assert (target / "part.txt" if folder else target).read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["thing"], "a temporary copy was left behind"
    with atomic_path(target, folder=folder, keep_existing=True) as staging:  # another process got there first
        write(staging, "late")
    assert (target / "part.txt" if folder else target).read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["thing"]
