"""One sweep at a time per cell: several `uqlora benchmark` processes may share an OUT folder (say, one per task),
and none starts a cell another is running.

A cell's lock is an exclusive `flock` on OUT/locks/CELL.lock, taken without blocking before the cell starts and
held until it ends. The cell's own process inherits the locked file (`run_subprocess` passes the descriptor on),
so a cell whose sweep was killed keeps its lock until the cell itself ends. The kernel drops a lock when the
last process holding it exits, so a crash never leaves a stale lock; the empty lock files stay (removing one
while another process waits on it would let two processes lock different files of one name).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class CellLock:
    """A held lock; `fd` is the locked file's descriptor (to pass on to the cell's process)."""

    def __init__(self, fd: int):
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing our descriptor drops the lock unless the cell's process still holds it
            self.fd = -1


def lock_path(out: Path, name: str) -> Path:
    return Path(out) / "locks" / f"{name}.lock"


def try_lock(out: Path, name: str) -> CellLock | None:
    """The lock of cell `name` of the sweep in `out`, or None when another process holds it."""
    path = lock_path(out, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return CellLock(fd)


def is_locked(out: Path, name: str) -> bool:
    """Whether another process runs cell `name` now (a test lock, released at once)."""
    if not lock_path(out, name).is_file():
        return False
    lock = try_lock(out, name)
    if lock is None:
        return True
    lock.release()
    return False
