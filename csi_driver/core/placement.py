"""Placement: pure decisions about which node holds a volume.

No I/O here; callers hand in the cluster's view (nodes and what is already
provisioned on them) and get a decision or a domain error back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from csi_driver.core.errors import OutOfRange, ResourceExhausted
from csi_driver.core.model import NodeRecord, Topology, TopologyRequirement

#: Topology keys Ferry's nodes report. The zone key is what volumes are
#: reported accessible from (so a PV never pins its pod to a single node);
#: the node key lets the provisioner's selected node and per-node capacity
#: reach the controller.
ZONE_KEY = "topology.ferry.csi.dev/zone"
NODE_KEY = "topology.ferry.csi.dev/node"
DEFAULT_ZONE = "default"


@dataclass(frozen=True)
class NodeView:
    """A node and what the catalog has already provisioned on it."""

    node: NodeRecord
    provisioned_bytes: int
    volume_count: int

    @property
    def free_bytes(self) -> int:
        return max(0, self.node.capacity_bytes - self.provisioned_bytes)


def eligible(nodes: Iterable[NodeView], segments: Sequence[Topology]) -> list[NodeView]:
    """The nodes whose topology satisfies any of ``segments`` (all when empty)."""
    if not segments:
        return list(nodes)
    return [n for n in nodes if any(n.node.topology.satisfies(s) for s in segments)]


def choose_primary(
    nodes: Sequence[NodeView], size_bytes: int, requirement: TopologyRequirement | None
) -> NodeRecord:
    """Pick the node that will hold a new volume of ``size_bytes``.

    Requisite segments limit the candidates; the first preferred segment that
    a candidate with room satisfies wins (under WaitForFirstConsumer this is
    the node the scheduler selected); otherwise the candidate with the most
    free bytes, ties broken by node id so the choice is deterministic.
    """
    requisite = requirement.requisite if requirement else ()
    preferred = requirement.preferred if requirement else ()
    # CSI: with no requisite, the preferred segments also bound where it may go.
    bound = requisite or preferred
    candidates = eligible(nodes, bound)
    if not candidates:
        raise ResourceExhausted(
            "no Ferry node matches the volume's topology requirement; check that the "
            "Ferry node DaemonSet runs on the nodes the StorageClass allows"
        )
    roomy = [c for c in candidates if c.free_bytes >= size_bytes]
    if not roomy:
        largest = max(c.node.capacity_bytes for c in candidates)
        if size_bytes > largest:
            raise OutOfRange(
                f"requested {size_bytes} bytes exceeds the largest Ferry pool "
                f"({largest} bytes); request a smaller volume or add a larger node"
            )
        best = max(c.free_bytes for c in candidates)
        raise ResourceExhausted(
            f"no Ferry node has {size_bytes} bytes free (most free: {best} bytes); "
            "free space by deleting volumes or add nodes"
        )
    for segment in preferred:
        for candidate in roomy:
            if candidate.node.topology.satisfies(segment):
                return candidate.node
    return max(roomy, key=lambda c: (c.free_bytes, _reverse(c.node.node_id))).node


def _reverse(node_id: str) -> tuple[int, ...]:
    # max() picks the largest key; invert so the smallest node id wins ties.
    return tuple(-ord(ch) for ch in node_id)


def accessible_segment(node: NodeRecord) -> Topology:
    """The topology a volume on ``node`` is reported accessible from: its zone."""
    return Topology.of({ZONE_KEY: node.topology.as_dict().get(ZONE_KEY, DEFAULT_ZONE)})
