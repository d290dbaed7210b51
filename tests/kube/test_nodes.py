"""A Kubernetes Node's readiness as placement and failover read it (pure), and
how a real ``V1Node`` of the client reads as facts."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest
from kubernetes import client

from csi_driver.core.placement import NodeReadiness
from csi_driver.kube.api import node_facts
from csi_driver.kube.nodes import (
    NODE_DELETED,
    NodeFacts,
    NodeState,
    Taint,
    combined,
    declared_lost,
    readiness,
)

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


@pytest.mark.parametrize(
    ("kube", "age", "drained", "expected", "why"),
    [
        (None, 5.0, False, READY, "reporting"),
        (None, 20.0, False, NOT_READY, "silent for 20s"),  # stale, not lost yet
        (None, 31.0, False, LEAVING, "lost"),  # past --node-lost-after: re-placed
        (K_READY, 5.0, True, LEAVING, "ferry drain"),
        (K_NOT_READY, 5.0, True, LEAVING, "ferry drain"),
        (NODE_DELETED, 5.0, False, LEAVING, "deleted from the cluster"),
    ],
)
def test_combined_with_loss_and_drains(
    kube: NodeState | None, age: float, drained: bool, expected: NodeReadiness, why: str
) -> None:
    state = combined(kube, age, stale_after_s=15, lost_after_s=30, drained=drained)
    assert state.readiness is expected and why in state.why


NOW = 1_000.0


@pytest.mark.parametrize(
    ("kube", "heartbeat_at", "since", "why"),
    [
        (None, NOW - 5, None, ""),  # heard of lately: not lost
        (None, NOW - 40, NOW - 10, "silent for 40s"),  # lost since heartbeat + 30 s
        (K_NOT_READY, NOW - 5, None, ""),  # a NotReady kubelet alone is no loss
        (K_READY, None, NOW, "no Ferry agent"),
        # The operator's taint: lost now, without waiting for the heartbeat...
        (K_LEAVING, NOW - 1, NOW, "tainted"),
        # ...counted from when Kubernetes says the taint was added.
        (NodeState(LEAVING, NOW - 7, "tainted out-of-service"), NOW - 1, NOW - 7, "tainted"),
        (NODE_DELETED, NOW - 1, NOW, "deleted"),
    ],
)
def test_declared_lost(
    kube: NodeState | None, heartbeat_at: float | None, since: float | None, why: str
) -> None:
    lost = declared_lost(kube, heartbeat_at, 30.0, NOW)
    if since is None:
        assert lost is None
    else:
        assert lost is not None and lost.since == since and why in lost.why


def test_an_out_of_service_taint_reads_as_leaving_since_it_was_added() -> None:
    taint = replace(OOS, added=NOW - 3)
    state = readiness(NodeFacts("n", "Unknown", taints=(taint,)))
    assert (state.readiness, state.since) == (LEAVING, NOW - 3)
    lost = declared_lost(state, NOW - 1, 30.0, NOW)
    assert lost is not None and lost.since == NOW - 3


def test_a_client_node_object_reads_as_facts() -> None:
    changed = dt.datetime(2026, 11, 26, 23, 0, tzinfo=dt.UTC)
    node = client.V1Node(
        metadata=client.V1ObjectMeta(name="worker-2"),
        spec=client.V1NodeSpec(
            unschedulable=True,
            taints=[
                client.V1Taint(key=OOS.key, value=OOS.value, effect=OOS.effect, time_added=changed)
            ],
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
        "worker-2",
        "Unknown",
        changed.timestamp(),
        unschedulable=True,
        taints=(replace(OOS, added=changed.timestamp()),),
    )
    bare = client.V1Node(metadata=client.V1ObjectMeta(name="new"))
    assert node_facts(bare) == NodeFacts("new", "")
