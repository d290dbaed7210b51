"""How the store tests open each backend (shared by fixtures and child processes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509

from csi_driver.catalog_api.server import register
from csi_driver.pki import CERT, ClientTlsBundle, TlsBundle, identity_of
from csi_driver.store.base import CatalogStore
from csi_driver.store.etcd import EtcdEndpoint, EtcdStore
from csi_driver.store.sqlite import SqliteStore
from csi_driver.store.url import open_store, parse_catalog_url
from csi_driver.transport import AgentSecurity, start_server

#: How test clients reach the plaintext loopback catalog servers below.
LOOPBACK_PLAINTEXT = AgentSecurity(plaintext_tcp=True)
#: Short enough that takeover tests stay quick, long enough for a loaded machine.
TEST_LEASE_TTL_S = 2
TEST_REQUEST_TIMEOUT_S = 3.0


def _bundle(tls_dir: Path) -> TlsBundle | ClientTlsBundle:
    cert = x509.load_pem_x509_certificate((tls_dir / CERT).read_bytes())
    return TlsBundle.load(tls_dir) if identity_of(cert) else ClientTlsBundle.load(tls_dir)


def open_url(url: str, tls_dir: Path | None = None) -> CatalogStore:
    """Open a store the way ``open_store`` does, with the tests' shorter etcd timings.

    ``tls_dir``: the bundle an ``etcds://`` catalog is spoken to with: a
    Ferry identity's (``--tls-dir``) or, naming none, an etcd's own PKI's
    (``--catalog-tls-dir``).
    """
    where = parse_catalog_url(url)
    if not where.etcd_endpoints:
        # The test catalog servers listen on loopback in plaintext (mTLS: test_remote.py).
        return open_store(url, security=LOOPBACK_PLAINTEXT)
    assert where.etcd_tls == (tls_dir is not None), f"{url} with TLS bundle {tls_dir}"
    return EtcdStore(
        [EtcdEndpoint(h, p) for h, p in where.etcd_endpoints],
        tls=_bundle(tls_dir) if tls_dir is not None else None,
        request_timeout_s=TEST_REQUEST_TIMEOUT_S,
        lease_ttl_s=TEST_LEASE_TTL_S,
    )


@dataclass
class Backend:
    """One backend under test: how to open clients on it and restart it."""

    name: str
    url: str
    restart: Callable[[], None]
    tls_dir: Path | None = None  # etcds: the client bundle
    opened: list[CatalogStore] = field(default_factory=list)

    def open(self) -> CatalogStore:
        store = open_url(self.url, self.tls_dir)
        self.opened.append(store)
        return store

    def close_all(self) -> None:
        for store in self.opened:
            store.close()


class CatalogServer:
    """A real ``ferry.v1.Catalog`` server on loopback TCP over a SQLite file.

    :meth:`restart` stops the server and its store and serves the same file
    on the same port again, as a restarted controller would.
    """

    def __init__(self, path: Path, progress_s: float = 5.0) -> None:
        self.path = path
        self.progress_s = progress_s
        self.port = 0
        self._server: grpc.Server | None = None
        self._store: SqliteStore | None = None

    @property
    def url(self) -> str:
        return f"ferry://127.0.0.1:{self.port}"

    def start(self) -> CatalogServer:
        self._store = SqliteStore(self.path)
        self._server, bound = start_server(
            f"tcp://127.0.0.1:{self.port}",
            [register(self._store, progress_s=self.progress_s)],
            max_workers=64,
        )
        self.port = int(bound.address.rpartition(":")[2])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=0).wait()
            self._server = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def restart(self) -> None:
        self.stop()
        self.start()
