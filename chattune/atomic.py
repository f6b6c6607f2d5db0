"""Atomic writes, the one implementation: a file or folder is written under a temporary name beside its target
and renamed into place once complete, so a crash never leaves something that looks finished but is not.

Model folders (chattune.export.save), GGUF files (chattune.export.gguf), converted GGUF models
(chattune.training.gguf_models), evaluate.py's results and the generator's datasets all go through it.
Checkpoints have their own staging (chattune.training.safety): every process writes into them first.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, folder: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `target` (an empty folder with `folder`, else a file name not yet created, so
    the file gets the usual permissions) to write into.

    When the block ends without an error it replaces `target` in one rename (a folder that exists is moved
    aside first, then removed); with `keep_existing`, a target that appeared meanwhile (another process was
    faster) is kept and the temporary copy dropped. On an error, or Ctrl-C, the temporary copy is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    if folder:
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        staging = target.with_name(f"{prefix}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield staging
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


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8, `\\n` line ends) to `path` atomically."""
    with atomic_path(path) as staging, open(staging, "w", encoding="utf-8", newline="\n") as file:
        file.write(text)
