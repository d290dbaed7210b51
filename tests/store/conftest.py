"""Store backends for the contract suite: a SQLite file and a real etcd process.

``backend`` is parametrized over both; each SQLite test gets a fresh file,
the etcd tests of a module share one real single-member etcd (started once,
emptied before each test, always stopped). Tests that need etcd skip with
the reason only when the ``etcd`` binary is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.store.base import CatalogStore
from tests.store.backends import Backend
from tests.store.etcd_cluster import ETCD, SKIP_REASON, EtcdCluster


def require_etcd() -> None:
    if ETCD is None:
        pytest.skip(SKIP_REASON)


@pytest.fixture(scope="module")
def etcd_single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    require_etcd()
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), 1).start()
    yield cluster
    cluster.close()


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        chosen = Backend("sqlite", f"sqlite://{tmp_path}/catalog.db", lambda: None)
        chosen.restart = chosen.close_all  # a restart of an embedded store is a reopen
    else:
        cluster: EtcdCluster = request.getfixturevalue("etcd_single")
        cluster.wipe()
        chosen = Backend("etcd", cluster.url, cluster.restart)
    yield chosen
    chosen.close_all()


@pytest.fixture
def store(backend: Backend) -> CatalogStore:
    return backend.open()
