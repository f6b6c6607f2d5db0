"""Writing a model folder (full model, LoRA adapter or merged model) with its tokenizer.

Each folder is written under a temporary name and renamed into place, so a crash never leaves a folder
that looks complete but is not.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from chattune.atomic import atomic_path

logger = logging.getLogger(__name__)


def save_model(model: Any, tokenizer: Any, target: Path, state_dict: dict | None = None) -> Path:
    with atomic_path(target, folder=True) as staging:
        model.save_pretrained(staging, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
    logger.info("saved %s", target)
    return target
