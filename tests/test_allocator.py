"""The service processes' allocator settings, in real child processes (glibc's
``malloc_stats`` prints one "Arena N:" section per arena to stderr)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from csi_driver import allocator

#: Eight threads allocating and freeing chunk-sized buffers at once, then the stats.
CHILD = """
import ctypes, sys, threading
from csi_driver import allocator
if sys.argv[1] == "limit":
    assert allocator.limit_arenas()
barrier = threading.Barrier(8)
def churn():
    barrier.wait()
    for _ in range(50):
        buffers = [bytearray(256 * 1024) for _ in range(8)]
        del buffers
threads = [threading.Thread(target=churn) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
ctypes.CDLL(None).malloc_stats()
"""


def _child(code: str, mode: str) -> subprocess.CompletedProcess[str]:
    """``code`` run in a child process with ``mode``, without the operator's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    return subprocess.run(
        [sys.executable, "-c", code, mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**env, "PYTHONPATH": os.getcwd()},
    )


def _arenas(mode: str) -> int:
    return _child(CHILD, mode).stderr.count("Arena ")


def _glibc() -> bool:
    try:
        ctypes.CDLL(None).malloc_stats  # noqa: B018
    except AttributeError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _glibc(), reason="glibc's malloc_stats is not available")


def test_a_service_process_keeps_two_arenas_however_many_threads_allocate() -> None:
    assert _arenas("default") > 2  # what the limit is for
    assert _arenas("limit") <= 2


def test_an_operators_own_arena_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert not allocator.limit_arenas()


#: Chunk-sized buffers made and freed, as a pull's receiver makes them (a message as
#: it arrives, the chunk read out of it, now and then something bigger); prints
#: the page faults 100 rounds took (each page faulted in again is zeroed first).
CHURN = """
import resource, sys
from csi_driver import allocator
if sys.argv[1] == "keep":
    assert allocator.keep_freed()
def round():
    message = bytearray((4 << 20) + 100)
    data = bytes(message[: 4 << 20])
    bigger = bytearray(8 << 20)
    del message, bigger, data
for _ in range(10):  # warm up: the first buffers are faulted in either way
    round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    return int(_child(CHURN, mode).stdout)


def test_freed_chunk_buffers_are_reused_not_faulted_in_again() -> None:
    # 100 rounds of 4096 pages: by default most are given back and faulted in again.
    assert _faults("default") > 100 * 1024
    assert _faults("keep") < 1024


def test_an_operators_own_trim_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert not allocator.keep_freed()
