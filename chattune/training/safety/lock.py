"""One process writes a run: a lock file beside its checkpoints, `runs/.<run_name>.lock`.

The lock is created with O_CREAT | O_EXCL, which exactly one of two racing processes wins; it holds the pid, the
host, the process's start time and a random token. The second process is refused in one line naming the holder.
A lock whose process is gone (same host, no process of that pid and start time: a SIGKILL, a power cut) is stale
and taken over: it is renamed aside (one rename wins), checked to be the stale one, and removed. A lock of another
host cannot be checked from here: the message names the file to delete once that process is known to be gone.

A multi-process launch (accelerate, torchrun, FSDP) is one run: its main process takes the lock and tells the
others whether it got it, so all of them go on, or all stop with the same line. The lock is released on every
exit path that runs Python's cleanup (an error, Ctrl-C, SIGTERM) and by the second-interrupt exit
(`release_held_locks`); only a SIGKILL leaves one behind, and the next run finds it stale.

Standard library and psutil only: the lock test races it in fresh processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from chattune.errors import ChattuneError

logger = logging.getLogger(__name__)

# A lock file that cannot be read is one being written (created, not yet filled) while it is younger than this.
UNREADABLE_GRACE_S = 10.0
_HELD: dict[Path, str] = {}  # lock path -> token, of the locks this process holds


class RunLockedError(ChattuneError):
    """Another process holds the run's lock; the message names it and what to do."""


def lock_path(run_dir: Path) -> Path:
    """Beside the run folder rather than in it: a fresh run still finds its folder empty."""
    run_dir = Path(run_dir)
    return run_dir.with_name(f".{run_dir.name}.lock")


def acquire(path: Path, what: str) -> str:
    """Take the lock at `path` for this process, or raise RunLockedError naming its holder; returns the token.
    `what` names the run in the message."""
    token = secrets.token_hex(8)
    for _ in range(3):  # a stale lock taken over by another process meanwhile: try again
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = settled_holder(path)
            if holder is not None and not is_stale(holder, path):
                raise RunLockedError(held_message(path, holder, what)) from None
            remove_stale(path, holder)
            continue
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(this_process(token), file)
            file.flush()
            os.fsync(file.fileno())
        _HELD[path] = token
        return token
    raise RunLockedError(f"{what}: could not take its lock {path}: other processes keep replacing it; try again")


def release(path: Path, token: str) -> None:
    """Remove the lock if it is still this process's (a lock taken over as stale is another's now)."""
    _HELD.pop(path, None)
    holder = read_holder(path)
    if holder is not None and holder.get("token") == token:
        path.unlink(missing_ok=True)


def release_held_locks() -> None:
    """For an exit that skips Python's cleanup (os._exit after a second interrupt)."""
    for path, token in list(_HELD.items()):
        with contextlib.suppress(OSError):
            release(path, token)


@contextlib.contextmanager
def held(path: Path, what: str) -> Iterator[None]:
    """Hold the lock at `path` for the block; folders made for it are removed again if they stay empty."""
    made = missing_folders(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        token = acquire(path, what)
        try:
            yield
        finally:
            release(path, token)
    finally:
        for folder in made:  # deepest first; one the run wrote into stays
            with contextlib.suppress(OSError):
                folder.rmdir()


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and its parents that do not exist yet, deepest first."""
    folder = folder.absolute()
    return [path for path in (folder, *folder.parents) if not path.exists()]


def this_process(token: str) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": psutil.Process().create_time(),
        "token": token,
    }


def settled_holder(path: Path, wait_s: float = 2.0) -> dict[str, Any] | None:
    """The lock's holder, given a moment to write itself into a lock it has just created."""
    deadline = time.monotonic() + wait_s
    holder = read_holder(path)
    while holder is not None and holder.get("filling") and time.monotonic() < deadline:
        time.sleep(0.02)
        holder = read_holder(path)
    return holder


def read_holder(path: Path) -> dict[str, Any] | None:
    """The lock's content, or None when it is gone, or cannot be read and is old enough to be a leftover."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(holder, dict) and {"pid", "host", "started", "token"} <= holder.keys():
            return holder
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError):
        if time.time() - path.stat().st_mtime < UNREADABLE_GRACE_S:  # being written by its creator right now
            return {"pid": "?", "host": socket.gethostname(), "started": 0, "token": None, "filling": True}
    return None


def is_stale(holder: dict[str, Any], path: Path) -> bool:
    """The holder ran on this host and no longer runs (a pid taken by a later process has another start time)."""
    if holder.get("filling") or holder["host"] != socket.gethostname():
        return False
    try:
        return abs(psutil.Process(int(holder["pid"])).create_time() - float(holder["started"])) > 1.0
    except (psutil.NoSuchProcess, ValueError):
        return True


def remove_stale(path: Path, holder: dict[str, Any] | None) -> None:
    """Move the stale lock aside and remove it; if what was moved is not the stale lock (another process took it
    over and holds it now), put it back. Only one of several processes that found it stale moves it."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another process moved it first
    moved = read_holder(aside)
    if moved is not None and (holder is None or moved.get("token") != holder.get("token")):
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)  # back in place, unless a newer lock exists already
    else:
        described = f"process {holder['pid']} on {holder['host']}" if holder else "an unreadable lock file"
        logger.warning("%s: took over the lock of %s, which no longer runs", path, described)
    aside.unlink(missing_ok=True)


def held_message(path: Path, holder: dict[str, Any], what: str) -> str:
    if holder.get("filling"):
        return (
            f"{what} is being started by another process (its lock {path} was just created); choose another --run_name"
        )
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["started"])))
    where = f"process {holder['pid']} on host {holder['host']}, started {started}"
    if holder["host"] == socket.gethostname():
        return f"{what} is in use by {where}; wait for it to end, or choose another --run_name"
    return (
        f"{what} is in use by {where} (lock {path}); wait for it to end, or choose another --run_name; if that "
        "process is gone, delete the lock file"
    )


@contextlib.contextmanager
def run_lock(run_dir: Path, run_name: str, state: Any) -> Iterator[None]:
    """Hold the run's lock for the block, taken by the main process of `state` (an accelerate PartialState) on
    behalf of all of them; every process raises the same RunLockedError when it is held elsewhere."""
    what = f"run {run_name!r} ({run_dir})"
    path = lock_path(run_dir)
    with contextlib.ExitStack() as stack:
        refusal = None
        if state.is_main_process:
            try:
                stack.enter_context(held(path, what))
            except RunLockedError as error:
                refusal = str(error)
        refusal = shared_with_every_process(refusal, state)
        if refusal is not None:
            raise RunLockedError(refusal)
        yield


def shared_with_every_process(value: str | None, state: Any) -> str | None:
    """The main process's `value`, on every process of the launch."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]
