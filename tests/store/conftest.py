"""Store backends for the contract suite: SQLite, a real etcd, the catalog service.

``backend`` is parametrized over five: each SQLite test gets a fresh
file; the etcd tests of a module share one real single-member etcd (started
once, emptied before each test, always stopped), ``etcds`` likewise one
that admits only clients of its CA (``--client-cert-auth``), its CA and
certificates made by Ferry's own pki, and ``etcds-own`` one whose PKI is
not Ferry's at all (an existing etcd's, spoken to with ``--catalog-tls-dir``);
each ``ferry`` test gets a real ``ferry.v1.Catalog`` server on loopback over
its own SQLite file. Tests
that need etcd skip with the reason only when the ``etcd`` binary is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from csi_driver.store.base import CatalogStore
from tests.certs import ForeignPki, Pki
from tests.store.backends import Backend, CatalogServer
from tests.store.etcd_cluster import ETCD, SKIP_REASON, EtcdCluster, EtcdTls


def require_etcd() -> None:
    if ETCD is None:
        pytest.skip(SKIP_REASON)


@pytest.fixture(scope="module")
def etcd_single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    require_etcd()
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), 1).start()
    yield cluster
    cluster.close()


@dataclass(frozen=True)
class TlsEtcd:
    """A TLS etcd, the Ferry CA it trusts, and a ``controller`` bundle of that CA."""

    cluster: EtcdCluster
    pki: Pki
    client: Path


@pytest.fixture(scope="module")
def etcd_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsEtcd]:
    require_etcd()
    base = tmp_path_factory.mktemp("etcd-tls")
    pki = Pki.create(base / "pki")
    # 127.0.0.1: etcd's gateway dials its own listener and checks that name.
    server = pki.issue("catalog", ips=("127.0.0.1",))
    client = pki.issue("controller")
    cluster = EtcdCluster(base, 1, EtcdTls(server, client)).start()
    yield TlsEtcd(cluster, pki, client)
    cluster.close()


@pytest.fixture(scope="module")
def etcd_own_pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A TLS etcd under a PKI that is not Ferry's; ``.tls.client`` is a bundle it accepts."""
    require_etcd()
    base = tmp_path_factory.mktemp("etcd-own-pki")
    pki = ForeignPki.create(base / "pki")
    server = pki.issue("etcd-member", dns=("localhost",), ips=("127.0.0.1",), server=True)
    cluster = EtcdCluster(base, 1, EtcdTls(server, pki.issue("ferry-client"))).start()
    yield cluster
    cluster.close()


@pytest.fixture(params=["sqlite", "etcd", "etcds", "etcds-own", "ferry"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    server: CatalogServer | None = None
    if request.param == "sqlite":
        chosen = Backend("sqlite", f"sqlite://{tmp_path}/catalog.db", lambda: None)
        chosen.restart = chosen.close_all  # a restart of an embedded store is a reopen
    elif request.param == "etcd":
        cluster: EtcdCluster = request.getfixturevalue("etcd_single")
        cluster.wipe()
        chosen = Backend("etcd", cluster.url, cluster.restart)
    elif request.param == "etcds":
        secured: TlsEtcd = request.getfixturevalue("etcd_tls")
        secured.cluster.wipe()
        chosen = Backend("etcds", secured.cluster.url, secured.cluster.restart, secured.client)
    elif request.param == "etcds-own":
        own: EtcdCluster = request.getfixturevalue("etcd_own_pki")
        own.wipe()
        assert own.tls is not None
        chosen = Backend("etcds-own", own.url, own.restart, own.tls.client)
    else:
        server = CatalogServer(tmp_path / "served.db").start()
        chosen = Backend("ferry", server.url, server.restart)
    yield chosen
    chosen.close_all()
    if server is not None:
        server.stop()


@pytest.fixture
def store(backend: Backend) -> CatalogStore:
    return backend.open()
