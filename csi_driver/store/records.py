"""Typed records over the store: read with a revision, write in a transaction.

The bridge between :mod:`csi_driver.core.records` (pure values) and the
store's bytes. A read returns the value together with the mod revision it
was read at, and :func:`unchanged_since` turns that into the compare that
makes a read-modify-write safe; :func:`put` is the op that writes a record
at its own key. So a multi-record change (a volume, its image and its
node's accounting) is one :meth:`CatalogStore.txn` built from typed values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from csi_driver.core.records import CatalogRecord, decode, encode
from csi_driver.store.base import ABSENT, CatalogStore, Compare, Put, Record

R = TypeVar("R", bound=CatalogRecord)
T = TypeVar("T")


@dataclass(frozen=True)
class Versioned(Generic[T]):
    """A value read from the store and the mod revision it was read at."""

    value: T
    revision: int


def read(store: CatalogStore, cls: type[R], key: str) -> Versioned[R] | None:
    """The ``cls`` record at ``key`` with its revision, or None when absent."""
    return from_stored(cls, store.get(key))


def from_stored(cls: type[R], stored: Record | None) -> Versioned[R] | None:
    """Decode a raw store record (from a get, a list or an informer's cache)."""
    if stored is None:
        return None
    return Versioned(decode(cls, stored.value), stored.revision)


def put(record: CatalogRecord) -> Put:
    """The op writing ``record`` at its key."""
    return Put(record.key, encode(record))


def unchanged_since(key: str, read_as: Versioned[T] | None) -> Compare:
    """The compare requiring ``key`` to be as it was read (``None``: still absent)."""
    return Compare(key, read_as.revision if read_as is not None else ABSENT)
