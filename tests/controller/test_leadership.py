"""Leadership in one process, on a real SQLite catalog: campaign, lead, resign.

(Takeover after a leader's death, between processes and on etcd, is in
test_failover.py.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from csi_driver.controller.leadership import ELECTION, Leadership
from csi_driver.store.catalog import Catalog
from csi_driver.store.leader import leader_key
from csi_driver.store.sqlite import SqliteStore


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    store = SqliteStore(tmp_path / "catalog.db")
    yield Catalog(store)
    store.close()


def _eventually(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.02)


def _gauge() -> float | None:
    return REGISTRY.get_sample_value("ferry_controller_leader")


def _leader(catalog: Catalog) -> str | None:
    record = catalog.store.get(leader_key(ELECTION))
    return record.value.decode() if record else None


def test_one_leads_and_a_stop_hands_over_to_the_standby(catalog: Catalog) -> None:
    first = Leadership(catalog, "first", sweep_interval_s=0.1)
    second = Leadership(catalog, "second", sweep_interval_s=0.1)
    first.start()
    try:
        _eventually(lambda: first.is_leader)
        assert _gauge() == 1
        second.start()
        time.sleep(0.5)  # several of the standby's campaign retries
        assert (first.is_leader, second.is_leader) == (True, False)
        assert _leader(catalog) == "first"

        first.stop()  # resigns: the standby need not wait for anything to lapse
        _eventually(lambda: second.is_leader, timeout=2)
        assert not first.is_leader
        assert _leader(catalog) == "second"
    finally:
        first.stop()
        second.stop()
    assert _gauge() == 0
    assert _leader(catalog) is None
