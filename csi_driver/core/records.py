"""Catalog records: each resource's desired spec and observed status.

The catalog is the contract between the controller and the node agents
(DESIGN.md, "Records and reconcilers"). Every resource is a pair of frozen
values: a *spec* that says what should be, and a *status* that says what its
owner last observed. Pure domain: no gRPC, no host, no store calls.

Key layout. Spec and status of one resource live under different keys, so
the writer of the spec (usually the controller) and the writer of the status
(usually the node that owns the resource) never compare-and-swap against
each other's writes, and a watcher of specs never wakes for a status
heartbeat::

    spec/volumes/<volume_id>                VolumeSpec        controller
    status/volumes/<volume_id>              VolumeStatus      controller
    spec/nodes/<node_id>                    NodeSpec          node (registration)
    status/nodes/<node_id>                  NodeStatus        node (heartbeat)
    accounting/nodes/<node_id>              NodeAccounting    controller, in the
                                                              same txn as the specs
                                                              it counts
    spec/images/<node_id>/<volume_id>       ImageSpec         controller
    status/images/<node_id>/<volume_id>     ImageStatus       node <node_id>
    spec/snapshots/<node_id>/<snapshot_id>  SnapshotSpec      controller
    status/snapshots/<node_id>/<snapshot_id> SnapshotStatus   node <node_id>
    spec/groups/<node_id>/<group_id>        GroupSnapshotSpec controller
    status/groups/<node_id>/<group_id>      GroupSnapshotStatus node <node_id>
    index/snapshots/<snapshot_id>           the node holding it (bytes)
    index/groups/<group_id>                 the node holding it (bytes)
    snapshot-names/<name>                   the snapshot or group id a name maps to
    spec/exports/<node_id>/<volume_id>      ExportSpec        controller
    status/exports/<node_id>/<volume_id>    ExportStatus      node <node_id> (the source)
    status/transfers/<node_id>/<volume_id>  TransferStatus    node <node_id> (the receiver)
    spec/moves/<volume_id>                  MoveSpec          controller (ControllerPublish)
    status/moves/<volume_id>                MoveStatus        controller (move reconciler)
    status/failovers/<volume_id>            FailoverStatus    controller (failover reconciler)

Mobility. A replica is an ImageSpec with role REPLICA and ``source_node``
(the primary it follows). The primary serves point-in-time images when its
ExportSpec asks (each ``round`` is one capture); every replica of the volume
pulls the export whose ``epoch`` is its own, commits it only when the whole
manifest verifies, and reports the synced transfer and manifest digest in its
ImageStatus. A move is a MoveSpec whose status records the last step done.

Images are keyed node first, so a node agent watches exactly its own work
with one prefix (``spec/images/<node_id>/``). Ids never contain ``/``
(checked here), so a prefix ending in ``/`` never matches a longer id.

Generations (as in Kubernetes): every change to a spec bumps its
``generation`` (:func:`revise`); the owner writes the generation it acted
on into its status's ``observed_generation``. A status answers for a spec
only when the two generations match (:func:`answers`), so a waiter never
mistakes the outcome of an older request for the one it made.

Codecs are strict JSON: each value is written with its ``kind`` and schema
``version``; decoding checks every field's type, refuses a record of
another kind or of a newer schema (a reader must not rewrite what it does
not understand), fills fields absent in older writes from their defaults,
and ignores fields it does not know (a newer writer's additions). A record
that fails these checks raises :class:`~csi_driver.core.errors.CorruptRecord`.
"""

from __future__ import annotations

import enum
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields, is_dataclass, replace
from typing import Any, ClassVar, Protocol, TypeVar

from csi_driver.core.errors import CorruptRecord, InvalidArgument
from csi_driver.core.model import (
    NODE_ID_PATTERN,
    VOLUME_ID_PATTERN,
    AccessType,
    FsType,
    Publication,
)

#: Schema version this code writes; records with a higher one are refused.
SCHEMA_VERSION = 1

SPEC = "spec/"
STATUS = "status/"
ACCOUNTING = "accounting/"

VOLUME_SPECS = SPEC + "volumes/"
VOLUME_STATUSES = STATUS + "volumes/"
NODE_SPECS = SPEC + "nodes/"
NODE_STATUSES = STATUS + "nodes/"
NODE_ACCOUNTS = ACCOUNTING + "nodes/"
IMAGE_SPECS = SPEC + "images/"
IMAGE_STATUSES = STATUS + "images/"
EXPORT_SPECS = SPEC + "exports/"
EXPORT_STATUSES = STATUS + "exports/"
TRANSFER_STATUSES = STATUS + "transfers/"
MOVE_SPECS = SPEC + "moves/"
MOVE_STATUSES = STATUS + "moves/"
FAILOVER_STATUSES = STATUS + "failovers/"
FENCE_STATUSES = STATUS + "fences/"
DRAIN_SPECS = SPEC + "drains/"


