"""Named fault points, for crash tests (tests/test_reliability.py) and nothing else.

Writers call ``fault_point("commit.manifest")`` and the like at the moments a crash matters
(mid-training, mid-checkpoint, between the renames of a commit). Without the environment
variables below a fault point only reads ``os.environ`` and returns.

    MUSEUM_FAULT=PATTERN[:N[:ACTION]]   at the N-th point (default 1) whose name matches the
                                        shell pattern PATTERN: ACTION ``kill`` (default:
                                        SIGKILL this process, as a crash or ``kill -9``
                                        would) or ``enospc`` (raise OSError "No space left
                                        on device", as a full disk would)
    MUSEUM_FAULT_TRACE=FILE             append the name of every point reached to FILE
                                        (flushed at once, so a killed process leaves the
                                        points it passed)
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal

ENV = "MUSEUM_FAULT"
TRACE_ENV = "MUSEUM_FAULT_TRACE"

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    trace = os.environ.get(TRACE_ENV)
    if trace:
        fd = os.open(trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{name}\n".encode())
        finally:
            os.close(fd)
    spec = os.environ.get(ENV)
    if not spec:
        return
    pattern, _, rest = spec.partition(":")
    count, _, action = rest.partition(":")
    if not fnmatch.fnmatchcase(name, pattern):
        return
    _hits[spec] = _hits.get(spec, 0) + 1
    if _hits[spec] != int(count or 1):
        return
    if (action or "kill") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(injected at {name})")
    else:
        raise ValueError(f"{ENV}: unknown action {action!r} (kill or enospc)")
