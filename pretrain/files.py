"""File-system helpers shared by the writers: outputs appear whole or not at all."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def is_occupied(out: Path) -> bool:
    """An existing output that writing there would clobber: a file, or a directory that is not empty."""
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory ``tmp`` to ``out``, replacing an existing ``out`` only at the very end."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
