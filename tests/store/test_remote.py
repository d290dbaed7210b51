"""The catalog service (``ferry://``): what only a networked client adds to the contract.

The contract itself runs over ``ferry`` in test_contract.py. Here: an
unreachable service, progress that keeps a quiet watch resumable past
compaction, leadership that ends with the service, streams that end quietly
when the store closes under them, a node service that
registers through the controller's catalog service over mutual TLS without
the catalog's file, and callers without a certificate, or not admitted, refused.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from csi_driver.catalog_api.client import RemoteStore
from csi_driver.core.errors import FailedPrecondition, PermissionDenied, StoreUnavailable
from csi_driver.core.model import MiB
from csi_driver.csi.client import CsiClient, mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.reconcile.wait import Waiters
from csi_driver.rpc.errors import status_for
from csi_driver.runtime import start_controller, start_node
from csi_driver.store.sqlite import SqliteStore
from csi_driver.store.url import open_store
from csi_driver.transport import AgentSecurity
from tests.certs import Pki
from tests.csi.conftest import node_config
from tests.store.backends import LOOPBACK_PLAINTEXT, CatalogServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CatalogServer]:
    served = CatalogServer(tmp_path / "served.db", progress_s=0.2).start()
    yield served
    served.stop()


def _dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_service_is_unavailable() -> None:
    store = RemoteStore(f"127.0.0.1:{_dead_port()}", LOOPBACK_PLAINTEXT, request_timeout_s=2)
    with pytest.raises(StoreUnavailable, match="nothing was written") as read:
        store.get("k")
    with pytest.raises(StoreUnavailable, match="may or may not have applied") as write:
        store.put("k", b"v")
    assert status_for(read.value) is grpc.StatusCode.UNAVAILABLE
    assert status_for(write.value) is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(StoreUnavailable):
        store.watch("k", 0)
    store.close()


def test_progress_keeps_a_quiet_watch_resumable_past_compaction(server: CatalogServer) -> None:
    store = RemoteStore(f"127.0.0.1:{server.port}", LOOPBACK_PLAINTEXT)
    watch = store.watch("quiet/", store.revision() + 1)
    last = 0
    for i in range(5):
        last = store.put(f"busy/{i}", b"x")
    deadline = time.monotonic() + 10
    while watch.next_revision <= last and time.monotonic() < deadline:
        assert watch.poll(0.1) is None
    assert watch.next_revision == last + 1  # moved on without any event for it
    watch.close()
    store.compact(last)
    with store.watch("quiet/", watch.next_revision) as resumed:  # no Compacted
        mine = store.put("quiet/k", b"v")
        event = resumed.poll(10)
        assert event is not None and event.revision == mine
    store.close()


def test_leadership_ends_when_the_service_goes_away(server: CatalogServer) -> None:
    store = RemoteStore(f"127.0.0.1:{server.port}", LOOPBACK_PLAINTEXT)
    election = store.election("ctl", "remote")
    assert election.campaign(timeout=10) and election.is_leader
    server.stop()
    assert election.wait_lost(10)
    assert not election.is_leader
    election.resign()
    store.close()


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_store_closed_under_its_streams_ends_them_quietly(server: CatalogServer) -> None:
    """Closing the store cuts its open watch, leadership and waiters: each reader
    thread hands its consumer StoreUnavailable or a lost leadership and ends,
    raising nothing in the background."""
    store = RemoteStore(f"127.0.0.1:{server.port}", LOOPBACK_PLAINTEXT)
    watch = store.watch("quiet/", store.revision() + 1)
    election = store.election("ctl", "remote")
    assert election.campaign(timeout=10)
    waiters = Waiters(store, "status/")
    store.close()
    with pytest.raises(StoreUnavailable, match="Channel closed"):
        watch.poll(10)
    assert election.wait_lost(10)
    watch.close()  # joins its reader
    waiters.close()
    election.resign()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


def test_several_controllers_serving_one_file_are_used_first_answering_first(
    tmp_path: Path,
) -> None:
    """ferry://a,b: calls go to a; once a is gone, a call may fail (its outcome said),
    and the next ones, and a watch resumed where it stopped, reach b."""
    first = CatalogServer(tmp_path / "shared.db", progress_s=0.2).start()
    second = CatalogServer(tmp_path / "shared.db", progress_s=0.2).start()
    store = open_store(
        f"ferry://127.0.0.1:{first.port},127.0.0.1:{second.port}",
        security=LOOPBACK_PLAINTEXT,
    )
    try:
        store.put("k/1", b"one")
        watch = store.watch("k/", store.revision() + 1)
        first.stop()
        deadline = time.monotonic() + 10
        while True:
            try:
                store.put("k/2", b"two")
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the second controller was never used"
                time.sleep(0.1)
        assert store.get("k/2") is not None
        with pytest.raises(StoreUnavailable):  # the first one's stream ended with it
            while watch.poll(5) is not None:
                pass
        resumed = store.watch("k/", watch.next_revision)
        event = resumed.poll(5)
        assert event is not None and event.key == "k/2"
        resumed.close()
        watch.close()
    finally:
        store.close()
        first.stop()
        second.stop()


def test_a_node_registers_through_the_controllers_catalog_service_over_mtls(
    tmp_path: Path, pki: Pki
) -> None:
    (tmp_path / "kubelet").mkdir()
    catalog_file = tmp_path / "controller" / "catalog.db"
    controller = start_controller(
        f"unix://{tmp_path}/controller.sock",
        catalog_file,
        AgentSecurity(pki.bundle("controller")),
        catalog_listen="tcp://127.0.0.1:0",
    )
    node = None
    try:
        listen = next(e for e in controller.endpoints if e.scheme == "tcp")
        url = f"ferry://127.0.0.1:{listen.address.rpartition(':')[2]}"
        config = replace(
            node_config(tmp_path, "node-remote"),
            security=AgentSecurity(pki.bundle("node/node-remote")),
        )
        node = start_node(f"unix://{tmp_path}/node.sock", config, url)
        with CsiClient(f"unix://{tmp_path}/controller.sock") as client:
            request = csi_pb2.CreateVolumeRequest(
                name="pvc-remote",
                capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MiB),
                volume_capabilities=[mount_capability()],
            )
            volume = client.controller.CreateVolume(request).volume
        # The node never opened the file; the controller's store holds its record.
        direct = SqliteStore(catalog_file)
        assert [r.key for r in direct.list("nodes/")] == ["nodes/node-remote"]
        assert direct.get(f"volumes/{volume.volume_id}") is not None
        direct.close()

        target = url.removeprefix("ferry://")
        # No certificate at all: the TLS handshake fails, the store is unavailable.
        bare = RemoteStore(target, LOOPBACK_PLAINTEXT, request_timeout_s=2)
        with pytest.raises(StoreUnavailable):
            bare.get("nodes/node-remote")
        bare.close()
        # A Ferry identity of this CA that is not a controller or node: refused.
        member = RemoteStore(target, AgentSecurity(pki.bundle("catalog")))
        with pytest.raises(PermissionDenied, match="may not call"):
            member.get("nodes/node-remote")
        member.close()
        # Without any security the client refuses plaintext TCP itself.
        with pytest.raises(FailedPrecondition, match="plaintext TCP"):
            RemoteStore(target)
    finally:
        if node is not None:
            node.stop(grace_s=0)
        controller.stop(grace_s=0)
