"""Assembles Ferry's parts into running services.

``ControllerRuntime`` serves Identity + Controller; ``NodeRuntime`` serves
Identity + Node on the CSI socket and the node-agent API on its own
endpoint, and keeps the node's registration in the catalog fresh;
``start_all_in_one`` serves both from one process on one CSI socket.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from csi_driver.agent_api.server import NodeAgentServicer, admitted_callers
from csi_driver.backup.snapshots import BackupSettings, SnapshotBackups
from csi_driver.catalog_api.server import admitted_callers as catalog_callers
from csi_driver.catalog_api.server import register as serve_store
from csi_driver.controller.failover import NODE_LOST_AFTER_S
from csi_driver.controller.leadership import Leadership
from csi_driver.controller.readiness import CatalogOutages, NodeReadings
from csi_driver.controller.snapshots import SnapshotService
from csi_driver.controller.volumes import VolumeService
from csi_driver.core.errors import InvalidArgument
from csi_driver.core.model import NodeRecord, Topology
from csi_driver.core.placement import NODE_KEY, ZONE_KEY
from csi_driver.csi.controller import ControllerServicer
from csi_driver.csi.group_controller import GroupControllerServicer
from csi_driver.csi.identity import IdentityServicer
from csi_driver.csi.node import NodeServicer
from csi_driver.enrollment import EnrollmentSettings, serve_enrollment
from csi_driver.gen import csi_pb2_grpc
from csi_driver.gen.ferry.v1 import agent_pb2_grpc
from csi_driver.kube.events import MobilityEvents
from csi_driver.metrics import observe_pool
from csi_driver.node.agent import NodeAgent
from csi_driver.node.clones import SnapshotExports, SnapshotFetcher
from csi_driver.node.fencing import EpochFence
from csi_driver.node.pool import ImageInfo, Pool
from csi_driver.node.reconcile.exports import export_runner
from csi_driver.node.reconcile.images import LocalImages, image_runner, settle_ahead
from csi_driver.node.reconcile.replicas import replica_runner
from csi_driver.node.reconcile.snapshots import snapshot_runner
from csi_driver.node.runner import CommandRunner
from csi_driver.pki import ClientTlsBundle, Identity, Role
from csi_driver.reconcile.runner import Runner
from csi_driver.rpc.errors import RUNNING
from csi_driver.store.base import CatalogStore
from csi_driver.store.catalog import Catalog
from csi_driver.store.etcd import DEFAULT_LEASE_TTL_S, EtcdStore
from csi_driver.store.sqlite import SqliteStore
from csi_driver.store.url import open_store
from csi_driver.transfer.source import Exports, serve_chunks
from csi_driver.transport import (
    AgentSecurity,
    Endpoint,
    Registration,
    parse_endpoint,
    start_server,
)

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 10.0
#: How soon a heartbeat that failed (the catalog unreachable) is tried again.
HEARTBEAT_RETRY_S = 1.0
#: Every this many beats, the heartbeat's scan of the pool takes a stat of every
#: image, not only of those in use (a safety net for writers the node does not see).
FULL_SCAN_BEATS = 30
#: How long a stop waits, after cancelling the calls still running, for their threads.
SETTLE_S = 0.5


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    pool_root: Path
    kubelet_dirs: tuple[Path, ...]
    agent_endpoint: str
    zone: str = "default"
    max_volumes: int = 0
    pool_capacity_bytes: int | None = None
    security: AgentSecurity = field(default_factory=AgentSecurity)
    #: Where this node serves its snapshots' chunks to other nodes (None: it does not).
    chunk_endpoint: str | None = None
    #: Where other nodes pull this node's volume exports (replicas, moves); empty:
    #: beside the agent API (same host, a port the kernel picks; or a socket in the pool).
    transfer_endpoint: str = ""
    heartbeat_s: float = HEARTBEAT_INTERVAL_S

    def export_endpoint(self) -> str:
        if self.transfer_endpoint:
            return self.transfer_endpoint
        agent = parse_endpoint(self.agent_endpoint)
        if agent.scheme == "unix":
            return f"unix://{self.pool_root.resolve() / 'exports.sock'}"
        return f"tcp://{agent.address.rpartition(':')[0]}:0"

    #: The installation's backup target (the chart's ``backup:`` block), if any.
    backup: BackupSettings | None = None


@dataclass
class Services:
    """What a running Ferry process serves; ``stop`` tears it all down."""

    servers: list[grpc.Server] = field(default_factory=list)
    endpoints: list[Endpoint] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)
    #: Kill the host commands still running for calls that a stop cancelled.
    killers: list[Callable[[], object]] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)

    def stop(self, grace_s: float = 5.0) -> bool:
        """Refuse new calls at once, give calls in flight ``grace_s`` in all, then
        cancel them and kill their host commands, and close what the services hold.

        Returns False, closing nothing, when a call's thread is still running
        :data:`SETTLE_S` after that (a wait on a lock that outlasts the grace):
        the catalog is not closed under a call that still uses it.
        """
        self._stopping.set()
        ends = time.monotonic() + grace_s
        for server in self.servers:  # in order: CSI calls in flight may still need the agent
            left = max(0.0, ends - time.monotonic())
            server.stop(left).wait(left)
        for kill in self.killers:
            kill()
        # gRPC has cancelled the calls still running when the grace ended, but their
        # threads may still be at work (a command just killed, a wait on a lock).
        if not RUNNING.wait_idle(SETTLE_S):
            log.warning("calls still running after the grace period; leaving them behind")
            return False
        for close in reversed(self.closers):
            close()
        return True

    def abandon(self) -> None:
        """What an exit that cannot wait for :meth:`stop` still does, without waiting.

        Removes the unix sockets (nothing should connect to a process that is
        going) and kills running host commands; SQLite needs no closing to
        stay consistent.
        """
        self._stopping.set()
        for endpoint in self.endpoints:
            if endpoint.scheme == "unix":
                Path(endpoint.address).unlink(missing_ok=True)
        for kill in self.killers:
            kill()


class NodeParts:
    """The node side's objects, built from its config."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.runner = CommandRunner()
        self.pool = Pool(config.pool_root, config.pool_capacity_bytes)
        self.agent = NodeAgent(config.node_id, self.pool, self.runner, config.kubelet_dirs)
        self.topology = Topology.of({ZONE_KEY: config.zone, NODE_KEY: config.node_id})
        #: the image reconciler, once started, for a controller in this process
        self.local_images: LocalImages | None = None

    def registration(self, advertised: Endpoint, chunks: Endpoint | None = None) -> NodeRecord:
        return NodeRecord(
            node_id=self.config.node_id,
            agent_endpoint=str(advertised),
            topology=self.topology,
            capacity_bytes=self.pool.status().capacity_bytes,
            max_volumes=self.config.max_volumes,
            heartbeat_at=time.time(),
            chunk_endpoint=str(chunks) if chunks else "",
        )


