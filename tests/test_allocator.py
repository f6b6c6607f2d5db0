"""train.py restarts itself with oneTBB's malloc preloaded on CPU hosts (chattune/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chattune.allocator import (
    ALLOCATOR_ENV,
    REEXEC_MARKER,
    TBBMALLOC_LIBRARIES,
    find_tbbmalloc,
    preload_plan,
    requested_allocator,
)

REPO = Path(__file__).resolve().parents[1]
LIBS = [Path("/env/lib/libtbbmalloc.so.2"), Path("/env/lib/libtbbmalloc_proxy.so.2")]
PRELOAD = "/env/lib/libtbbmalloc.so.2 /env/lib/libtbbmalloc_proxy.so.2"


def test_auto_preloads_oneTBB_on_a_linux_host_without_gpu():
    assert preload_plan({}, LIBS, gpu=False, platform="linux") == PRELOAD


def test_an_earlier_preload_is_kept_after_the_allocator():
    plan = preload_plan({"LD_PRELOAD": "/x/libfoo.so"}, LIBS, gpu=False, platform="linux")
    assert plan == f"{PRELOAD} /x/libfoo.so"


@pytest.mark.parametrize(
    "environ, libraries, gpu, platform",
    [
        ({ALLOCATOR_ENV: "system"}, LIBS, False, "linux"),  # opted out
        ({REEXEC_MARKER: "1"}, LIBS, False, "linux"),  # already restarted once: never loop
        ({}, None, False, "linux"),  # tbb not installed
        ({}, LIBS, False, "darwin"),  # LD_PRELOAD is Linux's
        ({}, LIBS, True, "linux"),  # auto leaves GPU hosts alone
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, LIBS, False, "linux"),  # the user's allocator stands
    ],
)
def test_no_restart(environ, libraries, gpu, platform):
    assert preload_plan(environ, libraries, gpu=gpu, platform=platform) is None


def test_tbbmalloc_forces_it_on_a_gpu_host():
    assert preload_plan({ALLOCATOR_ENV: "tbbmalloc"}, LIBS, gpu=True, platform="linux") == PRELOAD


def test_an_unknown_choice_names_the_variable_and_the_choices():
    with pytest.raises(SystemExit, match="CHATTUNE_ALLOCATOR='jemalloc' is not one of auto, tbbmalloc, system"):
        requested_allocator({ALLOCATOR_ENV: "jemalloc"})


def test_find_tbbmalloc_needs_both_libraries(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / TBBMALLOC_LIBRARIES[1]).write_bytes(b"")
    assert find_tbbmalloc((str(tmp_path),)) is None
    (tmp_path / "lib" / TBBMALLOC_LIBRARIES[0]).write_bytes(b"")
    assert find_tbbmalloc((str(tmp_path),)) == [tmp_path / "lib" / name for name in TBBMALLOC_LIBRARIES]


PROBE = (
    "import os; from chattune.allocator import use_scalable_allocator, active_allocator; "
    "print(os.getpid(), flush=True); use_scalable_allocator(); print(os.getpid(), active_allocator())"
)


def run_probe(**environ: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", REEXEC_MARKER, ALLOCATOR_ENV)}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env={**env, **environ}, capture_output=True, text=True, check=True
    )
    return done.stdout.split()


@pytest.mark.skipif(find_tbbmalloc() is None or not sys.platform.startswith("linux"), reason="tbb is not installed")
def test_the_restarted_process_runs_on_oneTBB_with_the_same_pid():
    # the probe prints its pid, restarts (and prints it again), then prints it with the allocator
    *pids, allocator = run_probe(**{ALLOCATOR_ENV: "tbbmalloc"})
    assert len(pids) == 3 and len(set(pids)) == 1
    assert allocator == "tbbmalloc"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_system_choice_keeps_glibc_malloc():
    *pids, allocator = run_probe(**{ALLOCATOR_ENV: "system"})
    assert len(pids) == 2  # no restart
    assert allocator == "glibc's"
