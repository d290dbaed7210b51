"""Which controller process runs the background work: the elected leader.

Every controller process campaigns for the catalog's ``controller``
election (an etcd lease and key; on SQLite an exclusive lock on a file next
to the database). CSI RPCs are served by every replica: each of their writes
is a compare-and-swap, so concurrent replicas cannot corrupt a record. Work
nobody asked for — the garbage collector, the move and replication
reconcilers — runs only on the leader, and each of its txns carries the
leader's fence, so a leader deposed without knowing it (a paused process, a
lease that lapsed) has its writes refused by the store.

Invariants: this process reports itself leader (log line ``leading``, gauge
``ferry_controller_leader`` = 1) only between winning and losing (or
resigning); a stop resigns, so a standby takes over at once; a dead leader's
etcd lease lapses within its TTL and its lock is dropped by the kernel, so a
standby takes over within the TTL plus one campaign retry.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from csi_driver.controller.collector import Collector
from csi_driver.controller.failover import NODE_LOST_AFTER_S, failover_runner
from csi_driver.controller.images import Deposed, ImageIntents
from csi_driver.controller.moves import move_runner
from csi_driver.controller.readiness import NodeReadings
from csi_driver.controller.replication import replication_runners
from csi_driver.kube.events import LoggingSink, MobilityEvents
from csi_driver.metrics import CONTROLLER_LEADER
from csi_driver.reconcile.runner import Runner
from csi_driver.store.catalog import Catalog

log = logging.getLogger(__name__)

ELECTION = "controller"
#: How often the leader settles the intents that changed (everything once on winning).
SWEEP_INTERVAL_S = 1.0
#: How long a new leader waits for the collector's caches before its first pass.
SYNC_SLICE_S = 1.0
#: A campaign is retried in slices this long, so a stop is noticed promptly.
CAMPAIGN_SLICE_S = 1.0
#: Pause after a failed campaign (catalog unreachable) before the next.
RETRY_S = 1.0


def default_candidate() -> str:
    """This process's name in the election: host (the pod's name in a cluster) and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Leadership:
    """Campaigns in a thread; while leading, settles what changed every ``sweep_interval_s``."""

    def __init__(
        self,
        catalog: Catalog,
        candidate: str | None = None,
        *,
        sweep_interval_s: float = SWEEP_INTERVAL_S,
        node_lost_after_s: float = NODE_LOST_AFTER_S,
        events: MobilityEvents | None = None,
        readings: NodeReadings | None = None,
    ) -> None:
        self._lost_after = node_lost_after_s
        self._readings = readings or NodeReadings(catalog, node_lost_after_s)
        self._events = events or MobilityEvents(LoggingSink())
        self.candidate = candidate or default_candidate()
        self._election = catalog.store.election(ELECTION, self.candidate)
        self._catalog = catalog
        self._collector = Collector(catalog, self._election.fence)
        self._interval = sweep_interval_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leadership", daemon=True)

    @property
    def is_leader(self) -> bool:
        return self._election.is_leader

    def start(self) -> None:
        log.info("campaigning", extra={"election": ELECTION, "candidate": self.candidate})
        # Standbys follow the catalog too, so a takeover starts from warm caches.
        self._collector.start()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop campaigning and resign, so a standby takes over without waiting for a TTL."""
        self._stopping.set()
        self._election.resign()  # wakes a campaign and a leader's wait
        self._thread.join(timeout)
        self._election.resign()  # in case a campaign won after the first resign
        self._collector.stop(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                won = self._election.campaign(timeout=CAMPAIGN_SLICE_S)
            except Exception as exc:  # the catalog is down: keep trying, never die
                log.warning("campaign failed", extra={"error": str(exc)})
                self._stopping.wait(RETRY_S)
                continue
            if won and not self._stopping.is_set():
                self._lead()

    def _reconcilers(self) -> list[Runner]:
        """The leader's reconcilers (moves, replication), their txns fenced."""
        intents = ImageIntents(self._catalog, fence=self._election.fence)
        return [
            move_runner(self._catalog, intents, self._lost_after, self._events),
            *replication_runners(self._catalog, intents, self._events, self._readings),
            failover_runner(self._catalog, intents, self._lost_after, self._events, self._readings),
        ]

    def _lead(self) -> None:
        CONTROLLER_LEADER.set(1)
        log.info("leading", extra={"election": ELECTION, "candidate": self.candidate})
        runners = self._reconcilers()
        for runner in runners:
            runner.start()
        try:
            while not self._collector.wait_synced(SYNC_SLICE_S):
                if self._stopping.is_set() or not self._election.is_leader:
                    break
            self._collector.resync()  # a new leader looks at everything once
            while not self._stopping.is_set() and self._election.is_leader:
                try:
                    self._collector.settle_changed()
                except Deposed:
                    # Someone else holds the key: drop what we hold and campaign anew.
                    self._election.resign()
                    break
                except Exception as exc:  # a failed sweep is retried next interval
                    log.warning("garbage collection failed", extra={"error": str(exc)})
                if self._election.wait_lost(self._interval):
                    break
        finally:
            for runner in runners:
                runner.stop(timeout=10.0)
            CONTROLLER_LEADER.set(0)
        log.info("not leading", extra={"election": ELECTION, "candidate": self.candidate})
