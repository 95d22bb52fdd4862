"""File-system helpers shared by the writers: outputs appear whole or not at all."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from pretrain.errors import LockError  # re-exported: raised here, defined with the other user errors


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




class DirLock:
    """One run at a time in a directory: an advisory ``flock`` on ``DIR/.lock``, whose text names the holder
    (host, pid, start time). The kernel drops the lock when its process dies, so a lock left by a killed run is
    free to take; its text is still there, and :meth:`acquire` says it took it over."""

    def __init__(self, directory: Path, what: str):
        self.directory, self.what = Path(directory), what
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock or raise LockError naming the holder; returns a line when a dead run's lock was taken."""
        import fcntl
        import socket
        import time

        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that has not written its name"
            os.close(fd)
            raise LockError(f"{self.what} {self.directory} is in use by another run ({holder}); wait for it to end "
                            "or use another directory") from None
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd
        if previous:
            return f"{self.what} {self.directory}: took over the lock of {previous}, which is no longer running"
        return None

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        os.ftruncate(self.fd, 0)  # an empty lock file: the last holder ended cleanly
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def check_writable(directory: Path, what: str) -> None:
    """Create ``directory`` if needed and write a probe file in it: a read-only mount, a path that is a file, or a
    missing permission fails now with one line (OSError's reason), not at the first save hours later."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise LockError(f"{what} {directory} is a file, not a directory")
    for parent in directory.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LockError(f"{what} {directory} is not writable: {parent} is a file")
            break
    import socket

    probe = directory / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"x" * 4096)
    except OSError as exc:
        raise LockError(f"{what} {directory} is not writable: {exc.strerror}") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def check_output(out: Path, inputs, overwrite: bool, what: str, ours, error=ValueError) -> None:
    """The one rule for every tool that writes a directory: refuse (raising ``error`` with one line) an output that
    is, contains or lies inside one of ``inputs`` — ``--overwrite`` or not —, an occupied output without
    ``overwrite``, and, with it, an output whose contents ``ours(out)`` does not recognise as an earlier ``what``
    (a tool replaces only what it wrote itself). The caller then writes beside it and renames (replace_dir)."""
    out = Path(out)
    target = out.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source:
            raise error(f"output {out} is the input {given}: choose an output outside the inputs")
        if target in source.parents:
            raise error(f"output {out} contains the input {given}: choose an output outside the inputs")
        if source in target.parents:
            raise error(f"output {out} lies inside the input {given}: choose an output outside the inputs")
    if not is_occupied(out):
        return
    if not out.is_dir():
        raise error(f"output {out} is an existing file, not a directory: choose another output")
    if not ours(out):
        entries = sorted(p.name for p in out.iterdir())
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise error(f"output {out} holds files that are not an earlier {what} ({shown}): refusing to replace it, "
                    "--overwrite or not; choose another output")
    if not overwrite:
        raise error(f"output {out} holds an earlier {what} (pass --overwrite to replace it)")


DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM}


def find_os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, its cause / context chain, or (DCP's CheckpointException) the
    per-rank ``failures`` it wraps as (exception, traceback) pairs."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if isinstance(e, tuple):
            todo += [x for x in e if isinstance(x, BaseException)]
            continue
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            return e
        todo += [e.__cause__, e.__context__, *getattr(e, "failures", {}).values()]
    return None


def disk_error(exc: BaseException, where=None) -> str | None:
    """One line for a write the file system refused (full, read-only, quota, permission), or None if ``exc`` is
    something else (a bug, which keeps its traceback). ``where`` names the output when the error does not."""
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return f"cannot write {exc.filename or where or 'a file'}: {exc.strerror}"
    return None


def as_os_error(exc: BaseException, path) -> BaseException:
    """Libraries that report an OS error in their own exception (safetensors: "I/O error: ... (os error 28)")
    as the OSError it is, so :func:`disk_error` can name it; anything else unchanged."""
    import re

    found = re.search(r"\(os error (\d+)\)", str(exc))
    if found and not isinstance(exc, OSError):
        code = int(found.group(1))
        return OSError(code, os.strerror(code), str(path))
    return exc
