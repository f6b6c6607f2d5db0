"""Cross-entropy over the labelled positions only, for SFT on assistant tokens.

Chat SFT labels a small share of the tokens (the assistant turns), yet a causal LM's head projects every
position onto the whole vocabulary. `LabelledLogitsLossMixin` asks the model for the logits of the labelled
positions only (`logits_to_keep` = the positions whose *next* token carries a label), then takes the
cross-entropy over them in row chunks, so neither a full `(tokens, vocab)` fp32 copy nor its log-softmax
is ever held. The loss, its gradients and TRL's logged metrics are the same as TRL's own `compute_loss`.

When it applies: TRL 1.16's `SFTTrainer` already projects through a fused, tiled LM head. On CUDA/XPU
with Triton that head scores the labelled positions only and never materialises their logits, which is
leaner than this module, so there the trainer keeps TRL's loss. Elsewhere (CPU, MPS, ...) TRL's head
scores *every* position in 4096 x 32768 tiles with several fp32 temporaries per tile; there the
labelled-only logits are leaner.

`CHATTUNE_LEAN_LOSS` overrides the choice: `1` always uses this loss, `0` never (TRL's own loss), unset or
`auto` decides per device as above.

`--loss_reduction sequences` always uses this loss, on every device: TRL's averages over tokens only. Each
example's NLL is averaged over its own labelled tokens, then the examples are averaged over the whole optimizer
step (every micro-batch of the accumulation, on every process), as transformers does for tokens with
`num_items_in_batch`: here that count is the number of examples with a labelled token.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch

from chattune.data.masking import IGNORE_INDEX
from chattune.errors import ChattuneError

LEAN_LOSS_ENV = "CHATTUNE_LEAN_LOSS"
# Elements of one fp32 working chunk (rows x vocabulary): 2**22 = 16 MiB, ~28 rows of a 150k vocabulary. Larger
# chunks buy no speed on a CPU and add their size (a few times over, for temporaries) to the peak.
CHUNK_ELEMENTS = 1 << 22


def lean_loss_mode() -> str:
    """`on`, `off` or `auto`, from the CHATTUNE_LEAN_LOSS environment variable."""
    value = os.environ.get(LEAN_LOSS_ENV, "auto").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return "on"
    if value in ("0", "false", "no", "off"):
        return "off"
    return "auto"


def kept_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence indices t whose next-token label labels[:, t + 1] is set, in any row (a 1-D long tensor).

    The logit at t predicts the token at t + 1, so the last position never needs one. With several rows
    (padded batches) the union is kept; rows without a label there are masked out of the loss.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()


@dataclass
class TokenStats:
    """Per kept position: negative log-likelihood (differentiable), entropy, top-1 hit; zero where unlabelled."""

    nll: torch.Tensor
    entropy: torch.Tensor
    is_top1: torch.Tensor
    mask: torch.Tensor


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """NLL of `targets` under `logits` (N, V), one row chunk at a time in fp32.

    Only the logits (already held) and one log-normaliser per row are kept for backward, which rebuilds
    softmax - one_hot chunk by chunk; `F.cross_entropy` would keep a full fp32 log-softmax instead.
    Entropy and top-1 hits come out of the same pass, without gradient, for TRL's metrics.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows = logits.shape[0]
        nll = logits.new_zeros(rows, dtype=torch.float32)
        entropy = torch.zeros_like(nll)
        is_top1 = torch.zeros(rows, dtype=torch.bool, device=logits.device)
        log_norm = torch.zeros_like(nll)
        mask = targets != IGNORE_INDEX
        safe_targets = targets.clamp(min=0)
        step = _rows_per_chunk(logits.shape[1])
        for start in range(0, rows, step):
            chunk = slice(start, start + step)
            z = logits[chunk].float()
            # one max serves the stable log-sum-exp and the top-1 check (the first maximum, like TRL's kernel)
            top, top_index = z.max(dim=-1)
            shifted = torch.exp(z - top[:, None])
            total = shifted.sum(-1)
            lse = top + torch.log(total)
            log_norm[chunk] = lse
            nll[chunk] = lse - z.gather(1, safe_targets[chunk, None]).squeeze(1)
            entropy[chunk] = lse - (shifted.mul_(z)).sum(-1) / total
            is_top1[chunk] = top_index == safe_targets[chunk]
        nll, entropy, is_top1 = nll * mask, entropy * mask, is_top1 & mask
        ctx.save_for_backward(logits, safe_targets, mask, log_norm)
        ctx.mark_non_differentiable(entropy, is_top1)
        return nll, entropy, is_top1

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor | None, *_: Any) -> tuple[torch.Tensor | None, None]:
        logits, targets, mask, log_norm = ctx.saved_tensors
        if grad_nll is None:
            return None, None
        scale = grad_nll.float() * mask
        grad = torch.empty_like(logits)
        step = _rows_per_chunk(logits.shape[1])
        for start in range(0, logits.shape[0], step):
            chunk = slice(start, start + step)
            # d nll / d z = softmax(z) - one_hot(target), built in place in one fp32 chunk
            probs = (logits[chunk].float() - log_norm[chunk, None]).exp_()
            rows = torch.arange(probs.shape[0], device=probs.device)
            probs[rows, targets[chunk]] -= 1.0
            grad[chunk] = probs.mul_(scale[chunk, None])
        return grad, None


