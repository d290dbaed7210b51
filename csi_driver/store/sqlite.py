"""SQLite backend of the catalog store: the embedded default.

One table of keys with per-key revisions drawn from one global counter, so
revisions only grow (as in etcd). WAL mode lets a controller and node agents
on the same machine share one file; writes take an IMMEDIATE transaction so
compare-and-swap is atomic across processes too.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from csi_driver.core.errors import Conflict, StoreError
from csi_driver.store.base import ABSENT, CatalogStore, Record

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0);
"""


class SqliteStore(CatalogStore):
    """Catalog store in one SQLite file (``:memory:`` is refused: it would not persist)."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 10.0) -> None:
        self._path = Path(path)
        self._timeout = busy_timeout_s
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._connection()
            conn.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                f"cannot open catalog database {self._path}: {exc}; "
                "check that its directory exists and is writable"
            ) from exc

    @property
    def path(self) -> Path:
        return self._path

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self._path, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"catalog database {self._path} is not writable: {exc}") from exc
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"catalog commit failed: {exc}") from exc

    @staticmethod
    def _next_revision(conn: sqlite3.Connection) -> int:
        conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
        row = conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        return int(row[0])

    @staticmethod
    def _current(conn: sqlite3.Connection, key: str) -> int:
        row = conn.execute("SELECT revision FROM kv WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else ABSENT

    def get(self, key: str) -> Record | None:
        try:
            row = (
                self._connection()
                .execute("SELECT key, value, revision FROM kv WHERE key = ?", (key,))
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise StoreError(f"catalog read of {key!r} failed: {exc}") from exc
        return Record(row[0], bytes(row[1]), int(row[2])) if row else None

    def put(self, key: str, value: bytes, expected_revision: int | None = None) -> int:
        try:
            with self._write() as conn:
                current = self._current(conn, key)
                if expected_revision is not None and current != expected_revision:
                    raise Conflict(
                        f"catalog key {key!r} is at revision {current}, "
                        f"not {expected_revision}: re-read and retry"
                    )
                revision = self._next_revision(conn)
                conn.execute(
                    "INSERT INTO kv (key, value, revision) VALUES (?, ?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
                    "revision = excluded.revision",
                    (key, value, revision),
                )
                return revision
        except sqlite3.Error as exc:
            raise StoreError(f"catalog write of {key!r} failed: {exc}") from exc

    def delete(self, key: str, expected_revision: int | None = None) -> bool:
        try:
            with self._write() as conn:
                current = self._current(conn, key)
                if current == ABSENT:
                    return False
                if expected_revision is not None and current != expected_revision:
                    raise Conflict(
                        f"catalog key {key!r} is at revision {current}, "
                        f"not {expected_revision}: re-read and retry"
                    )
                conn.execute("DELETE FROM kv WHERE key = ?", (key,))
                self._next_revision(conn)
                return True
        except sqlite3.Error as exc:
            raise StoreError(f"catalog delete of {key!r} failed: {exc}") from exc

    def list(self, prefix: str, start_after: str = "", limit: int = 0) -> list[Record]:
        # Range scan on the primary key: prefix <= key < prefix + U+10FFFF.
        low = max(prefix, start_after)
        query = "SELECT key, value, revision FROM kv WHERE key >= ? AND key < ?"
        args: list[object] = [low, prefix + "\U0010ffff"]
        if start_after and start_after >= prefix:
            query += " AND key > ?"
            args.append(start_after)
        query += " ORDER BY key"
        if limit > 0:
            query += " LIMIT ?"
            args.append(limit)
        try:
            rows = self._connection().execute(query, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"catalog list of {prefix!r} failed: {exc}") from exc
        return [Record(r[0], bytes(r[1]), int(r[2])) for r in rows]

    def ping(self) -> None:
        try:
            with self._write() as conn:
                conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"catalog database {self._path} is unusable: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()
