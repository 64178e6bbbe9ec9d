"""One writer at a time: an advisory ``fcntl.flock`` on ``DIR/.lock``.

The kernel releases the lock when the holder dies, even by ``kill -9``, so a crash never
leaves a museum locked. A second writer fails at once with a message naming the holder, or
waits (``wait=True``).
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from museum.errors import MuseumError, MuseumLockedError


@contextmanager
def writer_lock(folder: Path, *, wait: bool = False, timeout: float | None = None) -> Iterator[None]:
    path = Path(folder) / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise MuseumError(f"cannot write to museum {folder}: {err.strerror} ({path}); check that the folder "
                          "exists and is writable") from None
    try:
        start = time.time()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait or (timeout is not None and time.time() - start > timeout):
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    raise MuseumLockedError(
                        f"museum {folder} is being written by another process (pid {holder}); "
                        "wait for it to finish, or pass --wait to queue behind it") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


@contextmanager
def claim(path: Path, *, wait: bool) -> Iterator[bool]:
    """An exclusive ``flock`` on the file ``path`` (created): yields True while this process holds it, or
    False at once when another process does and ``wait`` is False (``wait=True`` blocks until it is free).
    Like the writer lock, it is released when the holder exits or dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
