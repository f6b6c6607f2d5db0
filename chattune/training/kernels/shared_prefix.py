"""DPO runs each pair's prompt once: chosen and rejected answers share it.

TRL's DPOTrainer forwards a pair as two padded rows, prompt + chosen and prompt + rejected, so the prompt (most
of a smart-home example: system prompt, device list, question) goes through the model twice, padding included.
Under causal attention a token's hidden state depends only on the tokens before it, so the two rows' common
prefix has the same hidden states in both: computing it once is exact, not an approximation.

`shared_prefixes` wraps the model's backbone for the length of one loss (or reference) computation. It packs the
micro-batch into one padding-free row: per pair, the common prefix, the rest of the chosen row, then the rest of
the rejected row, whose position ids jump back to the prefix length. chattune.training.kernels.attention reads that jump
as a branch (it attends to the prefix and to itself, never to the chosen answer). The hidden states are then
gathered back into TRL's padded layout, so TRL's head, loss types and metrics run unchanged, and the prefix's
gradient is the sum of what both answers send it, as in the two-row computation.

The activations of a DPO micro-batch of n pairs are then those of n prompts plus 2n answers, instead of 2n padded
prompt + answer rows: close to SFT's on the same n conversations.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from chattune.training.kernels.attention import VARLEN_SDPA

logger = logging.getLogger(__name__)

# what TRL's DPOTrainer passes the backbone besides input_ids and attention_mask; PEFT's model adds the other
# arguments of the forward, as None
PASSED_THROUGH = frozenset({"use_cache", "return_dict"})


@dataclass(frozen=True)
class PackedPairs:
    input_ids: torch.Tensor  # (1, packed tokens)
    position_ids: torch.Tensor  # (1, packed tokens): a rejected answer's jump back to its prompt's length
    gather: torch.Tensor  # (rows, columns): the packed token behind each position of the padded batch
    real: torch.Tensor  # (rows, columns) bool: not padding


def common_prefix_length(first: torch.Tensor, second: torch.Tensor) -> int:
    shortest = min(len(first), len(second))
    differ = (first[:shortest] != second[:shortest]).nonzero()
    return int(differ[0]) if len(differ) else shortest


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedPairs:
    """TRL's right-padded [chosen rows; rejected rows] as one row with each pair's common prefix once."""
    pairs = input_ids.shape[0] // 2
    lengths = attention_mask.sum(dim=1).tolist()
    ids = input_ids.cpu()
    gather = torch.zeros(input_ids.shape, dtype=torch.long)
    pieces, positions, offset = [], [], 0
    for chosen, rejected in zip(range(pairs), range(pairs, 2 * pairs)):
        chosen_length, rejected_length = lengths[chosen], lengths[rejected]
        shared = common_prefix_length(ids[chosen, :chosen_length], ids[rejected, :rejected_length])
        pieces += [ids[chosen, :chosen_length], ids[rejected, shared:rejected_length]]
        positions += [torch.arange(chosen_length), torch.arange(shared, rejected_length)]
        gather[chosen, :chosen_length] = offset + torch.arange(chosen_length)
        gather[rejected, :shared] = offset + torch.arange(shared)
        gather[rejected, shared:rejected_length] = offset + chosen_length + torch.arange(rejected_length - shared)
        offset += chosen_length + rejected_length - shared
    device = input_ids.device
    return PackedPairs(
        input_ids=torch.cat(pieces)[None].to(device),
        position_ids=torch.cat(positions)[None].to(device),
        gather=gather.to(device),
        real=attention_mask.bool(),
    )


def packable(input_ids: Any, attention_mask: Any, kwargs: dict) -> bool:
    """TRL's pair layout, right-padded, with nothing the packed row could not carry (a cache, embeddings)."""
    given = [kwargs[key] for key in set(kwargs) - PASSED_THROUGH if kwargs[key] is not None]
    if kwargs.get("use_cache") or any(value is not False for value in given):
        return False  # a cache, embeddings, per-layer outputs (in the packed layout) or router logits
    if not isinstance(input_ids, torch.Tensor) or not isinstance(attention_mask, torch.Tensor):
        return False
    if input_ids.dim() != 2 or input_ids.shape[0] % 2 or input_ids.shape != attention_mask.shape:
        return False
    right_padded = bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
    return right_padded and bool(attention_mask[:, 0].all())