def labelled_token_stats(logits: torch.Tensor, targets: torch.Tensor) -> TokenStats:
    """Per-position NLL, entropy and top-1 hits of `logits` (..., V) against `targets` (...)."""
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1).to(flat_logits.device)
    nll, entropy, is_top1 = _ChunkedCrossEntropy.apply(flat_logits, flat_targets)
    return TokenStats(nll, entropy, is_top1, flat_targets != IGNORE_INDEX)


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the (unwrapped, PEFT-stripped) model's forward takes `logits_to_keep`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(type(base).forward).parameters
    except (TypeError, ValueError):
        return False


def example_index(inputs: dict[str, Any]) -> torch.Tensor:
    """Which example each token belongs to, numbered across the micro-batch: (batch, length), like the labels.

    Padding-free and packed rows restart position_ids at 0 for every example; padded rows hold one example each.
    """
    labels = inputs["labels"]
    if "position_ids" in inputs:
        starts = inputs["position_ids"] == 0
        return starts.flatten().cumsum(0).reshape(labels.shape)
    return torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)


def labelled_example_count(inputs: dict[str, Any]) -> int:
    """Examples of a micro-batch with at least one labelled target (a label at position 1 or later)."""
    targets = inputs["labels"][:, 1:] != IGNORE_INDEX
    return example_index(inputs)[:, 1:][targets].unique().numel()


def mean_over_examples(stats: TokenStats, examples: torch.Tensor, count: Any) -> torch.Tensor:
    """Sum over examples of each one's mean NLL over its own labelled tokens, divided by `count` examples."""
    _, compact = examples.unique(return_inverse=True)
    sums = stats.nll.new_zeros(int(compact.max()) + 1 if compact.numel() else 0).index_add(0, compact, stats.nll)
    tokens = torch.zeros_like(sums).index_add(0, compact, stats.mask.float())
    per_example = sums / tokens.clamp(min=1)  # zero for examples without a labelled token (their sum is zero)
    return per_example.sum() / torch.as_tensor(count, device=sums.device).clamp(min=1)


class LossReductionError(ChattuneError):
    """--loss_reduction sequences asked of a trainer set-up whose loss TRL computes itself."""


def forward_kept_logits(
    model: Any, inputs: dict[str, Any], positions: torch.Tensor, takes_logits_to_keep: bool = True
) -> torch.Tensor:
    """The model's logits at `positions` only: (batch, len(positions), vocab)."""
    model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    # A KV cache turns off transformers' packed-sequence detection: padding-free rows would attend across examples.
    model_inputs["use_cache"] = False
    if takes_logits_to_keep:
        model_inputs["logits_to_keep"] = positions
    logits = model(**model_inputs).logits
    if logits.shape[1] != positions.numel():  # a model that ignored logits_to_keep: still right, just not lean
        logits = logits[:, positions.to(logits.device)]
    return logits


