"""The device and the dtype a model runs in, chosen from what the machine has; torch is imported only when asked
(evaluate.py --help answers without it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chattune.models.errors import ModelError


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bfloat16 matrix instructions (AMX-BF16 or AVX512-BF16), where a bfloat16 matrix product
    runs several times faster than a float32 one; elsewhere oneDNN emulates it, slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def pick_device(requested: str) -> str:
    """`auto`: the CUDA GPU when torch sees one, else the CPU; `cuda` refused where torch sees none."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA GPU is visible to torch")
    return requested


def pick_dtype(requested: str, device: str) -> Any:
    """The dtype a model generates in: `auto` picks the fastest that keeps greedy decoding unchanged."""
    import torch

    if requested == "auto":
        # bfloat16 halves GPU memory at no visible cost to greedy decoding; CPUs without bfloat16 instructions
        # are fastest in float32, those with AMX or AVX512-BF16 several times faster in bfloat16.
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]
