"""A Kubernetes Node's readiness as placement and failover read it (pure).

Kubernetes knows things about a node that Ferry's own heartbeat cannot:
that an operator declared it shut down (the ``out-of-service`` taint, which
also lets Kubernetes force-detach its volumes), that it is cordoned or
draining, and what the kubelet last reported. Invariants of
:func:`readiness`:

- ``node.kubernetes.io/out-of-service`` (any value or effect) is LEAVING:
  the operator says the node is gone, its copies are re-placed and a
  volume whose primary it held may fail over (per policy) without waiting.
- A Ready condition that is not ``True`` (``False``, ``Unknown``, absent),
  the node controller's ``unreachable`` / ``not-ready`` taints, and a
  cordon (``spec.unschedulable``) are NOT_READY: no new copies go there,
  and the ones it holds stay (a node that reboots returns with them).
- Otherwise READY. :func:`combined` adds Ferry's own heartbeat: a silent
  agent on a Ready node is NOT_READY too, and LEAVING always wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from csi_driver.core.placement import NodeReadiness

OUT_OF_SERVICE_TAINT = "node.kubernetes.io/out-of-service"
UNREACHABLE_TAINT = "node.kubernetes.io/unreachable"
NOT_READY_TAINT = "node.kubernetes.io/not-ready"


@dataclass(frozen=True)
class Taint:
    key: str
    value: str = ""
    effect: str = ""

    def __str__(self) -> str:
        value = f"={self.value}" if self.value else ""
        return f"{self.key}{value}:{self.effect}"


@dataclass(frozen=True)
class NodeFacts:
    """What the Kubernetes API says about one Node (see api.node_facts)."""

    name: str
    #: The Ready condition's status: "True", "False", "Unknown", or "" when absent.
    ready: str
    #: When the Ready condition last changed (seconds since the epoch; 0 unknown).
    ready_since: float = 0.0
    unschedulable: bool = False
    taints: tuple[Taint, ...] = ()


@dataclass(frozen=True)
class NodeState:
    """A node's readiness, since when (0: unknown), and why, for logs and Events."""

    readiness: NodeReadiness
    since: float
    why: str


def readiness(facts: NodeFacts) -> NodeState:
    """How placement and failover must treat ``facts``'s node (see the module doc)."""
    for taint in facts.taints:
        if taint.key == OUT_OF_SERVICE_TAINT:
            return NodeState(NodeReadiness.LEAVING, 0.0, f"tainted {taint}")
    if facts.ready != "True":
        shown = facts.ready or "not reported"
        return NodeState(NodeReadiness.NOT_READY, facts.ready_since, f"Ready is {shown}")
    for taint in facts.taints:
        if taint.key in (UNREACHABLE_TAINT, NOT_READY_TAINT):
            return NodeState(NodeReadiness.NOT_READY, 0.0, f"tainted {taint}")
    if facts.unschedulable:
        return NodeState(NodeReadiness.NOT_READY, 0.0, "cordoned (unschedulable)")
    return NodeState(NodeReadiness.READY, facts.ready_since, "Ready")


def combined(
    kube: NodeState | None, heartbeat_age_s: float | None, stale_after_s: float
) -> NodeState:
    """Kubernetes' view (None: no cluster, or no Node of that name) with Ferry's heartbeat.

    ``heartbeat_age_s`` is how long ago the node's agent last reported (None:
    it never registered). Without a Kubernetes view the heartbeat decides
    alone: Ferry never re-places copies because one source is missing.
    """
    if kube is not None and kube.readiness is NodeReadiness.LEAVING:
        return kube
    if heartbeat_age_s is None:
        return NodeState(NodeReadiness.LEAVING, 0.0, "no Ferry agent registered")
    if heartbeat_age_s > stale_after_s:
        return NodeState(
            NodeReadiness.NOT_READY, 0.0, f"Ferry agent silent for {heartbeat_age_s:.0f}s"
        )
    if kube is None:
        return NodeState(NodeReadiness.READY, 0.0, "Ferry agent reporting")
    return kube
