"""Prometheus metrics: names follow ``ferry_<area>_<what>_<unit>``.

The chart's Grafana dashboard queries these names; a test checks every name
it uses is one exported here, so renaming a metric means fixing the
dashboard in the same change.
"""

from __future__ import annotations

import enum
import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import ParamSpec, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_P = ParamSpec("_P")
_R = TypeVar("_R")

RPC_REQUESTS = Counter(
    "ferry_csi_requests_total",
    "CSI and agent RPCs served, by method and gRPC status code.",
    ["method", "code"],
)
RPC_SECONDS = Histogram(
    "ferry_csi_request_duration_seconds",
    "Time to serve an RPC, by method.",
    ["method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
SNAPSHOT_SECONDS = Histogram(
    "ferry_snapshot_take_seconds",
    "Time a node took to capture a snapshot (its fsfreeze excluded), by method.",
    ["method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
SNAPSHOT_BYTES = Gauge(
    "ferry_pool_snapshot_allocated_bytes",
    "Bytes the node's snapshots hold on the pool's filesystem (shared blocks included).",
)
POOL_CAPACITY = Gauge("ferry_pool_capacity_bytes", "Bytes the node's pool may provision.")
POOL_PROVISIONED = Gauge(
    "ferry_pool_provisioned_bytes", "Bytes promised to volumes in the node's pool."
)
POOL_ALLOCATED = Gauge(
    "ferry_pool_allocated_bytes", "Bytes actually written to images in the node's pool."
)
POOL_VOLUMES = Gauge("ferry_pool_volumes", "Volume images in the node's pool.")
PLACEMENT_BATCH = Histogram(
    "ferry_controller_placement_batch_creates",
    "Creates placed and committed in one catalog txn: above 1, concurrent creates shared a commit.",
    buckets=(1, 2, 4, 8, 16),
)
RECONCILES = Counter(
    "ferry_reconcile_total",
    "Reconciles run, by runner and result (done, requeue, error).",
    ["runner", "result"],
)
RECONCILE_SECONDS = Histogram(
    "ferry_reconcile_duration_seconds",
    "Time one reconcile took, by runner.",
    ["runner"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
)
INFORMER_LISTS = Counter(
    "ferry_informer_lists_total",
    "Full lists of a watched catalog prefix: the first sync, then one per compaction.",
    ["prefix"],
)
INFORMER_RESUMES = Counter(
    "ferry_informer_watch_resumes_total",
    "Catalog watches resumed after they ended without a stop (lost connection).",
    ["prefix"],
)

CONTROLLER_LEADER = Gauge(
    "ferry_controller_leader",
    "1 while this controller process leads (runs background work), else 0.",
)
COLLECTED = Counter(
    "ferry_gc_collected_total",
    "Orphaned intents the leader's garbage collector settled, by action.",
    ["action"],
)


def observe_pool(
    capacity_bytes: int, provisioned_bytes: int, allocated_bytes: int, volumes: int
) -> None:
    POOL_CAPACITY.set(capacity_bytes)
    POOL_PROVISIONED.set(provisioned_bytes)
    POOL_ALLOCATED.set(allocated_bytes)
    POOL_VOLUMES.set(volumes)


def observe_provisioned(provisioned_bytes: int, volumes: int) -> None:
    """After an image changed: allocated bytes follow on the next heartbeat."""
    POOL_PROVISIONED.set(provisioned_bytes)
    POOL_VOLUMES.set(volumes)


def serve(port: int, address: str = "0.0.0.0") -> WSGIServer | None:
    """Expose ``/metrics`` on ``address:port`` (0 disables); return the server."""
    if not port:
        return None
    server, _ = start_http_server(port, addr=address)
    return server


TRANSFER_BYTES = Counter(
    "ferry_transfer_bytes_total",
    "Chunk bytes moved between nodes, by direction (sent, received).",
    ["direction"],
)
TRANSFER_CHUNKS = Counter(
    "ferry_transfer_chunks_total",
    "Chunks moved between nodes, by direction and outcome (sent; landed, rejected).",
    ["direction", "outcome"],
)
TRANSFER_REMAINING = Gauge(
    "ferry_transfer_remaining_bytes", "Bytes a transfer still has to receive.", ["transfer"]
)
TRANSFER_RATE = Gauge(
    "ferry_transfer_rate_bytes_per_second",
    "Receive rate of a transfer since it (re)started.",
    ["transfer"],
)
TRANSFER_ETA = Gauge(
    "ferry_transfer_eta_seconds", "Estimated seconds until a transfer completes.", ["transfer"]
)


# -- volume mobility: moves, replication, failover ----------------------------------
# Recorded by the mobility reconcilers through the functions below (labels are
# enums or volume ids, so a typo cannot start a new series). Per-volume series
# (lag, replica counts) are removed with forget_volume / forget_replica when the
# volume or the replica goes, so a deleted volume does not report its last lag
# forever. The chart's dashboard and docs/operations.md name these metrics.


class DataFlow(enum.Enum):
    """Why volume data crossed between nodes."""

    MOVE = "move"  # a volume following its pod (ControllerPublish on another node)
    REPLICATION = "replication"  # a scheduled delta to a replica (rpoSeconds)
    RESYNC = "resync"  # a replica (re)built: added, or a returning stale primary


class MoveResult(enum.Enum):
    """How a move ended (the values of the move record's last step)."""

    DONE = "done"
    ABANDONED = "abandoned"  # rolled back; the source stays the primary


_DURATION_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600)

VOLUME_BYTES_MOVED = Counter(
    "ferry_volume_moved_bytes_total",
    "Volume data bytes shipped between nodes and verified, by flow (move, replication, resync).",
    ["flow"],
)
REPLICA_SYNC_BYTES = Counter(
    "ferry_replica_sync_bytes_total",
    "Bytes a replica on this node received from its primary, by volume.",
    ["volume"],
)
REPLICA_SYNCS = Counter(
    "ferry_replica_syncs_total",
    "Replica generations committed on this node, by volume.",
    ["volume"],
)
MOVE_SECONDS = Histogram(
    "ferry_move_duration_seconds",
    "Time from a move's request (ControllerPublish on a node without the primary) to its end.",
    ["result"],
    buckets=_DURATION_BUCKETS,
)
MOVE_FINAL_SYNC_BYTES = Counter(
    "ferry_move_final_sync_bytes_total",
    "Bytes the final (quiescent) sync of moves shipped: what the pod waited for.",
)
FAILOVER_SECONDS = Histogram(
    "ferry_failover_duration_seconds",
    "Time from the primary's node declared lost (out-of-service or forced detach) to the "
    "replica promoted.",
    buckets=_DURATION_BUCKETS,
)
FAILOVER_LOSS_WINDOW = Histogram(
    "ferry_failover_data_loss_window_seconds",
    "Writes a failover may have lost: from the promoted replica's capture to the lost "
    "primary's last sign of life.",
    buckets=(0, 1, 5, 15, 30, 60, 300, 900, 3600),
)
REPLICATION_LAG_SECONDS = Gauge(
    "ferry_replication_lag_seconds",
    "Age of the newest primary image a replica holds, per volume and replica node.",
    ["volume", "replica"],
)
REPLICATION_LAG_BYTES = Gauge(
    "ferry_replication_lag_bytes",
    "Bytes of the primary a replica does not hold yet (last known), per volume and replica node.",
    ["volume", "replica"],
)
REPLICATION_RPO_SECONDS = Gauge(
    "ferry_replication_rpo_seconds",
    "The volume's rpoSeconds (0: no schedule): compare with ferry_replication_lag_seconds.",
    ["volume"],
)
VOLUME_REPLICAS = Gauge(
    "ferry_volume_replicas", "Replicas of a volume in place and in sync.", ["volume"]
)
VOLUME_REPLICAS_WANTED = Gauge(
    "ferry_volume_replicas_wanted", "Replicas the volume's policy asks for.", ["volume"]
)
REPLICA_CHANGES = Counter(
    "ferry_replica_changes_total",
    "Replicas the leader added or retired (policy changes, nodes leaving or full, moves).",
    ["action"],
)
FORCED_DETACHES = Counter(
    "ferry_forced_detaches_total",
    "ControllerUnpublishVolume calls for a lost node: the volume fenced (epoch bumped).",
)
TRANSFERS_IN_FLIGHT = Gauge(
    "ferry_transfers_in_flight", "Node-to-node transfers under way, by flow.", ["flow"]
)


class ReplicaChange(enum.Enum):
    ADDED = "added"
    RETIRED = "retired"  # marked for deletion on its node


def count_replica_changes(action: ReplicaChange, count: int = 1) -> None:
    REPLICA_CHANGES.labels(action.value).inc(count)


def count_forced_detach() -> None:
    FORCED_DETACHES.inc()


def count_moved(flow: DataFlow, nbytes: int) -> None:
    """``nbytes`` of volume data landed verified on another node for ``flow``."""
    VOLUME_BYTES_MOVED.labels(flow.value).inc(nbytes)


def observe_sync(volume_id: str, received_bytes: int) -> None:
    """A replica committed a generation after receiving ``received_bytes``."""
    REPLICA_SYNCS.labels(volume_id).inc()
    REPLICA_SYNC_BYTES.labels(volume_id).inc(received_bytes)


def observe_move(result: MoveResult | str, seconds: float, final_bytes: int = 0) -> None:
    """A move ended (``done`` or ``abandoned``) after ``seconds``.

    ``result`` may be the move step's value; anything but a :class:`MoveResult`
    value is a bug (ValueError), not a new series.
    """
    MOVE_SECONDS.labels(MoveResult(result).value).observe(seconds)
    MOVE_FINAL_SYNC_BYTES.inc(final_bytes)


def observe_failover(data_loss_window_s: float, seconds: float | None = None) -> None:
    """A replica was promoted; ``seconds`` since the node was declared lost, when known."""
    FAILOVER_LOSS_WINDOW.observe(data_loss_window_s)
    if seconds is not None:
        FAILOVER_SECONDS.observe(seconds)


def observe_replication(
    volume_id: str, replica_node: str, lag_seconds: float, lag_bytes: int
) -> None:
    REPLICATION_LAG_SECONDS.labels(volume_id, replica_node).set(lag_seconds)
    REPLICATION_LAG_BYTES.labels(volume_id, replica_node).set(lag_bytes)


def observe_replicas(volume_id: str, in_sync: int, wanted: int, rpo_seconds: int) -> None:
    VOLUME_REPLICAS.labels(volume_id).set(in_sync)
    VOLUME_REPLICAS_WANTED.labels(volume_id).set(wanted)
    REPLICATION_RPO_SECONDS.labels(volume_id).set(rpo_seconds)


@contextmanager
def transfer_in_flight(flow: DataFlow) -> Iterator[None]:
    """Count a transfer as under way for the duration of the ``with`` block."""
    gauge = TRANSFERS_IN_FLIGHT.labels(flow.value)
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


def forget_replica(volume_id: str, replica_node: str) -> None:
    """The replica was retired: drop its lag series."""
    for gauge in (REPLICATION_LAG_SECONDS, REPLICATION_LAG_BYTES):
        with suppress(KeyError):
            gauge.remove(volume_id, replica_node)


def forget_volume(volume_id: str) -> None:
    """The volume was deleted: drop every series labelled with it."""
    replicas = {
        sample.labels["replica"]
        for family in REPLICATION_LAG_SECONDS.collect()
        for sample in family.samples
        if sample.labels["volume"] == volume_id
    }
    for replica in replicas:
        forget_replica(volume_id, replica)
    for metric in (
        VOLUME_REPLICAS,
        VOLUME_REPLICAS_WANTED,
        REPLICATION_RPO_SECONDS,
        REPLICA_SYNC_BYTES,
        REPLICA_SYNCS,
    ):
        with suppress(KeyError):
            metric.remove(volume_id)


# -- backups and restores ---------------------------------------------------------------
# Recorded by backup_image / restore_image in whichever process runs them. Today
# that is `ferry backup|restore`, a one-shot CLI process that prints its totals
# and rates instead (nothing would scrape it before it exits); the node agent
# exports them once it runs backups itself (the Backup record's reconciler,
# docs/decisions/0003).


class BackupOperation(enum.Enum):
    BACKUP = "backup"
    RESTORE = "restore"


class BackupOutcome(enum.Enum):
    DONE = "done"  # committed: a manifest put, or an image in place
    FAILED = "failed"


BACKUP_READ_BYTES = Counter(
    "ferry_backup_read_bytes_total", "Bytes backups read from source images."
)
BACKUP_UPLOADED_BYTES = Counter(
    "ferry_backup_uploaded_bytes_total",
    "Bytes backups put in their targets (compressed and encrypted, manifests included).",
)
BACKUP_DEDUPLICATED_BYTES = Counter(
    "ferry_backup_deduplicated_bytes_total",
    "Bytes of data chunks a backup did not upload because the target held them already.",
)
RESTORE_BYTES = Counter(
    "ferry_restore_bytes_total",
    "Bytes restores wrote into images (fetched, authenticated and hash-checked).",
)
BACKUP_SECONDS = Histogram(
    "ferry_backup_duration_seconds",
    "Time a backup or a restore took, by operation and outcome.",
    ["operation", "outcome"],
    buckets=_DURATION_BUCKETS,
)


def observe_backup(
    seconds: float, *, read_bytes: int, uploaded_bytes: int, deduplicated_bytes: int
) -> None:
    """A backup committed."""
    BACKUP_SECONDS.labels(BackupOperation.BACKUP.value, BackupOutcome.DONE.value).observe(seconds)
    BACKUP_READ_BYTES.inc(read_bytes)
    BACKUP_UPLOADED_BYTES.inc(uploaded_bytes)
    BACKUP_DEDUPLICATED_BYTES.inc(deduplicated_bytes)


def observe_restore(seconds: float, written_bytes: int) -> None:
    """A restore put its image in place."""
    BACKUP_SECONDS.labels(BackupOperation.RESTORE.value, BackupOutcome.DONE.value).observe(seconds)
    RESTORE_BYTES.inc(written_bytes)


def times_failures(
    operation: BackupOperation,
) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Decorate a backup or restore so that one that raises is timed as ``failed``
    (the function observes its own success, with its byte counts)."""

    def decorate(run: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(run)
        def timed(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            started = time.monotonic()
            try:
                return run(*args, **kwargs)
            except BaseException:
                BACKUP_SECONDS.labels(operation.value, BackupOutcome.FAILED.value).observe(
                    time.monotonic() - started
                )
                raise

        return timed

    return decorate
