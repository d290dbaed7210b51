"""Placement: pure decisions about which nodes hold a volume's copies.

No I/O here; callers hand in the cluster's view (nodes, their readiness and
what is already provisioned on them) and get a decision or a domain error
back. Every decision is deterministic: the same view, in any order, gives
the same answer (ties go to the smallest node id).

Invariants of every decision: never two copies of a volume (primary or
replica) on one node, and never a new copy on a node without room for it
(free bytes below the copy's size) or on a node that is not READY.
"""

from __future__ import annotations

import enum
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


class NodeReadiness(enum.Enum):
    """Whether a node may take new copies, and whether it keeps the ones it has.

    NOT_READY (Kubernetes' Ready condition is not True, or the agent is
    silent) keeps its copies: a node that reboots returns with them, and
    re-placing a replica costs a full copy. LEAVING (out-of-service taint,
    ``ferry drain``, gone from the cluster) has its copies re-placed.
    """

    READY = "ready"
    NOT_READY = "not-ready"
    LEAVING = "leaving"


@dataclass(frozen=True)
class NodeView:
    """A node and what the catalog has already provisioned on it."""

    node: NodeRecord
    provisioned_bytes: int
    volume_count: int
    readiness: NodeReadiness = NodeReadiness.READY
    #: Why the node has that readiness ("drained (ferry drain)"...), for messages.
    why: str = ""
    #: The part of ``provisioned_bytes`` that snapshot copies hold.
    snapshot_bytes: int = 0

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
    matching = eligible(nodes, bound)
    candidates = [n for n in matching if n.readiness is NodeReadiness.READY]
    if not candidates:
        raise ResourceExhausted(_none_ready(matching))
    roomy = [c for c in candidates if c.free_bytes >= size_bytes]
    if not roomy:
        largest = max(c.node.capacity_bytes for c in candidates)
        if size_bytes > largest:
            raise OutOfRange(
                f"requested {size_bytes} bytes exceeds the largest Ferry pool "
                f"({largest} bytes); request a smaller volume or add a larger node"
            )
        best = max(c.free_bytes for c in candidates)
        held = sum(c.snapshot_bytes for c in candidates)
        raise ResourceExhausted(
            f"no Ferry node has {size_bytes} bytes free (most free: {best} bytes)"
            f"{snapshots_hold(held, 'on the nodes that match')}; free space by deleting "
            "volumes or add nodes"
        )
    for segment in preferred:
        for candidate in roomy:
            if candidate.node.topology.satisfies(segment):
                return candidate.node
    return min(roomy, key=lambda c: (-c.free_bytes, c.node.node_id)).node


def snapshots_hold(held_bytes: int, where: str) -> str:
    """The part of a no-room message that says what snapshots hold ("" when nothing)."""
    if not held_bytes:
        return ""
    # Snapshots are charged their volume's whole size (controller/snapshot_space.py),
    # which an operator looking at a pool's used blocks would not guess.
    return (
        f"; snapshots hold {held_bytes} bytes of it {where} (each snapshot copy is charged "
        "its volume's full size): delete the VolumeSnapshots no longer needed"
    )


#: How many unready nodes a placement error names (the rest are counted).
_NAMED_NODES = 8


def _none_ready(matching: Sequence[NodeView]) -> str:
    """Why no node matching the topology can take a volume, and what the operator can do."""
    if not matching:
        return (
            "no Ferry node matches the volume's topology requirement; check that the "
            "Ferry node DaemonSet runs where the StorageClass's allowedTopologies allow"
        )
    ordered = sorted(matching, key=lambda n: n.node.node_id)
    named = [f"{n.node.node_id} ({n.why or n.readiness.value})" for n in ordered[:_NAMED_NODES]]
    if len(ordered) > _NAMED_NODES:
        named.append(f"{len(ordered) - _NAMED_NODES} more")
    return (
        "no ready Ferry node matches the volume's topology requirement; the nodes that "
        f"match are not ready: {', '.join(named)}. Undo a drain with `ferry drain NODE "
        "--undo`, bring a silent node's Ferry agent (and its Kubernetes Node) back to "
        "Ready, or allow other nodes in the StorageClass's allowedTopologies"
    )


def accessible_segment(node: NodeRecord) -> Topology:
    """The topology a volume on ``node`` is reported accessible from: its zone."""
    return Topology.of({ZONE_KEY: node.topology.as_dict().get(ZONE_KEY, DEFAULT_ZONE)})


@dataclass(frozen=True)
class Placement:
    """Where a new volume's copies go; ``missing`` replicas found no node yet."""

    primary: str
    replicas: tuple[str, ...]
    missing: int


