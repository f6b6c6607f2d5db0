"""Variable-length attention without the flash-attn package.

A padding-free row holds several examples, told apart by `position_ids` restarting at 0. flash-attn's
varlen kernel attends each example separately; stock SDPA instead builds one block-diagonal mask over
the whole row and pays for the full (row length)^2 score matrix, most of it masked out. On a CPU that makes
packing slower than padding. `chattune_varlen_sdpa` is registered with transformers' AttentionInterface:
for a packed row it attends each example on its own (cost: the sum of the squared example lengths, as with
padding, but no padding), and for anything else it is plain SDPA.

On CUDA it uses PyTorch's own varlen flash kernel (`torch.nn.attention.varlen`, one call per layer);
elsewhere, or where that kernel refuses the inputs, one SDPA call per example.

A row can also branch: where the position ids jump back to some p > 0 instead of counting on, the tokens that
follow continue the current example after its first p tokens, not after the token before them. DPO packs a
pair that way, shared prompt once and then both answers (chattune.training.kernels.shared_prefix); each branch
attends to that prefix and to itself, never to the other answer.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

logger = logging.getLogger(__name__)

VARLEN_SDPA = "chattune_varlen_sdpa"
# cuDNN's attention plans a graph per new sequence length: per-example calls would re-plan all the time
WITHOUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _torch_varlen_kernel() -> Any | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


TORCH_VARLEN = _torch_varlen_kernel()
# its keyword arguments changed between torch releases (is_causal -> window_size, enable_gqa added)
TORCH_VARLEN_OPTIONS = frozenset(inspect.signature(TORCH_VARLEN).parameters) if TORCH_VARLEN else frozenset()
_bounds_cache: dict[str, Any] = {}


def _once_per_forward(name: str, position_ids: torch.Tensor, compute: Any) -> Any:
    """`compute()` once per forward pass: every layer gets the same position_ids tensor, and a weak reference
    makes sure a later batch that happens to reuse its memory is never mistaken for it."""
    cached = _bounds_cache.get(name)
    if cached is not None and cached[0]() is position_ids:
        return cached[1]
    result = compute()
    _bounds_cache[name] = (weakref.ref(position_ids), result)
    return result


def cumulative_lengths(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """flash-attention's `cu_seqlens` (int32, starts of each example plus the total) and the longest example."""
    return _once_per_forward("bounds", position_ids, lambda: _cumulative_lengths(position_ids))


