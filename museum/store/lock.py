"""One writer at a time: an advisory ``fcntl.flock`` on ``DIR/.lock``.

The kernel releases the lock when the holder dies, even by ``kill -9``, so a crash never
leaves a museum locked. A second writer fails at once with a message naming the holder, or
waits (``wait=True``).
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from museum.errors import MuseumError, MuseumLockedError


@contextmanager
def _lock_file(path: Path) -> Iterator[int]:
    """The lock file at ``path`` (created) open for ``flock``; unlocked and closed on exit."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        yield fd
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _try_lock(fd: int, *, block: bool = False) -> bool:
    """Take the exclusive lock on ``fd``: True once held; False at once when another process holds it and
    ``block`` is False."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


@contextmanager
def writer_lock(folder: Path, *, wait: bool = False, timeout: float | None = None) -> Iterator[None]:
    path = Path(folder) / ".lock"
    with ExitStack() as stack:
        try:
            fd = stack.enter_context(_lock_file(path))
        except OSError as err:
            raise MuseumError(f"cannot write to museum {folder}: {err.strerror} ({path}); check that the folder "
                              "exists and is writable") from None
        start = time.time()
        while not _try_lock(fd):
            if not wait or (timeout is not None and time.time() - start > timeout):
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise MuseumLockedError(
                    f"museum {folder} is being written by another process (pid {holder}); "
                    "wait for it to finish, or pass --wait to queue behind it") from None
            time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield


@contextmanager
def claim(path: Path, *, wait: bool) -> Iterator[bool]:
    """An exclusive ``flock`` on the file ``path`` (created): yields True while this process holds it, or
    False at once when another process does and ``wait`` is False (``wait=True`` blocks until it is free).
    Like the writer lock, it is released when the holder exits or dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock_file(path) as fd:
        yield _try_lock(fd, block=wait)