def _node(node_id: str) -> str:
    if not NODE_ID_PATTERN.match(node_id):
        raise InvalidArgument(f"malformed node id {node_id!r} in a catalog key")
    return node_id


def _volume(volume_id: str) -> str:
    if not VOLUME_ID_PATTERN.match(volume_id):
        raise InvalidArgument(
            f"malformed volume id {volume_id!r} in a catalog key: Ferry ids look like vol-<32 hex>"
        )
    return volume_id


def image_specs_on(node_id: str) -> str:
    """The prefix of every image spec assigned to ``node_id`` (what its agent watches)."""
    return f"{IMAGE_SPECS}{_node(node_id)}/"


def image_statuses_on(node_id: str) -> str:
    return f"{IMAGE_STATUSES}{_node(node_id)}/"


def image_spec_key(node_id: str, volume_id: str) -> str:
    return image_specs_on(node_id) + _volume(volume_id)


def image_status_key(node_id: str, volume_id: str) -> str:
    return image_statuses_on(node_id) + _volume(volume_id)


def export_specs_on(node_id: str) -> str:
    """The prefix of every export node ``node_id`` is asked to serve."""
    return f"{EXPORT_SPECS}{_node(node_id)}/"


def export_spec_key(node_id: str, volume_id: str) -> str:
    return export_specs_on(node_id) + _volume(volume_id)


def export_status_key(node_id: str, volume_id: str) -> str:
    return f"{EXPORT_STATUSES}{_node(node_id)}/{_volume(volume_id)}"


def transfer_status_key(node_id: str, volume_id: str) -> str:
    return f"{TRANSFER_STATUSES}{_node(node_id)}/{_volume(volume_id)}"


def move_spec_key(volume_id: str) -> str:
    return MOVE_SPECS + _volume(volume_id)


def move_status_key(volume_id: str) -> str:
    return MOVE_STATUSES + _volume(volume_id)


def failover_status_key(volume_id: str) -> str:
    return FAILOVER_STATUSES + _volume(volume_id)


def fence_status_key(volume_id: str) -> str:
    return FENCE_STATUSES + _volume(volume_id)


def drain_spec_key(node_id: str) -> str:
    return DRAIN_SPECS + _node(node_id)


def volume_of_key(key: str) -> str | None:
    """The volume id a per-node record key ends with (``<kind>/<family>/<node>/<volume>``);
    None for any other key. A work-key map for runners woken by other nodes' records."""
    parts = key.split("/")
    return parts[3] if len(parts) == 4 and VOLUME_ID_PATTERN.match(parts[3]) else None


def volume_spec_key(volume_id: str) -> str:
    return VOLUME_SPECS + _volume(volume_id)


def volume_status_key(volume_id: str) -> str:
    return VOLUME_STATUSES + _volume(volume_id)


def node_spec_key(node_id: str) -> str:
    return NODE_SPECS + _node(node_id)


def node_status_key(node_id: str) -> str:
    return NODE_STATUSES + _node(node_id)


def node_accounting_key(node_id: str) -> str:
    return NODE_ACCOUNTS + _node(node_id)


# -- values ------------------------------------------------------------------


class ImageRole(enum.Enum):
    """What a node's copy of a volume is for."""

    PRIMARY = "primary"  # the one writable copy (epoch-fenced)
    REPLICA = "replica"  # a warm copy kept in sync from the primary


class ImagePhase(enum.Enum):
    PENDING = "pending"  # the node has not acted on this generation yet
    READY = "ready"  # the image exists with at least the spec's size
    DELETED = "deleted"  # the image is gone (spec.deleted was honoured)
    FAILED = "failed"  # the node cannot reach the spec; ``reason`` says why


class FailureReason(enum.Enum):
    """Why a node could not reach a spec: chosen so the controller can map it to a code.

    All but ``HOST_ERROR`` are final for the spec's generation: the node does
    not retry them until the spec changes. A host error is retried with backoff.
    """

    NONE = "none"
    NO_SPACE = "no-space"  # the pool cannot hold the image -> RESOURCE_EXHAUSTED
    TOO_LARGE = "too-large"  # larger than the whole pool -> OUT_OF_RANGE
    IN_USE = "in-use"  # staged, published or attached: kept -> FAILED_PRECONDITION
    MISMATCH = "mismatch"  # an image of another kind is there -> ALREADY_EXISTS
    STALE_EPOCH = "stale-epoch"  # the spec's epoch is older than the image's -> ABORTED
    LOST = "lost"  # a READY image vanished from the pool: never silently recreated
    HOST_ERROR = "host-error"  # a command or the filesystem failed -> INTERNAL
    SOURCE_MISSING = "source-missing"  # a clone's snapshot is gone -> NOT_FOUND
    #: A snapshot is taken but its backup could not be committed (the target is
    #: unreachable or failing): retried by the node -> UNAVAILABLE.
    BACKUP_FAILED = "backup-failed"

    @property
    def final(self) -> bool:
        return self not in (FailureReason.HOST_ERROR, FailureReason.BACKUP_FAILED)


