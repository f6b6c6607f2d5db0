"""A run knows what it is: its fingerprint is compared on resume, a finished run is not trained again, --max_steps 0
means "no step limit", and one process at a time writes a run (its lock). Each refusal asserts the exit status,
the last line on stderr and that no output changed; the lock is raced in fresh processes and by two train.py runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_bad_flags import forbidden, snapshot

from chattune.commands import train as run
from chattune.errors import ChattuneError
from chattune.training.safety import lock as lock_module
from chattune.training.safety.identity import RUN_FILE
from chattune.training.safety.lock import RunLockedError, held, lock_path
from conftest import REPO, TRAIN, chat_rows, make_tiny_model, run_script, train_argv, write_jsonl
from templates import ZEPHYR

LORA = ["--use_lora", "--lora_rank", "4", "--lora_alpha", "8"]
STEPS = {"learning_rate": "1e-3", "logging_steps": 1, "save_steps": 2, "seed": 5}


def train_here(argv: list[str], capsys) -> tuple[int, str]:
    """train.py's main in this process; its status and the last line it wrote to stderr."""
    status = run.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return status, err[-1] if err else ""


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "loras" / "run" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """A LoRA run of 4 steps that finished: checkpoints 2 and 4, loras/run written."""
    root = tmp_path_factory.mktemp("finished")
    data = write_jsonl(root / "train.jsonl", chat_rows(16))
    result = run_script(TRAIN, *train_argv(tiny_model_dir, data, root / "out", *LORA, max_steps=4, **STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "data": data, "out": root / "out", "run_dir": root / "out" / "runs" / "run"}


def resume_argv(finished, *extra: str, base=None, data=None, lora=LORA, max_steps=4, out=None) -> list[str]:
    return train_argv(
        base or finished["base"],
        data or finished["data"],
        out or finished["out"],
        *lora,
        "--resume_from_checkpoint",
        "latest",
        *extra,
        max_steps=max_steps,
        **STEPS,
    )


@pytest.fixture
def paths(finished, tiny_model_dir, test_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """The finished run, its base, and files that differ from its inputs in one way each (made once)."""
    other = finished["root"] / "other"
    if not other.exists():
        other.mkdir()
        rows = chat_rows(16)
        rows[5]["conversations"][1]["value"] = "Turn off the kitchen light"
        write_jsonl(other / "edited.jsonl", rows)
        make_tiny_model(test_tokenizer_dir, other / "base-other-weights", seed=1)
        (other / "template.jinja").write_text(ZEPHYR)
    return {
        **finished,
        "base": tiny_model_dir,
        "edited": other / "edited.jsonl",
        "other_base": other / "base-other-weights",
        "template": other / "template.jinja",
    }


# Changes of fingerprinted settings: how the resume command differs, and what the refusal line says about it.
CHANGES = {
    "data-content": (lambda p: {"data": p["edited"]}, [], "--train_dataset {edited}: other content"),
    "data-format": (lambda p: {"data": f"text:{p['data']}"}, [], "kind json -> text"),
    "data-weight": (lambda p: {"data": f"{p['data']}:1"}, [], "weight None -> 1.0"),
    "ctx-size": (lambda p: {}, ["--ctx_size", "512"], "--ctx_size 2048 -> 512"),
    "method": (lambda p: {}, ["--method", "simpo"], "--method sft -> simpo"),
    "lora-modules": (lambda p: {}, ["--lora_modules", "k_proj"], "--lora_modules unset -> k_proj"),
    "lora-layers": (lambda p: {}, ["--lora_layers", "1"], "--lora_layers unset -> 1"),
    "lora-rank": (lambda p: {}, ["--lora_rank", "8"], "--lora_rank 4 -> 8"),
    "lora-alpha": (lambda p: {}, ["--lora_alpha", "4"], "--lora_alpha 8 -> 4"),
    "dora": (lambda p: {}, ["--use_dora"], "--use_dora off -> on"),
    "rslora": (lambda p: {}, ["--use_rslora"], "--use_rslora off -> on"),
    "base-weights": (lambda p: {"base": p["other_base"]}, [], "weights "),
    "train-on-prompts": (lambda p: {}, ["--train_on_prompts"], "--train_on_prompts off -> on"),
    "packing": (lambda p: {}, ["--packing"], "--packing off -> on"),
    "template": (lambda p: {}, ["--prompt_template_file", "{template}"], "--prompt_template_file unset -> "),
    "added-token": (lambda p: {}, ["--add_pad_token"], "--add_pad_token off -> on"),
}
DATA_CHANGES = {"data-content", "data-format", "data-weight", "ctx-size", "train-on-prompts", "packing", "template"}
SFT_ONLY = {"packing", "train-on-prompts"}
SOURCE_CHANGES = ["data-content", "data-format", "data-weight"]  # each gives another --train_dataset: one at a time


def changed_argv(paths, names: set[str]) -> tuple[list[str], list[str]]:
    """The resume command with the changes `names`, and the texts the refusal must hold."""
    inputs, extra, expected = {}, [], []
    for name in sorted(names):
        make_inputs, flags, text = CHANGES[name]
        inputs.update(make_inputs(paths))
        extra += [flag.format(**paths) for flag in flags]
        expected.append(text.format(**paths))
    return resume_argv(paths, *extra, **inputs), expected


def assert_refused(argv, paths, capsys, monkeypatch, expected: list[str]) -> str:
    monkeypatch.setattr(run, "read_data", forbidden("data preparation"))
    monkeypatch.setattr(run, "load_model", forbidden("model loading"))
    before = snapshot(paths["out"])
    status, last = train_here(argv, capsys)
    assert status == 2, last
    assert last.startswith("error: "), last
    for text in expected:
        assert text in last, last
    assert snapshot(paths["out"]) == before, "a refused resume changed the run's outputs"
    assert not lock_path(paths["run_dir"]).exists(), "the lock was left behind"
    return last


@pytest.mark.parametrize("name", CHANGES)
def test_each_change_is_refused_before_data_preparation(paths, capsys, monkeypatch, name):
    argv, expected = changed_argv(paths, {name})
    last = assert_refused(argv, paths, capsys, monkeypatch, expected)
    assert f"{paths['run_dir'] / 'checkpoint-4'} was trained with other settings: " in last
    if name in DATA_CHANGES:
        assert last.endswith(
            "if that is meant, resume with --allow_changed_data; else resume with the settings it started with"
        )
    else:
        assert "start a new run" in last


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    others=st.sets(st.sampled_from(sorted(set(CHANGES) - set(SOURCE_CHANGES))), max_size=3),
    source=st.sampled_from([None, *SOURCE_CHANGES]),
)
def test_any_change_of_fingerprinted_settings_is_refused(paths, capsys, monkeypatch, others, source):
    names = others | ({source} if source else set())
    assume(names and not ("method" in names and names & SFT_ONLY))  # a preference method refuses those flags
    argv, expected = changed_argv(paths, names)
    assert_refused(argv, paths, capsys, monkeypatch, expected)


def test_full_training_on_a_lora_run_is_refused(paths, capsys, monkeypatch):
    argv = resume_argv(paths, lora=[])
    assert_refused(argv, paths, capsys, monkeypatch, ["--use_lora on -> off", "start a new run"])


def test_a_budget_below_the_steps_trained_is_refused(paths, capsys, monkeypatch):
    last = assert_refused(resume_argv(paths, max_steps=3), paths, capsys, monkeypatch, [])
    assert last == (
        f"error: --max_steps 3 is below the 4 steps {paths['run_dir'] / 'checkpoint-4'} has trained; give "
        "--max_steps 4 or more, or start a new run"
    )


def test_a_finished_run_is_not_trained_again(paths, capsys, monkeypatch):
    monkeypatch.setattr(run, "read_data", forbidden("data preparation"))
    before = snapshot(paths["out"])
    status, last = train_here(resume_argv(paths), capsys)
    assert status == 0
    assert last == (
        "run already finished at step 4 of 4 and its outputs are written; nothing was trained: raise --max_steps or "
        "--epochs to train further"
    )
    assert snapshot(paths["out"]) == before


def copy_run(paths, to: Path, checkpoint: str = "checkpoint-2") -> Path:
    """The finished run as it was at `checkpoint`: that checkpoint and its run file, no outputs."""
    run_dir = to / "runs" / "run"
    shutil.copytree(paths["run_dir"] / checkpoint, run_dir / checkpoint)
    record = json.loads((paths["run_dir"] / RUN_FILE).read_text())
    (run_dir / RUN_FILE).write_text(json.dumps({**record, "finished_at_step": None}))
    return to


def test_a_finished_run_without_its_outputs_writes_them_without_training(paths, tmp_path, capsys):
    """The final save failed (a full disk): the same command plus --resume_from_checkpoint latest finishes it."""
    out = copy_run(paths, tmp_path, "checkpoint-4")
    status, last = train_here(resume_argv(paths, out=out), capsys)
    assert status == 0, last
    saved = adapter(out)
    assert all(torch.equal(saved[name], tensor) for name, tensor in adapter(paths["out"]).items())
    assert sorted(p.name for p in (out / "runs" / "run").glob("checkpoint-*")) == ["checkpoint-4"]
    assert json.loads((out / "runs" / "run" / RUN_FILE).read_text())["finished_at_step"] == 4


def test_allow_changed_data_accepts_other_data(paths, tmp_path, capsys, caplog):
    out = copy_run(paths, tmp_path)
    argv = resume_argv(paths, "--allow_changed_data", "--ctx_size", "1024", data=paths["edited"], out=out, max_steps=3)
    status, last = train_here(argv, capsys)
    assert status == 0, last
    assert "--ctx_size 2048 -> 1024, accepted by --allow_changed_data" in caplog.text
    assert "other content, accepted by --allow_changed_data" in caplog.text
    fingerprint = json.loads((out / "runs" / "run" / RUN_FILE).read_text())["fingerprint"]
    assert fingerprint["ctx_size"] == 1024  # what the run trains on from now on


# Unchanged settings (the data or base model copied elsewhere, other logging) resume to the same weights.
SAME = {
    "as-is": lambda p, where: {},
    "data-moved": lambda p, where: {"data": shutil.copy(p["data"], where / "moved.jsonl")},
    "base-moved": lambda p, where: {"base": shutil.copytree(p["base"], where / "base-copy")},
}


@pytest.mark.slow
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(same=st.sets(st.sampled_from(sorted(SAME)), min_size=1, max_size=3), logging_steps=st.sampled_from([1, 3]))
def test_unchanged_settings_resume_bit_identical(paths, capsys, same, logging_steps):
    with tempfile.TemporaryDirectory() as folder:
        where = Path(folder)
        out = copy_run(paths, where / "out")
        inputs = {key: value for name in sorted(same) for key, value in SAME[name](paths, where).items()}
        argv = resume_argv(paths, "--logging_steps", str(logging_steps), out=out, **inputs)
        status, last = train_here(argv, capsys)
        assert status == 0, last
        resumed, straight = adapter(out), adapter(paths["out"])
        assert resumed.keys() == straight.keys()
        assert all(torch.equal(resumed[name], straight[name]) for name in straight), "resumed weights differ"


# --max_steps 0 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given_steps", ["0", "-1", "-7"])
def test_max_steps_zero_or_below_means_no_step_limit(tiny_model_dir, given_steps):
    from chattune.config.flags import parse_flags

    flags = parse_flags(train_argv(tiny_model_dir, "d.jsonl", "out", "--max_steps", given_steps, "--epochs", "2"))
    assert flags.max_steps == -1 and flags.epochs == 2


def test_max_steps_zero_trains_the_epochs(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))  # 2 steps of 4 per epoch
    argv = train_argv(tiny_model_dir, data, tmp_path, "--max_steps", "0", "--epochs", "2", save_steps=100)
    status, last = train_here(argv, capsys)
    assert status == 0, last
    state = json.loads(next((tmp_path / "runs" / "run").glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["global_step"] == 4 and state["max_steps"] == 4


# The run's lock -------------------------------------------------------------------------------------------------

RACER = """
import json, os, sys, time
from pathlib import Path
from chattune.training.safety.lock import RunLockedError, held
folder, rounds, start = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
for index in range(rounds):
    while time.time() < start + index:  # both racers try at the same moment
        time.sleep(0.001)
    try:
        with held(folder / f".run-{index}.lock", f"run {index}"):
            (folder / f"held-{index}-{os.getpid()}").touch()
            deadline = time.time() + 20
            while not list(folder.glob(f"tried-{index}-*")) and time.time() < deadline:
                time.sleep(0.005)  # hold it until the other racer has tried
            (folder / f"tried-{index}-{os.getpid()}").touch()
    except RunLockedError as error:
        (folder / f"tried-{index}-{os.getpid()}").touch()
        (folder / f"refused-{index}-{os.getpid()}").write_text(str(error))
"""


def test_two_processes_racing_for_one_run_exactly_one_is_refused(tmp_path):
    rounds = 20
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.time() + 5  # after both have imported the lock module
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(rounds), str(start)], env=env)
        for _ in range(2)
    ]
    assert [racer.wait(timeout=120) for racer in racers] == [0, 0]
    for index in range(rounds):
        held_by = list(tmp_path.glob(f"held-{index}-*"))
        refusals = list(tmp_path.glob(f"refused-{index}-*"))
        assert len(held_by) == 1 and len(refusals) == 1, f"round {index}: {held_by} held, {refusals} refused"
        assert f"run {index} is in use by process {held_by[0].name.split('-')[-1]} on host" in refusals[0].read_text()
    assert not list(tmp_path.glob(".run-*.lock")), "a lock was left behind"


