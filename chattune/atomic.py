"""Atomic writes, the one implementation: a file or folder is written under a temporary name beside its target
and renamed into place once complete, so a crash never leaves something that looks finished but is not.

Model folders (chattune.export.save), GGUF files (chattune.export.gguf), converted GGUF models
(chattune.models.gguf), evaluate.py's results and the generator's datasets all go through it.
Checkpoints have their own staging (chattune.training.safety.checkpoints): every process writes into them first.

What is written follows the umask, like any file the user creates: the temporary folder is made with `mkdir`
(not `mkdtemp`, whose 0700 would stay on the renamed folder), and before the rename every file in it gets the mode
a plain `open` would have given it (`follow_umask`): safetensors (0.8) writes through a private temporary file of
its own (Rust's `tempfile`, mode 0600) and renames that, so `model.safetensors` would otherwise be 0600 among
0644 files. A write that runs out of disk (or into a file size
limit) becomes a `DiskFullError` naming the target, instead of the library's own words (torch says
"unexpected pos N vs M").
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from chattune.errors import ChattuneError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# How libraries that lose the errno word it: torch's zip writer after a short write, Rust's io::Error (safetensors).
_CODES = "|".join(map(str, DISK_FULL_ERRNOS))
_WORDS = "|".join(os.strerror(code) for code in DISK_FULL_ERRNOS)
DISK_FULL_WORDS = re.compile(rf"unexpected pos \d+ vs \d+|file write failed|os error (?:{_CODES})\b|{_WORDS}")


class DiskFullError(ChattuneError, OSError):
    """A write ran out of disk space (or into a file size limit); the message names what was kept."""


def disk_full_reason(error: BaseException) -> str | None:
    """Why `error` (or an error it came from) is a full disk, in words, or None when it is something else."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return os.strerror(error.errno)
        found = DISK_FULL_WORDS.search(str(error))
        if found:
            code = re.fullmatch(r"os error (\d+)", found.group(0))
            if code:
                return os.strerror(int(code.group(1)))
            return found.group(0) if found.group(0) in _WORDS else "no space left, or a file size limit"
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, folder: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `target` (an empty folder with `folder`, else a file name not yet created, so
    the file gets the usual permissions) to write into.

    When the block ends without an error it replaces `target` in one rename (a folder that exists is moved
    aside first, then removed); with `keep_existing`, a target that appeared meanwhile (another process was
    faster) is kept and the temporary copy dropped. On an error, or Ctrl-C, the temporary copy is removed; a full
    disk raises DiskFullError.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    if folder:
        staging.mkdir()
    try:
        try:
            yield staging
        except Exception as error:
            reason = disk_full_reason(error)
            if reason is None:
                raise
            kept = f"the previous {target} is intact" if target.exists() else f"{target} was not created"
            raise DiskFullError(f"disk full while writing {target} ({reason}); {kept}") from error
        if os.path.lexists(staging):
            follow_umask(staging)
        if keep_existing:
            try:
                if not target.exists():
                    os.replace(staging, target)
            except OSError:  # renamed onto a folder another process just finished
                if not target.exists():
                    raise
        elif folder and target.exists():
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)


def creation_problem(folder: str | os.PathLike) -> str | None:
    """Why no new file can be created in `folder` (or, when it does not exist yet, in the nearest folder above it,
    where atomic_path would make it), or None. Tried with a temporary file, removed at once: the permission bits
    alone miss read-only mounts and ACLs."""
    folder = Path(folder).absolute()
    existing = next(path for path in [folder, *folder.parents] if path.exists())
    if not existing.is_dir():
        return f"{existing} is a file"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return error.strerror or str(error)
    return None


def current_umask() -> int:
    """The process's umask. Linux shows it in /proc/self/status; elsewhere it is read by setting it and back."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def follow_umask(path: str | os.PathLike) -> None:
    """Give `path` (a file, or a folder and everything in it) the mode that `open`/`mkdir` would have given it
    under the umask: what a library wrote through a private temporary file (mode 0600) becomes readable as the
    user's other files are. Executable files keep their execute bits (as far as the umask allows)."""
    path = Path(path)
    umask = current_umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        mode = item.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        full = 0o777 if stat.S_ISDIR(mode) or mode & 0o111 else 0o666
        if stat.S_IMODE(mode) != full & ~umask:
            os.chmod(item, full & ~umask)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8, `\\n` line ends) to `path` atomically."""
    with atomic_path(path) as staging, open(staging, "w", encoding="utf-8", newline="\n") as file:
        file.write(text)
