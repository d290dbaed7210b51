"""Leader election through the catalog: one controller acts at a time.

A :class:`LeaderElection` is one contender. :meth:`~LeaderElection.campaign`
blocks until it leads (or a timeout); the leader writes its name at
``leaders/<name>``, and :meth:`~LeaderElection.fence` returns a compare on
that key's revision. A leader includes the fence in every txn that acts on
its decisions, so a deposed leader that has not noticed yet loses with
``Conflict`` instead of writing: leadership is enforced by the store, not
only by timing.

Backends: etcd uses a lease and a key bound to it (``etcd.py``); SQLite
uses :class:`FileLockElection`, an exclusive ``flock`` on a file next to the
database, which the kernel releases when the holding process dies, so a
standby on the same machine takes over within one retry interval.
"""

from __future__ import annotations

import abc
import fcntl
import os
import re
import threading
import time
from pathlib import Path
from types import TracebackType

from csi_driver.core.errors import Conflict, FailedPrecondition, InvalidArgument
from csi_driver.store.base import CatalogStore, Compare

LEADERS = "leaders/"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

#: How often a SQLite standby retries the lock; bounds its takeover delay.
FILE_LOCK_RETRY_S = 0.1


def leader_key(name: str) -> str:
    """The catalog key holding the current leader of election ``name``."""
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"election name {name!r} must be 1-63 letters, digits, '.', '_' or '-'"
        )
    return LEADERS + name


class LeaderElection(abc.ABC):
    """One contender for the leadership called ``name``."""

    def __init__(self, store: CatalogStore, name: str, candidate: str) -> None:
        if not candidate:
            raise InvalidArgument("a leader candidate needs a non-empty name")
        self.store = store
        self.name = name
        self.candidate = candidate
        self.key = leader_key(name)
        self._fence: Compare | None = None
        self._lost = threading.Event()
        self._cancel = threading.Event()
        self._mutex = threading.Lock()

    def campaign(self, timeout: float | None = None) -> bool:
        """Block until this contender leads; False if ``timeout`` passed first.

        A :meth:`resign` from another thread ends a pending campaign (False).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self._cancel.clear()
        with self._mutex:
            return self._campaign(deadline)

    def resign(self) -> None:
        """Give up leadership (if held) so a standby can take over at once; idempotent."""
        self._cancel.set()
        with self._mutex:
            self._resign()

    @abc.abstractmethod
    def _campaign(self, deadline: float | None) -> bool:
        """Backend part of :meth:`campaign`, under the mutex."""

    @abc.abstractmethod
    def _resign(self) -> None:
        """Backend part of :meth:`resign`, under the mutex."""

    def _pause(self, seconds: float, deadline: float | None) -> bool:
        """Sleep before retrying; False if the campaign is over (cancelled or timed out)."""
        if deadline is not None:
            seconds = min(seconds, deadline - time.monotonic())
            if seconds <= 0:
                return False
        return not self._cancel.wait(seconds)

    @property
    def is_leader(self) -> bool:
        return self._fence is not None and not self._lost.is_set()

    def wait_lost(self, timeout: float | None = None) -> bool:
        """Block until leadership is lost (or resigned); False on timeout."""
        return self._lost.wait(timeout)

    def fence(self) -> Compare:
        """A compare that holds only while this contender is still the leader."""
        fence = self._fence
        if fence is None or not self.is_leader:
            raise FailedPrecondition(
                f"{self.candidate} is not the leader of {self.name}; campaign first"
            )
        return fence

    def leader(self) -> str | None:
        """Who leads ``name`` now, as recorded in the catalog (None if nobody)."""
        record = self.store.get(self.key)
        return record.value.decode() if record else None

    def _won(self, fence: Compare) -> None:
        self._lost.clear()
        self._fence = fence

    def _mark_lost(self) -> None:
        self._lost.set()

    def __enter__(self) -> LeaderElection:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.resign()


class FileLockElection(LeaderElection):
    """Election by an exclusive ``flock`` on ``lock_path`` (processes on one machine)."""

    def __init__(self, store: CatalogStore, lock_path: Path, name: str, candidate: str) -> None:
        super().__init__(store, name, candidate)
        self.lock_path = lock_path
        self._fd: int | None = None

    def _campaign(self, deadline: float | None) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not self._pause(FILE_LOCK_RETRY_S, deadline):
                        os.close(fd)
                        return False
            # Holding the lock: record ourselves; the new revision fences the old leader.
            revision = self.store.put(self.key, self.candidate.encode())
        except BaseException:
            os.close(fd)  # closing drops the lock
            raise
        self._fd = fd
        self._won(Compare(self.key, revision))
        return True

    def _resign(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        fence, self._fence = self._fence, None
        self._mark_lost()
        try:
            self.store.delete(self.key, fence.revision if fence else None)
        except Conflict:
            pass  # a newer leader already wrote the key: leave it
        finally:
            os.close(fd)
