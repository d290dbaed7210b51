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

A node's silence counts only time the controller could have heard it: while
the controller cannot read the catalog (etcd down, no quorum) every node falls
silent at once, and that silence is the store's, not the nodes'.
:class:`CatalogOutages` records those spans and :class:`NodeReadings` takes
them off each node's silence, so a catalog that comes back finds its nodes
ready (not NOT_READY until each one's next heartbeat, nor lost and failed
over) while a node that was already silent before the outage stays silent.

:func:`readiness_runner` tells the leader's reconcilers when a node's
readiness changes: it is woken by the node's registration and heartbeats and
by ``ferry drain`` records, and, since a node that falls silent writes
nothing, each pass asks to run again when the node's silence would cross the
next threshold. Per pass it reads nothing but the node's own record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence

from csi_driver.core.model import NodeRecord
from csi_driver.core.placement import NodeReadiness, NodeView
from csi_driver.core.records import DRAIN_SPECS, NodeAccounting, drain_spec_key
from csi_driver.kube.nodes import Lost, NodeState, combined, declared_lost
from csi_driver.reconcile.informer import Informer
from csi_driver.reconcile.runner import Runner, Source, strip_prefix
from csi_driver.store.base import CatalogStore
from csi_driver.store.catalog import NODES, Catalog
from csi_driver.store.records import Versioned

log = logging.getLogger(__name__)

#: Default for ``--node-lost-after``: three missed heartbeats of 10 s.
NODE_LOST_AFTER_S = 30.0

#: Kubernetes' view of a node by name (None: unknown, no cluster or unreadable).
KubeNodeStates = Callable[[str], NodeState | None]
#: Told a node's id, its readiness before (None: first seen) and now.
ReadinessChanged = Callable[[str, NodeReadiness | None, NodeReadiness], None]
#: How often every node's readiness is looked at again: Kubernetes' view of a
#: silent node (a taint, a deletion) changes without any catalog write.
READINESS_RESYNC_S = 10.0
#: How often a controller checks that it can read the catalog: the resolution
#: of :class:`CatalogOutages` (an outage is known to this precision).
OUTAGE_PROBE_S = 1.0


class CatalogOutages:
    """The spans in which this process could not read the catalog.

    A probe thread reads the store's revision every ``period_s``. An outage
    runs from the last read that succeeded before a failure to the first one
    that succeeded after it: the whole span nothing could be heard in, a
    little longer rather than shorter (a node's loss is noticed that much
    later; a live node is never taken for silent). One still going counts up
    to now. An outage that ended more than ``keep_s`` ago (the loss delay) is
    forgotten: a node heard before it and not since has been silent longer
    than that already, so it is lost with or without the credit.
    """

    def __init__(
        self,
        store: CatalogStore,
        keep_s: float,
        period_s: float = OUTAGE_PROBE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._keep_s = keep_s
        self._period_s = period_s
        self._clock = clock
        self._lock = threading.Lock()
        self._heard_at = clock()  # the last read that succeeded
        self._down_since: float | None = None
        self._past: list[tuple[float, float]] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="catalog-outages", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopping.wait(self._period_s):
            self.probe()

    def probe(self) -> None:
        """Read the catalog once and record whether it answered."""
        try:
            self._store.revision()
        except Exception as exc:  # whatever the backend raised, nothing could be read
            with self._lock:
                if self._down_since is None:
                    self._down_since = self._heard_at
                    log.warning(
                        "catalog unreachable: node silence is not counted until it answers",
                        extra={"error": str(exc)},
                    )
            return
        now = self._clock()
        with self._lock:
            if self._down_since is not None:
                self._past.append((self._down_since, now))
                log.warning(
                    "catalog reachable again: its outage is not counted as node silence",
                    extra={"outage_s": round(now - self._down_since, 3)},
                )
                self._down_since = None
            self._heard_at = now
            self._past = [(a, b) for a, b in self._past if b > now - self._keep_s]

    def unobserved(self, since: float, until: float) -> float:
        """Seconds of ``[since, until]`` in which the catalog could not be read."""
        with self._lock:
            spans = list(self._past)
            if self._down_since is not None:
                spans.append((self._down_since, until))
        return sum(max(0.0, min(b, until) - max(a, since)) for a, b in spans)


class NodeReadings:
    """What the leader's reconcilers and ControllerUnpublishVolume know of nodes."""

    def __init__(
        self,
        catalog: Catalog,
        lost_after_s: float = NODE_LOST_AFTER_S,
        kube: KubeNodeStates | None = None,
        clock: Callable[[], float] = time.time,
        outages: CatalogOutages | None = None,
    ) -> None:
        """``outages``: when the catalog could not be read (None: it always could)."""
        self.catalog = catalog
        self.lost_after_s = lost_after_s
        self._kube = kube
        self._clock = clock
        self._outages = outages

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

    def silence(self, node: NodeRecord) -> float:
        """Seconds ``node`` has not been heard from, not counting catalog outages."""
        now = self._clock()
        age = now - node.heartbeat_at
        if self._outages is not None:
            age -= self._outages.unobserved(node.heartbeat_at, now)
        return age

    def state(self, node: NodeRecord, drained: bool) -> NodeState:
        """``node``'s readiness for placement."""
        age = self.silence(node)
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
        age = self.silence(node)
        ahead = [t - age for t in (self.stale_after_s, self.lost_after_s) if t >= age]
        # Just past the threshold: ``combined`` compares strictly.
        return min(ahead) + 0.05 if ahead else None

    def lost(self, node_id: str, node: NodeRecord | None = None) -> Lost | None:
        """Whether node ``node_id`` counts as lost for failover and fencing, since when.

        ``node``: its registration as the caller holds it (None: read from the catalog).
        """
        if node is None:
            node = self.catalog.get_node(node_id)
        now = self._clock()
        return declared_lost(
            self._kube_state(node_id),
            now - self.silence(node) if node is not None else None,
            self.lost_after_s,
            now,
        )

    def views(
        self,
        accounts: Mapping[str, Versioned[NodeAccounting]],
        nodes: Sequence[NodeRecord] | None = None,
        drained: Collection[str] | None = None,
    ) -> list[NodeView]:
        """Every registered node (or ``nodes``, registrations read already), what the
        catalog promised it, and its readiness (``drained``: the drains read already)."""
        if drained is None:
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