class VolumePhase(enum.Enum):
    PENDING = "pending"  # spec written, the primary image is not confirmed yet
    READY = "ready"
    DELETING = "deleting"  # spec.deleted set, images are being removed
    FAILED = "failed"


@dataclass(frozen=True)
class VolumeSpec:
    """What the controller wants a volume to be."""

    KIND: ClassVar[str] = "VolumeSpec"

    volume_id: str
    name: str
    capacity_bytes: int
    access_type: AccessType
    fs_type: FsType | None
    primary_node: str
    epoch: int
    parameters: tuple[tuple[str, str], ...] = ()
    publications: tuple[Publication, ...] = ()
    created_at: float = 0.0
    deleted: bool = False
    generation: int = 1

    @property
    def key(self) -> str:
        return volume_spec_key(self.volume_id)


@dataclass(frozen=True)
class VolumeStatus:
    KIND: ClassVar[str] = "VolumeStatus"

    volume_id: str
    phase: VolumePhase
    observed_generation: int
    capacity_bytes: int = 0
    message: str = ""

    @property
    def key(self) -> str:
        return volume_status_key(self.volume_id)


@dataclass(frozen=True)
class NodeSpec:
    """A node agent's registration: who it is and what it offers."""

    KIND: ClassVar[str] = "NodeSpec"

    node_id: str
    agent_endpoint: str
    topology: tuple[tuple[str, str], ...]
    capacity_bytes: int
    max_volumes: int
    labels: tuple[tuple[str, str], ...] = ()
    generation: int = 1

    @property
    def key(self) -> str:
        return node_spec_key(self.node_id)


@dataclass(frozen=True)
class NodeStatus:
    """What a node agent last reported about itself (its heartbeat)."""

    KIND: ClassVar[str] = "NodeStatus"

    node_id: str
    observed_generation: int
    heartbeat_at: float
    pool_capacity_bytes: int = 0
    allocated_bytes: int = 0
    image_count: int = 0
    message: str = ""

    @property
    def key(self) -> str:
        return node_status_key(self.node_id)


@dataclass(frozen=True)
class NodeAccounting:
    """What the catalog has promised a node: kept exact by writing it in each volume's txn.

    Placement reads one of these per node instead of every volume. Never
    deleted: a create's txn compares it, and rewriting it is what makes such a
    txn whose answer was lost impossible for good
    (:func:`csi_driver.node.reconcile.images.settle_left`).
    """

    KIND: ClassVar[str] = "NodeAccounting"

    node_id: str
    provisioned_bytes: int = 0
    volume_count: int = 0
    #: volumes published on the node (ControllerPublishVolume's max-volumes check)
    published_count: int = 0
    #: the sizes of the snapshots the node holds (each snapshot copy counts its
    #: source volume's size: the most a reflink snapshot comes to hold as the
    #: volume is overwritten, and at least what a copied one holds)
    snapshot_bytes: int = 0

    @property
    def key(self) -> str:
        return node_accounting_key(self.node_id)

    def publications(self, change: int) -> NodeAccounting:
        """Account for ``change`` more (negative: fewer) volumes published on the node.

        Floored at zero: a record written before this count existed reads 0
        while volumes may still be published, and their unpublish must not
        make it negative (the count is exact again once they are unpublished).
        """
        return replace(self, published_count=max(0, self.published_count + change))

    def charge(self, size_bytes: int, volumes: int = 1) -> NodeAccounting:
        """Account for ``volumes`` more volumes totalling ``size_bytes`` (negative to release)."""
        provisioned = self.provisioned_bytes + size_bytes
        count = self.volume_count + volumes
        if provisioned < 0 or count < 0:
            raise InvalidArgument(
                f"node {self.node_id}'s accounting would go negative "
                f"({provisioned} bytes, {count} volumes): a release without a charge"
            )
        return replace(self, provisioned_bytes=provisioned, volume_count=count)

    def snapshots(self, size_bytes: int) -> NodeAccounting:
        """Account for snapshot copies totalling ``size_bytes`` more (negative: fewer).

        Floored at zero: snapshots taken before this count existed were never
        charged, so their deletion must not make it negative.
        """
        return replace(self, snapshot_bytes=max(0, self.snapshot_bytes + size_bytes))

    @property
    def promised_bytes(self) -> int:
        """Pool space promised away: volumes and the snapshots held beside them."""
        return self.provisioned_bytes + self.snapshot_bytes


