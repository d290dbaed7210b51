"""Prometheus metrics, scraped over HTTP from a running Ferry."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from csi_driver.core.model import MiB
from csi_driver.metrics import serve
from tests.csi.conftest import Ferry


@pytest.fixture
def metrics_url() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = serve(port, "127.0.0.1")
    assert server is not None
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_rpcs_and_pool_usage_are_counted(ferry: Ferry, metrics_url: str) -> None:
    ok_key = ("ferry_csi_requests_total", (("code", "OK"), ("method", "CreateVolume")))
    before = scrape(metrics_url).get(ok_key, 0.0)
    ferry.create("metered", size=96 * MiB)
    ferry.create("metered", size=96 * MiB)
    with pytest.raises(Exception):  # noqa: B017 - any gRPC error; the code is checked below
        ferry.create("", size=MiB)
    samples = scrape(metrics_url)
    assert samples[ok_key] == before + 2
    bad = ("ferry_csi_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "CreateVolume")))
    assert samples[bad] >= 1
    assert samples[("ferry_csi_request_duration_seconds_count", (("method", "CreateVolume"),))] >= 3
    assert samples[("ferry_pool_capacity_bytes", ())] == 2048 * MiB
    assert samples[("ferry_pool_provisioned_bytes", ())] == 96 * MiB
    assert samples[("ferry_pool_volumes", ())] == 1
