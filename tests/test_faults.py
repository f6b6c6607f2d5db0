"""Fault injection (issue 21): a signal in every phase of a run, damaged checkpoints, a full disk, result folders
that cannot be written, SIGKILL at random points. Each case asserts the exit status, the message, and that no
output was changed (or, for SIGKILL, that resuming gives bit-identical weights)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_crash_safety import command, popen, wait_until

from chattune.atomic import DiskFullError, atomic_path, write_text_atomic
from chattune.commands import train as run_module
from chattune.config.flags import FlagError
from chattune.training.safety import outputs as outputs_module
from chattune.training.safety.checkpoints import checkpoint_problem
from chattune.training.safety.resume import newest_complete_checkpoint, refuse_damaged
from conftest import REPO, chat_rows, run_script, train_argv, write_jsonl

KILL_AT = str(REPO / "tests" / "kill_at.py")
STEPS = ["--max_steps", "8", "--save_steps", "2"]  # 8 steps of 2 micro-batches; checkpoints 6 and 8 are kept


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", chat_rows(40))


@pytest.fixture(scope="module")
def straight(tiny_model_dir, data, tmp_path_factory) -> Path:
    """The output root of a run of STEPS that nothing disturbed."""
    out = tmp_path_factory.mktemp("straight")
    result = run_script(*command(tiny_model_dir, data, out, *STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "models" / "run" / "model.safetensors")


def assert_bit_identical(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first), "resumed weights differ"


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` and its hash: equal before and after means nothing was changed. (The model card
    the trainer writes into the checkpoints' staging folder at each start is not an output.)"""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and ".staging" not in path.parts
    }


# SIGKILL ------------------------------------------------------------------------------------------------------


