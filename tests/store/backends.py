"""How the store tests open each backend (shared by fixtures and child processes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from csi_driver.store.base import CatalogStore
from csi_driver.store.etcd import EtcdEndpoint, EtcdStore
from csi_driver.store.url import open_store, parse_catalog_url

#: Short enough that takeover tests stay quick, long enough for a loaded machine.
TEST_LEASE_TTL_S = 2
TEST_REQUEST_TIMEOUT_S = 3.0


def open_url(url: str) -> CatalogStore:
    """Open a store the way ``open_store`` does, with the tests' shorter etcd timings."""
    where = parse_catalog_url(url)
    if where.sqlite_path is not None:
        return open_store(url)
    return EtcdStore(
        [EtcdEndpoint(h, p) for h, p in where.etcd_endpoints],
        request_timeout_s=TEST_REQUEST_TIMEOUT_S,
        lease_ttl_s=TEST_LEASE_TTL_S,
    )


@dataclass
class Backend:
    """One backend under test: how to open clients on it and restart it."""

    name: str
    url: str
    restart: Callable[[], None]
    opened: list[CatalogStore] = field(default_factory=list)

    def open(self) -> CatalogStore:
        store = open_url(self.url)
        self.opened.append(store)
        return store

    def close_all(self) -> None:
        for store in self.opened:
            store.close()
