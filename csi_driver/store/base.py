"""The catalog store contract: get, multi-key compare-and-swap, list, watch.

Keys are ``/``-separated strings (``volumes/<id>``, ``names/<name>``,
``nodes/<id>``); values are opaque bytes. Revisions behave like etcd's, so
the etcd backend is a thin mapping and SQLite emulates the rest:

- One global revision per store, strictly increasing. Every :meth:`txn` that
  changes something advances it by exactly one, and every key it writes
  records that revision as its mod revision (``Record.revision``). A txn that
  changes nothing (no ops, or deleting absent keys) leaves it where it is.
- A txn is atomic: either all its compares hold and all its ops apply at one
  revision, or it raises and nothing changed. A lost compare raises
  :class:`~csi_driver.core.errors.Conflict` naming the key; a backend that
  cannot be reached raises :class:`~csi_driver.core.errors.StoreUnavailable`.
  A txn that raised any domain error but
  :class:`~csi_driver.core.errors.OutcomeUnknown` changed nothing, then or
  later; one that raised that (or anything else) may apply, even after it
  raised (:func:`undecided`).
- A watch yields every put and delete under its prefix whose revision is
  ``>= from_revision``, in revision order (a txn's events in op order), each
  exactly once. The events of one revision are delivered together, so after
  a disconnect ``watch(prefix, w.next_revision)`` resumes with no gap and no
  repeat. History older than the compact revision is gone: asking for it
  raises :class:`~csi_driver.core.errors.Compacted`, and the watcher re-lists.
- List pages are each a consistent read served at ``Page.revision``. The
  list-then-watch pattern is: list (all pages), then watch from the first
  page's revision + 1; changes made while paging are replayed, in order.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from csi_driver.core.errors import Conflict, FerryError, InvalidArgument, OutcomeUnknown

if TYPE_CHECKING:
    from csi_driver.store.leader import LeaderElection

#: A compare on this revision means "the key must not exist".
ABSENT = 0


def undecided(exc: BaseException) -> bool:
    """True when a txn that raised ``exc`` may have applied, or may still apply.

    Only a domain error other than ``OutcomeUnknown`` says for sure that
    nothing was written (a lost compare, a refusal, no room, no store reached,
    and every failure of SQLite, whose commit is definitive); anything else
    (an unknown outcome, a bug, an interrupt) leaves the answer to the store.
    """
    return isinstance(exc, OutcomeUnknown) or not isinstance(exc, FerryError)


@dataclass(frozen=True)
class Record:
    key: str
    value: bytes
    #: the revision of the txn that last wrote this key (its mod revision)
    revision: int


@dataclass(frozen=True)
class Compare:
    """Require ``key`` to be at mod revision ``revision`` (``ABSENT``: not to exist)."""

    key: str
    revision: int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes


@dataclass(frozen=True)
class Delete:
    """Delete ``key``; deleting an absent key is allowed and changes nothing."""

    key: str


Op = Put | Delete


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class Event:
    type: EventType
    key: str
    #: the new value of a put; empty for a delete
    value: bytes
    revision: int


@dataclass(frozen=True)
class Page:
    """One page of a list, read consistently at ``revision``."""

    records: tuple[Record, ...]
    revision: int
    #: True when keys under the prefix remain after the last record
    more: bool


class Watch(abc.ABC):
    """An open watch on a prefix. Iterate it, or :meth:`poll` with a timeout.

    Iteration ends when :meth:`close` is called (from any thread). A lost
    connection raises ``StoreUnavailable`` once the events already received
    are consumed; resume with ``store.watch(prefix, w.next_revision)``.
    """

    @property
    @abc.abstractmethod
    def next_revision(self) -> int:
        """The revision to resume from: one past the last revision delivered."""

    @abc.abstractmethod
    def poll(self, timeout: float | None = None) -> Event | None:
        """The next event; None after ``timeout`` seconds without one, or once closed."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the watch and release its connection; idempotent."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """True once :meth:`close` was called."""

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.poll(None)
            if event is None:
                return
            yield event

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def conflict(key: str, actual: int, expected: int) -> Conflict:
    """The one wording of a lost compare, shared by every backend."""
    have = "absent" if actual == ABSENT else f"at revision {actual}"
    want = "absent" if expected == ABSENT else f"at revision {expected}"
    return Conflict(f"catalog key {key!r} is {have}, not {want}: re-read and retry", key=key)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest byte string greater than every string starting with ``prefix``.

    ``b""`` (no upper bound) when the prefix is empty or all 0xff bytes, as in etcd.
    """
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b""
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


class CatalogStore(abc.ABC):
    """Compare-and-swap key/value store behind Ferry's catalog (see the module doc)."""

    # -- the contract each backend implements ---------------------------------

    @abc.abstractmethod
    def get(self, key: str) -> Record | None:
        """Return the record at ``key``, or None."""

    @abc.abstractmethod
    def _apply(self, compares: Sequence[Compare], ops: Sequence[Op]) -> int:
        """Backend part of :meth:`txn`; arguments are already validated."""

    @abc.abstractmethod
    def range(self, prefix: str, start_after: str = "", limit: int = 0) -> Page:
        """One page of records whose key starts with ``prefix``, in key order.

        ``start_after`` skips keys up to and including it; ``limit`` 0 means all.
        """

    @abc.abstractmethod
    def watch(self, prefix: str, from_revision: int) -> Watch:
        """Watch changes under ``prefix`` from ``from_revision`` on (inclusive).

        ``from_revision`` 0 means "changes after the current revision".
        Raises ``Compacted`` (now or from the watch) if that history is gone.
        """

    @abc.abstractmethod
    def revision(self) -> int:
        """The store's current revision (0 for a store never written)."""

    @abc.abstractmethod
    def compact(self, revision: int) -> None:
        """Discard watch history before ``revision``; compacting again lower is a no-op.

        ``revision`` beyond the current revision is an ``InvalidArgument``.
        """

    @abc.abstractmethod
    def election(self, name: str, candidate: str) -> LeaderElection:
        """A contender named ``candidate`` for the leadership called ``name``."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise a StoreError or StoreUnavailable unless the store can serve reads and writes."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store's resources."""

    # -- derived operations, identical for every backend ----------------------

    def txn(self, compares: Sequence[Compare], ops: Sequence[Op]) -> int:
        """If every compare holds, apply ``ops`` atomically; return the store's revision.

        Raises ``Conflict`` (its ``key`` names the first compare that failed)
        and changes nothing otherwise. A key may appear in at most one op.
        """
        seen: set[str] = set()
        for item in (*compares, *ops):
            if not item.key:
                raise InvalidArgument("catalog keys must not be empty")
        for op in ops:
            if op.key in seen:
                raise InvalidArgument(f"catalog key {op.key!r} is written twice in one txn")
            seen.add(op.key)
        for compare in compares:
            if compare.revision < 0:
                raise InvalidArgument(f"revision {compare.revision} of {compare.key!r} is < 0")
        return self._apply(tuple(compares), tuple(ops))

    def put(self, key: str, value: bytes, expected_revision: int | None = None) -> int:
        """Write ``value`` at ``key`` and return the new revision.

        ``expected_revision=None`` writes unconditionally; ``ABSENT`` requires
        the key not to exist; any other number requires the key's current
        revision to equal it. A failed condition raises ``Conflict``.
        """
        compares = [] if expected_revision is None else [Compare(key, expected_revision)]
        return self.txn(compares, [Put(key, value)])

    def delete(self, key: str, expected_revision: int | None = None) -> bool:
        """Delete ``key``; return False if it did not exist.

        With ``expected_revision`` set, raise ``Conflict`` if the key exists at
        another revision.
        """
        while True:
            record = self.get(key)
            if record is None:
                return False
            if expected_revision is not None and record.revision != expected_revision:
                raise conflict(key, record.revision, expected_revision)
            try:
                self.txn([Compare(key, record.revision)], [Delete(key)])
            except Conflict:
                if expected_revision is not None:
                    raise
                continue  # rewritten or deleted since our read: look again
            return True

    def list(self, prefix: str, start_after: str = "", limit: int = 0) -> list[Record]:
        """The records of :meth:`range` without the page's revision."""
        return list(self.range(prefix, start_after, limit).records)
