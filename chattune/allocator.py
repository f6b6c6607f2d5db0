"""A scalable memory allocator for CPU training: train.py restarts itself with oneTBB's malloc preloaded.

Why: training on a CPU frees and reallocates gigabytes of activations every micro-batch, in tensors of a few to
a few tens of MB. glibc's malloc serves these from its heap, which fragments: on SmolLM2-135M's shape (LoRA,
micro-batch 8 x 320 tokens) the process peaked at 8.0 GB RSS for 3.9 GB of live tensors. Forcing glibc to
map each large tensor on its own (`MALLOC_MMAP_THRESHOLD_`) brings RSS down to the live size but makes every
step 60% slower (the kernel zeroes fresh pages on every allocation). oneTBB's scalable allocator caches freed
blocks by size class: 4.5 GB at the same speed (docs/performance.md).

An allocator replaces malloc only if it is loaded before the program starts (`LD_PRELOAD`), so
`use_scalable_allocator` re-executes the same command, same process id, with the library preloaded; a marker in
the environment stops it from doing so twice. PyTorch's own CPU launcher (`torch.backends.xeon.run_cpu`) preloads
jemalloc or tcmalloc the same way.

`CHATTUNE_ALLOCATOR` chooses: `auto` (default: oneTBB on Linux hosts without a GPU, when the `tbb` package is
installed), `tbbmalloc` (also with a GPU), `system` (glibc's malloc, no restart). An allocator already in
`LD_PRELOAD` (jemalloc, tcmalloc, ...) is left alone.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

ALLOCATOR_ENV = "CHATTUNE_ALLOCATOR"
REEXEC_MARKER = "CHATTUNE_ALLOCATOR_PRELOADED"
# the proxy (which replaces malloc, free, ...) finds its allocator by soname only, so both are preloaded
TBBMALLOC_LIBRARIES = ("libtbbmalloc.so.2", "libtbbmalloc_proxy.so.2")
CHOICES = ("auto", "tbbmalloc", "system")
# device nodes of the NVIDIA and AMD (ROCm) drivers: checked instead of importing torch, which takes seconds
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd")


def requested_allocator(environ: Mapping[str, str]) -> str:
    choice = environ.get(ALLOCATOR_ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise SystemExit(f"{ALLOCATOR_ENV}={choice!r} is not one of {', '.join(CHOICES)}")
    return choice


def find_tbbmalloc(prefixes: tuple[str, ...] | None = None) -> list[Path] | None:
    """oneTBB's allocator and its malloc replacement, as the `tbb` wheel installs them (<environment>/lib)."""
    for prefix in prefixes or (sys.prefix, sys.base_prefix):
        candidates = [Path(prefix) / "lib" / name for name in TBBMALLOC_LIBRARIES]
        if all(candidate.is_file() for candidate in candidates):
            return candidates
    return None


def has_gpu_device() -> bool:
    return any(Path(node).exists() for node in GPU_DEVICE_NODES)


def preload_plan(
    environ: Mapping[str, str], libraries: list[Path] | None, gpu: bool, platform: str = sys.platform
) -> str | None:
    """The new LD_PRELOAD to restart with, or None to run as is (the reason is what `active_allocator` logs)."""
    choice = requested_allocator(environ)
    if choice == "system" or REEXEC_MARKER in environ or not platform.startswith("linux") or not libraries:
        return None
    preloaded = environ.get("LD_PRELOAD", "")
    if "malloc" in preloaded:  # jemalloc, tcmalloc, mimalloc, tbbmalloc: the user's choice stands
        return None
    if choice == "auto" and gpu:
        return None
    return " ".join([*(str(library) for library in libraries), *([preloaded] if preloaded else [])])


def preload_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What a process started with `environ` needs in its environment to run on the malloc train.py would choose
    there: {"LD_PRELOAD": ...}, or {} to run as is. The benchmarks give it to the arms they start."""
    plan = preload_plan(environ, find_tbbmalloc(), has_gpu_device())
    return {"LD_PRELOAD": plan} if plan else {}


def use_scalable_allocator() -> None:
    """Restart this command with oneTBB's malloc preloaded, when `preload_plan` says so; otherwise return."""
    preload = preload_environment(os.environ)
    if not preload:
        return
    environ = {**os.environ, **preload, REEXEC_MARKER: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def active_allocator() -> str:
    """Which malloc this process runs on, in words, for the training log."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "the system's"
    # oneTBB's allocator replaces malloc only through its proxy; the others replace it themselves
    for library, name in (
        ("libtbbmalloc_proxy", "tbbmalloc"),
        ("libjemalloc", "jemalloc"),
        ("libtcmalloc", "tcmalloc"),
    ):
        if library in maps:
            return name
    choice = os.environ.get(ALLOCATOR_ENV, "auto")
    if sys.platform.startswith("linux") and choice != "system" and find_tbbmalloc() is None:
        return "glibc's (pip install tbb for less fragmentation on CPU)"
    return "glibc's"
