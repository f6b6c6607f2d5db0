"""LoRA: the adapter's configuration (targets, layers, DoRA, rsLoRA, inits, embeddings trained in full when tokens
were added) and the trained parameters float16 loss scaling needs in float32."""

from __future__ import annotations

import logging
from typing import Any

import torch

from chattune.config.flags import FlagError, TrainFlags

logger = logging.getLogger(__name__)


def upcast_trainable_parameters(model: Any) -> None:
    """Trained float16 parameters (modules_to_save copies of a float16 base) to float32: float16 loss scaling
    unscales float32 gradients only. peft already upcasts the LoRA matrices themselves."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype == torch.float16:
            parameter.data = parameter.data.float()


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
    if targets == "all-linear" and (flags.lora_layers is not None or flags.load_as_gptq):
        # peft takes a layer subset only with named modules, and its all-linear finds no GPTQ layer (no nn.Linear)
        targets = block_linear_names(model)
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
    """Short names of the linear projections inside the transformer blocks (q_proj, ..., down_proj): nn.Linear, or
    GPTQ's packed layers (a `qweight` in place of the weight)."""
    output = model.get_output_embeddings()
    names = [
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if (isinstance(module, torch.nn.Linear) or hasattr(module, "qweight")) and module is not output
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