def _report_pool(pool: Pool, images: Sequence[ImageInfo] | None = None) -> None:
    status = pool.status(images)
    observe_pool(
        status.capacity_bytes, status.provisioned_bytes, status.allocated_bytes, status.image_count
    )


def _heartbeat(catalog: Catalog, parts: NodeParts, stopping: threading.Event) -> None:
    node_id = parts.config.node_id
    pause = parts.config.heartbeat_s
    beats = 0
    #: When the last beat landed; a beat after failures says how long the node was silent.
    landed = time.monotonic()
    failing = False
    while not stopping.wait(pause):
        started = time.monotonic()
        try:
            # One scan of the pool serves the whole beat. It takes a stat of the images
            # staged now (written through their loop devices) and of those the pool or
            # an unstage changed since the last; the others are as the last scan found
            # them. Every FULL_SCAN_BEATS beats, a stat of every image.
            staged = None if beats % FULL_SCAN_BEATS == 0 else set(parts.agent.staged_volumes())
            beats += 1
            images = parts.pool.images(restat=staged)
            if parts.pool.keep_reserved(images):
                images = parts.pool.images(restat=staged)
            conditions = parts.agent.conditions(images)
            scanned = time.monotonic()
            catalog.heartbeat(node_id, time.time(), conditions)
            _report_pool(parts.pool, images)
            pause = parts.config.heartbeat_s
        except Exception:  # keep beating: a failed write is retried soon
            log.exception(
                "heartbeat failed",
                extra={"node": node_id, "after_s": round(time.monotonic() - started, 3)},
            )
            # The catalog may be back any moment: beat again within a second of it,
            # not a whole period later.
            pause = min(parts.config.heartbeat_s, HEARTBEAT_RETRY_S)
            failing = True
            continue
        done = time.monotonic()
        # What a controller counting this node not ready would want to know: how long
        # the node was silent, and what a slow beat spent its time on.
        if failing or done - started > parts.config.heartbeat_s:
            log.warning(
                "heartbeat landed late" if not failing else "heartbeat landed again",
                extra={
                    "node": node_id,
                    "silent_s": round(done - landed, 3),
                    "scan_s": round(scanned - started, 3),
                    "write_s": round(done - scanned, 3),
                },
            )
        landed, failing = done, False