def _pair_packed_forward(original: Any, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
    if not packable(input_ids, attention_mask, kwargs):
        return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    packed = pack_pairs(input_ids, attention_mask)
    outputs = original(input_ids=packed.input_ids, position_ids=packed.position_ids, **kwargs)
    hidden = outputs.last_hidden_state[0][packed.gather]  # (rows, columns, width); its backward sums the prefix
    outputs.last_hidden_state = hidden.masked_fill(~packed.real[..., None], 0.0)
    return outputs


def packable_backbone(model: Any) -> Any | None:
    """The transformer under the LM head of `model` (a PEFT model's too), when it attends with varlen SDPA."""
    if model is None:
        return None
    if hasattr(model, "get_base_model"):  # PEFT: LoRA layers sit inside the same backbone
        model = model.get_base_model()
    if getattr(model.config, "_attn_implementation", None) != VARLEN_SDPA:
        return None
    backbone = getattr(model, "base_model", None)
    return backbone if backbone is not None and backbone is not model else None


@contextlib.contextmanager
def shared_prefixes(*models: Any) -> Iterator[None]:
    """While inside, the backbones of `models` run TRL's pair batches with each pair's common prefix once."""
    backbones = {id(b): b for b in map(packable_backbone, models) if b is not None}.values()
    saved = [(backbone, backbone.__dict__.get("forward")) for backbone in backbones]
    for backbone, _ in saved:
        backbone.forward = functools.partial(_pair_packed_forward, backbone.forward)
    try:
        yield
    finally:
        for backbone, own_forward in saved:
            if own_forward is None:
                del backbone.forward
            else:
                backbone.forward = own_forward


def share_prompts(model: Any, per_example_attention: bool = True) -> bool:
    """Switch an SDPA model to varlen SDPA so that DPO can run each prompt once; False, logged, where it cannot.

    `per_example_attention` is off when the user chose --attn_implementation: their choice is kept.
    """
    from chattune.training.kernels.batching import plan_batching

    # the choice SFT's padding-free batches make (and the switch to varlen SDPA), for the same reasons
    plan = plan_batching(model, packing=False, per_example_attention=per_example_attention)
    if not per_example_attention:
        why = "--attn_implementation was given"
    elif plan.padding_free:  # examples are kept apart, but not by chattune's attention, which alone can branch
        why = "the model's attention is not SDPA, or has sliding-window layers"
    else:
        why = plan.reason
    shared = per_example_attention and getattr(model.config, "_attn_implementation", None) == VARLEN_SDPA
    if shared:
        logger.info("DPO: each pair's prompt runs once, its two answers branch from it (no padding)")
    else:
        logger.info("DPO: each pair runs as two padded rows (%s)", why)
    return shared


@contextlib.contextmanager
def labelled_positions_only() -> Iterator[None]:
    """While inside, TRL's fused LM head projects only the positions that have a label, on every device.

    TRL (trl/trainer/utils.py, `add_fused_lm_head`) does so only where its Triton kernels run; elsewhere it projects
    every position of the padded batch, prompt and padding included, to keep tile shapes fixed for compilers such as
    XLA. Eager PyTorch on a CPU compiles nothing, and there the full projection is what DPO's memory peaks on: a
    (positions x 32,768) fp32 tile and its temporaries, about 2 GB on SmolLM2's 49k vocabulary at 4 pairs of 370
    tokens. The positions kept are the answers' (the loss reads nothing else), so every figure is unchanged.
    """
    from trl.trainer import utils as trl_utils

    decides = getattr(trl_utils, "_use_triton", None)
    if decides is None:  # a TRL that decides otherwise: leave it be
        yield
        return
    trl_utils._use_triton = lambda device: decides(device) or device.type in ("cpu", "cuda")
    try:
        yield
    finally:
        trl_utils._use_triton = decides


class LeanDPO:
    """Mixed into TRL's DPOTrainer: its policy and reference passes run each pair's shared prompt once, and its
    head projects only the answers' positions."""

    def _compute_loss(self, model: Any, inputs: dict, return_outputs: bool) -> Any:
        with shared_prefixes(self.model, getattr(self, "ref_model", None)), labelled_positions_only():
            return super()._compute_loss(model, inputs, return_outputs)

    def compute_ref_log_probs(self, model: Any, inputs: dict) -> Any:
        with shared_prefixes(self.model, getattr(self, "ref_model", None)), labelled_positions_only():
            return super().compute_ref_log_probs(model, inputs)
