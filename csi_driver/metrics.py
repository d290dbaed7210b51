"""Prometheus metrics: names follow ``ferry_<area>_<what>_<unit>``."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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
POOL_CAPACITY = Gauge("ferry_pool_capacity_bytes", "Bytes the node's pool may provision.")
POOL_PROVISIONED = Gauge(
    "ferry_pool_provisioned_bytes", "Bytes promised to volumes in the node's pool."
)
POOL_ALLOCATED = Gauge(
    "ferry_pool_allocated_bytes", "Bytes actually written to images in the node's pool."
)
POOL_VOLUMES = Gauge("ferry_pool_volumes", "Volume images in the node's pool.")
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
