"""Folding a LoRA adapter into its base model's weights, for a merged model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from chattune.models.loading import load_model


def merge_adapter(
    peft_model: Any,
    base_model_path: str,
    reload: bool,
    dtype: torch.dtype,
    adapter_dir: Path,
    trained_on_quantization: Any | None = None,
) -> Any:
    """Fold the LoRA weights into the base weights.

    With `reload`, the base is loaded again in full precision and the saved adapter (with any fully
    trained modules) applied to it: a quantized base cannot absorb a LoRA delta exactly, and under FSDP or
    ZeRO-3 this process does not hold the full weights. An adapter that learned the quantization error
    itself (LoftQ) belongs on the quantized weights: with `trained_on_quantization` (the quantization config),
    the base is quantized as in training and dequantized, and the adapter merged onto that.
    """
    if not reload:
        return peft_model.merge_and_unload()
    from peft import PeftModel

    base = load_model(base_model_path, dtype, quantization=trained_on_quantization)
    if trained_on_quantization is not None:
        base = base.dequantize(dtype=dtype)
    rows = peft_model.get_input_embeddings().weight.shape[0]
    if base.get_input_embeddings().weight.shape[0] != rows:
        base.resize_token_embeddings(rows)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