@dataclass(frozen=True)
class ImageSpec:
    """The image of one volume that one node should hold."""

    KIND: ClassVar[str] = "ImageSpec"

    volume_id: str
    node_id: str
    size_bytes: int
    epoch: int
    role: ImageRole = ImageRole.PRIMARY
    thin: bool = False  # space not reserved up front (StorageClass provisioning: thin)
    deleted: bool = False
    generation: int = 1
    #: The snapshot a new image starts as (clone or restore); None: blank.
    source: ImageSource | None = None

    #: REPLICA only: the primary node whose exports this replica pulls.
    source_node: str = ""
    #: A primary demoted by a failover: what it holds may include writes the new
    #: primary never got, so it is kept aside (a snapshot image), never overwritten.
    keep_divergent: bool = False
    #: REPLICA kept for a move off this node (``ferry drain``): never retired
    #: while the volume's primary is still there, whatever the replica count.
    pinned_for: str = ""

    @property
    def key(self) -> str:
        return image_spec_key(self.node_id, self.volume_id)

    @property
    def status_key(self) -> str:
        return image_status_key(self.node_id, self.volume_id)


@dataclass(frozen=True)
class ImageStatus:
    """What node ``node_id`` last did about its image of ``volume_id``."""

    KIND: ClassVar[str] = "ImageStatus"

    volume_id: str
    node_id: str
    phase: ImagePhase
    observed_generation: int
    size_bytes: int = 0
    reason: FailureReason = FailureReason.NONE
    message: str = ""
    #: REPLICA: the export last committed (its transfer id and manifest digest),
    #: when, and how many bytes that sync received.
    synced_transfer: str = ""
    manifest_digest: str = ""
    synced_at: float = 0.0
    synced_bytes: int = 0
    #: when the primary captured the image this replica holds: its lag is now - this
    synced_captured_at: float = 0.0

    @property
    def key(self) -> str:
        return image_status_key(self.node_id, self.volume_id)

    @property
    def settled(self) -> bool:
        """True when the node has finished with the generation it reports on."""
        return self.phase is not ImagePhase.PENDING


# -- snapshots ---------------------------------------------------------------
# A snapshot is taken on the node that held its volume's primary image (its
# home) and copied to the nodes holding the volume's replicas; each copy has
# its own spec and status, keyed node first like images, and
# ``index/snapshots/<id>`` names the home, so a lookup by id reads one key.

SNAPSHOT_SPECS = SPEC + "snapshots/"
SNAPSHOT_STATUSES = STATUS + "snapshots/"
GROUP_SPECS = SPEC + "groups/"
GROUP_STATUSES = STATUS + "groups/"
SNAPSHOT_INDEX = "index/snapshots/"
GROUP_INDEX = "index/groups/"
SNAPSHOT_NAMES = "snapshot-names/"

#: Snapshot and group ids are Ferry's own; they end up in file names on nodes.
SNAPSHOT_ID_PATTERN = re.compile(r"^snap-[0-9a-f]{32}$")
GROUP_ID_PATTERN = re.compile(r"^group-[0-9a-f]{32}$")


def _snapshot(snapshot_id: str) -> str:
    if not SNAPSHOT_ID_PATTERN.match(snapshot_id):
        raise InvalidArgument(
            f"malformed snapshot id {snapshot_id!r}: Ferry snapshot ids look like snap-<32 hex>"
        )
    return snapshot_id


def _group(group_id: str) -> str:
    if not GROUP_ID_PATTERN.match(group_id):
        raise InvalidArgument(
            f"malformed group snapshot id {group_id!r}: Ferry's look like group-<32 hex>"
        )
    return group_id


def snapshot_specs_on(node_id: str) -> str:
    return f"{SNAPSHOT_SPECS}{_node(node_id)}/"


def snapshot_statuses_on(node_id: str) -> str:
    return f"{SNAPSHOT_STATUSES}{_node(node_id)}/"


def snapshot_spec_key(node_id: str, snapshot_id: str) -> str:
    return snapshot_specs_on(node_id) + _snapshot(snapshot_id)


def snapshot_status_key(node_id: str, snapshot_id: str) -> str:
    return snapshot_statuses_on(node_id) + _snapshot(snapshot_id)


def snapshot_index_key(snapshot_id: str) -> str:
    return SNAPSHOT_INDEX + _snapshot(snapshot_id)


