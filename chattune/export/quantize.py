"""k-quants and llama.cpp's other quantization types, made by llama.cpp's own quantizer.

chattune writes f32, f16 and q8_0 itself (chattune.export.gguf). Every other type is made the way llama.cpp's
`llama-quantize` makes it, from the f16 file, through the `llama_model_quantize` binding of llama-cpp-python:
the k-quants' per-tensor choices (Q6_K for the output matrix, a higher type for some attention and feed-forward
tensors in _M mixes, fallbacks for rows that are not a multiple of 256 wide) are llama.cpp's and stay in step
with it, rather than being re-implemented here.

The quantizer runs in a child process. `llama_model_quantize` cannot be cancelled, and while it runs a signal
reaches Python only inside llama.cpp's log callback, where ctypes swallows the KeyboardInterrupt ("Exception
ignored on calling ctypes callback function"): Ctrl-C would not stop it, and the export would finish and exit 0.
The parent waits in Python, where SIGINT/SIGTERM raise as usual; it then kills the child and removes its file.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gguf

from chattune.atomic import DiskFullError, atomic_path
from chattune.config.outtypes import LLAMA_QUANT_NAMES, QuantizeError, require_quantizer

__all__ = ["LLAMA_QUANT_TYPES", "QuantizeError", "describe_tensor_types", "quantize_gguf", "require_quantizer"]

logger = logging.getLogger(__name__)

LLAMA_QUANT_TYPES: dict[str, gguf.LlamaFileType] = {
    name: gguf.LlamaFileType[f"MOSTLY_{name.upper()}"] for name in LLAMA_QUANT_NAMES
}


def quantize_gguf(source: str | os.PathLike, out: str | os.PathLike, outtype: str, threads: int | None = None) -> Path:
    """Quantize the GGUF file `source` (f16 or f32) to `outtype` into `out`, atomically; returns `out`.
    A signal meanwhile stops llama.cpp's quantizer and leaves no part of `out`."""
    if outtype not in LLAMA_QUANT_TYPES:
        raise QuantizeError(f"unknown quantization type {outtype!r}: choose one of {', '.join(LLAMA_QUANT_TYPES)}")
    require_quantizer(outtype)
    source, out = Path(source), Path(out)
    threads = threads or len(os.sched_getaffinity(0))
    logger.info("quantizing %s to %s with llama.cpp", source.name, outtype)
    with atomic_path(out) as staging:
        status, log = _run_quantizer(source, staging, int(LLAMA_QUANT_TYPES[outtype]), threads)
        if status != 0:
            # llama.cpp reports the cause in its log and returns 1; a full disk is the one cause worth naming here.
            if shutil.disk_usage(out.parent).free < source.stat().st_size // 4:
                raise DiskFullError(f"disk full while writing {out} (llama.cpp's quantizer failed); nothing was kept")
            said = log.strip().splitlines()[-3:]
            raise QuantizeError(f"llama.cpp could not quantize {source} to {outtype}: {' / '.join(said)}")
    logger.info("%s holds %s", out.name, describe_tensor_types(out))
    return out


# The child: llama_model_quantize with the default parameters but the type and threads; its status is the exit
# status, its log (a line per tensor) goes to stderr. Ctrl-C at a terminal reaches it too: it then dies at once
# rather than swallowing the signal as the parent would.
_QUANTIZER = """
import ctypes, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
import llama_cpp
source, out, ftype, threads = sys.argv[1:]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = int(ftype), int(threads)
sys.exit(llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params)))
"""


def _run_quantizer(source: Path, out: Path, ftype: int, threads: int) -> tuple[int, str]:
    """llama.cpp's quantizer in a child process: its status and log. On any exception here (a signal), the child
    is killed and waited for before the exception goes on, so that nothing writes `out` after it is removed."""
    command = [sys.executable, "-c", _QUANTIZER, str(source), str(out), str(ftype), str(threads)]
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, log = child.communicate()
    except BaseException:
        child.kill()
        child.wait()
        raise
    return child.returncode, log.decode("utf-8", errors="replace")


def describe_tensor_types(path: Path) -> str:
    """How many tensors of each storage type a GGUF file holds, e.g. "169 Q4_K, 31 Q6_K, 61 F32": k-quants fall
    back to other types for rows that are not a multiple of 256 wide, and this says how much of a file did."""
    counts = Counter(tensor.tensor_type.name for tensor in gguf.GGUFReader(path).tensors)
    return ", ".join(f"{count} {name}" for name, count in counts.most_common())
