"""Node readiness as the controller reads it: Ferry's heartbeat, drains, Kubernetes' Node.

One place combines what Ferry knows of a node (its agent's last heartbeat
in the catalog, ``ferry drain`` records) with what Kubernetes knows (the
Node's Ready condition and taints, through :mod:`csi_driver.kube` when a
cluster is reachable), by the pure rules of :mod:`csi_driver.kube.nodes`:

- placement (:meth:`NodeReadings.views`): a node lost past
  ``--node-lost-after``, drained, tainted out-of-service or deleted from
  the cluster is LEAVING (its replicas are re-placed); a silent or NotReady
  one is NOT_READY (keeps its copies, takes no new one);
- failover and fencing (:meth:`NodeReadings.lost`): out-of-service (or a
  deleted Node) is lost at once, a silent agent once past
  ``--node-lost-after``; a NotReady kubelet alone is not.

Without a cluster the Kubernetes part is absent and Ferry's own view decides.

:func:`readiness_runner` tells the leader's reconcilers when a node's
readiness changes: it is woken by the node's registration and heartbeats and
by ``ferry drain`` records, and, since a node that falls silent writes
nothing, each pass asks to run again when the node's silence would cross the
next threshold. Per pass it reads nothing but the node's own record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from csi_driver.core.model import NodeRecord
from csi_driver.core.placement import NodeReadiness, NodeView
from csi_driver.core.records import DRAIN_SPECS, NodeAccounting, drain_spec_key
from csi_driver.kube.nodes import Lost, NodeState, combined, declared_lost
from csi_driver.reconcile.informer import Informer
from csi_driver.reconcile.runner import Runner, Source, strip_prefix
from csi_driver.store.catalog import NODES, Catalog
from csi_driver.store.records import Versioned

#: Default for ``--node-lost-after``: three missed heartbeats of 10 s.
NODE_LOST_AFTER_S = 30.0

#: Kubernetes' view of a node by name (None: unknown, no cluster or unreadable).
KubeNodeStates = Callable[[str], NodeState | None]
#: Told a node's id, its readiness before (None: first seen) and now.
ReadinessChanged = Callable[[str, NodeReadiness | None, NodeReadiness], None]
#: How often every node's readiness is looked at again: Kubernetes' view of a
#: silent node (a taint, a deletion) changes without any catalog write.
READINESS_RESYNC_S = 10.0


class NodeReadings:
    """What the leader's reconcilers and ControllerUnpublishVolume know of nodes."""

    def __init__(
        self,
        catalog: Catalog,
        lost_after_s: float = NODE_LOST_AFTER_S,
        kube: KubeNodeStates | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.catalog = catalog
        self.lost_after_s = lost_after_s
        self._kube = kube
        self._clock = clock

    def drained(self) -> set[str]:
        """Nodes ``ferry drain`` was run for (and not undone)."""
        return {r.key[len(DRAIN_SPECS) :] for r in self.catalog.store.list(DRAIN_SPECS)}

    def _kube_state(self, node_id: str) -> NodeState | None:
        return self._kube(node_id) if self._kube is not None else None

    @property
    def stale_after_s(self) -> float:
        """Silence after which a node is NOT_READY: two thirds of the loss delay (two
        missed heartbeats of the default 10 s)."""
        return self.lost_after_s * 2 / 3

    def state(self, node: NodeRecord, drained: bool) -> NodeState:
        """``node``'s readiness for placement."""
        age = self._clock() - node.heartbeat_at
        return combined(
            self._kube_state(node.node_id),
            age,
            stale_after_s=self.stale_after_s,
            lost_after_s=self.lost_after_s,
            drained=drained,
        )

    def next_change_in(self, node: NodeRecord) -> float | None:
        """Seconds until ``node``'s silence crosses its next threshold (stale, then
        lost) if no heartbeat comes; None once it is past both."""
        age = self._clock() - node.heartbeat_at
        ahead = [t - age for t in (self.stale_after_s, self.lost_after_s) if t >= age]
        # Just past the threshold: ``combined`` compares strictly.
        return min(ahead) + 0.05 if ahead else None

    def lost(self, node_id: str, node: NodeRecord | None = None) -> Lost | None:
        """Whether node ``node_id`` counts as lost for failover and fencing, since when.

        ``node``: its registration as the caller holds it (None: read from the catalog).
        """
        if node is None:
            node = self.catalog.get_node(node_id)
        return declared_lost(
            self._kube_state(node_id),
            node.heartbeat_at if node is not None else None,
            self.lost_after_s,
            self._clock(),
        )

    def views(
        self,
        accounts: Mapping[str, Versioned[NodeAccounting]],
        nodes: Sequence[NodeRecord] | None = None,
    ) -> list[NodeView]:
        """Every registered node (or ``nodes``, registrations read already), what the
        catalog promised it, and its readiness."""
        drained = self.drained()
        views = []
        for node in self.catalog.list_nodes() if nodes is None else nodes:
            account = accounts.get(node.node_id)
            charged = account.value if account else NodeAccounting(node.node_id)
            state = self.state(node, node.node_id in drained)
            views.append(
                NodeView(
                    node,
                    charged.promised_bytes,
                    charged.volume_count,
                    state.readiness,
                    state.why,
                    charged.snapshot_bytes,
                )
            )
        return views


class ReadinessChanges:
    """Reconciles node ids: calls ``changed`` when a node's readiness differs from the
    last pass's (a node whose record is gone reads as LEAVING)."""

    def __init__(self, readings: NodeReadings, drains: Informer, changed: ReadinessChanged) -> None:
        self._readings = readings
        self._drains = drains
        self._changed = changed
        self._seen: dict[str, NodeReadiness] = {}

    def __call__(self, node_id: str) -> float | None:
        node = self._readings.catalog.get_node(node_id)
        if node is None:
            now, again = NodeReadiness.LEAVING, None
        else:
            drained = self._drains.get(drain_spec_key(node_id)) is not None
            now = self._readings.state(node, drained).readiness
            again = self._readings.next_change_in(node)
        before = self._seen.get(node_id)
        if before is not now:
            self._seen[node_id] = now
            self._changed(node_id, before, now)
        return again


def readiness_runner(readings: NodeReadings, changed: ReadinessChanged) -> Runner:
    """A runner calling ``changed`` whenever a node becomes (or stops being) ready,
    drained, silent or lost: one worker, keyed by node id."""
    store = readings.catalog.store
    drains = Informer(store, DRAIN_SPECS)
    return Runner(
        "node-readiness",
        ReadinessChanges(readings, drains, changed),
        [
            Source(Informer(store, NODES), strip_prefix(NODES)),
            Source(drains, strip_prefix(DRAIN_SPECS)),
        ],
        workers=1,
        resync_s=READINESS_RESYNC_S,
    )
