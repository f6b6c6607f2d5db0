"""Checks of train.py's inputs on disk, made before any expensive work (GGUF conversion, data preparation, model
loading): the base model folder, the chat template file and the output folders. Each reads no more than a folder
listing; a problem is one FlagError naming the flag, the path and what to do.

The flag values themselves are checked earlier still, when they are parsed (chattune.config.flags.check_values).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from chattune.config.flags import FlagError, TrainFlags
from chattune.models.gguf import PACKAGE_PREFIX, find_gguf
from chattune.training.safety.outputs import planned_outputs

# A Hugging Face repository id: `name` or `owner/name`, letters, digits and - _ . only.
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def check_inputs(flags: TrainFlags) -> None:
    check_base_model(flags.base_model)
    if flags.prompt_template_file and not Path(flags.prompt_template_file).is_file():
        raise FlagError(f"--prompt_template_file {flags.prompt_template_file}: no such file")
    check_output_folders(flags)


def looks_like_local_path(name: str) -> bool:
    """Whether `name` means a folder on this machine rather than a hub id: it starts like a path (./ ../ / ~), it
    is not shaped like owner/name, or its first part is a folder here (models/home-sft next to a models/ folder)."""
    if name.startswith((".", "/", "~")) or (os.altsep and os.altsep in name):
        return True
    if os.sep not in name:
        return False
    return not HUB_ID.fullmatch(name) or Path(name).parent.is_dir()


def check_base_model(name: str) -> None:
    """--base_model names a model: a folder with config.json and weights, a GGUF file, or a hub id."""
    if name.startswith(PACKAGE_PREFIX) or find_gguf(name) is not None:
        return  # a GGUF file; chattune.models.gguf checks it
    folder = Path(name).expanduser()
    if not folder.exists():
        if looks_like_local_path(name):
            raise FlagError(
                f"--base_model {name}: no such model folder ({folder.absolute()} does not exist); give a folder "
                "with config.json and weights, a .gguf file, or a hub id such as Qwen/Qwen2-0.5B-Instruct"
            )
        return  # a hub id: transformers downloads it, or says why it cannot
    if not folder.is_dir():
        raise FlagError(f"--base_model {name}: a file, not a model folder (or a .gguf file)")
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise FlagError(
            f"--base_model {name} is a LoRA adapter, not a model: train on its base model (named in its "
            "adapter_config.json), or on the merged model that --lora_merge writes to models/<run_name>"
        )
    if not (folder / "config.json").is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
        raise FlagError(
            f"--base_model {name} is not a model folder: it has no config.json (found: {found}); a tokenizer alone "
            "cannot be trained: give the folder that holds the model's config and weights"
        )
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise FlagError(
            f"--base_model {name} has a config.json but no weights (*.safetensors or *.bin); give the folder that "
            "holds the model's weights"
        )


def check_output_folders(flags: TrainFlags) -> None:
    """Every folder the run writes can be created and written: the run's checkpoints go into runs/<run_name>, and
    the final folders are written beside their target, then renamed into place."""
    where = f"--output_dir {flags.output_dir}" if flags.output_dir else "the current directory (no --output_dir)"
    folders = planned_outputs(flags)
    for folder in folders:
        if folder.exists() and not folder.is_dir():
            raise FlagError(f"{where}: {folder} is a file where the run writes a folder; move it, or choose another")
    for existing in dict.fromkeys(nearest_existing(path) for folder in folders for path in (folder, folder.parent)):
        _check_writable(existing, where)


def nearest_existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor))


def _check_writable(folder: Path, where: str) -> None:
    """Tried with a folder made and removed in `folder`, since permission bits do not tell (root, read-only
    mounts, ACLs)."""
    if not folder.is_dir():
        raise FlagError(f"{where}: {folder} is a file, not a folder; the run writes folders under it")
    try:
        tempfile.TemporaryDirectory(prefix=".chattune-write-test-", dir=folder).cleanup()
    except OSError as error:
        raise FlagError(
            f"{where}: cannot write in {folder} ({error.strerror}); choose a writable --output_dir, or fix its "
            "permissions"
        ) from None
