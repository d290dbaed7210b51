"""Per-key locks that are dropped once nobody holds or waits for them."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from csi_driver.core import deadline
from csi_driver.core.errors import OPERATION_PENDING, Aborted


class KeyedLocks:
    """A lock per key (volume id, volume name), created on demand."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    def _acquire_entry(self, key: str) -> threading.Lock:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
            return lock

    def _release_entry(self, key: str) -> None:
        with self._guard:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    @contextmanager
    def hold(self, key: str, *, timeout: float = -1) -> Iterator[None]:
        """Hold ``key``'s lock, waiting up to ``timeout`` (forever when negative),
        and never past the current call's deadline.

        Raises :class:`Aborted` when the wait times out: CSI's answer for "an
        operation is already pending for this volume".
        """
        wait = timeout if timeout >= 0 else math.inf
        wait = deadline.clamp(wait)
        lock = self._acquire_entry(key)
        try:
            if not lock.acquire(timeout=wait if math.isfinite(wait) else -1):
                raise Aborted(OPERATION_PENDING.format(key=key))
            try:
                yield
            finally:
                lock.release()
        finally:
            self._release_entry(key)
