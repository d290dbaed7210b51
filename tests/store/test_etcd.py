"""etcd-only behaviour on real etcd processes: outages, a dying member, lost quorum.

The contract itself is in test_contract.py; here are the failures only a
networked backend has. A three-member cluster loses one member while work
runs (the work goes on), then loses quorum (operations fail UNAVAILABLE
with a clear message in bounded time, nothing half-written) and recovers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.core.errors import Conflict, StoreUnavailable
from csi_driver.rpc.errors import status_for
from csi_driver.store.base import ABSENT, CatalogStore, Compare, Event, Put
from csi_driver.store.etcd import EtcdEndpoint, EtcdStore, _resources_refused
from tests.store.backends import TEST_LEASE_TTL_S, open_url
from tests.store.conftest import require_etcd
from tests.store.etcd_cluster import EtcdCluster

#: The three-member test's request timeout: how long a member without quorum may stall us.
CLUSTER_REQUEST_TIMEOUT_S = 2.0


def _dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[EtcdCluster]:
    require_etcd()
    cluster = EtcdCluster(tmp_path, 3).start()
    yield cluster
    cluster.close()


_NO_ROUTE_PROBE = """
from csi_driver.core.errors import StoreUnavailable
from csi_driver.store.etcd import EtcdEndpoint, EtcdStore
store = EtcdStore([EtcdEndpoint("10.255.0.1", 2379)], request_timeout_s=2)
try:
    store.put("k", b"v")
except StoreUnavailable as exc:
    print(exc.message)
"""


def test_etcd_behind_a_missing_route_is_said_to_be_unreachable_not_a_certificate_problem(
    tmp_path: Path,
) -> None:
    """A host whose link is down (no route to the member) is told to check its
    network, not that etcd may refuse its certificate: in its own network
    namespace with only loopback up, the member's address has no route."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    namespace = f"ferry-noroute-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
        probe = subprocess.run(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", _NO_ROUTE_PROBE],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parents[2],
            check=True,
        )
    finally:
        subprocess.run(["ip", "netns", "delete", namespace], check=False)
    said = probe.stdout
    assert "cannot be reached from here" in said, said + probe.stderr
    assert "unreachable" in said.lower(), said
    assert "certificate" not in said and "etcds://" not in said, said


def test_unreachable_etcd_is_unavailable_with_a_clear_message() -> None:
    store = EtcdStore([EtcdEndpoint("127.0.0.1", _dead_port())], request_timeout_s=2)
    with pytest.raises(StoreUnavailable) as down:
        store.put("k", b"v")
    assert "refused the connection" in down.value.message
    assert "nothing was written" in down.value.message
    assert status_for(down.value) is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(StoreUnavailable):
        store.watch("k", 0)
    with pytest.raises(StoreUnavailable):
        store.ping()
    store.close()


#: Run in a child process with a proxy in its environment: a write and a read.
_PROXIED_PROBE = """
import sys
from csi_driver.store.etcd import EtcdEndpoint, EtcdStore, _resources_refused
store = EtcdStore([EtcdEndpoint("127.0.0.1", int(sys.argv[1]))], request_timeout_s=3)
store.put("proxy/k", b"direct")
record = store.get("proxy/k")
print(record.value.decode() if record else "absent")
"""


