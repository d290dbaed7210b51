"""Per-key locks: a wait that times out is ABORTED with the spec's "operation pending"."""

from __future__ import annotations

import threading

import pytest

from csi_driver.core.errors import OPERATION_PENDING, Aborted
from csi_driver.core.locks import KeyedLocks


def test_a_held_key_aborts_a_second_holder_that_cannot_wait() -> None:
    locks = KeyedLocks()
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with locks.hold("vol-a"):
            held.set()
            release.wait()

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(5)
        with pytest.raises(Aborted) as caught, locks.hold("vol-a", timeout=0.01):
            pass
        assert caught.value.message == OPERATION_PENDING.format(key="vol-a")
        with locks.hold("vol-b", timeout=0.01):
            pass  # other keys are not held up
    finally:
        release.set()
        thread.join()
    with locks.hold("vol-a", timeout=0.01):
        pass  # released with its holder
