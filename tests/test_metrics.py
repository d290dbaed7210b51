"""The mobility metrics the reconcilers record, read back as Prometheus exposes them."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from csi_driver.metrics import (
    DataFlow,
    MoveResult,
    count_moved,
    forget_replica,
    forget_volume,
    observe_failover,
    observe_move,
    observe_replicas,
    observe_replication,
    observe_sync,
    transfer_in_flight,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
VOL = "vol-" + "c" * 32


def exposed() -> Samples:
    """Every sample of the process's registry, as a scrape would read it."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(REGISTRY).decode())
        for s in family.samples
    }


def test_bytes_moved_count_per_flow() -> None:
    key = ("ferry_volume_moved_bytes_total", (("flow", "move"),))
    other = ("ferry_volume_moved_bytes_total", (("flow", "replication"),))
    before = exposed()
    count_moved(DataFlow.MOVE, 4096)
    count_moved(DataFlow.MOVE, 1024)
    count_moved(DataFlow.REPLICATION, 7)
    after = exposed()
    assert after[key] - before.get(key, 0) == 5120
    assert after[other] - before.get(other, 0) == 7


def test_move_and_failover_durations_are_histograms() -> None:
    count = ("ferry_move_duration_seconds_count", (("result", "done"),))
    under_two = ("ferry_move_duration_seconds_bucket", (("le", "2.0"), ("result", "done")))
    failovers = ("ferry_failover_duration_seconds_count", ())
    window_sum = ("ferry_failover_data_loss_window_seconds_sum", ())
    before = exposed()
    final = ("ferry_move_final_sync_bytes_total", ())
    observe_move(MoveResult.DONE, 1.5, final_bytes=4096)
    observe_move("done", 40)  # the move record's step value
    observe_move(MoveResult.ABANDONED, 3)
    observe_failover(12.5, seconds=8.0)
    observe_failover(3.0)  # the time since the node was declared lost is not known
    after = exposed()
    assert after[count] - before.get(count, 0) == 2
    assert after[under_two] - before.get(under_two, 0) == 1
    assert after[final] - before.get(final, 0) == 4096
    assert after[failovers] - before.get(failovers, 0) == 1
    # A float sum: earlier tests in the process leave it at any value.
    assert after[window_sum] - before.get(window_sum, 0) == pytest.approx(15.5)
    with pytest.raises(ValueError):
        observe_move("switched", 1.0)  # not an end: a bug, not a new series


def test_replica_syncs_per_volume() -> None:
    volume = "vol-" + "e" * 32
    observe_sync(volume, 1 << 20)
    observe_sync(volume, 4096)
    samples = exposed()
    assert samples[("ferry_replica_sync_bytes_total", (("volume", volume),))] == (1 << 20) + 4096
    assert samples[("ferry_replica_syncs_total", (("volume", volume),))] == 2
    forget_volume(volume)
    assert not [k for k in exposed() if ("volume", volume) in k[1]]


def test_replication_lag_per_volume_and_replica_until_forgotten() -> None:
    seconds = ("ferry_replication_lag_seconds", (("replica", "node-2"), ("volume", VOL)))
    lag_bytes = ("ferry_replication_lag_bytes", (("replica", "node-3"), ("volume", VOL)))
    wanted = ("ferry_volume_replicas_wanted", (("volume", VOL),))
    observe_replication(VOL, "node-2", 12.0, 1 << 20)
    observe_replication(VOL, "node-3", 2.0, 4096)
    observe_replicas(VOL, in_sync=1, wanted=2, rpo_seconds=30)
    samples = exposed()
    assert samples[seconds] == 12.0
    assert samples[lag_bytes] == 4096
    assert samples[wanted] == 2
    assert samples[("ferry_replication_rpo_seconds", (("volume", VOL),))] == 30
    forget_replica(VOL, "node-2")
    forget_replica(VOL, "node-2")  # twice: already gone is fine
    samples = exposed()
    assert seconds not in samples
    assert lag_bytes in samples
    forget_volume(VOL)
    forget_volume(VOL)
    assert not [k for k in exposed() if ("volume", VOL) in k[1]]


def test_transfers_in_flight_go_back_down_even_on_failure() -> None:
    key = ("ferry_transfers_in_flight", (("flow", "resync"),))
    start = exposed().get(key, 0)
    with transfer_in_flight(DataFlow.RESYNC):
        with transfer_in_flight(DataFlow.RESYNC):
            assert exposed()[key] == start + 2
        with pytest.raises(RuntimeError), transfer_in_flight(DataFlow.RESYNC):
            raise RuntimeError("link cut")
        assert exposed()[key] == start + 1
    assert exposed()[key] == start