def group_specs_on(node_id: str) -> str:
    return f"{GROUP_SPECS}{_node(node_id)}/"


def group_statuses_on(node_id: str) -> str:
    return f"{GROUP_STATUSES}{_node(node_id)}/"


def group_spec_key(node_id: str, group_id: str) -> str:
    return group_specs_on(node_id) + _group(group_id)


def group_status_key(node_id: str, group_id: str) -> str:
    return group_statuses_on(node_id) + _group(group_id)


def group_index_key(group_id: str) -> str:
    return GROUP_INDEX + _group(group_id)


def snapshot_name_key(name: str) -> str:
    if not name:
        raise InvalidArgument("a snapshot name must not be empty")
    return SNAPSHOT_NAMES + name


class SnapshotMethod(enum.Enum):
    """How a snapshot's bytes were captured."""

    NONE = "none"  # not taken yet
    REFLINK = "reflink"  # blocks shared with the image: O(1) in its size
    COPY = "copy"  # the pool cannot reflink: the data ranges were copied
    PULLED = "pulled"  # a copy pulled from the node that took it, verified chunk by chunk


@dataclass(frozen=True)
class ImageSource:
    """Where a new image's bytes come from: snapshot ``snapshot_id`` on ``node_id``.

    On the same node the image is a reflink (or a copy) of the snapshot;
    on another node its chunks are pulled from that node and verified, or,
    when the snapshot was backed up (``backup_id``), restored from the
    backup target. A backup handle from another installation has no node.
    """

    snapshot_id: str
    node_id: str
    backup_id: str = ""


@dataclass(frozen=True)
class SnapshotSpec:
    """A point-in-time image of volume ``source_volume_id`` that node ``node_id`` holds."""

    KIND: ClassVar[str] = "SnapshotSpec"

    snapshot_id: str
    name: str
    node_id: str
    source_volume_id: str
    size_bytes: int  # the source volume's capacity (a restore needs at least this)
    access_type: AccessType
    fs_type: FsType | None
    created_at: float = 0.0
    #: Set for a member of a group snapshot: the group takes it, with its peers.
    group_id: str = ""
    deleted: bool = False
    generation: int = 1
    #: The VolumeSnapshotClass asked for a backup: READY only once it is committed.
    backup: bool = False
    #: The source volume's name (the PV's): what its backup is listed and retained by.
    volume_name: str = ""
    #: The source volume is encrypted (fscrypt): so is every volume made from this.
    encrypted: bool = False
    #: Written by a call whose caller has not received the id yet; cleared (without a
    #: generation bump) once a CreateSnapshot returns it. One left set past a grace
    #: period is an orphan: the leader's collector removes it.
    awaiting_caller: bool = False
    #: A copy of the snapshot taken on node ``copy_from`` (its home: the index names
    #: it), held here because this node holds a replica of the volume; pulled from
    #: the home node as a delta against the replica. "": this is the home spec.
    copy_from: str = ""

    @property
    def key(self) -> str:
        return snapshot_spec_key(self.node_id, self.snapshot_id)

    @property
    def status_key(self) -> str:
        return snapshot_status_key(self.node_id, self.snapshot_id)


@dataclass(frozen=True)
class SnapshotStatus:
    """What node ``node_id`` last did about snapshot ``snapshot_id``."""

    KIND: ClassVar[str] = "SnapshotStatus"

    snapshot_id: str
    node_id: str
    phase: ImagePhase
    observed_generation: int
    size_bytes: int = 0
    taken_at: float = 0.0  # the point in time the snapshot holds
    method: SnapshotMethod = SnapshotMethod.NONE
    reason: FailureReason = FailureReason.NONE
    message: str = ""
    #: The committed backup of a snapshot whose spec asks for one.
    backup_id: str = ""

    @property
    def key(self) -> str:
        return snapshot_status_key(self.node_id, self.snapshot_id)

    @property
    def settled(self) -> bool:
        return self.phase is not ImagePhase.PENDING


@dataclass(frozen=True)
class GroupMember:
    snapshot_id: str
    volume_id: str


@dataclass(frozen=True)
class GroupSnapshotSpec:
    """Snapshots of several volumes of one node, all taken at one freeze point."""

    KIND: ClassVar[str] = "GroupSnapshotSpec"

    group_id: str
    name: str
    node_id: str
    members: tuple[GroupMember, ...]
    created_at: float = 0.0
    deleted: bool = False
    generation: int = 1
    #: The VolumeGroupSnapshotClass asked for a backup: every member is backed up
    #: (from its file, taken at the group's freeze point) before the group is READY.
    backup: bool = False

    @property
    def key(self) -> str:
        return group_spec_key(self.node_id, self.group_id)

    @property
    def status_key(self) -> str:
        return group_status_key(self.node_id, self.group_id)


