"""How examples are put into batches: packed rows, padding-free micro-batches, or padded batches.

TRL's collator does the work; this module only decides which mode is safe for the model at hand.
Packed and padding-free batches carry per-example `position_ids`; transformers' native models turn
those into attention that never crosses examples (varlen kernels with flash-attention, a block-diagonal
mask with SDPA/eager), so no example sees another.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

ISOLATING_ATTENTION = {"flash_attention_2", "flash_attention_3", "sdpa", "eager", "flex_attention"}


@dataclass(frozen=True)
class BatchingPlan:
    packing: bool
    padding_free: bool
    reason: str


def isolates_packed_examples(model: Any) -> tuple[bool, str]:
    attention = getattr(model.config, "_attn_implementation", None) or "sdpa"
    module = type(model).__module__
    if not module.startswith("transformers."):
        return False, f"{type(model).__name__} is remote code; its attention may not honour position ids"
    if attention not in ISOLATING_ATTENTION:
        return False, f"attention backend {attention!r} cannot isolate packed examples"
    return True, f"attention backend {attention!r} isolates examples by position ids"


def plan_batching(model: Any, packing: bool | None) -> BatchingPlan:
    """Padding-free micro-batches by default: zero padding, and --batch_size keeps counting examples.

    --packing fills rows of ctx_size instead (TRL's best-fit-decreasing packing); then a micro-batch is a
    number of rows, each holding as many examples as fit.
    """
    safe, why = isolates_packed_examples(model)
    if not safe:
        if packing:
            logger.warning("--packing ignored: %s; using padded batches", why)
        return BatchingPlan(False, False, f"padded batches ({why})")
    if packing:
        return BatchingPlan(True, True, f"packed rows of ctx_size ({why})")
    return BatchingPlan(False, True, f"padding-free micro-batches ({why})")
