"""Ferry's Kubernetes calls against a real API server (skipped without one).

An Event about a volume lands on its PersistentVolumeClaim with Ferry's
reason, type and words; Node readiness reads what the cluster reports.
Everything a test creates lives in its own namespace and PV, deleted after.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from csi_driver import DRIVER_NAME
from csi_driver.core.placement import NodeReadiness
from csi_driver.kube.api import REPORTING_CONTROLLER, KubeApi, KubeNodes, KubeSink
from csi_driver.kube.events import MobilityEvents, VolumeRef
from csi_driver.kube.nodes import NODE_DELETED, readiness

pytestmark = pytest.mark.slow

#: 2026-11-26T23:40:01Z
STAMP = 1795736401.0


@pytest.fixture
def claimed_volume(kube_client: Any) -> Iterator[tuple[VolumeRef, str, str]]:
    """A namespace, a PVC and a PV bound to it by claimRef: (volume, namespace, pvc)."""
    core = client.CoreV1Api(kube_client)
    suffix = uuid.uuid4().hex[:8]
    namespace, pvc, pv = f"ferry-test-{suffix}", "data", f"pvc-ferry-test-{suffix}"
    core.create_namespace({"metadata": {"name": namespace}})
    try:
        # A class no provisioner serves, so nothing but this test binds either object.
        core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "metadata": {"name": pvc},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": f"ferry-test-{suffix}",
                    "resources": {"requests": {"storage": "1Mi"}},
                },
            },
        )
        core.create_persistent_volume(
            {
                "metadata": {"name": pv},
                "spec": {
                    "capacity": {"storage": "1Mi"},
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": f"ferry-test-{suffix}",
                    "claimRef": {"namespace": namespace, "name": pvc},
                    "csi": {"driver": DRIVER_NAME, "volumeHandle": "vol-" + suffix * 4},
                },
            }
        )
        yield VolumeRef("vol-" + suffix * 4, pv), namespace, pvc
    finally:
        core.delete_persistent_volume(pv, _request_timeout=10)
        core.delete_namespace(namespace, _request_timeout=10)


def test_an_event_lands_on_the_volumes_claim(
    kube_client: Any, claimed_volume: tuple[VolumeRef, str, str]
) -> None:
    volume, namespace, pvc = claimed_volume
    sink = KubeSink(KubeApi(kube_client), "ferry-test")
    MobilityEvents(sink).failed_over(volume, "node-1", "node-2", 4, 12.5, STAMP)
    assert sink.close(), "the queued Event was not posted in time"
    api = client.EventsV1Api(kube_client)
    deadline = time.monotonic() + 10
    found: list[Any] = []
    while not found and time.monotonic() < deadline:
        listed = api.list_namespaced_event(
            namespace, field_selector=f"regarding.name={pvc}", _request_timeout=5
        )
        found = [e for e in listed.items if e.reason == "FailedOver"]
        time.sleep(0.2)
    assert found, f"no FailedOver Event on {namespace}/{pvc}"
    event = found[0]
    assert event.type == "Warning"
    assert event.action == "Failover"
    assert event.reporting_controller == REPORTING_CONTROLLER
    assert event.regarding.kind == "PersistentVolumeClaim"
    assert event.related.name == volume.name
    assert "Data-loss window" in event.note


def test_a_volume_without_a_pv_gets_no_event_and_no_error(kube_client: Any) -> None:
    api = KubeApi(kube_client)
    ghost = VolumeRef("vol-" + "0" * 32, f"pvc-ferry-absent-{uuid.uuid4().hex[:8]}")
    assert api.regarding(ghost) is None
    sink = KubeSink(api, "ferry-test")
    MobilityEvents(sink).move_failed(ghost, "node-2", "test")
    assert sink.close()


def test_node_readiness_reads_the_cluster(kube_client: Any) -> None:
    api = KubeApi(kube_client)
    nodes = api.nodes()
    assert nodes, "a cluster has at least one Node"
    for facts in nodes:
        assert api.node(facts.name) == facts or api.node(facts.name) is not None
        state = readiness(facts)
        if facts.ready != "True":
            assert state.readiness is not NodeReadiness.READY
        elif not facts.unschedulable and not facts.taints:
            assert state.readiness is NodeReadiness.READY
    assert api.node(f"ferry-no-such-node-{uuid.uuid4().hex[:8]}") is None


def test_node_states_for_failover_read_the_cluster(kube_client: Any) -> None:
    api = KubeApi(kube_client)
    states = KubeNodes(api, ttl_s=60.0)
    for facts in api.nodes():
        state = states.state(facts.name)
        assert state is not None and state.readiness is readiness(facts).readiness
        assert states.state(facts.name) is state  # served from the cache within the TTL
    # A Node Kubernetes does not have is one that left the cluster.
    assert states.state(f"ferry-no-such-node-{uuid.uuid4().hex[:8]}") == NODE_DELETED