@dataclass(frozen=True)
class GroupSnapshotStatus:
    KIND: ClassVar[str] = "GroupSnapshotStatus"

    group_id: str
    node_id: str
    phase: ImagePhase
    observed_generation: int
    taken_at: float = 0.0
    reason: FailureReason = FailureReason.NONE
    message: str = ""

    @property
    def key(self) -> str:
        return group_status_key(self.node_id, self.group_id)

    @property
    def settled(self) -> bool:
        return self.phase is not ImagePhase.PENDING


class ExportPhase(enum.Enum):
    READY = "ready"  # captured and served at ``endpoint``
    WAITING = "waiting"  # a final export waits for the volume to be unstaged here
    FAILED = "failed"


@dataclass(frozen=True)
class ExportSpec:
    """Node ``node_id`` (the primary) should serve a point-in-time image of its volume.

    Each ``round`` asks for a new capture. ``final`` captures only once nothing
    on the node uses the volume (a move's last sync: the image is quiescent).
    """

    KIND: ClassVar[str] = "ExportSpec"

    volume_id: str
    node_id: str
    epoch: int
    round: int = 1
    final: bool = False
    generation: int = 1

    @property
    def key(self) -> str:
        return export_spec_key(self.node_id, self.volume_id)

    @property
    def status_key(self) -> str:
        return export_status_key(self.node_id, self.volume_id)

    @property
    def transfer_id(self) -> str:
        return f"{self.volume_id}-e{self.epoch}-r{self.round}"


@dataclass(frozen=True)
class ExportStatus:
    KIND: ClassVar[str] = "ExportStatus"

    volume_id: str
    node_id: str
    phase: ExportPhase
    observed_generation: int
    epoch: int = 0
    transfer_id: str = ""
    endpoint: str = ""  # the node's chunk source (tcp:// or unix://)
    manifest_digest: str = ""
    size_bytes: int = 0
    data_bytes: int = 0
    captured_at: float = 0.0
    final: bool = False
    message: str = ""

    @property
    def key(self) -> str:
        return export_status_key(self.node_id, self.volume_id)