def _require_identity(security: AgentSecurity, expected: Identity) -> None:
    """A process serves and calls as the identity its certificate names, nothing else."""
    if security.tls is not None and security.tls.identity != expected:
        raise InvalidArgument(
            f"the certificate in --tls-dir is for {security.tls.identity}, but this process "
            f"runs as {expected}: issue one with `ferry ca issue --name {expected}`"
        )


def _start_node_side(parts: NodeParts, catalog: Catalog, services: Services) -> None:
    node_id = parts.config.node_id
    _require_identity(parts.config.security, Identity(Role.NODE, node_id))
    parts.agent.recover()
    agent_server, agent_endpoint = start_server(
        parts.config.agent_endpoint,
        [
            lambda s: agent_pb2_grpc.add_NodeAgentServicer_to_server(
                NodeAgentServicer(parts.agent), s
            )
        ],
        agents=(parts.config.security, admitted_callers(node_id)),
    )
    services.servers.append(agent_server)
    services.endpoints.append(agent_endpoint)
    services.killers.append(parts.runner.kill_running)
    chunks = None
    if parts.config.chunk_endpoint:
        chunk_server, chunks = serve_chunks(
            parts.config.chunk_endpoint,
            SnapshotExports(parts.agent.snapshots),
            parts.config.security,
            node_id,
        )
        services.servers.append(chunk_server)
        services.endpoints.append(chunks)
    catalog.register_node(parts.registration(agent_endpoint, chunks))
    _report_pool(parts.pool)
    # The node's images and snapshots follow their records in the catalog from here on.
    backups = SnapshotBackups(parts.config.backup) if parts.config.backup else None
    fetcher = SnapshotFetcher(
        catalog.store, parts.config.security, parts.config.pool_root, backups, node_id
    )
    # Before any pass of the runner: an image a crash left created ahead of its
    # records is the volume's, or nothing's (see LocalImages.create_ahead); those the
    # catalog cannot settle now are settled by the runner's passes once it answers.
    unsettled = settle_ahead(catalog.store, parts.pool, node_id)
    images, local = image_runner(catalog.store, parts.agent, fetcher=fetcher)
    for volume_id in unsettled:
        images.queue.add(volume_id)
    parts.local_images = local
    snapshots = snapshot_runner(catalog.store, parts.agent, backups=backups, fetcher=fetcher)
    for runner in (images, snapshots):
        runner.start()
        services.closers.append(functools.partial(_stop_runner, runner))
    _start_mobility(parts, catalog, services)
    beat = threading.Thread(
        target=_heartbeat,
        args=(catalog, parts, services._stopping),
        name="heartbeat",
        daemon=True,
    )
    beat.start()


