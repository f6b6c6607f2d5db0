"""The shipped accelerate configs, read by accelerate's own launcher code down to torchrun's process count."""

from __future__ import annotations

import pytest
import torch
import yaml
from accelerate.commands.launch import _filter_args, _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_multi_gpu_env
from torch.distributed import run as torchrun

from conftest import REPO

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
