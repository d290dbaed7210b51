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

Freed chunk buffers are kept for the next chunk too (:func:`keep_freed`):
by default glibc gives a freed 4 MiB buffer back to the kernel (unmapped, or
trimmed off the arena's top) and the next one is faulted in again page by
page, zeroed by the kernel first. On a pull's receiver that cost about 1.3 of
4.3 CPU s per 1.5 GiB (perf: do_anonymous_page under the copies of each
arriving chunk; docs/benchmarks.md, "Node-to-node transfer").

Invariants: applied once per process, first thing in a service command,
before its threads start; an operator's own ``MALLOC_ARENA_MAX`` (or
``MALLOC_TRIM_THRESHOLD_``) wins; on a C library without ``mallopt`` (musl)
nothing changes.
"""

from __future__ import annotations

import ctypes
import os

#: glibc's mallopt parameters (malloc.h): M_ARENA_MAX, M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_ARENA_MAX = -8
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Freed memory an arena keeps before giving any back: a few chunks' worth (64 MiB
#: gave about the same CPU and 5-10 MiB more node RSS in bench.mobility).
KEEP_FREED_BYTES = 32 * 1024 * 1024
#: Allocations at least this big are mapped on their own (glibc's largest
#: threshold on 64 bits): every chunk-sized buffer comes from an arena instead.
MAP_APART_BYTES = 32 * 1024 * 1024
#: Arenas for a service process: the main thread's and one shared by the rest.
SERVICE_ARENAS = 2


def limit_arenas(count: int = SERVICE_ARENAS) -> bool:
    """Cap the allocator's arenas at ``count``; False when left as it was."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    return _mallopt(_M_ARENA_MAX, count)


def keep_freed(keep: int = KEEP_FREED_BYTES) -> bool:
    """Keep up to ``keep`` bytes of freed memory per arena, and chunk-sized buffers
    in the arenas, for reuse; False when left as it was."""
    if "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    return _mallopt(_M_MMAP_THRESHOLD, MAP_APART_BYTES) and _mallopt(_M_TRIM_THRESHOLD, keep)


def _mallopt(parameter: int, value: int) -> bool:
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(parameter, value))
