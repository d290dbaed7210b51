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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from csi_driver.core.model import NodeRecord
from csi_driver.core.placement import NodeView
from csi_driver.core.records import DRAIN_SPECS, NodeAccounting
from csi_driver.kube.nodes import Lost, NodeState, combined, declared_lost
from csi_driver.store.catalog import Catalog
from csi_driver.store.records import Versioned

#: Default for ``--node-lost-after``: three missed heartbeats of 10 s.
NODE_LOST_AFTER_S = 30.0

#: Kubernetes' view of a node by name (None: unknown, no cluster or unreadable).
KubeNodeStates = Callable[[str], NodeState | None]


class NodeReadings:
    """What the leader's reconcilers and ControllerUnpublishVolume know of nodes."""

    def __init__(
        self,
        catalog: Catalog,
        lost_after_s: float = NODE_LOST_AFTER_S,
        kube: KubeNodeStates | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._catalog = catalog
        self.lost_after_s = lost_after_s
        self._kube = kube
        self._clock = clock

    def drained(self) -> set[str]:
        """Nodes ``ferry drain`` was run for (and not undone)."""
        return {r.key[len(DRAIN_SPECS) :] for r in self._catalog.store.list(DRAIN_SPECS)}

    def _kube_state(self, node_id: str) -> NodeState | None:
        return self._kube(node_id) if self._kube is not None else None

    def state(self, node: NodeRecord, drained: bool) -> NodeState:
        """``node``'s readiness for placement."""
        age = self._clock() - node.heartbeat_at
        return combined(
            self._kube_state(node.node_id),
            age,
            # Two thirds of the loss delay: two missed heartbeats of the default 10 s.
            stale_after_s=self.lost_after_s * 2 / 3,
            lost_after_s=self.lost_after_s,
            drained=drained,
        )

    def lost(self, node_id: str) -> Lost | None:
        """Whether node ``node_id`` counts as lost for failover and fencing, since when."""
        node = self._catalog.get_node(node_id)
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
        for node in self._catalog.list_nodes() if nodes is None else nodes:
            account = accounts.get(node.node_id)
            charged = account.value if account else NodeAccounting(node.node_id)
            state = self.state(node, node.node_id in drained)
            views.append(
                NodeView(
                    node, charged.promised_bytes, charged.volume_count, state.readiness, state.why
                )
            )
        return views