class TransferPhase(enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class TransferStatus:
    """A pull into node ``node_id``'s replica: what a CLI or a metric shows of it."""

    KIND: ClassVar[str] = "TransferStatus"

    volume_id: str
    node_id: str
    transfer_id: str
    source_node: str
    phase: TransferPhase
    bytes_total: int = 0
    bytes_done: int = 0
    rate_bytes_per_s: float = 0.0
    eta_s: float = -1.0  # unknown until something arrived
    started_at: float = 0.0
    updated_at: float = 0.0
    message: str = ""

    @property
    def key(self) -> str:
        return transfer_status_key(self.node_id, self.volume_id)


class MoveStep(enum.Enum):
    """A move's steps in order; the status names the last one completed."""

    REQUESTED = "requested"
    SOURCE_RELEASED = "source-released"  # published nowhere (RWO: detached from the source)
    TARGET_ASSIGNED = "target-assigned"  # the target holds a replica image spec
    FINAL_CAPTURED = "final-captured"  # the source served its quiescent image
    VERIFIED = "verified"  # the target committed exactly that image
    SWITCHED = "switched"  # epoch bumped, target primary, source a replica
    DONE = "done"  # the target serves the volume as its primary
    ABANDONED = "abandoned"  # rolled back: the source stays primary

    @property
    def finished(self) -> bool:
        return self in (MoveStep.DONE, MoveStep.ABANDONED)


@dataclass(frozen=True)
class MoveSpec:
    """Move volume ``volume_id``'s primary from ``source_node`` to ``target_node``."""

    KIND: ClassVar[str] = "MoveSpec"

    volume_id: str
    source_node: str
    target_node: str
    from_epoch: int
    requested_at: float = 0.0
    generation: int = 1

    @property
    def key(self) -> str:
        return move_spec_key(self.volume_id)

    @property
    def status_key(self) -> str:
        return move_status_key(self.volume_id)


@dataclass(frozen=True)
class MoveStatus:
    KIND: ClassVar[str] = "MoveStatus"

    volume_id: str
    observed_generation: int
    step: MoveStep
    message: str = ""
    updated_at: float = 0.0
    #: bytes the final sync shipped, and when the final sync started and the move ended
    final_bytes: int = 0
    final_started_at: float = 0.0
    finished_at: float = 0.0

    @property
    def key(self) -> str:
        return move_status_key(self.volume_id)


@dataclass(frozen=True)
class FailoverStatus:
    """The last failover of a volume: who took over, and the writes it may have lost.

    ``data_loss_window_s`` is from the capture the new primary holds to the
    last heartbeat of the lost one: writes made in it may be gone (they are
    kept aside on the old primary if it returns).
    """

    KIND: ClassVar[str] = "FailoverStatus"

    volume_id: str
    from_node: str
    to_node: str
    epoch: int
    at: float
    primary_last_seen: float = 0.0
    replica_captured_at: float = 0.0
    data_loss_window_s: float = 0.0

    @property
    def key(self) -> str:
        return failover_status_key(self.volume_id)


@dataclass(frozen=True)
class FenceStatus:
    """The last forced detach of a volume from a node Ferry could not reach.

    ControllerUnpublishVolume for a lost node bumps the volume's epoch to
    ``epoch`` in the txn that writes this, so whatever that node staged
    under an older epoch can never be staged again; ``at`` is when the node
    was declared lost (failover counts from it).
    """

    KIND: ClassVar[str] = "FenceStatus"

    volume_id: str
    node_id: str
    epoch: int
    at: float
    why: str = ""

    @property
    def key(self) -> str:
        return fence_status_key(self.volume_id)


@dataclass(frozen=True)
class DrainSpec:
    """``ferry drain NODE``: the node is leaving; its copies are re-placed elsewhere."""

    KIND: ClassVar[str] = "DrainSpec"

    node_id: str
    requested_at: float = 0.0
    generation: int = 1

    @property
    def key(self) -> str:
        return drain_spec_key(self.node_id)


class _Spec(Protocol):
    @property
    def generation(self) -> int: ...


class _Status(Protocol):
    @property
    def observed_generation(self) -> int: ...


S = TypeVar("S", bound=_Spec)


def revise(spec: S, **changes: Any) -> S:
    """``spec`` with ``changes`` applied and its generation bumped, or ``spec`` if unchanged.

    Only a real change bumps the generation, so repeating a request (CSI
    idempotency) does not make the owner redo work or a waiter wait again.
    """
    if "generation" in changes:
        raise InvalidArgument("a spec's generation is bumped by revise(), never set")
    changed = replace(spec, **changes)  # type: ignore[type-var]
    if changed == spec:
        return spec
    return replace(changed, generation=spec.generation + 1)  # type: ignore[type-var]


def answers(status: _Status | None, spec: _Spec) -> bool:
    """True when ``status`` reports on exactly ``spec``'s generation."""
    return status is not None and status.observed_generation == spec.generation


# -- codec -------------------------------------------------------------------

CatalogRecord = (
    VolumeSpec
    | VolumeStatus
    | NodeSpec
    | NodeStatus
    | NodeAccounting
    | ImageSpec
    | ImageStatus
    | SnapshotSpec
    | SnapshotStatus
    | GroupSnapshotSpec
    | GroupSnapshotStatus
    | ExportSpec
    | ExportStatus
    | TransferStatus
    | MoveSpec
    | MoveStatus
    | FailoverStatus
    | FenceStatus
    | DrainSpec
)
R = TypeVar("R", bound=CatalogRecord)

#: Every record type by its ``kind`` tag (new record types register here).
KINDS: dict[str, type[Any]] = {
    cls.KIND: cls
    for cls in (
        VolumeSpec,
        VolumeStatus,
        NodeSpec,
        NodeStatus,
        NodeAccounting,
        ImageSpec,
        ImageStatus,
        SnapshotSpec,
        SnapshotStatus,
        GroupSnapshotSpec,
        GroupSnapshotStatus,
        ExportSpec,
        ExportStatus,
        TransferStatus,
        MoveSpec,
        MoveStatus,
        FailoverStatus,
        FenceStatus,
        DrainSpec,
    )
}


def encode(record: CatalogRecord) -> bytes:
    """Canonical JSON for ``record`` (sorted keys: equal records give equal bytes)."""
    doc = _to_json(record)
    doc["kind"] = record.KIND
    doc["version"] = SCHEMA_VERSION
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def decode(cls: type[R], raw: bytes) -> R:
    """Decode ``raw`` as a ``cls``; raise CorruptRecord if it is not one."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptRecord(f"{cls.KIND} record is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CorruptRecord(f"{cls.KIND} record is not a JSON object")
    kind = doc.get("kind")
    if kind != cls.KIND:
        raise CorruptRecord(f"expected a {cls.KIND} record, found kind {kind!r}")
    version = doc.get("version")
    if type(version) is not int or version < 1:
        raise CorruptRecord(f"{cls.KIND} record has no valid schema version: {version!r}")
    if version > SCHEMA_VERSION:
        raise CorruptRecord(
            f"{cls.KIND} record has schema version {version}, newer than this Ferry "
            f"({SCHEMA_VERSION}); upgrade every Ferry component to the same release"
        )
    value: R = _from_json(cls, doc, cls.KIND)
    return value


_PLAIN = (str, int, float, bool, type(None))
#: A record class's field names, in order (``fields()`` costs more than a small encode).
_FIELD_NAMES: dict[type[Any], tuple[str, ...]] = {}


def _to_json(value: Any) -> Any:
    if type(value) in _PLAIN:
        return value
    if isinstance(value, enum.Enum):
        return value.value
    names = _FIELD_NAMES.get(type(value))
    if names is None and is_dataclass(value) and not isinstance(value, type):
        names = _FIELD_NAMES[type(value)] = tuple(f.name for f in fields(value))
    if names is not None:
        return {name: _to_json(getattr(value, name)) for name in names}
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


Decoder = Callable[[Any, str], Any]
#: A decoder per type, built once: the type is inspected at the first decode, not each.
_DECODERS: dict[Any, Decoder] = {}


def _from_json(tp: Any, doc: Any, where: str) -> Any:
    """Decode ``doc`` as type ``tp``, checking types exactly (bool is not an int)."""
    return _decoder(tp)(doc, where)


def _decoder(tp: Any) -> Decoder:
    found = _DECODERS.get(tp)
    if found is None:
        found = _DECODERS[tp] = _build_decoder(tp)
    return found


def _build_decoder(tp: Any) -> Decoder:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return _optional_decoder(tp)
    if origin is tuple:
        return _tuple_decoder(typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum_decoder(tp)
    if isinstance(tp, type) and is_dataclass(tp):
        return _dataclass_decoder(tp)
    if tp is float:

        def number(doc: Any, where: str) -> Any:
            if type(doc) not in (int, float):
                raise CorruptRecord(f"{where}: expected a number, found {doc!r}")
            return float(doc)

        return number
    if tp in (int, str, bool):

        def exact(doc: Any, where: str) -> Any:
            if type(doc) is not tp:
                raise CorruptRecord(f"{where}: expected {tp.__name__}, found {doc!r}")
            return doc

        return exact

    def unsupported(doc: Any, where: str) -> Any:
        raise TypeError(f"records cannot hold values of type {tp!r}")  # a bug in this module

    return unsupported


def _optional_decoder(tp: Any) -> Decoder:
    options = typing.get_args(tp)
    nullable = type(None) in options
    (inner,) = (o for o in options if o is not type(None))

    def optional(doc: Any, where: str) -> Any:
        if doc is None and nullable:
            return None
        return _decoder(inner)(doc, where)

    return optional


def _tuple_decoder(args: tuple[Any, ...]) -> Decoder:
    def items(doc: Any, where: str) -> Any:
        if not isinstance(doc, list):
            raise CorruptRecord(f"{where}: expected a list, found {type(doc).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            each = _decoder(args[0])
            return tuple(each(v, f"{where}[{i}]") for i, v in enumerate(doc))
        if len(doc) != len(args):
            raise CorruptRecord(f"{where}: expected {len(args)} items, found {len(doc)}")
        pairs = enumerate(zip(args, doc, strict=True))
        return tuple(_decoder(a)(v, f"{where}[{i}]") for i, (a, v) in pairs)

    return items


def _enum_decoder(tp: type[enum.Enum]) -> Decoder:
    def member(doc: Any, where: str) -> Any:
        try:
            return tp(doc)
        except ValueError:
            raise CorruptRecord(f"{where}: {doc!r} is not a {tp.__name__}") from None

    return member


def _dataclass_decoder(cls: type[Any]) -> Decoder:
    # The fields' decoders are looked up at the first decode (a class may name
    # itself); each entry: name, its decoder, whether it must be present.
    plan: list[tuple[str, Decoder, bool]] | None = None

    def record(doc: Any, where: str) -> Any:
        nonlocal plan
        if not isinstance(doc, dict):
            raise CorruptRecord(f"{where}: expected an object, found {type(doc).__name__}")
        if plan is None:
            hints = _hints(cls)
            plan = [
                (
                    f.name,
                    _decoder(hints[f.name]),
                    f.default is MISSING and f.default_factory is MISSING,
                )
                for f in fields(cls)
            ]
        values: dict[str, Any] = {}
        for name, decode_field, required in plan:
            if name in doc:
                values[name] = decode_field(doc[name], f"{where}.{name}")
            elif required:
                raise CorruptRecord(f"{where}: required field {name!r} is missing")
        return cls(**values)

    return record


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints(cls: type[Any]) -> dict[str, Any]:
    """A record class's resolved field types (resolving them costs more than a decode)."""
    found = _HINTS.get(cls)
    if found is None:
        found = _HINTS[cls] = typing.get_type_hints(cls)
    return found
