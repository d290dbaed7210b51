"""The node's image reconciler on a real pool and a real catalog store."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.core.model import GiB, MiB
from csi_driver.core.records import (
    FailureReason,
    ImagePhase,
    ImageSpec,
    ImageStatus,
    image_status_key,
    revise,
)
from csi_driver.node.agent import NodeAgent
from csi_driver.node.reconcile.images import ImageReconciler, image_runner
from csi_driver.reconcile.wait import wait_for
from csi_driver.store.base import Record
from csi_driver.store.records import Versioned, put, read
from csi_driver.store.sqlite import SqliteStore
from tests.node.conftest import new_volume_id

SIZE = 8 * MiB


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "catalog.db")
    yield s
    s.close()


def _spec(n: int, size: int = SIZE, *, thin: bool = True) -> ImageSpec:
    return ImageSpec(new_volume_id(n), "node-a", size, 1, thin=thin)


def _ready_again(store: SqliteStore, spec: ImageSpec, what: str) -> None:
    """Waits (30 s at most, else fails) until ``spec``'s status reads READY."""
    wait_for(
        store,
        spec.status_key,
        lambda r: r is not None and b'"phase":"ready"' in r.value,
        time.monotonic() + 30,
        waiting_for=what,
    )


def _status(store: SqliteStore, n: int) -> ImageStatus | None:
    found = read(store, ImageStatus, image_status_key("node-a", new_volume_id(n)))
    return found.value if found else None


def test_creates_grows_and_deletes_toward_the_spec(store: SqliteStore, agent: NodeAgent) -> None:
    reconcile = ImageReconciler(store, agent)
    spec = _spec(1)
    store.put(spec.key, put(spec).value)
    assert reconcile(spec.volume_id) is None
    assert _status(store, 1) == ImageStatus(spec.volume_id, "node-a", ImagePhase.READY, 1, SIZE)
    assert agent.pool.require(spec.volume_id).size_bytes == SIZE

    grown = revise(spec, size_bytes=2 * SIZE)
    store.put(grown.key, put(grown).value)
    reconcile(spec.volume_id)
    status = _status(store, 1)
    assert status is not None and (status.observed_generation, status.size_bytes) == (2, 2 * SIZE)
    assert agent.pool.require(spec.volume_id).size_bytes == 2 * SIZE

    doomed = revise(grown, deleted=True)
    store.put(doomed.key, put(doomed).value)
    reconcile(spec.volume_id)
    status = _status(store, 1)
    assert status is not None and (status.phase, status.observed_generation) == (
        ImagePhase.DELETED,
        3,
    )
    assert agent.pool.get(spec.volume_id) is None


def test_a_repeat_changes_nothing(store: SqliteStore, agent: NodeAgent) -> None:
    reconcile = ImageReconciler(store, agent)
    spec = _spec(2)
    store.put(spec.key, put(spec).value)
    reconcile(spec.volume_id)
    record = store.get(spec.status_key)
    reconcile(spec.volume_id)
    again = store.get(spec.status_key)
    assert record is not None and again is not None and again.revision == record.revision


def test_no_room_is_a_final_refusal_reported_once(store: SqliteStore, agent: NodeAgent) -> None:
    reconcile = ImageReconciler(store, agent)
    spec = _spec(3, size=agent.pool.capacity_bytes + GiB)
    store.put(spec.key, put(spec).value)
    assert reconcile(spec.volume_id) is None  # final: not retried
    status = _status(store, 3)
    assert status is not None and status.phase is ImagePhase.FAILED
    assert status.reason is FailureReason.TOO_LARGE and "exceeds the whole pool" in status.message
    assert agent.pool.get(spec.volume_id) is None


def test_an_absent_spec_never_deletes_an_image(store: SqliteStore, agent: NodeAgent) -> None:
    volume_id = new_volume_id(4)
    agent.pool.create_image(volume_id, SIZE, 1, thin=True)
    assert ImageReconciler(store, agent)(volume_id) is None
    assert agent.pool.get(volume_id) is not None
    assert _status(store, 4) is None


