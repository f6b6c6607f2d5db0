"""How examples are put into batches: packed rows, padding-free micro-batches, or padded batches.

TRL's collator does the work; this module only decides which mode is safe for the model at hand.
Packed and padding-free batches carry per-example `position_ids`; transformers' native models turn
those into attention that never crosses examples (varlen kernels with flash-attention, a block-diagonal
mask with eager), so no example sees another. Without flash-attn, SDPA models switch to chattune's
per-example SDPA (chattune.training.kernels.attention), which costs what padded batches cost minus the padding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from chattune.training.kernels.attention import VARLEN_SDPA, use_varlen_sdpa

logger = logging.getLogger(__name__)

ISOLATING_ATTENTION = {"flash_attention_2", "flash_attention_3", "sdpa", "eager", "flex_attention", VARLEN_SDPA}


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


def plan_batching(model: Any, packing: bool | None, per_example_attention: bool = True) -> BatchingPlan:
    """Padding-free micro-batches by default: zero padding, and --batch_size keeps counting examples.

    --packing fills rows of ctx_size instead (TRL's best-fit-decreasing packing); then a micro-batch is a
    number of rows, each holding as many examples as fit. An SDPA model is switched to per-example SDPA
    for either (unless `per_example_attention` is off, or the model has sliding-window layers: then SDPA's
    block-diagonal mask keeps the examples apart).
    """
    safe, why = isolates_packed_examples(model)
    if safe and per_example_attention and use_varlen_sdpa(model):
        why = "flash-attn is not in use, so each example is attended on its own with SDPA (no padding, no mask)"
    if not safe:
        if packing:
            logger.warning("--packing ignored: %s; using padded batches", why)
        return BatchingPlan(False, False, f"padded batches ({why})")
    if packing:
        return BatchingPlan(True, True, f"packed rows of ctx_size ({why})")
    return BatchingPlan(False, True, f"padding-free micro-batches ({why})")
