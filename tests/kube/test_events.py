"""Which Kubernetes Events Ferry emits about a volume, and their words (pure)."""

from __future__ import annotations

import logging

import pytest

from csi_driver.kube.events import (
    MAX_NOTE,
    EventType,
    LoggingSink,
    MobilityEvents,
    Reason,
    VolumeEvent,
    VolumeRef,
    failed_over,
    failover_waiting,
    move_failed,
    move_finished,
    move_started,
    move_waiting,
    replicas_degraded,
    replication_behind,
    seconds_text,
    size_text,
)

VOL = VolumeRef("vol-" + "a" * 32, "pvc-0b7c")
#: 2026-11-26T23:40:01Z
STAMP = 1795736401.0
OTHER = VolumeRef("vol-" + "b" * 32, "pvc-9f21")
MiB = 1024 * 1024


class Recorder:
    """An EventSink that keeps what it was given, for the assertions."""

    def __init__(self) -> None:
        self.events: list[tuple[VolumeRef, VolumeEvent]] = []

    def emit(self, volume: VolumeRef, event: VolumeEvent) -> None:
        self.events.append((volume, event))

    @property
    def reasons(self) -> list[Reason]:
        return [e.reason for _, e in self.events]


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (64 * MiB, "64 MiB"), (3 * 1024**3, "3 GiB")],
)
def test_sizes_read_as_an_operator_reads_them(n: int, text: str) -> None:
    assert size_text(n) == text


@pytest.mark.parametrize(
    ("s", "text"), [(0.42, "0.4s"), (59.96, "60.0s"), (61, "1m01s"), (7260, "2h01m")]
)
def test_durations(s: float, text: str) -> None:
    assert seconds_text(s) == text


#: (event, reason, type, words its note must hold)
WORDS = [
    (
        move_started("node-1", "node-2", 48 * MiB, warm=True),
        "MoveStarted",
        EventType.NORMAL,
        ["from node node-1 to node node-2", "48 MiB to send", "delta against its warm replica"],
    ),
    (
        move_started("node-1", "node-3", 3 * 1024**3, warm=False),
        "MoveStarted",
        EventType.NORMAL,
        ["3 GiB to send", "a full copy"],
    ),
    (
        move_waiting("node-2", "the volume to be unstaged on node-1", 8 * MiB, 48 * MiB),
        "MoveWaiting",
        EventType.NORMAL,
        ["waiting for the volume to be unstaged on node-1", "8 MiB of 48 MiB sent"],
    ),
    (
        move_finished("node-1", "node-2", 1.84, 48 * MiB, 7),
        "MoveFinished",
        EventType.NORMAL,
        ["in 1.8s", "48 MiB sent and verified", "node-2 is the primary (epoch 7)"],
    ),
    (
        move_failed("node-2", "node-2 has 10 MiB free, the volume needs 64 MiB"),
        "MoveFailed",
        EventType.WARNING,
        ["cannot proceed: node-2 has 10 MiB free", "stuck move"],
    ),
    (
        failed_over("node-1", "node-3", 9, 12.5, STAMP),
        "FailedOver",
        EventType.WARNING,
        [
            "node-1 holding the primary was lost",
            "replica on node node-3 (epoch 9)",
            "Data-loss window: writes acknowledged after 2026-11-26T23:40:01Z (up to 12.5s)",
            "divergent data is kept as a snapshot image",
        ],
    ),
    (
        failover_waiting("node-1", 95),
        "FailoverWaiting",
        EventType.WARNING,
        ["unreachable for 1m35s", "failoverPolicy is wait", "set failoverPolicy: promote"],
    ),
    (
        replication_behind("node-2", 95, 120 * MiB, 30),
        "ReplicationBehindRPO",
        EventType.WARNING,
        ["node-2 is 1m35s behind", "120 MiB not yet shipped", "rpoSeconds of 30"],
    ),
    (
        replicas_degraded(1, 2, "no other ready node in zone z1 has 64 MiB free"),
        "ReplicasDegraded",
        EventType.WARNING,
        ["1 of 2 replicas in place: no other ready node", "lower replicas"],
    ),
]


@pytest.mark.parametrize(
    ("event", "reason", "event_type", "words"),
    WORDS,
    ids=[w[1] + str(i) for i, w in enumerate(WORDS)],
)
def test_each_event_has_its_reason_type_and_numbers(
    event: VolumeEvent, reason: str, event_type: EventType, words: list[str]
) -> None:
    assert event.reason.reason == reason
    assert event.event_type is event_type
    for phrase in words:
        assert phrase in event.note, (phrase, event.note)
    assert len(event.note.encode()) <= MAX_NOTE


def test_reasons_are_camel_case_and_unique() -> None:
    names = [r.reason for r in Reason]
    assert len(set(names)) == len(names)
    assert all(n[0].isupper() and n.isalnum() for n in names)
    assert all(r.action.isalpha() for r in Reason)


