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
- Otherwise READY. :func:`combined` adds Ferry's own view: a silent agent
  on a Ready node is NOT_READY, one silent past ``--node-lost-after`` (lost)
  or drained with ``ferry drain`` is LEAVING, and LEAVING always wins.

:func:`declared_lost` is what failover reads: a node is lost when the
operator says so (out-of-service, since the taint was added) or when Ferry's
agent has been silent past ``--node-lost-after`` (since the heartbeat plus
that delay). A NotReady kubelet alone is not a loss: Ferry's agent may still
serve the data, and promoting then would give up acknowledged writes.
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
    #: When the taint was added (Kubernetes sets it for NoExecute taints; 0 unknown).
    added: float = 0.0

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
            return NodeState(NodeReadiness.LEAVING, taint.added, f"tainted {taint}")
    if facts.ready != "True":
        shown = facts.ready or "not reported"
        return NodeState(NodeReadiness.NOT_READY, facts.ready_since, f"Ready is {shown}")
    for taint in facts.taints:
        if taint.key in (UNREACHABLE_TAINT, NOT_READY_TAINT):
            return NodeState(NodeReadiness.NOT_READY, 0.0, f"tainted {taint}")
    if facts.unschedulable:
        return NodeState(NodeReadiness.NOT_READY, 0.0, "cordoned (unschedulable)")
    return NodeState(NodeReadiness.READY, facts.ready_since, "Ready")


#: What a Node that Kubernetes no longer has (deleted from the cluster) reads as.
NODE_DELETED = NodeState(NodeReadiness.LEAVING, 0.0, "the Node was deleted from the cluster")


def combined(
    kube: NodeState | None,
    heartbeat_age_s: float | None,
    stale_after_s: float,
    lost_after_s: float | None = None,
    *,
    drained: bool = False,
) -> NodeState:
    """Kubernetes' view (None: no cluster, or it could not be read) with Ferry's own.

    ``heartbeat_age_s`` is how long ago the node's agent last reported (None:
    it never registered); past ``lost_after_s`` the node is lost (LEAVING).
    ``drained``: ``ferry drain`` was run for it. Without a Kubernetes view
    Ferry's own decides alone: Ferry never re-places copies because one
    source of facts is missing.
    """
    if kube is not None and kube.readiness is NodeReadiness.LEAVING:
        return kube
    if drained:
        return NodeState(NodeReadiness.LEAVING, 0.0, "drained (ferry drain)")
    if heartbeat_age_s is None:
        return NodeState(NodeReadiness.LEAVING, 0.0, "no Ferry agent registered")
    if lost_after_s is not None and heartbeat_age_s > lost_after_s:
        return NodeState(
            NodeReadiness.LEAVING, 0.0, f"Ferry agent silent for {heartbeat_age_s:.0f}s: lost"
        )
    if heartbeat_age_s > stale_after_s:
        return NodeState(
            NodeReadiness.NOT_READY, 0.0, f"Ferry agent silent for {heartbeat_age_s:.0f}s"
        )
    if kube is None:
        return NodeState(NodeReadiness.READY, 0.0, "Ferry agent reporting")
    return kube


@dataclass(frozen=True)
class Lost:
    """A node failover may act on: since when it counts as lost, and why."""

    since: float
    why: str


def declared_lost(
    kube: NodeState | None, heartbeat_at: float | None, lost_after_s: float, now: float
) -> Lost | None:
    """Whether (and since when) a volume's primary node is lost (see the module doc).

    ``heartbeat_at`` is the agent's last report (None: never registered).
    An out-of-service taint (or a Node deleted from the cluster) is a loss at
    once, counted from the taint's time when Kubernetes gives it, else from
    ``now``: the operator's word replaces waiting for ``lost_after_s``.
    """
    if kube is not None and kube.readiness is NodeReadiness.LEAVING:
        return Lost(kube.since or now, kube.why)
    if heartbeat_at is None:
        return Lost(now, "no Ferry agent registered")
    silent = now - heartbeat_at
    if silent > lost_after_s:
        return Lost(heartbeat_at + lost_after_s, f"Ferry agent silent for {silent:.0f}s")
    return None
