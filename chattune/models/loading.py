"""Loading a model: the training dtype, the attention kernel, quantization; a model folder, hub id, GGUF file or
LoRA adapter folder loaded in transformers, for every command."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from chattune.config.flags import FlagError, TrainFlags, check_quantization_packages
from chattune.models.errors import ModelError
from chattune.models.gguf import resolve_model
from chattune.models.tokenizer import resize_embeddings

logger = logging.getLogger(__name__)


FP16_NEEDS_GPU = (
    "--fp16 needs a CUDA GPU: float16 loss scaling is for GPUs without bfloat16 (T4, V100). On a CPU train in "
    "float32 (no precision flag), or with --bf16 where the CPU has AMX or AVX512-BF16 (docs/training.md)"
)


def check_precision_hardware(flags: TrainFlags) -> None:
    """--fp16 on a machine without a CUDA GPU is refused before any data or model is loaded."""
    if flags.fp16 and not torch.cuda.is_available():
        raise FlagError(FP16_NEEDS_GPU)


def choose_dtype(bf16: bool, fp16: bool = False) -> torch.dtype:
    """The compute dtype: float16 with --fp16 (a GPU), bfloat16 where the hardware runs it, else float32."""
    if fp16:
        if not torch.cuda.is_available():
            raise FlagError(FP16_NEEDS_GPU)
        return torch.float16
    if not bf16:
        return torch.float32
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        logger.warning("--bf16: this GPU does not support bfloat16; training in float32 (--fp16 runs on it)")
        return torch.float32
    if _cpu_has_bf16():
        return torch.bfloat16
    logger.warning("--bf16: this CPU has no native bfloat16 support; training in float32")
    return torch.float32


def weight_dtype(flags: TrainFlags, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype the model's weights are loaded in, given the dtype its matrix products run in.

    Frozen weights (LoRA, QLoRA) can sit in bfloat16 or float16. Trained weights stay float32 under autocast:
    at fine-tuning learning rates a bfloat16 weight (8 significant bits) rounds most AdamW updates away, and
    float16 loss scaling refuses float16 gradients.
    """
    trains_base_weights = not flags.use_lora and not flags.quantized
    half = compute_dtype in (torch.bfloat16, torch.float16)
    if half and trains_base_weights and not (flags.pure_bf16 and compute_dtype == torch.bfloat16):
        return torch.float32
    return compute_dtype


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_attention(requested: str | None) -> str:
    """flash_attention_2 needs a GPU and the flash-attn package; fall back to SDPA with a message."""
    if requested in (None, "flash_attention_2"):
        usable = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
        if usable:
            return "flash_attention_2"
        if requested:
            logger.warning(
                "flash_attention_2 needs a CUDA GPU and `pip install flash-attn`; using sdpa instead "
                "(packed examples stay isolated through position ids)"
            )
        return "sdpa"
    return requested


def quantization_config(flags: TrainFlags, dtype: torch.dtype) -> Any | None:
    check_quantization_packages(flags)
    if flags.load_in_4bit or flags.load_in_8bit:
        from transformers import BitsAndBytesConfig

        if flags.load_in_8bit:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if flags.load_as_gptq:
        from transformers import GPTQConfig

        # A GPTQ checkpoint's own quantization_config (bits, group size, format) is used as saved; of the config
        # passed here transformers 5 takes only the loading attributes, `backend` and `max_input_length`
        # (use_exllama and the like are dropped). auto_trainable lets gptqmodel pick a kernel that has a
        # backward pass on this device, as LoRA training needs.
        return GPTQConfig(bits=4, backend="auto_trainable")
    return None


def quantized_device_map(flags: TrainFlags) -> dict[str, Any] | None:
    """Where a GPTQ model's layers go: transformers' GPTQ quantizer puts them on the CPU unless told, so each
    process places the whole model on its own GPU (LOCAL_RANK under accelerate/torchrun)."""
    if not flags.load_as_gptq:
        return None
    if torch.cuda.is_available():
        return {"": f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"}
    return {"": "cpu"}


def describe_quantization(flags: TrainFlags) -> str:
    if flags.load_in_4bit:
        return "4-bit NF4 weights, double quantization (bitsandbytes)"
    if flags.load_in_8bit:
        return "8-bit weights (bitsandbytes)"
    return "GPTQ weights (gptqmodel)"


def load_model(
    name_or_path: str,
    dtype: torch.dtype,
    attn_implementation: str | None = None,
    quantization: Any | None = None,
    device_map: dict[str, Any] | None = None,
) -> Any:
    """A causal LM from a model folder, hub id or GGUF file (converted once, then loaded from its folder), in `dtype`,
    with the attention kernel, quantization config and device map given (transformers' own choice where None)."""
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if device_map is not None:
        kwargs["device_map"] = device_map
    return AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path), **kwargs)


def load_adapter(folder: Path, base: str, tokenizer: Any, dtype: torch.dtype) -> Any:
    """A LoRA adapter folder on its base model (load_model), the base's embeddings grown to the adapter's tokenizer."""
    from peft import PeftModel
    from transformers import GenerationConfig

    try:
        model = load_model(base, dtype)
    except OSError as error:
        named = f"{base!r} named in adapter_config.json"
        raise ModelError(f"{folder}: cannot load the base model {named}: {error}") from None
    # train.py grows the embeddings when it adds tokens; the adapter's saved embeddings have that size.
    resize_embeddings(model, tokenizer)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return PeftModel.from_pretrained(model, str(folder))
