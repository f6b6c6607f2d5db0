"""The shipped accelerate configs, read by accelerate's own launcher code down to torchrun's process count."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from accelerate.commands.launch import _filter_args, _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_multi_gpu_env
from torch.distributed import run as torchrun
from transformers import AutoModelForCausalLM

from chattune.models.device import cpu_has_native_bf16
from conftest import REPO, TRAIN, accelerate, chat_rows, launch, run_script, train_argv, write_jsonl

FSDP_CONFIG = REPO / "fsdp_config.yaml"


def processes_started(config, *launch_flags: str) -> int:
    """How many processes `accelerate launch --config_file config [launch_flags] train.py` starts on this node:
    accelerate's validation and environment, then torchrun's reading of them (nothing is spawned)."""
    args = launch_command_parser().parse_args(["--config_file", str(config), *launch_flags, "train.py"])
    args, _, _ = _validate_launch_command(args)
    assert args.use_fsdp
    prepare_multi_gpu_env(args)
    script = ["--training_script", args.training_script, "--training_script_args", args.training_script_args]
    launch_config, _, _ = torchrun.config_from_args(_filter_args(args, torchrun.get_args_parser(), script))
    return launch_config.nproc_per_node


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_fsdp_config_starts_one_process_per_gpu_of_the_node(monkeypatch, gpus):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert processes_started(FSDP_CONFIG) == gpus


@pytest.mark.parametrize("asked", [1, 2, 8])
def test_num_processes_still_overrides_the_gpu_count(monkeypatch, asked):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert processes_started(FSDP_CONFIG, "--num_processes", str(asked)) == asked


def test_a_config_without_num_processes_is_refused_by_accelerate(tmp_path):
    """Why the config says `gpu`: accelerate counts GPUs only when there is no config file at all; a config that
    names no num_processes gets ClusterConfig's -1 and is refused (docs/distributed.md)."""
    config = yaml.safe_load(FSDP_CONFIG.read_text())
    del config["num_processes"]
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="manually pass in `--num_processes`"):
        processes_started(tmp_path / "fsdp.yaml")


# --- what runs on a CPU: ZeRO-3 and multi_gpu.yaml ----------------------------------------------------------------

DEEPSPEED_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "bf16"}
REQUIRED = ["--run_name", "r", "--base_model", "m", "--train_dataset", "d.jsonl"]


@pytest.mark.parametrize(
    "environ,flags,dtype,refused",
    [
        (DEEPSPEED_ENV, [], "float32", "(no --bf16)"),
        (DEEPSPEED_ENV, ["--bf16"], "float32", "(--bf16, but this machine has no bfloat16 hardware)"),
        (DEEPSPEED_ENV, ["--bf16"], "bfloat16", None),
        ({**DEEPSPEED_ENV, "ACCELERATE_MIXED_PRECISION": "no"}, [], "float32", None),
        ({"ACCELERATE_USE_FSDP": "true", "ACCELERATE_MIXED_PRECISION": "bf16"}, [], "float32", None),
    ],
    ids=["zero3-without-bf16", "zero3-bf16-on-a-cpu", "zero3-bf16", "zero3-no-mixed-precision", "fsdp"],
)
def test_deepspeed_precision_must_match_the_launchers(environ, flags, dtype, refused):
    from chattune.config.flags import FlagError, parse_flags
    from chattune.training.safety.launcher import check_launch_precision

    parsed = parse_flags([*REQUIRED, *flags])
    if refused is None:
        check_launch_precision(parsed, dtype, environ)
        return
    with pytest.raises(FlagError, match=re.escape(refused)) as error:
        check_launch_precision(parsed, dtype, environ)
    assert "--mixed_precision no" in str(error.value) and "\n" not in str(error.value)


def test_zero3_without_bf16_is_refused_before_torch(tmp_path, monkeypatch):
    """What the processes of `accelerate launch --config_file deepspeed_zero3.yaml train.py` (no --bf16) get."""
    for name, value in DEEPSPEED_ENV.items():
        monkeypatch.setenv(name, value)
    result = run_script("-X", "importtime", str(REPO / "train.py"), *REQUIRED, cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("import time")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and "DeepSpeed config asks for bf16 mixed precision" in lines[0]
    assert not [line for line in result.stderr.splitlines() if line.rstrip().endswith(("| torch", "| transformers"))]


@pytest.fixture
def tiny_run(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    return train_argv(tiny_model_dir, data, tmp_path, max_steps=2, learning_rate="1e-3", save_steps=2)


@pytest.mark.slow
def test_zero3_config_refused_on_a_cpu_with_bf16_then_trains_without_mixed_precision(tiny_run, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    if cpu_has_native_bf16():
        pytest.skip("this CPU runs bfloat16: the refusal is for CPUs without it")
    launcher = ("--config_file", str(REPO / "deepspeed_zero3.yaml"), "--num_processes", "2")
    refused = launch(*accelerate(*launcher), TRAIN, *tiny_run, "--bf16")
    assert refused.returncode != 0
    assert "DeepSpeed config asks for bf16 mixed precision, but train.py trains in float32" in refused.stderr
    assert "]: Traceback" not in refused.stderr  # no process's traceback ([rank0]: ...), only the launcher's report

    trained = launch(*accelerate(*launcher, "--mixed_precision", "no"), TRAIN, *tiny_run)
    assert trained.returncode == 0, trained.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "run")  # ZeRO-3's partitions, gathered
    start = AutoModelForCausalLM.from_pretrained(tiny_run[tiny_run.index("--base_model") + 1])
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in start.parameters())


@pytest.mark.slow
def test_multi_gpu_config_runs_ddp_on_two_cpu_processes(tiny_run, tmp_path):
    launcher = ("--config_file", str(REPO / "multi_gpu.yaml"), "--num_processes", "2")
    result = launch(*accelerate(*launcher), TRAIN, *tiny_run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 process(es)" in result.stderr
    AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "run")