def test_the_members_are_reached_directly_whatever_proxy_the_environment_names(
    etcd_single: EtcdCluster,
) -> None:
    proxy = f"http://127.0.0.1:{_dead_port()}"
    env = {**os.environ, "http_proxy": proxy, "https_proxy": proxy, "grpc_proxy": proxy}
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    port = str(etcd_single.members[0].client_port)
    done = subprocess.run(
        [sys.executable, "-c", _PROXIED_PROBE, port],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "direct"


def test_a_watch_reports_its_lost_member_and_resumes_after_restart(
    etcd_single: EtcdCluster,
) -> None:
    store = open_url(etcd_single.url)
    start = store.put("lw/a", b"1") + 1
    watch = store.watch("lw/", start)
    etcd_single.kill_member(0)
    try:
        with pytest.raises(StoreUnavailable, match="resume"):
            watch.poll(10)
        with pytest.raises(StoreUnavailable):  # and keeps saying so
            watch.poll(0)
    finally:
        etcd_single.start_member(0)
        etcd_single.wait_healthy()
    later = store.put("lw/b", b"2")
    with store.watch("lw/", watch.next_revision) as resumed:
        event = resumed.poll(10)
        assert event is not None and (event.key, event.revision) == ("lw/b", later)
    watch.close()
    store.close()


def test_a_leader_that_cannot_reach_etcd_steps_down(etcd_single: EtcdCluster) -> None:
    store = open_url(etcd_single.url)
    election = store.election("cut", "lonely")
    assert election.campaign(timeout=10) and election.is_leader
    etcd_single.kill_member(0)
    try:
        # Its lease cannot be renewed: it must consider itself deposed within one TTL.
        assert election.wait_lost(TEST_LEASE_TTL_S + 3)
        assert not election.is_leader
    finally:
        etcd_single.start_member(0)
        etcd_single.wait_healthy()
    election.resign()
    store.close()


def _create_jobs(store: CatalogStore, count: int, done: list[int], unavailable: list[str]) -> None:
    """Create job/<i> once each, riding out a member's death by retrying."""
    for i in range(count):
        key, value = f"job/{i:03d}", f"v{i}".encode()
        while True:
            try:
                store.txn([Compare(key, ABSENT)], [Put(key, value)])
                break
            except StoreUnavailable as exc:
                unavailable.append(exc.message)
                time.sleep(0.1)
            except Conflict:
                # An attempt whose outcome was unknown had landed: it must be ours.
                record = store.get(key)
                assert record is not None and record.value == value
                break
        done.append(i)


def _collect(store: CatalogStore, prefix: str, start: int, count: int) -> list[Event]:
    """``count`` events from ``start``, resuming the watch whenever its member dies."""
    events: list[Event] = []
    deadline = time.monotonic() + 60
    next_revision = start
    while len(events) < count and time.monotonic() < deadline:
        try:
            watch = store.watch(prefix, next_revision)
        except StoreUnavailable:
            time.sleep(0.1)
            continue
        try:
            while len(events) < count and (event := watch.poll(10)) is not None:
                events.append(event)
        except StoreUnavailable:
            time.sleep(0.1)
        finally:
            next_revision = watch.next_revision
            watch.close()
    return events


@pytest.mark.slow
def test_cluster_loses_a_member_then_quorum_then_recovers(cluster3: EtcdCluster) -> None:
    endpoints = [EtcdEndpoint("127.0.0.1", m.client_port) for m in cluster3.members]
    store = EtcdStore(endpoints, request_timeout_s=CLUSTER_REQUEST_TIMEOUT_S)
    start = store.revision() + 1
    jobs = 60
    done: list[int] = []
    unavailable: list[str] = []
    writer = threading.Thread(target=_create_jobs, args=(store, jobs, done, unavailable))
    writer.start()
    while len(done) < 10:
        time.sleep(0.01)
    cluster3.kill_member(0)  # the member the client talks to first, mid-run
    writer.join(60)
    assert not writer.is_alive() and done == list(range(jobs))  # the work went on
    assert [r.value for r in store.list("job/")] == [f"v{i}".encode() for i in range(jobs)]
    # A watch across the member's death sees every job once, in order.
    events = _collect(store, "job/", start, jobs)
    assert [e.key for e in events] == [f"job/{i:03d}" for i in range(jobs)]

    cluster3.kill_member(1)  # one of three left: no quorum
    deadline = time.monotonic() + 20
    while not cluster3.leaderless(cluster3.members[2]):
        assert time.monotonic() < deadline, "the last member never noticed it lost quorum"
        time.sleep(0.05)
    began = time.monotonic()
    with pytest.raises(StoreUnavailable) as write:
        store.txn([], [Put("q/one", b"1"), Put("q/two", b"2")])
    with pytest.raises(StoreUnavailable) as read:
        store.get("job/000")
    # Bounded: each call waits at most one request timeout on the member left.
    assert time.monotonic() - began < 2 * (CLUSTER_REQUEST_TIMEOUT_S + 1)
    assert "quorum" in write.value.message and "never partly" in write.value.message
    assert "quorum" in read.value.message
    assert status_for(write.value) is grpc.StatusCode.UNAVAILABLE

    cluster3.start_member(0)
    cluster3.start_member(1)
    cluster3.wait_healthy()
    # Nothing of the failed txn landed, and the cluster takes writes again.
    assert store.get("q/one") is None and store.get("q/two") is None
    assert len(store.list("job/")) == jobs
    assert store.put("q/after", b"ok") == start + jobs  # the failed txn used no revision
    store.close()


#: etcd's smallest workable space quota here: its empty backend already takes ~20 KiB.
_TINY_QUOTA = 256 * 1024


def test_etcd_out_of_space_is_unavailable_with_a_retry_hint(tmp_path: Path) -> None:
    """etcd refusing a write for want of resources (RESOURCE_EXHAUSTED: its space
    quota here; "too many requests" takes the same path) is UNAVAILABLE, says that
    nothing was written and what to do, and never reads as an internal error."""
    require_etcd()
    # The quota is checked against the database file, which grows only when the
    # backend commits: a commit after every write makes the refusal come on time.
    cluster = EtcdCluster(
        tmp_path,
        1,
        extra_args=(f"--quota-backend-bytes={_TINY_QUOTA}", "--backend-batch-limit=1"),
    )
    cluster.start()
    store = EtcdStore([EtcdEndpoint("127.0.0.1", cluster.members[0].client_port)])
    try:
        value = os.urandom(32 * 1024)
        written = 0
        with pytest.raises(StoreUnavailable) as full:
            for written in range(256):  # 8 MiB of values against a 256 KiB quota
                store.put(f"fill/{written}", value)
        assert written > 0, "the quota refused the very first write: pick a larger one"
        message = full.value.message
        assert "database space exceeded" in message
        assert "nothing was written" in message
        assert "alarm disarm" in message
        assert status_for(full.value) is grpc.StatusCode.UNAVAILABLE
        assert store.get(f"fill/{written}") is None  # the refused write did not land
        assert store.get("fill/0") is not None  # reads go on
    finally:
        store.close()
        cluster.close()


def test_etcd_too_many_requests_reads_as_overload_to_retry() -> None:
    """etcd's own words when its apply lags (ErrGRPCTooManyRequests): a load this
    test cannot cause on purpose, so the wording is checked on its exact text."""
    refused = _resources_refused(
        EtcdEndpoint("127.0.0.1", 2379), "txn", "etcdserver: too many requests"
    )
    assert "overloaded" in refused.message
    assert "retry in a moment" in refused.message
    assert "nothing was written" in refused.message
    assert status_for(refused) is grpc.StatusCode.UNAVAILABLE
