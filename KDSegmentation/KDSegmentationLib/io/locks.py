"""Exclusive locks on output files, so that two runs never write the same model (or its checkpoints) at once.

The lock is an OS file lock (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows) on ``<output>.lock``; the OS
drops it when the process ends, however it ends, so a crashed run never leaves a stale lock behind.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from KDSegmentationLib.errors import InputError

LOCK_SUFFIX = ".lock"


class OutputLocked(InputError):
    """Another process holds the lock of this output."""


def _try_lock(handle) -> bool:
    try:
        if os.name == "nt":
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _same_file(handle, path: Path) -> bool:
    """The locked handle is still the file at ``path`` (not one a finishing run just removed)."""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except OSError:
        return False


class OutputLock:
    """The lock of one output file: :meth:`acquire` (or ``with``) raises :class:`OutputLocked` (exit code 2) when
    another process holds it; :meth:`release` removes the lock file."""

    def __init__(self, output):
        self.output = Path(output)
        self.path = self.output.with_name(self.output.name + LOCK_SUFFIX)
        self._handle = None

    def acquire(self) -> "OutputLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for _attempt in range(5):
                handle = open(self.path, "a+")
                if not _try_lock(handle):
                    handle.close()
                    raise OutputLocked(f"{self.output.name} is being written by another training run; wait for it "
                                       f"to finish or choose another --output")
                if _same_file(handle, self.path):
                    self._handle = handle
                    return self
                handle.close()  # the file was removed between open and lock: lock the new one
        except OSError as exc:
            raise InputError(f"cannot create {self.path} ({exc.strerror or exc}); choose a writable --output "
                             f"folder") from None
        raise OutputLocked(f"cannot lock {self.path}; choose another --output")

    def release(self) -> None:
        if self._handle is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # removed while still held: a waiting run then locks a new file, never this one
        self._handle.close()
        self._handle = None

    def __enter__(self) -> Path:
        self.acquire()
        return self.output

    def __exit__(self, *exc) -> None:
        self.release()