def test_a_ready_image_that_vanished_is_reported_not_recreated(
    store: SqliteStore, agent: NodeAgent
) -> None:
    reconcile = ImageReconciler(store, agent)
    spec = _spec(5)
    store.put(spec.key, put(spec).value)
    reconcile(spec.volume_id)
    agent.pool.delete_image(spec.volume_id)  # lost outside Ferry
    reconcile(spec.volume_id)
    status = _status(store, 5)
    assert status is not None and status.reason is FailureReason.LOST
    assert agent.pool.get(spec.volume_id) is None


def test_a_status_is_not_written_for_a_spec_that_is_gone(
    store: SqliteStore, agent: NodeAgent
) -> None:
    reconcile = ImageReconciler(store, agent)
    spec = _spec(6)
    store.put(spec.key, put(spec).value)
    reconcile(spec.volume_id)
    store.delete(spec.key)
    store.delete(spec.status_key)
    reconcile(spec.volume_id)
    assert store.get(spec.status_key) is None


def test_a_pass_holding_an_older_spec_after_the_delete_makes_no_image(
    store: SqliteStore, agent: NodeAgent
) -> None:
    """A worker's pass whose cache still shows the volume's first spec, running after
    the image was deleted and the records removed, must not create the image again:
    no record would be left to delete it."""
    reconcile = ImageReconciler(store, agent)
    spec = _spec(11)
    first = Versioned(spec, store.put(spec.key, put(spec).value))
    assert reconcile.reconcile(first) is not None
    doomed = revise(spec, deleted=True)
    deleted = Versioned(doomed, store.put(doomed.key, put(doomed).value))
    status = reconcile.reconcile(deleted)
    assert status is not None and status.phase is ImagePhase.DELETED
    store.delete(spec.key)
    store.delete(spec.status_key)

    assert reconcile.reconcile(first) is None
    assert agent.pool.get(spec.volume_id) is None
    assert store.get(spec.status_key) is None


def test_a_restarted_node_converges_to_specs_written_while_it_was_down(
    store: SqliteStore, agent: NodeAgent
) -> None:
    specs = [_spec(10 + i) for i in range(4)]
    for spec in specs:
        store.put(spec.key, put(spec).value)
    runner, _ = image_runner(store, agent, resync_s=3600)
    runner.start()
    try:
        for spec in specs:

            def ready(record: Record | None) -> bool:
                return record is not None and b'"phase":"ready"' in record.value

            wait_for(store, spec.status_key, ready, time.monotonic() + 60, waiting_for="image")
            assert agent.pool.get(spec.volume_id) is not None
        doomed = revise(specs[0], deleted=True)
        store.put(doomed.key, put(doomed).value)  # a change while it runs
        wait_for(
            store,
            doomed.status_key,
            lambda r: r is not None and b'"phase":"deleted"' in r.value,
            time.monotonic() + 60,
            waiting_for="deletion",
        )
        assert agent.pool.get(doomed.volume_id) is None
    finally:
        assert runner.stop(timeout=30)


def test_a_status_removed_right_after_the_callers_reconcile_is_written_again(
    store: SqliteStore, agent: NodeAgent
) -> None:
    """The runner skips the passes its own events queue after a reconcile in the
    caller's thread (all-in-one), but not a pass for anyone else's change."""
    runner, local = image_runner(store, agent, resync_s=3600)
    runner.start()
    try:
        spec = _spec(20)
        status = local(Versioned(spec, store.put(spec.key, put(spec).value)))
        assert status is not None and status.phase is ImagePhase.READY
        store.delete(spec.status_key)  # well within the skip's few seconds
        _ready_again(store, spec, "the status written again")
    finally:
        assert runner.stop(timeout=30)


def test_a_status_rewritten_by_anyone_else_is_corrected_from_the_spec(
    store: SqliteStore, agent: NodeAgent
) -> None:
    """The runner's status source drops only the events of its own writes (same
    revision): another writer's status, even a well-formed one, gets a pass."""
    runner, local = image_runner(store, agent, resync_s=3600)
    runner.start()
    try:
        spec = _spec(21)
        status = local(Versioned(spec, store.put(spec.key, put(spec).value)))
        assert status is not None and status.phase is ImagePhase.READY
        wrong = ImageStatus(
            spec.volume_id,
            "node-a",
            ImagePhase.FAILED,
            spec.generation,
            reason=FailureReason.HOST_ERROR,
            message="written by someone else",
        )
        store.put(spec.status_key, put(wrong).value)
        _ready_again(store, spec, "the status corrected")
    finally:
        assert runner.stop(timeout=30)
