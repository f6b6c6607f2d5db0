"""The wrapper every command line shares (train.py, evaluate.py, find_split.py, the data generator, the GGUF
exporter and their chattune-* console scripts).

chattune's errors (chattune.errors.ChattuneError) become one line on stderr and exit status 2; Ctrl-C (SIGINT)
and SIGTERM become exit status 130 and 143 with one line saying what the command was doing and what it had saved
(see `report_progress`), never a traceback. argparse's own usage errors keep their status 2.

SIGTERM is raised in the main thread as `Terminated`, a KeyboardInterrupt, so every cleanup that Ctrl-C runs
(temporary folders removed, `datasets`' worker pools terminated) runs for it too. Processes forked by the command
(tokenization workers) start with the default action for both signals (`install_handler`), so the pool's SIGTERM
ends a worker at once, even one busy in native code, and none outlives its parent.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from chattune.errors import ChattuneError

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
TERMINATED = 143  # 128 + SIGTERM
USER_ERROR = 2  # argparse's status for a bad command line, kept for every input error
HANDLED = (signal.SIGINT, signal.SIGTERM)

Main = TypeVar("Main", bound=Callable[..., int])


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would raise KeyboardInterrupt."""


@dataclass
class Progress:
    """What the running command is doing and what it has saved so far: the line a signal prints."""

    doing: str = ""
    saved: str = ""
    signal_name: str | None = None  # the signal received, if any


PROGRESS = Progress()


def report_progress(doing: str, saved: str | None = None) -> None:
    """Record what the command does now (and, when given, what it has saved), for the interrupt message.

    A phase never starts after a signal: one whose exception was lost stops the command here."""
    raise_if_signalled()
    PROGRESS.doing = doing
    if saved is not None:
        PROGRESS.saved = saved


def entry_point(main: Main | None = None, *, interrupted: str = "interrupted") -> Main | Callable[[Main], Main]:
    """Decorate a command's `main` (usable bare or with `interrupted=` the line printed on a signal until the
    command reports its progress)."""

    def wrap(function: Main) -> Main:
        @functools.wraps(function)
        def wrapper(*args, **kwargs) -> int:
            PROGRESS.__init__()
            with signals_raise():
                try:
                    return function(*args, **kwargs)
                except ChattuneError as error:
                    if PROGRESS.signal_name is None:
                        close_progress_bars()
                        print(f"error: {one_line(str(error))}", file=sys.stderr, flush=True)
                        return USER_ERROR
                    return report_interrupt(interrupted)
                except BaseException as error:
                    # A library may replace the KeyboardInterrupt with its own error while cleaning up
                    # (datasets' worker pool raises a TimeoutError): the signal still decides.
                    if PROGRESS.signal_name is None and not isinstance(error, KeyboardInterrupt):
                        raise
                    return report_interrupt(interrupted)

        return wrapper  # type: ignore[return-value]

    return wrap(main) if main is not None else wrap


def close_progress_bars() -> None:
    """Close the progress bars a failed phase left open (the trainer's), here, before the last line: tqdm would
    otherwise draw them once more at exit, after the error or interrupt line."""
    module = sys.modules.get("tqdm")  # not imported: no bar was drawn
    for bar in list(getattr(getattr(module, "tqdm", None), "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()


def report_interrupt(default: str) -> int:
    close_progress_bars()
    name = PROGRESS.signal_name or "SIGINT"
    if PROGRESS.doing:
        line = f"{name}: interrupted while {PROGRESS.doing}; {PROGRESS.saved or 'nothing was saved'}"
    else:
        line = default if name == "SIGINT" else f"{name}: {default}"
    print(f"\n{line}", file=sys.stderr, flush=True)
    end_child_processes()
    return 128 + signal.Signals[name].value


def end_child_processes(grace: float = 5.0) -> None:
    """Processes a library started (datasets' worker pool and its manager) end with an interrupted command, even
    when the signal came at a moment the library's own cleanup misses (its manager still starting), where the
    exit would otherwise wait for them, or leave them behind."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt and SIGTERM `Terminated` in this process (main thread only, where Python
    delivers signals); the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()
    previous = {sig: install_handler(sig, functools.partial(_raise, owner)) for sig in HANDLED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# Handlers that belong to the process that installed them; a forked child gets the default action instead.
_PARENT_ONLY: collections.deque[Callable] = collections.deque(maxlen=8)  # those installed now are the newest
_FORK_HOOK: list[bool] = []


def install_handler(sig: int, handler: Callable) -> Any:
    """`signal.signal(sig, handler)` for a handler that only makes sense in this process (it raises into the
    command's main loop, or saves a checkpoint). A Python handler runs only when the main thread is back in the
    interpreter: a forked tokenizing worker that inherited one and sat in native code (a tokenizer call, a lock)
    ignored the pool's SIGTERM, and the parent hung in the pool's terminate()/join(). So every process forked
    while such a handler is installed starts with the default action. Returns the previous handler."""
    if not _FORK_HOOK:
        os.register_at_fork(after_in_child=_default_signals_in_child)
        _FORK_HOOK.append(True)
    _PARENT_ONLY.append(handler)
    return signal.signal(sig, handler)


def _default_signals_in_child() -> None:
    for sig in HANDLED:
        if any(signal.getsignal(sig) is handler for handler in _PARENT_ONLY):
            signal.signal(sig, signal.SIG_DFL)


def raise_if_signalled() -> None:
    """Raise again a signal whose exception was lost: Python drops an exception raised in a callback it runs
    itself (the fork hooks of logging, a `__del__`), so the signal is recorded too, and checked between phases."""
    if PROGRESS.signal_name is not None:
        raise Terminated() if PROGRESS.signal_name == "SIGTERM" else KeyboardInterrupt()


def _raise(owner: int, signum: int, frame) -> None:
    if os.getpid() != owner:  # a child forked before the fork hook ran: end the default way, without a traceback
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    PROGRESS.signal_name = signal.Signals(signum).name
    raise_if_signalled()


def one_line(message: str) -> str:
    """A message that spans lines (a library's, or a list of problems) keeps every part, on one line."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())
