"""The catalog store: one small compare-and-swap key/value interface.

Keys are ``/``-separated strings (``volumes/<id>``, ``names/<name>``,
``nodes/<id>``); values are opaque bytes. Every key carries a revision that
grows on each write; a conditional write names the revision it read, and
loses with :class:`~csi_driver.core.errors.Conflict` if the key moved since.
Two real backends implement it: SQLite (embedded default) and, later, etcd.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

#: ``expected_revision`` value meaning "the key must not exist yet".
ABSENT = 0


@dataclass(frozen=True)
class Record:
    key: str
    value: bytes
    revision: int


class CatalogStore(abc.ABC):
    """Compare-and-swap key/value store behind Ferry's catalog."""

    @abc.abstractmethod
    def get(self, key: str) -> Record | None:
        """Return the record at ``key``, or None."""

    @abc.abstractmethod
    def put(self, key: str, value: bytes, expected_revision: int | None = None) -> int:
        """Write ``value`` at ``key`` and return the new revision.

        ``expected_revision=None`` writes unconditionally; ``ABSENT`` requires
        the key not to exist; any other number requires the key's current
        revision to equal it. A failed condition raises ``Conflict``.
        """

    @abc.abstractmethod
    def delete(self, key: str, expected_revision: int | None = None) -> bool:
        """Delete ``key``; return False if it did not exist.

        With ``expected_revision`` set, raise ``Conflict`` if the key exists at
        another revision.
        """

    @abc.abstractmethod
    def list(self, prefix: str, start_after: str = "", limit: int = 0) -> list[Record]:
        """Records whose key starts with ``prefix``, in key order.

        ``start_after`` skips keys up to and including it; ``limit`` 0 means all.
        """

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise StoreError unless the store can serve reads and writes."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store's resources."""
