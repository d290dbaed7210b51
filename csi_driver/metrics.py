"""Prometheus metrics: names follow ``ferry_<area>_<what>_<unit>``."""

from __future__ import annotations

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


def serve(port: int, address: str = "0.0.0.0") -> None:
    """Expose ``/metrics`` on ``address:port`` (0 disables)."""
    if port:
        start_http_server(port, addr=address)
