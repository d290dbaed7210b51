"""A Kubernetes Node's readiness as placement and failover read it (pure), and
how a real ``V1Node`` of the client reads as facts."""

from __future__ import annotations

import datetime as dt

import pytest
from kubernetes import client

from csi_driver.core.placement import NodeReadiness
from csi_driver.kube.api import node_facts
from csi_driver.kube.nodes import NodeFacts, NodeState, Taint, combined, readiness

READY, NOT_READY, LEAVING = NodeReadiness.READY, NodeReadiness.NOT_READY, NodeReadiness.LEAVING
OOS = Taint("node.kubernetes.io/out-of-service", "nodeshutdown", "NoExecute")

#: (facts, readiness, words of why)
TABLE = [
    (NodeFacts("n", "True", 100.0), READY, "Ready"),
    (NodeFacts("n", "False", 100.0), NOT_READY, "Ready is False"),
    (NodeFacts("n", "Unknown", 100.0), NOT_READY, "Ready is Unknown"),
    (NodeFacts("n", ""), NOT_READY, "Ready is not reported"),
    (NodeFacts("n", "True", unschedulable=True), NOT_READY, "cordoned"),
    (
        NodeFacts("n", "True", taints=(Taint("node.kubernetes.io/unreachable", "", "NoExecute"),)),
        NOT_READY,
        "tainted node.kubernetes.io/unreachable:NoExecute",
    ),
    (NodeFacts("n", "True", taints=(OOS,)), LEAVING, "out-of-service=nodeshutdown:NoExecute"),
    # The operator's word beats a kubelet that still looks Ready, and a NotReady one.
    (NodeFacts("n", "Unknown", taints=(OOS,)), LEAVING, "out-of-service"),
    (NodeFacts("n", "True", taints=(Taint("dedicated", "db", "NoSchedule"),)), READY, "Ready"),
]


@pytest.mark.parametrize(("facts", "expected", "why"), TABLE)
def test_readiness(facts: NodeFacts, expected: NodeReadiness, why: str) -> None:
    state = readiness(facts)
    assert state.readiness is expected
    assert why in state.why


def test_not_ready_since_the_condition_changed() -> None:
    assert readiness(NodeFacts("n", "False", 1234.5)).since == 1234.5


K_READY = NodeState(READY, 0.0, "Ready")
K_NOT_READY = NodeState(NOT_READY, 0.0, "Ready is Unknown")
K_LEAVING = NodeState(LEAVING, 0.0, "tainted")


@pytest.mark.parametrize(
    ("kube", "age", "expected"),
    [
        (None, 5.0, READY),  # no cluster: the heartbeat decides
        (None, 500.0, NOT_READY),
        (None, None, LEAVING),  # never registered with Ferry
        (K_READY, 5.0, READY),
        (K_READY, 500.0, NOT_READY),  # Kubernetes says Ready, Ferry's agent is silent
        (K_NOT_READY, 5.0, NOT_READY),
        (K_LEAVING, 5.0, LEAVING),  # out-of-service wins over a live heartbeat
        (K_LEAVING, None, LEAVING),
    ],
)
def test_combined_with_the_heartbeat(
    kube: NodeState | None, age: float | None, expected: NodeReadiness
) -> None:
    assert combined(kube, age, stale_after_s=60).readiness is expected


def test_a_client_node_object_reads_as_facts() -> None:
    changed = dt.datetime(2026, 11, 26, 23, 0, tzinfo=dt.UTC)
    node = client.V1Node(
        metadata=client.V1ObjectMeta(name="worker-2"),
        spec=client.V1NodeSpec(
            unschedulable=True,
            taints=[client.V1Taint(key=OOS.key, value=OOS.value, effect=OOS.effect)],
        ),
        status=client.V1NodeStatus(
            conditions=[
                client.V1NodeCondition(type="MemoryPressure", status="False"),
                client.V1NodeCondition(
                    type="Ready", status="Unknown", last_transition_time=changed
                ),
            ]
        ),
    )
    assert node_facts(node) == NodeFacts(
        "worker-2", "Unknown", changed.timestamp(), unschedulable=True, taints=(OOS,)
    )
    bare = client.V1Node(metadata=client.V1ObjectMeta(name="new"))
    assert node_facts(bare) == NodeFacts("new", "")
