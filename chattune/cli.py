"""The wrapper every command line shares (train.py, evaluate.py, find_split.py, the data generator, the GGUF
exporter and their chattune-* console scripts).

chattune's errors (chattune.errors.ChattuneError) become one line on stderr and exit status 2; Ctrl-C becomes
exit status 130 with one line, never a traceback. argparse's own usage errors keep their status 2.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

from chattune.errors import ChattuneError

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
USER_ERROR = 2  # argparse's status for a bad command line, kept for every input error

Main = TypeVar("Main", bound=Callable[..., int])


def entry_point(main: Main | None = None, *, interrupted: str = "interrupted") -> Main | Callable[[Main], Main]:
    """Decorate a command's `main` (usable bare or with `interrupted=` the line printed on Ctrl-C)."""

    def wrap(function: Main) -> Main:
        @functools.wraps(function)
        def wrapper(*args, **kwargs) -> int:
            try:
                return function(*args, **kwargs)
            except ChattuneError as error:
                print(f"error: {one_line(str(error))}", file=sys.stderr, flush=True)
                return USER_ERROR
            except KeyboardInterrupt:
                print(f"\n{interrupted}", file=sys.stderr, flush=True)
                return INTERRUPTED

        return wrapper  # type: ignore[return-value]

    return wrap(main) if main is not None else wrap


def one_line(message: str) -> str:
    """A message that spans lines (a library's, or a list of problems) keeps every part, on one line."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())
