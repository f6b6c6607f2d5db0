"""Loading the base model: precision, attention kernel, quantization, LoRA configuration."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from chattune.config.flags import FlagError, TrainFlags

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


def upcast_trainable_parameters(model: Any) -> None:
    """Trained float16 parameters (modules_to_save copies of a float16 base) to float32: float16 loss scaling
    unscales float32 gradients only. peft already upcasts the LoRA matrices themselves."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype == torch.float16:
            parameter.data = parameter.data.float()


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bfloat16 matrix instructions (AMX-BF16 or AVX512-BF16), where a bfloat16 matrix product
    runs several times faster than a float32 one; elsewhere oneDNN emulates it, slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


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
    if flags.load_in_4bit or flags.load_in_8bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise FlagError("--load_in_4bit/--load_in_8bit need bitsandbytes: pip install bitsandbytes")
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
        if importlib.util.find_spec("gptqmodel") is None:
            raise FlagError(
                "--load_as_gptq needs the maintained GPTQ backend: pip install gptqmodel optimum "
                "(auto-gptq is unmaintained and not supported by current transformers)"
            )
        from transformers import GPTQConfig

        return GPTQConfig(bits=4, use_exllama=False)
    return None


def describe_quantization(flags: TrainFlags) -> str:
    if flags.load_in_4bit:
        return "4-bit NF4 weights, double quantization (bitsandbytes)"
    if flags.load_in_8bit:
        return "8-bit weights (bitsandbytes)"
    return "GPTQ weights (gptqmodel)"


def load_model(flags: TrainFlags, dtype: torch.dtype, attn_implementation: str) -> Any:
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    quant = quantization_config(flags, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    model = AutoModelForCausalLM.from_pretrained(flags.base_model, **kwargs)
    if quant is not None:
        logger.info("loaded %s with %s", flags.base_model, describe_quantization(flags))
    model.config.use_cache = False  # the KV cache only costs memory during training
    return model


def embedding_module_names(model: Any) -> list[str]:
    """Short names of the input and output embedding modules (embed_tokens/lm_head, wte/lm_head, ...)."""
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    names = []
    for name, module in model.named_modules():
        if any(module is w for w in wanted if w is not None):
            names.append(name.rsplit(".", 1)[-1])
    return list(dict.fromkeys(names))


def lora_config(flags: TrainFlags, model: Any, tokens_added: bool) -> Any:
    from peft import LoraConfig

    targets: Any = _split(flags.lora_modules) or "all-linear"
    if flags.lora_layers is not None and targets == "all-linear":
        targets = block_linear_names(model)  # peft takes a layer subset only with named modules
    to_save = _split(flags.lora_modules_to_save) or []
    if tokens_added:
        missing = [n for n in embedding_module_names(model) if n not in to_save]
        if missing:
            to_save += missing
            logger.info(
                "new tokens were added: training %s in full next to the adapter (modules_to_save) so their "
                "embeddings learn",
                ", ".join(missing),
            )
    return LoraConfig(
        use_dora=flags.use_dora,
        use_rslora=flags.use_rslora,
        # loftq starts from peft's default and is set once the base is quantized (init_loftq); the others are peft's
        init_lora_weights=flags.lora_init if flags.lora_init in ("pissa", "olora", "gaussian") else True,
        layers_to_transform=last_layers(model, flags.lora_layers),
        r=flags.lora_rank,
        lora_alpha=flags.lora_alpha,
        lora_dropout=flags.lora_dropout,
        target_modules=targets,
        modules_to_save=to_save or None,
        task_type="CAUSAL_LM",
    )


def block_linear_names(model: Any) -> list[str]:
    """Short names of the linear projections inside the transformer blocks (q_proj, ..., down_proj)."""
    output = model.get_output_embeddings()
    names = [
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output
    ]
    return list(dict.fromkeys(names))


def last_layers(model: Any, count: int | None) -> list[int] | None:
    """Indices of the last `count` transformer blocks (None: every block)."""
    if count is None:
        return None
    total = model.config.num_hidden_layers
    if count > total:
        raise FlagError(f"--lora_layers {count}: the model has only {total} blocks")
    return list(range(total - count, total))


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]
