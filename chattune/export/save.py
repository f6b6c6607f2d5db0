"""Writing the final model folders: full model, LoRA adapter, merged model.

Each folder is written under a temporary name and renamed into place, so a crash never leaves a folder
that looks complete but is not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def set_stop_tokens(model: Any, tokenizer: Any, end_of_turn: str | None) -> None:
    """Make `generate` stop at the chat template's end-of-turn token as well as at EOS."""
    ids = [tokenizer.eos_token_id]
    if end_of_turn is not None:
        ids.append(tokenizer.convert_tokens_to_ids(end_of_turn))
    ids = [i for i in dict.fromkeys(ids) if i is not None]
    if ids:
        model.generation_config.eos_token_id = ids if len(ids) > 1 else ids[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def save_model(model: Any, tokenizer: Any, target: Path, state_dict: dict | None = None) -> Path:
    with atomic_folder(target) as staging:
        model.save_pretrained(staging, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
    logger.info("saved %s", target)
    return target


def merge_adapter(peft_model: Any, base_model_path: str, reload: bool, dtype: torch.dtype, adapter_dir: Path) -> Any:
    """Fold the LoRA weights into the base weights.

    With `reload`, the base is loaded again in full precision and the saved adapter (with any fully
    trained modules) applied to it: a quantized base cannot absorb a LoRA delta exactly, and under FSDP or
    ZeRO-3 this process does not hold the full weights.
    """
    if not reload:
        return peft_model.merge_and_unload()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=dtype)
    rows = peft_model.get_input_embeddings().weight.shape[0]
    if base.get_input_embeddings().weight.shape[0] != rows:
        base.resize_token_embeddings(rows)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