def _cumulative_lengths(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    flat = position_ids.flatten()
    starts = (flat == 0).nonzero().flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu_seqlens = torch.cat([starts, starts.new_full((1,), flat.numel())]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


# A run of a packed row: tokens [start, end) attend to themselves causally, after the tokens
# [prefix_start, prefix_start + prefix_length) of their example (none for a run that starts an example).
Run = tuple[int, int, int, int]


def branched_runs(position_ids: torch.Tensor, batch: int, tokens: int) -> list[Run] | None:
    """The runs of a flattened (batch * tokens) row whose position ids branch; None when none branches."""
    return _once_per_forward("runs", position_ids, lambda: _branched_runs(position_ids, batch, tokens))


def _branched_runs(position_ids: torch.Tensor, batch: int, tokens: int) -> list[Run] | None:
    flat = position_ids.expand(batch, tokens).flatten()
    jumps = (flat[1:] != flat[:-1] + 1) & (flat[1:] != 0)
    jumps[tokens - 1 :: tokens] = False  # a new row always starts a new example
    if not bool(jumps.any()):
        return None
    positions = flat.tolist()
    row_starts = range(0, batch * tokens, tokens)
    example_starts = (flat == 0).nonzero().flatten().tolist()
    starts = sorted({*row_starts, *example_starts, *(jumps.nonzero().flatten() + 1).tolist()})
    runs: list[Run] = []
    example_start, first_run_end = 0, 0
    for start, end in zip(starts, [*starts[1:], batch * tokens]):
        prefix = positions[start]
        if prefix == 0 or start % tokens == 0:
            example_start, first_run_end, prefix = start, end, 0
        elif prefix > first_run_end - example_start:
            raise ValueError(
                f"position ids branch back to {prefix}, past the {first_run_end - example_start} tokens their "
                "example has before its first branch"
            )
        runs.append((start, end, example_start, prefix))
    return runs


def _attend_runs(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    runs: list[Run],
    **kwargs: Any,
) -> list[torch.Tensor]:
    """One SDPA call per run of (1, heads, tokens, head_dim) states; a branch also sees its prefix's keys."""
    pieces = []
    for start, end, prefix_start, prefix in runs:
        if prefix == 0:
            states = (key[:, :, start:end], value[:, :, start:end])
            mask = None
        else:
            before = slice(prefix_start, prefix_start + prefix)
            states = tuple(torch.cat([s[:, :, before], s[:, :, start:end]], dim=2) for s in (key, value))
            mask = branch_mask(end - start, prefix, query.device)
        pieces.append(sdpa_attention_forward(module, query[:, :, start:end], *states, mask, **kwargs)[0])
    return pieces


def branch_mask(length: int, prefix: int, device: torch.device) -> torch.Tensor:
    """(1, 1, length, prefix + length), True where attention is allowed: the whole prefix, then causal."""
    rows = torch.arange(length, device=device)[:, None]
    columns = torch.arange(prefix + length, device=device)[None, :]
    return ((columns < prefix) | (columns - prefix <= rows))[None, None]


def batch_lengths(position_ids: torch.Tensor, batch: int, tokens: int) -> tuple[torch.Tensor, int]:
    """`cumulative_lengths` over the (batch * tokens) flattened batch, also when one row of position ids is
    shared by every row of the batch. Examples never cross rows: each row starts with position 0."""
    cu_seqlens, longest = cumulative_lengths(position_ids)
    if position_ids.shape[0] != batch:
        row_starts = cu_seqlens[:-1]
        offsets = torch.arange(batch, device=row_starts.device, dtype=row_starts.dtype)[:, None] * tokens
        total = cu_seqlens.new_full((1,), batch * tokens)
        cu_seqlens = torch.cat([(row_starts[None] + offsets).flatten(), total])
    return cu_seqlens, longest


def flat_tokens(states: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens, head_dim) -> (batch * tokens, heads, head_dim), the varlen layout."""
    batch, heads, tokens, dim = states.shape
    return states.transpose(1, 2).reshape(batch * tokens, heads, dim)


def _torch_varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    longest: int,
    scaling: float | None,
) -> torch.Tensor:
    """PyTorch's varlen flash kernel over the flattened batch; returns (batch * tokens, heads, head_dim)."""
    heads = query.shape[1]
    causal = {"window_size": (-1, 0)} if "window_size" in TORCH_VARLEN_OPTIONS else {"is_causal": True}
    if key.shape[1] != heads:
        if "enable_gqa" in TORCH_VARLEN_OPTIONS:
            causal["enable_gqa"] = True
        else:
            key = key.repeat_interleave(heads // key.shape[1], dim=1)
            value = value.repeat_interleave(heads // value.shape[1], dim=1)
    return TORCH_VARLEN(
        flat_tokens(query),
        flat_tokens(key),
        flat_tokens(value),
        cu_seqlens,
        cu_seqlens,
        longest,
        longest,
        scale=scaling,
        **causal,
    )


_torch_varlen_failed: list[str] = []


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA per example when the row is packed (no mask, position ids restart), plain SDPA otherwise."""
    causal_without_mask = attention_mask is None and query.shape[2] > 1 and key.shape[2] == query.shape[2]
    if not causal_without_mask:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if position_ids is None:
        # the mask was skipped on the promise that position ids tell the examples apart
        raise RuntimeError(
            f"{type(module).__name__} does not pass position_ids to its attention, so {VARLEN_SDPA} cannot keep "
            "packed examples apart; train with --attn_implementation sdpa"
        )
    batch, heads, tokens, dim = query.shape
    runs = branched_runs(position_ids, batch, tokens)
    if runs is None:
        cu_seqlens, longest = batch_lengths(position_ids, batch, tokens)
        if query.is_cuda and TORCH_VARLEN is not None and not _torch_varlen_failed and not kwargs.get("dropout"):
            try:
                output = _torch_varlen_attention(query, key, value, cu_seqlens, longest, kwargs.get("scaling"))
                return output.reshape(batch, tokens, heads, dim), None
            except (RuntimeError, TypeError, ValueError) as error:  # an older kernel, a dtype or head size it refuses
                _torch_varlen_failed.append(str(error))
                logger.warning("torch varlen attention refused these inputs (%s); attending per example", error)
        bounds = cu_seqlens.tolist()
        runs = [(start, end, start, 0) for start, end in zip(bounds[:-1], bounds[1:])]
    # one SDPA call per run of the flattened batch (branches too, on every device): (1, heads, length, head_dim)
    query, key, value = (flat_tokens(states).transpose(0, 1)[None] for states in (query, key, value))
    with sdpa_kernel(WITHOUT_CUDNN):
        pieces = _attend_runs(module, query, key, value, runs, **kwargs)
    return torch.cat(pieces, dim=1).reshape(batch, tokens, heads, dim), None


def varlen_sdpa_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """No mask at all for unpadded training rows (the attention reads the examples from position ids).

    With padding or a KV cache (generation, evaluation) this is SDPA's own mask.
    """
    no_padding = attention_mask is None or bool(attention_mask.all())
    if no_padding and kwargs.get("q_offset", 0) == 0 and kwargs.get("kv_length") == kwargs.get("q_length"):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, varlen_sdpa_mask)


def has_sliding_window(config: Any) -> bool:
    """Sliding-window layers need their window in the mask; varlen_sdpa only knows full causal attention."""
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return True
    window = getattr(config, "sliding_window", None)
    return bool(window) and getattr(config, "use_sliding_window", True)


def use_varlen_sdpa(model: Any) -> bool:
    """Switch an SDPA model to per-example attention for padding-free batches; False where that is unsafe."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or has_sliding_window(config):
        return False
    model.set_attn_implementation(VARLEN_SDPA)
    return True