def kill_points(seed: int = 21) -> list[tuple[str, int]]:
    """Seeded, so a failure reproduces: call numbers after the first checkpoint (so `latest` finds one).

    8 steps x 2 micro-batches = 16 training steps, the first checkpoint after the 4th; each checkpoint makes 4
    torch.save calls (training arguments, optimizer, scheduler, RNG state); 4 checkpoints are renamed into
    place; the 3rd and 4th each delete the oldest."""
    rng = random.Random(seed)
    return [
        ("step", rng.randint(5, 16)),
        ("step", rng.randint(5, 16)),
        ("save", rng.randint(5, 16)),
        ("rename", rng.randint(2, 4)),
        ("rotate", rng.randint(1, 2)),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("point,count", kill_points(), ids=lambda value: str(value))
def test_sigkill_at_random_points_resumes_bit_identical(straight, tiny_model_dir, data, tmp_path, point, count):
    args = command(tiny_model_dir, data, tmp_path, *STEPS)[1:]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KILL_AT": f"{point}:{count}"}
    killed = subprocess.run([sys.executable, KILL_AT, *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, f"never reached {point} #{count}: {killed.stderr[-2000:]}"
    assert not (tmp_path / "models" / "run").exists()
    resumed = run_script(*command(tiny_model_dir, data, tmp_path, *STEPS, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bit_identical(straight, tmp_path)


# Signals in each phase ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_during_multiprocess_tokenization_leaves_no_workers(tiny_model_dir, tmp_path):
    rows = write_jsonl(tmp_path / "many.jsonl", chat_rows(6000))
    log = tmp_path / "run.log"
    process = popen(command(tiny_model_dir, rows, tmp_path, "--dataset_processing_threads", "2"), log)
    parent = psutil.Process(process.pid)
    wait_until(lambda: len(parent.children(recursive=True)) >= 2, process, log)  # the pool's workers
    workers = parent.children(recursive=True)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143, log.read_text()[-3000:]
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == [], f"workers outlived their parent: {alive}"
    assert f"SIGTERM: interrupted while tokenizing {rows}; nothing was saved" in log.read_text()
    assert not (tmp_path / "models").exists() and not list((tmp_path / "runs").rglob("checkpoint-*"))


PHASES = {  # the phase's report, the signal, the flags that make the run reach it
    "final-evaluation": ("evaluating on the full test set", signal.SIGINT, ["--eval_fraction", "0.5"]),
    "save": ("writing", signal.SIGTERM, []),
    "merge": ("merging the adapter", signal.SIGINT, ["--use_lora", "--lora_merge"]),
    "export": ("exporting", signal.SIGTERM, ["--use_lora", "--lora_merge", "--export_gguf", "q8_0"]),
}


@pytest.mark.parametrize("phase", PHASES)
def test_a_signal_in_each_phase_after_training_stops_it(tiny_model_dir, data, tmp_path, monkeypatch, capsys, phase):
    """The signal is sent (for real, to this process) as the run reports that the phase begins."""
    doing, sig, extra = PHASES[phase]

    def report_then_signal(now: str, saved: str | None = None) -> None:
        report_progress(now, saved)
        if now.startswith(doing):
            os.kill(os.getpid(), sig)

    report_progress = run_module.report_progress
    monkeypatch.setattr(run_module, "report_progress", report_then_signal)
    monkeypatch.setattr(outputs_module, "report_progress", report_then_signal)
    argv = train_argv(tiny_model_dir, data, tmp_path, "--max_steps", "2", *extra, test_dataset=data, save_steps=2)
    status = run_module.main(argv)

    err = capsys.readouterr().err
    checkpoint = tmp_path / "runs" / "run" / "checkpoint-2"
    assert status == 128 + sig, err[-3000:]
    assert f"{sig.name}: interrupted while {doing}" in err
    assert (
        f"the trained weights are in {checkpoint}; rerun the same command plus --resume_from_checkpoint latest" in err
    )
    assert (checkpoint / "trainer_state.json").is_file()
    assert not (tmp_path / "models" / "run").exists() or phase == "export", "a model folder was written"
    assert not list(tmp_path.rglob("*.gguf"))
    assert not [p for p in tmp_path.rglob(".*") if ".tmp-" in p.name], "a temporary copy was left behind"
    if phase in ("merge", "export"):
        assert f"wrote {tmp_path / 'loras' / 'run'}" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the handlers were not given back"


# Damaged checkpoints ------------------------------------------------------------------------------------------


def fake_checkpoint(folder: Path) -> Path:
    """A checkpoint's kinds of files, in their real formats: safetensors weights, torch zip files, JSON state."""
    folder.mkdir(parents=True)
    save_file({"weight": torch.arange(256.0)}, folder / "model.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.ones(256)}}}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": []}))
    return folder


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_latest_skips_a_cut_short_checkpoint_and_an_explicit_one_is_refused(tmp_path, caplog, name):
    older, newer = fake_checkpoint(tmp_path / "checkpoint-2"), fake_checkpoint(tmp_path / "checkpoint-4")
    assert checkpoint_problem(newer) is None
    file = newer / name
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    assert checkpoint_problem(newer).startswith(f"{name} is ")

    with caplog.at_level(logging.WARNING):
        assert newest_complete_checkpoint(tmp_path) == older
    assert f"skipping {newer}: {name} is" in caplog.text

    with pytest.raises(FlagError, match=rf"{newer}: {name} is .* cannot be resumed; resume from {older} instead"):
        refuse_damaged(newer)
    (older / "optimizer.pt").write_bytes(b"")
    with pytest.raises(FlagError, match=r"no complete checkpoint in .*checkpoint-4 \(.*checkpoint-2 \(optimizer.pt"):
        newest_complete_checkpoint(tmp_path)


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_end_to_end(straight, tiny_model_dir, data, tmp_path):
    shutil.copytree(straight / "runs", tmp_path / "runs")
    newest = tmp_path / "runs" / "run" / "checkpoint-8"
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    before = digest(tmp_path)

    explicit = run_script(*command(tiny_model_dir, data, tmp_path, *STEPS, "--resume_from_checkpoint", str(newest)))
    assert explicit.returncode == 2, explicit.stderr[-3000:]
    assert f"error: --resume_from_checkpoint {newest}: optimizer.pt is cut short" in explicit.stderr
    assert f"resume from {newest.parent / 'checkpoint-6'} instead" in explicit.stderr
    assert digest(tmp_path) == before

    latest = run_script(*command(tiny_model_dir, data, tmp_path, *STEPS, "--resume_from_checkpoint", "latest"))
    assert latest.returncode == 0, latest.stderr[-3000:]
    assert f"skipping {newest}: optimizer.pt is cut short" in latest.stderr
    assert_bit_identical(straight, tmp_path)


# A full disk ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_names_the_save_and_keeps_the_previous_checkpoint(straight, tiny_model_dir, data, tmp_path):
    shutil.copytree(straight, tmp_path / "out")
    out = tmp_path / "out"
    run_dir = out / "runs" / "run"
    before = digest(out)
    # Files may grow to the size of the weights, no further: the next checkpoint's optimizer state (twice as big)
    # hits the limit. Python ignores SIGXFSZ, so the write fails with EFBIG ("File too large").
    limit = (run_dir / "checkpoint-8" / "model.safetensors").stat().st_size + 65536

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = command(tiny_model_dir, data, out, "--max_steps", "10", "--save_steps", "2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, *args, "--resume_from_checkpoint", "latest"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    # torch's zip writer loses the errno ("unexpected pos ..."), so the reason is worded without it
    reason = r"\((File too large|no space left, or a file size limit)\)"
    assert re.search(
        rf"error: disk full while writing {re.escape(str(run_dir / 'checkpoint-10'))} {reason}; the previous "
        rf"checkpoint {re.escape(str(run_dir / 'checkpoint-8'))} is intact; free some space, then rerun the same "
        "command plus --resume_from_checkpoint latest",
        result.stderr,
    ), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "unexpected pos" not in result.stderr
    # run.json records the newest start (its larger --max_steps): not a checkpoint, and each checkpoint keeps the
    # fingerprint it was saved with, which is what a resume compares with.
    after = digest(out)
    assert json.loads((run_dir / "run.json").read_text())
    after.pop("runs/run/run.json"), before.pop("runs/run/run.json")
    assert after == before, "the previous checkpoint or the model changed"
    assert not list(run_dir.rglob("checkpoint-10")), "the half-written checkpoint was left behind"


def test_a_full_disk_during_an_atomic_write_keeps_the_previous_copy(tmp_path):
    target = tmp_path / "models" / "run"
    with atomic_path(target, folder=True) as staging:
        (staging / "weights").write_text("first")
    with pytest.raises(DiskFullError, match=rf"disk full while writing {target} .*; the previous {target} is intact"):
        with atomic_path(target, folder=True) as staging:
            (staging / "weights").write_text("half")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert (target / "weights").read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["run"]


# Output folders and files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("umask,folder_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_atomic_outputs_follow_the_umask(tmp_path, umask, folder_mode, file_mode):
    previous = os.umask(umask)
    try:
        with atomic_path(tmp_path / "models" / "run", folder=True) as staging:
            (staging / "config.json").write_text("{}")
            # safetensors writes through a temporary file of its own (mode 0600) and renames it: the cause of
            # a 0600 model.safetensors among 0644 files (safetensors 0.8)
            save_file({"weight": torch.ones(2)}, staging / "model.safetensors")
        write_text_atomic(tmp_path / "eval_results.json", "{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "models" / "run").stat().st_mode & 0o777 == folder_mode
    assert (tmp_path / "models" / "run" / "config.json").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "models" / "run" / "model.safetensors").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "eval_results.json").stat().st_mode & 0o777 == file_mode


def modes_against_umask(root: Path, umask: int) -> dict[str, str]:
    """Every file and folder under `root` whose mode is not what `open`/`mkdir` give under `umask`."""
    wrong = {}
    for path in sorted(root.rglob("*")):
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        if path.stat().st_mode & 0o777 != expected:
            wrong[str(path.relative_to(root))] = f"{path.stat().st_mode & 0o777:o}, not {expected:o}"
    return wrong


def run_under_umask(umask: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(umask),  # the child alone: pytest's own files keep the umask they had
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "umask,flags",
    [(0o022, []), (0o027, ["--use_lora", "--lora_merge"])],
    ids=["022-full", "027-lora-merged"],
)
def test_every_output_file_follows_the_umask(tiny_model_dir, data, tmp_path, umask, flags):
    """A run's model folders, adapter, checkpoints, GGUF file and Modelfile, then a GGUF export of the model
    (a llama.cpp type when llama-cpp-python is there): every file 0o666 & ~umask, every folder 0o777 & ~umask."""
    argv = train_argv(
        tiny_model_dir, data, tmp_path / "out", *flags, "--export_gguf", "q8_0", max_steps=2, save_steps=1
    )
    trained = run_under_umask(umask, str(REPO / "train.py"), *argv)
    assert trained.returncode == 0, trained.stderr[-3000:]
    outtype = "q4_0" if importlib.util.find_spec("llama_cpp") else "f16"
    model_dir, gguf_file = tmp_path / "out" / "models" / "run", tmp_path / "export" / f"run-{outtype}.gguf"
    exported = run_under_umask(
        umask, "-m", "chattune.export.gguf", str(model_dir), "--outtype", outtype, "--out", str(gguf_file)
    )
    assert exported.returncode == 0, exported.stderr[-3000:]

    written = {path.name for path in tmp_path.rglob("*")}
    assert {"model.safetensors", "run-q8_0.gguf", "run-q8_0.Modelfile", f"run-{outtype}.Modelfile"} <= written
    assert "checkpoint-2" in written and ("adapter_model.safetensors" in written) == bool(flags)
    assert modes_against_umask(tmp_path / "out", umask) == {}
    assert modes_against_umask(tmp_path / "export", umask) == {}


def test_an_adapter_records_its_base_as_an_absolute_path(tiny_model_dir, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    relative = tiny_model_dir.name
    argv = train_argv(relative, data, tmp_path, "--use_lora", "--max_steps", "1", save_steps=1)
    previous = os.umask(0o022)
    try:
        assert run_module.main(argv) == 0
    finally:
        os.umask(previous)
    adapter = tmp_path / "loras" / "run"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir.resolve()
    )
    assert adapter.stat().st_mode & 0o777 == 0o755
    assert run_module.recorded_base("HuggingFaceTB/SmolLM2-135M-Instruct", None) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    ), "a hub id is kept as given"


def test_evaluate_refuses_an_unwritable_results_folder_before_loading(
    tiny_model_dir, data, tmp_path, monkeypatch, capsys
):
    from chattune.commands import evaluate

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the results folder was checked")

    monkeypatch.setattr(evaluate, "open_model", never)
    blocker = tmp_path / "results.txt"
    blocker.write_text("a file where a folder should be")
    status = evaluate.main([str(tiny_model_dir), "--test_dataset", str(data), "--output_dir", str(blocker / "eval")])
    assert status == 2
    assert (
        f"error: {blocker / 'eval'}: cannot write the results there ({blocker} is a file); pass another "
        "--output_dir to write them elsewhere"
    ) in capsys.readouterr().err
    assert blocker.read_text() == "a file where a folder should be"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_evaluate_refuses_a_read_only_model_folder(tiny_model_dir, data, tmp_path, capsys):
    from chattune.commands import evaluate

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    model.chmod(0o555)
    try:
        status = evaluate.main([str(model), "--test_dataset", str(data)])
    finally:
        model.chmod(0o755)
    err = capsys.readouterr().err
    assert status == 2
    assert f"error: {model}: cannot write the results there (Permission denied); pass --output_dir DIR" in err