def _start_mobility(parts: NodeParts, catalog: Catalog, services: Services) -> None:
    """Serve this node's exports to the other nodes and keep its replicas in sync."""
    security = parts.config.security
    exports = Exports()
    chunk_server, chunk_endpoint = serve_chunks(
        parts.config.export_endpoint(), exports, security, parts.config.node_id
    )
    services.servers.append(chunk_server)
    services.endpoints.append(chunk_endpoint)
    for runner in (
        export_runner(catalog.store, parts.agent, exports, str(chunk_endpoint)),
        replica_runner(catalog.store, parts.agent, security),
    ):
        runner.start()
        services.closers.append(functools.partial(_stop_runner, runner))


def _stop_runner(runner: Runner) -> None:
    if not runner.stop(timeout=10.0):
        log.warning("reconciler threads still busy at shutdown", extra={"runner": runner.name})


def _serve_csi(endpoint: str, registrations: list[Registration], services: Services) -> None:
    server, bound = start_server(endpoint, registrations)
    services.servers.insert(0, server)  # stop the CSI socket first
    services.endpoints.insert(0, bound)


@contextmanager
def _stopped_on_failure(services: Services) -> Iterator[None]:
    """Stop whatever was already started if starting the rest fails."""
    try:
        yield
    except BaseException:
        services.stop(grace_s=0)
        raise


def _serve_catalog(
    store: CatalogStore, endpoint: str | None, security: AgentSecurity, services: Services
) -> None:
    """Serve the catalog to nodes as ``ferry.v1.Catalog`` (they open ``ferry://``)."""
    if endpoint:
        server, bound = start_server(
            endpoint,
            [serve_store(store)],
            max_workers=128,
            agents=(security, catalog_callers),
        )
        services.servers.append(server)
        services.endpoints.append(bound)


def _controller_services(volumes: VolumeService, snapshots: SnapshotService) -> list[Registration]:
    """The CSI Controller and GroupController services, which share the catalog."""
    controller = ControllerServicer(volumes, snapshots)
    group = GroupControllerServicer(snapshots)
    return [
        lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(controller, s),
        lambda s: csi_pb2_grpc.add_GroupControllerServicer_to_server(group, s),
    ]


def _readings(catalog: Catalog, node_lost_after_s: float, services: Services) -> NodeReadings:
    """Node readiness for a controller: Ferry's heartbeats (not counting the catalog's
    outages), and Kubernetes' Nodes in a cluster."""
    # Only a controller needs the kubernetes client (Events on PVCs, Node readiness).
    from csi_driver.kube.api import node_states

    kube = node_states()
    outages = CatalogOutages(catalog.store, keep_s=node_lost_after_s)
    outages.start()
    services.closers.append(outages.stop)
    return NodeReadings(
        catalog, node_lost_after_s, kube.state if kube is not None else None, outages=outages
    )


def _campaign(catalog: Catalog, services: Services, readings: NodeReadings) -> None:
    """Every controller process campaigns; only the leader runs background work."""
    from csi_driver.kube.api import event_sink

    events = MobilityEvents(event_sink())
    leadership = Leadership(
        catalog, node_lost_after_s=readings.lost_after_s, events=events, readings=readings
    )
    leadership.start()
    services.closers.append(leadership.stop)


def start_controller(
    csi_endpoint: str,
    catalog_path: str | Path,
    security: AgentSecurity | None = None,
    catalog_listen: str | None = None,
    catalog_tls: ClientTlsBundle | None = None,
    node_lost_after_s: float = NODE_LOST_AFTER_S,
    backup: BackupSettings | None = None,
    lease_ttl_s: int = DEFAULT_LEASE_TTL_S,
    enrollment: EnrollmentSettings | None = None,
) -> Services:
    """``security``: the controller's certificate (it must name the controller), which
    secures the catalog it opens and the one it serves to nodes (default: plain).
    ``catalog_tls``: the etcd's own PKI instead, for the catalog it opens.
    ``enrollment``: also issue node certificates (the only process holding the CA key)."""
    services = Services()
    security = security or AgentSecurity()
    with _stopped_on_failure(services):
        _require_identity(security, Identity.controller())
        if enrollment is not None:
            server, bound = serve_enrollment(enrollment, security.tls)
            services.servers.append(server)
            services.endpoints.append(bound)
        store = open_store(
            catalog_path, security=security, catalog_tls=catalog_tls, lease_ttl_s=lease_ttl_s
        )
        services.closers.append(store.close)
        _serve_catalog(store, catalog_listen, security, services)
        catalog = Catalog(store)
        readings = _readings(catalog, node_lost_after_s, services)
        volumes = VolumeService(catalog, readings=readings)
        services.closers.append(volumes.close)
        identity = IdentityServicer([volumes.check], controller=True)
        _serve_csi(
            csi_endpoint,
            [
                lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s),
                *_controller_services(volumes, _snapshot_service(catalog, backup, readings)),
            ],
            services,
        )
        _campaign(catalog, services, readings)
    return services


