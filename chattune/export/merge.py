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
    itself (LoftQ), or was trained on a GPTQ checkpoint (which has no other weights), belongs on the quantized
    weights: with `trained_on_quantization` (the quantization config), the base is quantized (or read) as in
    training and dequantized, and the adapter merged onto that.
    """
    if not reload:
        return peft_model.merge_and_unload()
    from peft import PeftModel

    if trained_on_quantization is not None and trained_on_quantization.quant_method == "gptq":
        base = dequantized_gptq_model(base_model_path, dtype)
    else:
        base = load_model(base_model_path, dtype, quantization=trained_on_quantization)
        if trained_on_quantization is not None:
            base = base.dequantize(dtype=dtype)
    rows = peft_model.get_input_embeddings().weight.shape[0]
    if base.get_input_embeddings().weight.shape[0] != rows:
        base.resize_token_embeddings(rows)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def dequantized_gptq_model(path: str, dtype: torch.dtype) -> Any:
    """A GPTQ checkpoint with each packed layer turned back into an nn.Linear holding its dequantized weight: the
    weights a LoRA adapter trained against, to which a merge can add the adapter's delta (peft cannot merge into
    packed GPTQ layers, and transformers has no GPTQ dequantize). Loaded on the CPU with gptqmodel's torch kernel,
    which can dequantize wherever training ran."""
    from transformers import GPTQConfig

    model = load_model(path, dtype, quantization=GPTQConfig(bits=4, backend="torch"), device_map={"": "cpu"})
    packed = [(name, module) for name, module in model.named_modules() if hasattr(module, "qweight")]
    for name, module in packed:
        model.set_submodule(name, _dequantized_linear(module, dtype))
    model.hf_quantizer.remove_quantization_config(model)
    return model


def _dequantized_linear(packed: Any, dtype: torch.dtype) -> torch.nn.Linear:
    has_bias = getattr(packed, "bias", None) is not None
    linear = torch.nn.Linear(packed.in_features, packed.out_features, bias=has_bias, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(packed.dequantize_weight().T.to(dtype))  # packed layers hold in x out
        if has_bias:
            linear.bias.copy_(packed.bias.to(dtype))
    return linear
