"""Injected crashes at named steps, for the tests that prove every step resumes.

``FERRY_CRASH_FILE`` names a file listing step names, one a line (for
example ``controller:move:final-captured``). The first process that reaches
a listed step removes that line from the file and kills itself with
SIGKILL: a crash as abrupt as ``kill -9``, exactly once, so the restarted
process (same command line, same environment) goes past the step. Without
the variable, :func:`crash_point` costs one environment lookup.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal

log = logging.getLogger(__name__)

CRASH_FILE_ENV = "FERRY_CRASH_FILE"


def crash_point(step: str) -> None:
    """Die here, with SIGKILL, if ``step`` is listed in the crash file."""
    path = os.environ.get(CRASH_FILE_ENV)
    if not path:
        return
    try:
        with open(path, "r+", encoding="utf-8") as listed:
            fcntl.flock(listed, fcntl.LOCK_EX)  # two processes never take the same line
            steps = listed.read().split()
            if step not in steps:
                return
            steps.remove(step)
            listed.seek(0)
            listed.truncate()
            listed.write("".join(f"{s}\n" for s in steps))
            listed.flush()
            os.fsync(listed.fileno())
    except FileNotFoundError:
        return
    log.warning("crashing at an injected fault point", extra={"step": step})
    os.kill(os.getpid(), signal.SIGKILL)