def test_a_long_note_is_cut_to_what_kubernetes_accepts() -> None:
    event = move_failed("node-2", "é" * 2000)
    assert len(event.note.encode()) <= MAX_NOTE
    assert event.note.endswith("...")


def test_moves_and_failovers_are_emitted_every_time() -> None:
    sink = Recorder()
    events = MobilityEvents(sink)
    events.move_started(VOL, "node-1", "node-2", MiB, warm=True)
    events.move_waiting(VOL, "node-2", "the volume to be unstaged on node-1", 0, MiB)
    events.move_waiting(VOL, "node-2", "the volume to be unstaged on node-1", 0, MiB)
    events.move_finished(VOL, "node-1", "node-2", 1.0, MiB, 2)
    events.failed_over(OTHER, "node-2", "node-3", 3, 4.0, STAMP)
    assert sink.reasons == [
        Reason.MOVE_STARTED,
        Reason.MOVE_WAITING,
        Reason.MOVE_WAITING,
        Reason.MOVE_FINISHED,
        Reason.FAILED_OVER,
    ]
    assert [v for v, _ in sink.events] == [VOL] * 4 + [OTHER]


def test_replication_lag_is_reported_when_it_crosses_the_rpo_only() -> None:
    sink = Recorder()
    events = MobilityEvents(sink)
    for lag in (3, 10, 29):  # within the RPO from the start: nothing to say
        events.replication_lag(VOL, "node-2", lag, MiB, rpo_seconds=30)
    assert sink.events == []
    for lag in (31, 45, 80):  # behind: said once
        events.replication_lag(VOL, "node-2", lag, MiB, rpo_seconds=30)
    events.replication_lag(VOL, "node-3", 50, MiB, rpo_seconds=30)  # another replica: its own
    events.replication_lag(OTHER, "node-2", 50, MiB, rpo_seconds=30)  # another volume: its own
    for lag in (12, 4):  # back within: said once
        events.replication_lag(VOL, "node-2", lag, 0, rpo_seconds=30)
    events.replication_lag(VOL, "node-2", 40, MiB, rpo_seconds=30)  # behind again: said again
    assert [(v.volume_id[-1], e.reason) for v, e in sink.events] == [
        ("a", Reason.REPLICATION_BEHIND),
        ("a", Reason.REPLICATION_BEHIND),
        ("b", Reason.REPLICATION_BEHIND),
        ("a", Reason.REPLICATION_CAUGHT_UP),
        ("a", Reason.REPLICATION_BEHIND),
    ]
    assert "node-3" in sink.events[1][1].note


def test_no_rpo_means_no_lag_events() -> None:
    sink = Recorder()
    MobilityEvents(sink).replication_lag(VOL, "node-2", 10_000, MiB, rpo_seconds=0)
    assert sink.events == []


def test_replica_count_is_reported_on_a_change_only() -> None:
    sink = Recorder()
    events = MobilityEvents(sink)
    events.replica_count(VOL, 2, 2, "")
    events.replica_count(VOL, 1, 2, "node-3 left")
    events.replica_count(VOL, 1, 2, "node-3 left")
    events.replica_count(VOL, 2, 2, "")
    events.replica_count(VOL, 2, 2, "")
    assert sink.reasons == [Reason.REPLICAS_DEGRADED, Reason.REPLICAS_RESTORED]
    assert "node-3 left" in sink.events[0][1].note


def test_failover_waiting_once_per_loss() -> None:
    sink = Recorder()
    events = MobilityEvents(sink)
    events.failover_waiting(VOL, "node-1", 40)
    events.failover_waiting(VOL, "node-1", 80)
    events.primary_reachable(VOL, "node-1")
    events.failover_waiting(VOL, "node-1", 5)
    events.failed_over(VOL, "node-1", "node-2", 4, 3.0, STAMP)
    events.failover_waiting(VOL, "node-1", 5)
    assert sink.reasons == [
        Reason.FAILOVER_WAITING,
        Reason.FAILOVER_WAITING,
        Reason.FAILED_OVER,
        Reason.FAILOVER_WAITING,
    ]


def test_forget_drops_a_deleted_volumes_states() -> None:
    sink = Recorder()
    events = MobilityEvents(sink)
    events.replica_count(VOL, 0, 1, "no room")
    events.forget(VOL.volume_id)
    events.replica_count(VOL, 0, 1, "no room")
    assert sink.reasons == [Reason.REPLICAS_DEGRADED, Reason.REPLICAS_DEGRADED]


def test_without_a_cluster_events_are_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    events = MobilityEvents(LoggingSink())
    with caplog.at_level(logging.INFO, logger="csi_driver.kube.events"):
        events.move_finished(VOL, "node-1", "node-2", 1.0, MiB, 2)
        events.failed_over(VOL, "node-2", "node-3", 3, 4.0, STAMP)
    first, second = caplog.records
    assert (first.levelno, second.levelno) == (logging.INFO, logging.WARNING)
    assert first.reason == "MoveFinished"
    assert second.volume == VOL.volume_id
    assert "Data-loss window" in second.getMessage()