def _snapshot_service(
    catalog: Catalog, backup: BackupSettings | None, readings: NodeReadings
) -> SnapshotService:
    """The controller reads the backup target only to resolve ``backup-<id>`` handles;
    a node lost (as failover decides it, by the same readings) is no source for a
    restore."""
    return SnapshotService(
        catalog, backups=SnapshotBackups(backup) if backup else None, readings=readings
    )


def start_node(
    csi_endpoint: str,
    config: NodeConfig,
    catalog_path: str | Path,
    catalog_tls: ClientTlsBundle | None = None,
) -> Services:
    """``catalog_tls``: the etcd's own PKI for the catalog (else ``config.security``)."""
    services = Services()
    with _stopped_on_failure(services):
        store = open_store(catalog_path, security=config.security, catalog_tls=catalog_tls)
        services.closers.append(store.close)
        parts = NodeParts(config)
        catalog = Catalog(store)
        _start_node_side(parts, catalog, services)
        identity = IdentityServicer([parts.agent.check], controller=False)
        fence = EpochFence(catalog, config.node_id)
        node = NodeServicer(parts.agent, parts.topology, config.max_volumes, fence)
        _serve_csi(
            csi_endpoint,
            [
                lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s),
                lambda s: csi_pb2_grpc.add_NodeServicer_to_server(node, s),
            ],
            services,
        )
    return services


def start_all_in_one(
    csi_endpoint: str,
    config: NodeConfig,
    catalog_path: str | Path,
    catalog_listen: str | None = None,
    catalog_tls: ClientTlsBundle | None = None,
    node_lost_after_s: float = NODE_LOST_AFTER_S,
    lease_ttl_s: int = DEFAULT_LEASE_TTL_S,
) -> Services:
    """Controller and node in one process, on one CSI socket (one-machine mode)."""
    services = Services()
    with _stopped_on_failure(services):
        store = open_store(
            catalog_path,
            security=config.security,
            catalog_tls=catalog_tls,
            lease_ttl_s=lease_ttl_s,
        )
        services.closers.append(store.close)
        _serve_catalog(store, catalog_listen, config.security, services)
        catalog = Catalog(store)
        parts = NodeParts(config)
        _start_node_side(parts, catalog, services)
        readings = _readings(catalog, node_lost_after_s, services)
        # The stores whose failed writes say whether they may have applied (SQLite's
        # never, etcd's OutcomeUnknown): an image created ahead of its records is
        # dropped only when their txn provably failed, else settled by the catalog.
        # (A remote catalog service's lost answer is not told apart: not ahead there.)
        ahead = parts.local_images if isinstance(store, SqliteStore | EtcdStore) else None
        volumes = VolumeService(catalog, local=parts.local_images, readings=readings, ahead=ahead)
        services.closers.append(volumes.close)
        identity = IdentityServicer([volumes.check, parts.agent.check], controller=True)
        fence = EpochFence(catalog, config.node_id)
        node = NodeServicer(parts.agent, parts.topology, config.max_volumes, fence)
        _serve_csi(
            csi_endpoint,
            [
                lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s),
                lambda s: csi_pb2_grpc.add_NodeServicer_to_server(node, s),
                *_controller_services(volumes, _snapshot_service(catalog, config.backup, readings)),
            ],
            services,
        )
        _campaign(catalog, services, readings)
    return services