@pytest.mark.slow
def test_two_train_runs_racing_for_one_name_one_is_refused(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    argv = [TRAIN, *train_argv(tiny_model_dir, data, tmp_path / "out", max_steps=4, save_steps=2)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = [
        subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(process.wait(timeout=600), process.stderr.read().strip().splitlines()) for process in runs]
    assert sorted(status for status, _ in results) == [0, 2], [lines[-3:] for _, lines in results]
    refused = next(lines for status, lines in results if status == 2)
    assert refused[-1].startswith(f"error: run 'run' ({tmp_path / 'out' / 'runs' / 'run'}) is in use by process ")
    assert (tmp_path / "out" / "models" / "run" / "model.safetensors").is_file()
    assert not lock_path(tmp_path / "out" / "runs" / "run").exists()


def write_lock(path: Path, **holder) -> None:
    content = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "token": "t", **holder}
    path.write_text(json.dumps(content))


def ended_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("case", ["dead-pid", "pid-reused"])
def test_a_stale_lock_is_taken_over(tmp_path, caplog, case):
    path = tmp_path / ".run.lock"
    if case == "dead-pid":
        write_lock(path, pid=ended_pid())
    else:  # this pid, but the start time of an older process that had it
        write_lock(path, started=1.0)
    with held(path, "run 'run'"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "took over the lock of process" in caplog.text
    assert not path.exists()


def test_a_lock_of_another_host_or_a_live_process_is_refused(tmp_path):
    path = tmp_path / ".run.lock"
    write_lock(path, host="elsewhere", pid=123)
    with pytest.raises(RunLockedError, match=r"in use by process 123 on host elsewhere.*delete the lock file"):
        with held(path, "run 'run'"):
            pass
    write_lock(path, started=__import__("psutil").Process().create_time())  # this very process
    with pytest.raises(RunLockedError, match="wait for it to end, or choose another --run_name$"):
        with held(path, "run 'run'"):
            pass
    assert path.exists(), "another's lock was removed"


def test_an_unreadable_lock_is_held_while_young_and_stale_when_old(tmp_path, monkeypatch):
    path = tmp_path / ".run.lock"
    path.write_text("")  # created, not yet filled by its process
    with pytest.raises(RunLockedError, match="is being started by another process"):
        with held(path, "run 'run'"):
            pass
    monkeypatch.setattr(lock_module, "UNREADABLE_GRACE_S", 0.0)
    with held(path, "run 'run'"):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_the_lock_is_released_on_an_error_and_its_folders_removed(tmp_path):
    path = tmp_path / "out" / "runs" / ".run.lock"
    with pytest.raises(ChattuneError), held(path, "run 'run'"):
        assert path.exists()
        raise ChattuneError("bad row")
    assert not (tmp_path / "out").exists(), "the folders made for the lock stayed"


HOLDER = """
import sys, time
from pathlib import Path
from chattune.cli import entry_point
from chattune.training.safety.lock import held

@entry_point
def main():
    with held(Path(sys.argv[1]), "run 'run'"):
        print("holding", flush=True)
        time.sleep(60)
    return 0

sys.exit(main())
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda sig: sig.name)
def test_the_lock_is_released_on_ctrl_c_and_sigterm(tmp_path, sig):
    path = tmp_path / ".run.lock"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "holding"
    assert path.exists()
    process.send_signal(sig)
    assert process.wait(timeout=30) == 128 + sig
    assert not path.exists()


class OneProcess:
    """accelerate's PartialState as seen by one process of a launch."""

    def __init__(self, main: bool) -> None:
        self.is_main_process, self.num_processes = main, 1


def test_only_the_main_process_takes_the_lock(tmp_path):
    run_dir = tmp_path / "runs" / "run"
    with lock_module.run_lock(run_dir, "run", OneProcess(main=False)):
        assert not lock_path(run_dir).exists()
    with lock_module.run_lock(run_dir, "run", OneProcess(main=True)):
        assert json.loads(lock_path(run_dir).read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockedError), lock_module.run_lock(run_dir, "run", OneProcess(main=True)):
            pass
    assert not lock_path(run_dir).exists()


@pytest.mark.slow
def test_a_multi_process_launch_is_one_run_for_the_lock(tiny_model_dir, tmp_path):
    """Both processes of a launch stop with the one line when another run holds the lock (none waits for the
    other in a collective call); the test_distributed runs show that the processes of one launch do not refuse
    each other."""
    from test_distributed import accelerate, launch

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    path = lock_path(tmp_path / "out" / "runs" / "run")
    path.parent.mkdir(parents=True)
    with held(path, "run 'run'"):
        before = snapshot(tmp_path / "out")
        result = launch(
            *accelerate("--multi_gpu", "--num_processes", "2"),
            TRAIN,
            *train_argv(tiny_model_dir, data, tmp_path / "out", max_steps=1),
        )
        assert snapshot(tmp_path / "out") == before
    assert result.returncode != 0
    refusals = [line for line in result.stderr.splitlines() if "is in use by process" in line]
    assert len(refusals) == 2 and all(line.startswith("error: run 'run' (") for line in refusals), refusals
    assert f"is in use by process {os.getpid()} on host" in refusals[0]


def test_the_second_interrupt_exit_releases_the_lock(tmp_path, monkeypatch):
    """A second Ctrl-C while training exits at once with os._exit, which skips the cleanup that releases it."""
    from chattune.training.safety import checkpoints as safety
    from chattune.training.safety.checkpoints import GracefulStop

    path = tmp_path / ".run.lock"
    exits = []

    def exit_now(status: int) -> None:
        exits.append((status, path.exists()))  # whether the lock is still there as the process would end
        raise SystemExit(status)

    monkeypatch.setattr(safety.os, "_exit", exit_now)
    stop = GracefulStop()
    with pytest.raises(SystemExit), held(path, "run 'run'"):
        stop._handle(signal.SIGINT, None)  # the first: save and stop after this step
        assert path.exists()
        stop._handle(signal.SIGINT, None)
    assert exits == [(130, False)]
