"""Model and adapter folders: telling one from the other, and refusing missing or truncated weights before loading.

A model is named by a folder, a hub id or a GGUF file. A GGUF file is run in llama.cpp by evaluate.py's
`--gguf_runtime llama.cpp`, or converted once to a model folder (chattune.models.gguf) and used as one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from chattune.models.errors import IncompleteWeightsError, ModelError
from chattune.models.gguf import find_gguf, read_architecture, resolve_model
from chattune.models.hub_cache import cached_hub_model

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
EXPECTED_FOLDER_HELP = (
    "expected a model folder (config.json + one of " + ", ".join(WEIGHT_FILES) + ") or a LoRA adapter folder "
    "(adapter_config.json + one of " + ", ".join(ADAPTER_WEIGHT_FILES) + ")"
)

# org/name as the hub spells model ids; a missing local path spelled so is looked up in the cache too
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class ModelSource:
    path: Path
    kind: str  # "model", "adapter", or "gguf" (a GGUF file run in llama.cpp)
    base: str | None = None  # the base model an adapter was trained on
    converted_from: Path | None = None  # the GGUF file a "model" was converted from (--gguf_runtime transformers)
    hub_id: str | None = None  # a hub model read from the local Hugging Face cache (path: its snapshot)

    @property
    def results_dir(self) -> Path:
        """Where its result files go by default: the model's folder; for a GGUF file (run in llama.cpp, or
        converted for transformers into a hidden cache folder) a folder beside the file named after it
        (models/run/run-q8_0.gguf -> models/run/run-q8_0-eval), since one folder often holds several; for a hub
        model a folder in the working directory (org/name -> org--name-eval), never inside the cache."""
        if self.hub_id:
            return Path(f"{self.hub_id.replace('/', '--')}-eval")
        gguf_file = self.path if self.kind == "gguf" else self.converted_from
        return gguf_file.parent / f"{gguf_file.stem}-eval" if gguf_file else self.path

    @property
    def weight_files(self) -> list[Path]:
        """The files whose change invalidates stored results."""
        if self.kind == "gguf":
            return [self.path]
        names = WEIGHT_FILES + ADAPTER_WEIGHT_FILES
        return [p for p in sorted(self.path.iterdir()) if p.name in names or p.suffix == ".safetensors"]


def inspect_model_folder(path: str | os.PathLike, gguf_runtime: str = "transformers") -> ModelSource:
    """Tell a full model folder from a LoRA adapter folder, with an error that lists what was expected.

    A GGUF file (or a folder holding one) is run in llama.cpp with `gguf_runtime` "llama.cpp"; with
    "transformers" it is converted once to a model folder and evaluated as one.
    """
    gguf_file = find_gguf(path)
    if gguf_runtime == "llama.cpp" and gguf_file is not None:
        read_architecture(gguf_file)  # a file that is not GGUF, or is cut short, is named before any work
        return ModelSource(gguf_file, "gguf")
    folder = Path(resolve_model(str(path)))
    if gguf_file is not None:
        return dataclasses.replace(_inspect_folder(folder), converted_from=gguf_file)
    if not folder.exists() and HUB_ID.fullmatch(str(path)):
        return dataclasses.replace(_inspect_folder(cached_model_folder(str(path))), hub_id=str(path))
    return _inspect_folder(folder)


def cached_model_folder(repo_id: str) -> Path:
    """A hub id's snapshot in the local Hugging Face cache, found offline, or an error naming the id."""
    folder = cached_hub_model(repo_id)
    if folder is None:
        raise ModelError(
            f"{repo_id}: no such folder, and not a hub model in the local Hugging Face cache "
            f"({hf_cache_dir()}); download it once with `hf download {repo_id}`, or give a model folder"
        )
    return folder


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _inspect_folder(folder: Path) -> ModelSource:
    if not folder.exists():
        raise ModelError(f"{folder}: no such file or folder; {EXPECTED_FOLDER_HELP}")
    if not folder.is_dir():
        raise ModelError(f"{folder}: is a file, not a folder; {EXPECTED_FOLDER_HELP}")
    names = sorted(p.name for p in folder.iterdir())
    if (folder / "adapter_config.json").is_file():
        if not any(name in names for name in ADAPTER_WEIGHT_FILES):
            raise IncompleteWeightsError(
                f"{folder}: adapter_config.json but no adapter weights; {EXPECTED_FOLDER_HELP}"
            )
        check_weights_complete(folder, ADAPTER_WEIGHT_FILES)
        return ModelSource(folder, "adapter", _adapter_base(folder))
    if (folder / "config.json").is_file():
        if not any(name in names for name in WEIGHT_FILES):
            raise IncompleteWeightsError(f"{folder}: config.json but no model weights; {EXPECTED_FOLDER_HELP}")
        check_weights_complete(folder, WEIGHT_FILES)
        return ModelSource(folder, "model")
    found = ", ".join(names) or "nothing"
    raise ModelError(f"{folder}: neither a model nor a LoRA adapter; {EXPECTED_FOLDER_HELP}; found: {found}")


def check_weights_complete(folder: Path, candidates: tuple[str, ...]) -> None:
    """Read the headers of the weight files (and every shard an index names) without loading any tensor.

    Raises IncompleteWeightsError for a missing shard or a file cut short. Without this, loading fails deep inside
    safetensors or torch.load with a message that names neither the file nor the cause.
    """
    for name in candidates:
        path = folder / name
        if not path.is_file():
            continue
        files = _index_shards(path) if name.endswith(".index.json") else [path]
        for file in files:
            problem = _weights_file_problem(file)
            if problem:
                hint = "a save killed part-way leaves this; re-save the model or pick another checkpoint"
                raise IncompleteWeightsError(f"{file}: {problem} ({hint})")
        return


def _index_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [index.parent / shard for shard in sorted(set(weight_map.values()))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise IncompleteWeightsError(f"{index}: unreadable shard index ({error})") from None


def _weights_file_problem(file: Path) -> str | None:
    """Why `file` cannot hold complete weights, or None. safetensors checks that its header covers the whole file."""
    if not file.is_file():
        return "missing"
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt"):
                return None
        except (SafetensorError, OSError) as error:
            return f"truncated or corrupt safetensors file ({error})"
    with file.open("rb") as handle:
        is_zip = handle.read(2) == b"PK"
    if is_zip:  # torch.save's format since torch 1.6; its directory is at the end, so a cut-short file lacks it
        try:
            with zipfile.ZipFile(file):
                return None
        except (zipfile.BadZipFile, OSError) as error:
            return f"truncated or corrupt torch checkpoint ({error})"
    return None  # the legacy pickle format: nothing cheap to check


def _adapter_base(folder: Path) -> str:
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelError(f"{folder / 'adapter_config.json'}: unreadable ({error})") from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base:
        raise ModelError(f"{folder / 'adapter_config.json'}: no base_model_name_or_path; cannot load the base model")
    return str(base)