class LabelledLogitsLossMixin:
    """Mixed into TRL's SFTTrainer: `compute_loss` projects and scores only the labelled positions, and averages
    over tokens or, with `loss_reduction="sequences"`, over examples."""

    def __init__(self, *args: Any, loss_reduction: str = "tokens", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_reduction = loss_reduction
        if loss_reduction == "sequences":
            # the loss is divided by the whole step's example count, so transformers must not divide it again
            self.loss_is_scaled_for_ga = True

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The step's micro-batches, and what the loss divides by: tokens (transformers' count) or examples."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.loss_reduction == "sequences" and batch_samples:
            num_items = torch.tensor(sum(labelled_example_count(batch) for batch in batch_samples), device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                num_items = self.accelerator.gather(num_items).sum()
        return batch_samples, num_items

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if return_outputs or not self._lean_loss_applies(model, inputs):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        labels = inputs["labels"]
        positions = kept_positions(labels)
        logits = forward_kept_logits(model, inputs, positions, self._model_takes_logits_to_keep(model))
        stats = labelled_token_stats(logits, labels[:, positions + 1])
        if self.loss_reduction == "sequences":
            examples = example_index(inputs)[:, positions + 1].reshape(-1)
            count = labelled_example_count(inputs) if num_items_in_batch is None else num_items_in_batch
            loss = mean_over_examples(stats, examples, count)
        else:
            count = stats.mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = stats.nll.sum() / torch.as_tensor(count, device=stats.nll.device).clamp(min=1)
        loss = self._undo_process_mean(loss, num_items_in_batch)
        self._record_token_metrics(inputs, stats)
        return loss

    def _undo_process_mean(self, loss: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
        """The loss over the whole (accumulated, multi-process) batch, as TRL and transformers normalise it."""
        # num_items_in_batch counts every rank's tokens while DDP averages the gradients: undo that mean
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    def _record_token_metrics(self, inputs: dict[str, Any], stats: TokenStats) -> None:
        """`entropy`, `mean_token_accuracy` and `num_tokens`, computed as TRL's SFTTrainer.compute_loss does."""
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        num_valid = gather(stats.mask.sum()).sum()
        entropy_sum = gather(stats.entropy.detach().sum()).sum()
        num_correct = gather(stats.is_top1.sum()).sum()
        metrics = self._metrics[mode]
        metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += self._tokens_in_batch(inputs) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

    def _tokens_in_batch(self, inputs: dict[str, Any]) -> int:
        # padding-free batches carry position_ids instead of an attention mask, and hold no padding
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        else:
            local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        return self.accelerator.gather_for_metrics(local).sum().item()

    def _lean_loss_applies(self, model: Any, inputs: dict[str, Any]) -> bool:
        """Plain next-token NLL on a model that takes logits_to_keep, where it is leaner than TRL's fused head;
        always for --loss_reduction sequences, which TRL's loss cannot do."""
        if "labels" not in inputs:
            return False
        unsupported = self._set_up_for_trl_loss(inputs)
        if self.loss_reduction == "sequences":
            if unsupported:
                raise LossReductionError(f"--loss_reduction sequences cannot be combined with {unsupported}")
            return True
        mode = lean_loss_mode()
        if mode == "off" or unsupported:
            return False
        if mode == "auto" and _trl_head_is_compact(inputs["labels"].device):
            return False
        return self._model_takes_logits_to_keep(model)

    def _set_up_for_trl_loss(self, inputs: dict[str, Any]) -> str | None:
        """The loss variant or parallel layout that TRL handles itself (custom losses, label smoothing, DFT, MoE
        aux loss, sequence/context parallelism), if any."""
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        reasons = {
            "sequence or context parallelism": "shift_labels" in inputs
            or any(getattr(parallelism, flag, False) for flag in ("sp_enabled", "cp_enabled")),
            "a custom loss function": self.compute_loss_func is not None,
            "label smoothing": self.label_smoother is not None,
            f"loss_type {self.args.loss_type}": self.args.loss_type != "nll",
            "a mixture-of-experts auxiliary loss": getattr(self, "aux_loss_enabled", False),
        }
        return next((reason for reason, applies in reasons.items() if applies), None)

    def _model_takes_logits_to_keep(self, model: Any) -> bool:
        cached = getattr(self, "_chattune_logits_to_keep", None)
        if cached is None:
            cached = accepts_logits_to_keep(self.accelerator.unwrap_model(model))
            self._chattune_logits_to_keep = cached
        return cached


def _trl_head_is_compact(device: torch.device) -> bool:
    """True where TRL's fused LM head already scores only the labelled positions (Triton on CUDA/XPU)."""
    try:
        from trl.kernels.chunked_logprob import _use_triton
    except ImportError:  # another TRL layout: assume its head is not compact
        return False
    return _use_triton(device)
