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


def _arenas(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**env, "PYTHONPATH": os.getcwd()},
    )
    return child.stderr.count("Arena ")


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
