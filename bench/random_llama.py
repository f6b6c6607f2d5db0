"""The random-weight Llama both benchmarks train: SmolLM2-135M's architecture, or a toy one, saved with a tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# SmolLM2-135M's architecture (its config.json), with random weights: the real model's cost without its file.
SMOLLM2_135M: dict[str, Any] = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
)


def save_random_llama(folder: Path, shape: dict[str, Any], tokenizer: Any, seed: int, max_positions: int) -> Any:
    """A Llama of `shape` (tied embeddings, the tokenizer's special ids) with seeded random weights, saved with
    `tokenizer` into `folder`; returns the model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **shape,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model
