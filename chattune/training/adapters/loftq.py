"""`--lora_init loftq`: a QLoRA adapter that starts as the low-rank part of the 4-bit quantization error.

LoftQ (arXiv 2310.08659) initialises B and A so that Q + scaling * B @ A is as close as rank r allows to the
original weight W, instead of starting from Q alone. peft's `replace_lora_weights_loftq` does this on CUDA or
XPU only, and leaves out the adapter's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA), so the start is
only right when that scaling is 1. This module does the same one-shot step on whatever device the weights are,
with the scaling divided out, using peft's 4-bit LoRA layer and bitsandbytes' dequantization.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from chattune.config.flags import FlagError, TrainFlags

logger = logging.getLogger(__name__)
PEFT_PREFIX = "base_model.model."


def check_loftq_weights(flags: TrainFlags) -> None:
    """Before any work: LoftQ reads the original (unquantized) weights from the base model's safetensors files."""
    if flags.lora_init != "loftq":
        return
    folder = Path(flags.base_model)
    if folder.is_dir() and not list(folder.glob("*.safetensors")):
        raise FlagError(
            f"--lora_init loftq reads the original weights of {folder} from .safetensors files, and it has none: "
            "save the model with safetensors (save_pretrained's default) or drop --lora_init loftq"
        )


def original_weights(base_model: str) -> dict[str, tuple[Path, str]]:
    """Where each tensor of the base model's safetensors files is: name -> (file, name)."""
    from safetensors import safe_open

    folder = Path(base_model)
    if not folder.is_dir():  # a hub id: the files from_pretrained just read, from the local cache
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(base_model, local_files_only=True, allow_patterns=["*.safetensors"]))
    index = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            index.update({name: (path, name) for name in handle.keys()})
    return index


def read_tensor(location: tuple[Path, str]) -> torch.Tensor:
    from safetensors import safe_open

    path, name = location
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name)


def low_rank_residual(original: torch.Tensor, dequantized: torch.Tensor, rank: int) -> tuple[torch.Tensor, ...]:
    """B (out x r) and A (r x in) with B @ A the best rank-r approximation of original - dequantized."""
    residual = original.to(dequantized.device, torch.float32) - dequantized.float()
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def dequantized_weight(weight: Any) -> torch.Tensor:
    """A 4-bit weight in full precision, as its layer computes with it."""
    from bitsandbytes.functional import dequantize_4bit

    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks a weight for its AVX512-BF16 CPU kernel after an inference forward pass; that layout
        # dequantizes to scrambled values, so unpack a copy first
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
    return dequantize_4bit(data, state)


def init_loftq(peft_model: Any, base_model: str, adapter: str = "default") -> int:
    """Set every 4-bit LoRA layer's B and A to the scaled low-rank quantization error; returns how many."""
    from peft.tuners.lora.bnb import Linear4bit

    weights = original_weights(base_model)
    done = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, Linear4bit) or adapter not in module.lora_A:
            continue
        key = name.removeprefix(PEFT_PREFIX) + ".weight"
        if key not in weights:
            raise FlagError(f"--lora_init loftq: {base_model} has no tensor {key} in its safetensors files")
        b, a = low_rank_residual(read_tensor(weights[key]), dequantized_weight(module.weight), module.r[adapter])
        lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        lora_a.data = a.to(lora_a.device, lora_a.dtype)
        # peft multiplies B @ A by the scaling in the forward pass: divide it out so the start is Q + (W - Q)_r
        lora_b.data = (b / module.scaling[adapter]).to(lora_b.device, lora_b.dtype)
        done += 1
    if not done:
        raise FlagError("--lora_init loftq found no 4-bit LoRA layer: it needs --load_in_4bit and --use_lora")
    logger.info("LoftQ: %d adapted layers start at the low-rank part of their quantization error", done)
    return done
