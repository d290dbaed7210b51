"""The C allocator's settings for Ferry's long-running services (glibc only).

glibc gives threads that allocate at the same time arenas of their own, up to
eight per core, and each arena keeps what was freed in it for reuse. A node
service runs dozens of threads (gRPC's, the reconcilers' workers, a pull's
syncer), and chunk buffers of a few MiB pass through many of them, so each
arena came to hold its own high-water mark of freed buffers: a node's resident
size grew by 20-60 MiB over its first moves and passed 200 MiB. With two
arenas it stays near 125 MiB (docs/benchmarks.md, "Planned moves"); the
service's hot threads spend their time in hashing, I/O and gRPC's C core,
which release the GIL, not in malloc contention.

Invariants: applied once per process, first thing in a service command,
before its threads start; an operator's own ``MALLOC_ARENA_MAX`` wins; on a C
library without ``mallopt`` (musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import os

#: glibc's mallopt parameter for the arena limit (malloc.h: M_ARENA_MAX).
_M_ARENA_MAX = -8
#: Arenas for a service process: the main thread's and one shared by the rest.
SERVICE_ARENAS = 2


def limit_arenas(count: int = SERVICE_ARENAS) -> bool:
    """Cap the allocator's arenas at ``count``; False when left as it was."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, count))
