"""k-quants and llama.cpp's other quantization types, made by llama.cpp's own quantizer.

chattune writes f32, f16 and q8_0 itself (chattune.export.gguf). Every other type is made the way llama.cpp's
`llama-quantize` makes it, from the f16 file, through the `llama_model_quantize` binding of llama-cpp-python:
the k-quants' per-tensor choices (Q6_K for the output matrix, a higher type for some attention and feed-forward
tensors in _M mixes, fallbacks for rows that are not a multiple of 256 wide) are llama.cpp's and stay in step
with it, rather than being re-implemented here.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf

from chattune.atomic import DiskFullError, atomic_path
from chattune.export.outtypes import LLAMA_QUANT_NAMES, QuantizeError, require_quantizer

__all__ = ["LLAMA_QUANT_TYPES", "QuantizeError", "describe_tensor_types", "quantize_gguf", "require_quantizer"]

logger = logging.getLogger(__name__)

LLAMA_QUANT_TYPES: dict[str, gguf.LlamaFileType] = {
    name: gguf.LlamaFileType[f"MOSTLY_{name.upper()}"] for name in LLAMA_QUANT_NAMES
}


def quantize_gguf(source: str | os.PathLike, out: str | os.PathLike, outtype: str, threads: int | None = None) -> Path:
    """Quantize the GGUF file `source` (f16 or f32) to `outtype` into `out`, atomically; returns `out`."""
    if outtype not in LLAMA_QUANT_TYPES:
        raise QuantizeError(f"unknown quantization type {outtype!r}: choose one of {', '.join(LLAMA_QUANT_TYPES)}")
    require_quantizer(outtype)
    import llama_cpp

    source, out = Path(source), Path(out)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(LLAMA_QUANT_TYPES[outtype])
    params.nthread = threads or len(os.sched_getaffinity(0))
    logger.info("quantizing %s to %s with llama.cpp", source.name, outtype)
    with atomic_path(out) as staging, _captured_llama_log(llama_cpp) as log:
        status = llama_cpp.llama_model_quantize(
            str(source).encode("utf-8"), str(staging).encode("utf-8"), ctypes.byref(params)
        )
        if status != 0:
            # llama.cpp reports the cause on stderr and returns 1; a full disk is the one cause worth naming here.
            if shutil.disk_usage(out.parent).free < source.stat().st_size // 4:
                raise DiskFullError(f"disk full while writing {out} (llama.cpp's quantizer failed); nothing was kept")
            said = "".join(log).strip().splitlines()[-3:]
            raise QuantizeError(f"llama.cpp could not quantize {source} to {outtype}: {' / '.join(said)}")
    logger.info("%s holds %s", out.name, describe_tensor_types(out))
    return out


def describe_tensor_types(path: Path) -> str:
    """How many tensors of each storage type a GGUF file holds, e.g. "169 Q4_K, 31 Q6_K, 61 F32": k-quants fall
    back to other types for rows that are not a multiple of 256 wide, and this says how much of a file did."""
    counts = Counter(tensor.tensor_type.name for tensor in gguf.GGUFReader(path).tensors)
    return ", ".join(f"{count} {name}" for name, count in counts.most_common())


@contextlib.contextmanager
def _captured_llama_log(llama_cpp: Any) -> Iterator[list[str]]:
    """llama.cpp's log while the block runs, as lines, instead of on stderr: its quantizer writes a line per
    tensor, and one more per tensor that falls back to another type. The lines are shown when it fails."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level: int, text: bytes, user_data: Any) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        from llama_cpp import _logger  # llama-cpp-python's own callback, which it set on import

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
