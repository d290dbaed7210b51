"""Kubernetes Events about a volume's data: reasons, types and words, as pure values.

Invariants:

- Every reason is a :class:`Reason` (CamelCase, as Kubernetes' own), with a
  fixed type: Warning when the user's data or its protection is at risk
  (failover, replication behind its RPO, fewer replicas than wanted, a move
  that cannot proceed), Normal otherwise.
- Each note says what happened, in numbers an operator can act on (bytes,
  seconds, nodes, epoch) and, for a Warning, what to do next; notes stay
  under Kubernetes' 1 KiB limit.
- :class:`MobilityEvents` emits a state (replication behind, replicas
  degraded) on its change only, so a reconciler may report every pass
  without flooding the PVC's events.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import threading
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

#: Kubernetes refuses an Event whose note exceeds 1 KiB.
MAX_NOTE = 1024


class EventType(enum.Enum):
    NORMAL = "Normal"
    WARNING = "Warning"


class Reason(enum.Enum):
    """Why an Event was emitted (Kubernetes' ``reason``), with its type and action."""

    MOVE_STARTED = ("MoveStarted", EventType.NORMAL, "Move")
    MOVE_WAITING = ("MoveWaiting", EventType.NORMAL, "Move")
    MOVE_FINISHED = ("MoveFinished", EventType.NORMAL, "Move")
    MOVE_FAILED = ("MoveFailed", EventType.WARNING, "Move")
    FAILED_OVER = ("FailedOver", EventType.WARNING, "Failover")
    FAILOVER_WAITING = ("FailoverWaiting", EventType.WARNING, "Failover")
    REPLICATION_BEHIND = ("ReplicationBehindRPO", EventType.WARNING, "Replicate")
    REPLICATION_CAUGHT_UP = ("ReplicationWithinRPO", EventType.NORMAL, "Replicate")
    REPLICAS_DEGRADED = ("ReplicasDegraded", EventType.WARNING, "Place")
    REPLICAS_RESTORED = ("ReplicasRestored", EventType.NORMAL, "Place")

    def __init__(self, reason: str, event_type: EventType, action: str) -> None:
        self.reason = reason
        self.event_type = event_type
        self.action = action


@dataclass(frozen=True)
class VolumeRef:
    """The volume an Event is about: Ferry's id and its CSI name (the PV's name)."""

    volume_id: str
    name: str


@dataclass(frozen=True)
class VolumeEvent:
    """One Event to emit about a volume."""

    reason: Reason
    note: str

    @property
    def event_type(self) -> EventType:
        return self.reason.event_type


def _event(reason: Reason, note: str) -> VolumeEvent:
    if len(note.encode()) > MAX_NOTE:
        note = note.encode()[: MAX_NOTE - 3].decode(errors="ignore") + "..."
    return VolumeEvent(reason, note)


def size_text(n: int) -> str:
    """Bytes as an operator reads them: binary units, three significant figures."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def seconds_text(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    minutes, seconds = divmod(round(s), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def utc_text(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the Events ------------------------------------------------------------------------


def move_started(source: str, target: str, bytes_to_send: int, warm: bool) -> VolumeEvent:
    how = "a delta against its warm replica there" if warm else "a full copy (no replica there)"
    return _event(
        Reason.MOVE_STARTED,
        f"Moving the volume's data from node {source} to node {target}: "
        f"{size_text(bytes_to_send)} to send, {how}.",
    )


def move_waiting(target: str, waiting_for: str, done_bytes: int, total_bytes: int) -> VolumeEvent:
    progress = f"{size_text(done_bytes)} of {size_text(total_bytes)} sent"
    return _event(
        Reason.MOVE_WAITING,
        f"Move to node {target} is waiting for {waiting_for} ({progress}); the pod "
        "starts when the move completes.",
    )


def move_finished(
    source: str, target: str, seconds: float, bytes_sent: int, epoch: int
) -> VolumeEvent:
    return _event(
        Reason.MOVE_FINISHED,
        f"Moved from node {source} to node {target} in {seconds_text(seconds)}: "
        f"{size_text(bytes_sent)} sent and verified; node {target} is the primary "
        f"(epoch {epoch}); node {source}'s copy stays as a replica if the volume's "
        "replica count wants one, else it is retired.",
    )


def move_failed(target: str, why: str) -> VolumeEvent:
    return _event(
        Reason.MOVE_FAILED,
        f"Move to node {target} cannot proceed: {why}. The data stays on its current "
        "primary; Ferry retries, see `ferry volumes` and docs/operations.md (stuck move).",
    )


def failed_over(
    lost_node: str, new_primary: str, epoch: int, loss_window_s: float, replicated_at: float
) -> VolumeEvent:
    """``loss_window_s``: how far the promoted replica lags the lost primary at most;
    ``replicated_at``: when the promoted image was captured (seconds since the epoch)."""
    return _event(
        Reason.FAILED_OVER,
        f"Node {lost_node} holding the primary was lost; promoted the replica on node "
        f"{new_primary} (epoch {epoch}). Data-loss window: writes acknowledged after "
        f"{utc_text(replicated_at)} (up to {seconds_text(loss_window_s)}) are not on the new "
        f"primary. If node {lost_node} returns, its divergent data is kept as a snapshot "
        "image, never merged: see docs/operations.md (node loss).",
    )


def failover_waiting(lost_node: str, since_s: float) -> VolumeEvent:
    return _event(
        Reason.FAILOVER_WAITING,
        f"Node {lost_node} holding the primary has been unreachable for "
        f"{seconds_text(since_s)}; failoverPolicy is wait, so the volume stays there "
        "until the node returns and no acknowledged write is lost. To fail over now, "
        "accepting the loss of writes since the last replication, set failoverPolicy: "
        "promote (VolumeAttributesClass).",
    )


def replication_behind(
    replica_node: str, lag_s: float, lag_bytes: int, rpo_seconds: int
) -> VolumeEvent:
    return _event(
        Reason.REPLICATION_BEHIND,
        f"Replica on node {replica_node} is {seconds_text(lag_s)} behind the primary "
        f"({size_text(lag_bytes)} not yet shipped), beyond its rpoSeconds of {rpo_seconds}. "
        "A failover now would lose that much; check the link to that node and the "
        "ferry_replication_lag_seconds metric.",
    )


def replication_caught_up(replica_node: str, lag_s: float, rpo_seconds: int) -> VolumeEvent:
    return _event(
        Reason.REPLICATION_CAUGHT_UP,
        f"Replica on node {replica_node} is back within its rpoSeconds of {rpo_seconds} "
        f"({seconds_text(lag_s)} behind).",
    )


def replicas_degraded(placed: int, wanted: int, why: str) -> VolumeEvent:
    return _event(
        Reason.REPLICAS_DEGRADED,
        f"{placed} of {wanted} replicas in place: {why}. Add a node with room in the "
        "volume's zone, or lower replicas (VolumeAttributesClass).",
    )


def replicas_restored(wanted: int) -> VolumeEvent:
    return _event(Reason.REPLICAS_RESTORED, f"All {wanted} replicas are in place and in sync.")


# -- emitting --------------------------------------------------------------------------


class EventSink(Protocol):
    """Where Events go: the Kubernetes API in a cluster, the log elsewhere."""

    def emit(self, volume: VolumeRef, event: VolumeEvent) -> None:
        """Deliver ``event``; never raise (an Event is best effort)."""


class LoggingSink:
    """The sink without a cluster: each Event is one log line, Warnings at WARNING."""

    def emit(self, volume: VolumeRef, event: VolumeEvent) -> None:
        level = logging.WARNING if event.event_type is EventType.WARNING else logging.INFO
        log.log(
            level,
            event.note,
            extra={
                "volume": volume.volume_id,
                "volume_name": volume.name,
                "reason": event.reason.reason,
            },
        )


class MobilityEvents:
    """What moves, failovers and replication report, as Events on the volume.

    The mobility reconcilers call these; states that a reconciler observes
    on every pass (replication lag, replica count) are emitted when they
    change only.
    """

    def __init__(self, sink: EventSink) -> None:
        self._sink = sink
        self._lock = threading.Lock()
        # (volume id, subject) -> its state last emitted, when not the healthy one.
        self._states: dict[tuple[str, str], Reason] = {}

    def move_started(
        self, volume: VolumeRef, source: str, target: str, bytes_to_send: int, warm: bool
    ) -> None:
        self._sink.emit(volume, move_started(source, target, bytes_to_send, warm))

    def move_waiting(
        self, volume: VolumeRef, target: str, waiting_for: str, done_bytes: int, total_bytes: int
    ) -> None:
        self._sink.emit(volume, move_waiting(target, waiting_for, done_bytes, total_bytes))

    def move_finished(
        self,
        volume: VolumeRef,
        source: str,
        target: str,
        seconds: float,
        bytes_sent: int,
        epoch: int,
    ) -> None:
        self._sink.emit(volume, move_finished(source, target, seconds, bytes_sent, epoch))

    def move_failed(self, volume: VolumeRef, target: str, why: str) -> None:
        self._sink.emit(volume, move_failed(target, why))

    def failed_over(
        self,
        volume: VolumeRef,
        lost_node: str,
        new_primary: str,
        epoch: int,
        loss_window_s: float,
        replicated_at: float,
    ) -> None:
        event = failed_over(lost_node, new_primary, epoch, loss_window_s, replicated_at)
        self._changed(volume, f"primary:{lost_node}", None, None)
        self._sink.emit(volume, event)

    def failover_waiting(self, volume: VolumeRef, lost_node: str, since_s: float) -> None:
        """Report on every pass while policy ``wait`` holds the volume: one Event."""
        if self._changed(volume, f"primary:{lost_node}", Reason.FAILOVER_WAITING, None):
            self._sink.emit(volume, failover_waiting(lost_node, since_s))

    def primary_reachable(self, volume: VolumeRef, node: str) -> None:
        """The primary's node is back: a later loss is reported afresh."""
        self._changed(volume, f"primary:{node}", None, None)

    def replication_lag(
        self,
        volume: VolumeRef,
        replica_node: str,
        lag_s: float,
        lag_bytes: int,
        rpo_seconds: int,
    ) -> None:
        """Report a replica's lag on every pass: an Event when it crosses the RPO."""
        if not rpo_seconds:
            return
        if lag_s > rpo_seconds:
            event = replication_behind(replica_node, lag_s, lag_bytes, rpo_seconds)
        else:
            event = replication_caught_up(replica_node, lag_s, rpo_seconds)
        within = Reason.REPLICATION_CAUGHT_UP
        if self._changed(volume, f"replica:{replica_node}", event.reason, within):
            self._sink.emit(volume, event)

    def replica_count(self, volume: VolumeRef, placed: int, wanted: int, why: str) -> None:
        """Report how many replicas are in place on every pass: an Event on a change."""
        if placed < wanted:
            event = replicas_degraded(placed, wanted, why)
        else:
            event = replicas_restored(wanted)
        if self._changed(volume, "replicas", event.reason, Reason.REPLICAS_RESTORED):
            self._sink.emit(volume, event)

    def forget(self, volume_id: str) -> None:
        """Drop what was remembered about a deleted volume."""
        with self._lock:
            for key in [k for k in self._states if k[0] == volume_id]:
                del self._states[key]

    def _changed(
        self, volume: VolumeRef, subject: str, reason: Reason | None, initial: Reason | None
    ) -> bool:
        """Record ``reason`` as the subject's state; True if that is a change.

        ``initial`` is the state assumed before the first report: the healthy
        one, so a volume that starts healthy emits nothing.
        """
        key = (volume.volume_id, subject)
        with self._lock:
            if self._states.get(key, initial) is reason:
                return False
            if reason is None or reason is initial:
                self._states.pop(key, None)
            else:
                self._states[key] = reason
            return True