@dataclass(frozen=True)
class ReplicaPlan:
    """How to bring a volume's replicas to what its policy wants.

    ``keep`` + ``add`` are the replicas once the plan is carried out;
    ``retire`` are deleted (after ``add`` are in place, so the volume is never
    below its previous number of copies); ``missing`` wanted replicas have no
    node that can take them now: the volume is degraded until one joins.
    """

    keep: tuple[str, ...]
    retire: tuple[str, ...]
    add: tuple[str, ...]
    missing: int

    @property
    def settled(self) -> bool:
        return not (self.retire or self.add)


def choose_replicas(
    nodes: Sequence[NodeView],
    size_bytes: int,
    holders: Sequence[str],
    count: int,
    within: Sequence[Topology] = (),
) -> tuple[str, ...]:
    """Up to ``count`` READY nodes with room for a copy, none among ``holders``.

    ``holders`` are the nodes that hold (or are about to hold) a copy: the
    primary and the replicas. ``within`` bounds the candidates (the
    volume's accessible topology: a replica elsewhere could never serve its
    pod). Each pick prefers the node sharing the fewest topology values
    (zone, rack... every key but the node's own) with the copies so far, so
    copies spread across failure domains, then the most free bytes, then
    the smallest node id.
    """
    if count <= 0:
        return ()
    by_id = {n.node.node_id: n for n in nodes}
    copies = [by_id[h] for h in dict.fromkeys(holders) if h in by_id]
    taken = set(holders)
    candidates = [
        n
        for n in eligible(nodes, within)
        if n.readiness is NodeReadiness.READY
        and n.free_bytes >= size_bytes
        and n.node.node_id not in taken
    ]
    chosen: list[str] = []
    while candidates and len(chosen) < count:
        best = min(
            candidates,
            key=lambda c: (_shared_domains(c, copies), -c.free_bytes, c.node.node_id),
        )
        chosen.append(best.node.node_id)
        copies.append(best)
        candidates = [c for c in candidates if c.node.node_id != best.node.node_id]
    return tuple(chosen)


def place_volume(
    nodes: Sequence[NodeView],
    size_bytes: int,
    requirement: TopologyRequirement | None,
    replicas: int,
) -> Placement:
    """Primary (see :func:`choose_primary`) and ``replicas`` more nodes in its zone."""
    primary = choose_primary(nodes, size_bytes, requirement)
    chosen = choose_replicas(
        nodes, size_bytes, [primary.node_id], replicas, [accessible_segment(primary)]
    )
    return Placement(primary.node_id, chosen, replicas - len(chosen))


def plan_replicas(
    nodes: Sequence[NodeView],
    size_bytes: int,
    primary: str,
    current: Sequence[str],
    wanted: int,
    within: Sequence[Topology] = (),
    growth_bytes: int = 0,
    no_room: Sequence[str] = (),
) -> ReplicaPlan:
    """Re-place a volume's replicas after a node left or filled up, or ``wanted`` changed.

    A replica is retired when it shares the primary's node (after a move the
    old primary becomes a replica elsewhere, never beside the new one), when
    its node has left the view or is LEAVING, when its node lacks the
    ``growth_bytes`` the volume's expansion needs on every copy or is in
    ``no_room`` (its node filled up: it reported no space for the copy), or
    when it is one too many (the least useful go first: on NOT_READY nodes, sharing
    the most failure domains, least free). A NOT_READY node keeps its
    replica. New replicas go where :func:`choose_replicas` puts them,
    never on a node whose retiring copy still occupies it nor on one in
    ``no_room``.
    """
    by_id = {n.node.node_id: n for n in nodes}
    current = list(dict.fromkeys(current))
    retire: list[str] = []
    keep: list[NodeView] = []
    for node_id in current:
        view = by_id.get(node_id)
        if (
            node_id == primary
            or view is None
            or view.readiness is NodeReadiness.LEAVING
            or view.free_bytes < growth_bytes
            or node_id in no_room
        ):
            retire.append(node_id)
        else:
            keep.append(view)
    primary_view = [by_id[primary]] if primary in by_id else []
    while len(keep) > max(wanted, 0):
        worst = max(
            keep,
            key=lambda k: (
                k.readiness is not NodeReadiness.READY,
                _shared_domains(k, primary_view + [o for o in keep if o is not k]),
                -k.free_bytes,
                k.node.node_id,
            ),
        )
        keep.remove(worst)
        retire.append(worst.node.node_id)
    kept = tuple(sorted(k.node.node_id for k in keep))
    needed = max(wanted, 0) - len(kept)
    add = choose_replicas(
        nodes, size_bytes + growth_bytes, [primary, *kept, *retire, *no_room], needed, within
    )
    return ReplicaPlan(kept, tuple(sorted(retire)), add, max(needed, 0) - len(add))


def _shared_domains(candidate: NodeView, copies: Sequence[NodeView]) -> int:
    """How many (copy, topology key) pairs the candidate shares a value with."""
    mine = {k: v for k, v in candidate.node.topology.segments if k != NODE_KEY}
    return sum(
        1
        for copy in copies
        for key, value in copy.node.topology.segments
        if key != NODE_KEY and mine.get(key) == value
    )
