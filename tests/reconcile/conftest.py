"""Real catalog stores for the reconcile framework's tests, and a recorder of keys.

The store fixtures are the store contract suite's: every test here runs on a
SQLite file and on a real etcd process (skipped, with the reason, where the
``etcd`` binary is missing).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tests.store.conftest import backend, etcd_own_pki, etcd_single, etcd_tls, store

# Fixtures, re-exported for pytest: backend's etcds params need their clusters.
__all__ = ["backend", "etcd_own_pki", "etcd_single", "etcd_tls", "store"]

#: Upper bound on waiting for a background thread to catch up. A correctness
#: bound (the test fails if it passes), never a speed claim.
SETTLE_S = 20.0


class Recorder:
    """Collects the keys an informer reports, in order, from its thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.keys: list[str] = []

    def __call__(self, key: str) -> None:
        with self._cond:
            self.keys.append(key)
            self._cond.notify_all()

    def wait_until(self, condition: Callable[[list[str]], bool]) -> list[str]:
        deadline = time.monotonic() + SETTLE_S
        with self._cond:
            while not condition(self.keys):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"condition not met; keys seen: {self.keys}")
                self._cond.wait(remaining)
            return list(self.keys)


def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SETTLE_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)
