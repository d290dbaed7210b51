"""The controller's volume lifecycle: provision, publish, expand, delete.

Every operation is keyed by the volume's name or id and is safe to repeat:
the catalog records intent (``CREATING``, ``DELETING``) before a node acts,
and a repeat (or a retry after a crash) picks the operation up where the
record says it stopped.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from csi_driver.controller.fencing import Fences
from csi_driver.controller.images import (
    DEFAULT_WAIT_S,
    REPLY_MARGIN_S,
    AheadNode,
    ImageIntents,
    LocalNode,
    Staged,
)
from csi_driver.controller.moves import MoveRequests
from csi_driver.controller.policy import check_mutable, modify_volume
from csi_driver.controller.readiness import NodeReadings
from csi_driver.controller.snapshots import CloneSource
from csi_driver.core import deadline
from csi_driver.core.batching import GroupLead
from csi_driver.core.encryption import check_encryptable
from csi_driver.core.errors import (
    CONTROLLER_PUBLISH_INCOMPATIBLE,
    NAME_CONFLICT,
    OPERATION_PENDING,
    PUBLISHED_ON_OTHER_NODE,
    STILL_PUBLISHED_ON,
    UNKNOWN_STARTING_TOKEN,
    Aborted,
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    FerryError,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    StoreError,
    Unavailable,
)
from csi_driver.core.locks import KeyedLocks
from csi_driver.core.model import (
    SUPPORTED_ACCESS_MODES,
    VOLUME_ID_PATTERN,
    AccessType,
    CapacityRange,
    FsType,
    GiB,
    MiB,
    NodeRecord,
    Publication,
    Topology,
    TopologyRequirement,
    Volume,
    VolumeCapability,
    VolumeState,
)
from csi_driver.core.params import MUTABLE, Provisioning, StorageParameters, parse_parameters
from csi_driver.core.placement import (
    NODE_KEY,
    NodeReadiness,
    NodeView,
    accessible_segment,
    choose_primary,
    eligible,
    snapshots_hold,
)
from csi_driver.core.records import ImageSpec, ImageStatus, NodeAccounting
from csi_driver.metrics import PLACEMENT_BATCH
from csi_driver.store.base import Put, undecided
from csi_driver.store.catalog import NAMES, Catalog
from csi_driver.store.records import Versioned, put, unchanged_since

log = logging.getLogger(__name__)

_CAS_ATTEMPTS = 16
#: Most creates placed and committed in one txn. A create is at most 4 compares
#: and 4 puts (volume, name, image spec and status) besides its node's charge,
#: and etcd refuses a txn of more than 128 of either (its default --max-txn-ops).
PLACEMENT_BATCH_MAX = 16

DEFAULT_CAPACITY = 1 * GiB
ALLOCATION_UNIT = 1 * MiB
#: Smallest image each kind of volume can live in (mkfs.xfs refuses < 300 MiB).
MINIMUM_SIZE = {None: 1 * MiB, FsType.EXT4: 8 * MiB, FsType.XFS: 300 * MiB}
DEFAULT_FS = FsType.EXT4
#: How long placement reuses the node registrations and drains it read (they
#: change rarely; a placement that finds no room reads them again at once).
NODES_REMEMBERED_S = 1.0
#: A node whose agent has not reported for this long is reported abnormal.
NODE_STALE_AFTER_S = 60.0

EPOCH_CONTEXT_KEY = "ferry.csi.dev/epoch"
PRIMARY_CONTEXT_KEY = "ferry.csi.dev/primary"
FS_TYPE_CONTEXT_KEY = "fsType"


class _NameTaken(Conflict):
    """The provision txn lost on the name's compare: the name is claimed already."""


class _PlacedElsewhere(Conflict):
    """Placement now picks another node than the one an image was created ahead on."""


@dataclass(eq=False)
class _Placing:
    """A create waiting to be placed (see VolumeService._place) and, once it was,
    where it went (``node_id``, the txn's ``revision``) or why not (``error``)."""

    volume_id: str
    name: str
    size: int
    requirement: TopologyRequirement | None
    #: the volume's records for a primary on this node
    stage: Callable[[str], Staged]
    only: str | None
    node_id: str = ""
    revision: int = 0
    error: Exception | None = None


@dataclass(frozen=True)
class _RememberedNodes:
    """The node registrations and drains placement read at ``read_at`` (monotonic)."""

    read_at: float
    records: tuple[NodeRecord, ...]
    drained: frozenset[str]

    def recent(self, now: float) -> bool:
        """Young enough to place by (see NODES_REMEMBERED_S)."""
        return now - self.read_at <= NODES_REMEMBERED_S


@dataclass(frozen=True)
class Condition:
    abnormal: bool
    message: str


@dataclass(frozen=True)
class Capacity:
    available_bytes: int
    maximum_volume_bytes: int
    minimum_volume_bytes: int


def _round_up(size: int, unit: int) -> int:
    return -(-size // unit) * unit


def resolve_size(capacity: CapacityRange, minimum: int) -> int:
    """The image size for a capacity range: honour both bounds, whole MiB."""
    required, limit = capacity.required_bytes, capacity.limit_bytes
    if required < 0 or limit < 0:
        raise InvalidArgument("capacity_range bytes must not be negative")
    if limit and required > limit:
        raise InvalidArgument(
            f"capacity_range required_bytes ({required}) exceeds limit_bytes ({limit})"
        )
    wanted = required or (min(DEFAULT_CAPACITY, limit) if limit else DEFAULT_CAPACITY)
    size = _round_up(max(wanted, minimum), ALLOCATION_UNIT)
    if limit and size > limit:
        size = limit // ALLOCATION_UNIT * ALLOCATION_UNIT
        if size < max(required, minimum):
            raise OutOfRange(
                f"capacity_range limit {limit} bytes is below the smallest volume of this "
                f"kind ({_round_up(max(required, minimum), ALLOCATION_UNIT)} bytes, "
                f"in whole MiB); raise the limit"
            )
    return size


def _clone_size(
    source: CloneSource, capacity: CapacityRange, size: int, fs_type: FsType | None
) -> int:
    """The size of a volume made from ``source``: never smaller than the source, and at
    least what the request asks (the filesystem grows to it on stage)."""
    if source.fs_type is not None and fs_type is not None and source.fs_type != fs_type:
        raise InvalidArgument(
            f"the source holds {source.fs_type.value}, not the requested {fs_type.value}; "
            "request the source's fsType"
        )
    if capacity.required_bytes and capacity.required_bytes < source.size_bytes:
        raise OutOfRange(
            f"required_bytes {capacity.required_bytes} is smaller than the source "
            f"({source.size_bytes} bytes); volumes made from it cannot be smaller"
        )
    if capacity.limit_bytes and capacity.limit_bytes < source.size_bytes:
        raise OutOfRange(
            f"limit_bytes {capacity.limit_bytes} is smaller than the source "
            f"({source.size_bytes} bytes); raise the limit"
        )
    return size if capacity.required_bytes else source.size_bytes


def _check_encryption(source: CloneSource, encrypted: bool) -> None:
    """A copy keeps its source's fscrypt policy and ciphertext: the class must agree."""
    if source.encrypted and not encrypted:
        raise InvalidArgument(
            f"the source ({source.described}) is an encrypted volume: a copy of it stays "
            'encrypted and needs its key, so request a StorageClass with encrypted: "true" '
            "(and the source's key as the node-stage secret)"
        )
    if encrypted and not source.encrypted:
        raise InvalidArgument(
            f"the source ({source.described}) is not encrypted and a copy keeps its "
            "plaintext files: request an unencrypted StorageClass, or copy the data into a "
            "new encrypted volume"
        )


def _near(node: NodeRecord | None) -> TopologyRequirement | None:
    """Without a topology requirement, a copy goes where its source is: a reflink there."""
    if node is None:
        return None
    return TopologyRequirement(preferred=(Topology.of({NODE_KEY: node.node_id}),))


def volume_shape(
    capabilities: Sequence[VolumeCapability], params: StorageParameters
) -> tuple[AccessType, FsType | None]:
    """What a new volume must be to serve every requested capability."""
    if not capabilities:
        raise InvalidArgument("volume_capabilities must name at least one capability")
    for cap in capabilities:
        if cap.access_mode not in SUPPORTED_ACCESS_MODES:
            raise InvalidArgument(
                f"access mode {cap.access_mode.value} is not supported: Ferry volumes are "
                "single-node (ReadWriteOnce / ReadWriteOncePod / single-node read-only)"
            )
    kinds = {cap.access_type for cap in capabilities}
    if len(kinds) > 1:
        raise InvalidArgument("a volume cannot be both a block device and a filesystem")
    access_type = kinds.pop()
    fs_type = None
    if access_type is AccessType.MOUNT:
        fs_types = {cap.fs_type for cap in capabilities if cap.fs_type} | (
            {params.fs_type} if params.fs_type else set()
        )
        if len(fs_types) > 1:
            shown = ", ".join(sorted(f.value for f in fs_types))
            raise InvalidArgument(f"conflicting filesystem types requested: {shown}")
        fs_type = fs_types.pop() if fs_types else DEFAULT_FS
    if params.encrypted:
        check_encryptable(access_type, fs_type)
    return access_type, fs_type


def _fixed(parameters: Mapping[str, str]) -> dict[str, str]:
    """The parameters a volume keeps for life: all but the mutable policy."""
    return {key: value for key, value in parameters.items() if key not in MUTABLE}


def _serves(volume: Volume, cap: VolumeCapability) -> bool:
    if cap.access_mode not in SUPPORTED_ACCESS_MODES or cap.access_type != volume.access_type:
        return False
    return cap.fs_type is None or cap.fs_type == volume.fs_type


class VolumeService:
    """Domain logic behind the CSI Controller service."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        clock: Callable[[], float] = time.time,
        lock_timeout_s: float = 30.0,
        wait_s: float = DEFAULT_WAIT_S,
        local: LocalNode | None = None,
        readings: NodeReadings | None = None,
        ahead: AheadNode | None = None,
    ) -> None:
        """``local``: the image reconciler of a node in this process (see ImageIntents).
        ``ahead``: that node, when the catalog's failed commits say whether they may
        have applied (SQLite, etcd): its new empty volumes are created image first,
        with every record in one txn (:meth:`_provision_ahead`).
        ``readings``: which nodes are ready for a new volume (not drained, silent or
        lost, as for replicas) and which are lost (a detach from one is fenced)."""
        self._catalog = catalog
        self._images = ImageIntents(catalog, wait_s=wait_s, local=local)
        self._ahead = ahead
        self._readings = readings or NodeReadings(catalog)
        self._fences = Fences(catalog, self._images, self._readings)
        self._moves = MoveRequests(catalog, wait_s=wait_s, clock=clock)
        self._clock = clock
        self._lock_timeout = lock_timeout_s
        self._names = KeyedLocks()
        self._volumes = KeyedLocks()
        # Placement reads the accounting and charges it in one txn; in-process
        # serialisation keeps concurrent creates from losing that race over and
        # over (the txn's compare still guards other controller processes), and
        # ``_placing`` batches them so that they share one txn (see _place).
        self._placement = threading.Lock()
        self._placing: GroupLead[_Placing] = GroupLead(PLACEMENT_BATCH_MAX)
        self._accounted = False
        # What placement last read or wrote, under ``_placement``: a create
        # reuses it instead of reading the catalog again. Safe because the
        # txn compares the chosen node's accounting at the remembered
        # revision (a Conflict reads afresh), and a placement that finds no
        # room in a remembered view decides again on a fresh one. This
        # process's other accounting writes forget it (:meth:`_forget_placement`).
        self._remembered_accounts: dict[str, Versioned[NodeAccounting]] = {}
        self._remembered_nodes: _RememberedNodes | None = None

    # -- health ----------------------------------------------------------------

    def check(self) -> None:
        """Raise unless the catalog can serve reads and writes."""
        self._catalog.store.ping()

    def close(self) -> None:
        """Stop the catalog watches this service keeps (the catalog stays open)."""
        self._images.close()

    # -- provisioning ----------------------------------------------------------

    def create_volume(
        self,
        name: str,
        capacity: CapacityRange,
        capabilities: Sequence[VolumeCapability],
        parameters: Mapping[str, str],
        requirement: TopologyRequirement | None,
        mutable_parameters: Mapping[str, str] | None = None,
        content_source: str = "",
        resolve_source: Callable[[], CloneSource] | None = None,
    ) -> Volume:
        """Provision (or return the already provisioned) volume called ``name``,
        empty or as a copy of a source (a clone or a restore).

        ``mutable_parameters`` (the PVC's VolumeAttributesClass) override the
        StorageClass's policy parameters from the start. ``content_source``
        names the source ("snapshot:<id>", "volume:<id>"); ``resolve_source``
        finds it, and is called only when the volume is provisioned now: a
        repeat for a volume made already needs nothing of its source, which
        may be gone by then.
        """
        if not name:
            raise InvalidArgument("name is required")
        params = parse_parameters(parameters).with_mutable(mutable_parameters or {})
        access_type, fs_type = volume_shape(capabilities, params)
        with self._names.hold(name, timeout=self._lock_timeout):
            if resolve_source is None:
                # Optimistic: a new name is the common case, and the provision txn's
                # compare on the name says whether it is, without a read before it.
                size = resolve_size(capacity, MINIMUM_SIZE[fs_type])
                try:
                    intent = self._provision(
                        name, size, access_type, fs_type, params, requirement, None, None
                    )
                except (_NameTaken, ResourceExhausted, OutOfRange):
                    pass  # the name may be taken (a repeat gets its volume, wherever it fits)
                else:
                    return self._finish_create(*intent)
            existing_id = self._catalog.volume_id_for_name(name)
            if existing_id is not None:
                volume = self._catalog.get_volume(existing_id)
                if volume is not None:
                    self._check_compatible(volume, capacity, capabilities, params, content_source)
                    if self._ahead is not None and volume.primary_node == self._ahead.node_id:
                        # A retry after an undecided commit: its image, left aside, first.
                        self._ahead.settle(volume.volume_id)
                    return self._finish_create(volume)
            source = resolve_source() if resolve_source is not None else None
            if source is not None and source.fs_type is not None and params.fs_type is None:
                # A restore keeps its source's filesystem unless the request names one.
                capabilities = [
                    replace(c, fs_type=c.fs_type or source.fs_type) for c in capabilities
                ]
                access_type, fs_type = volume_shape(capabilities, params)
            size = resolve_size(capacity, MINIMUM_SIZE[fs_type])
            if source is not None:
                _check_encryption(source, params.encrypted)
                size = _clone_size(source, capacity, size, fs_type)
                requirement = requirement or _near(self._catalog.get_node(source.image.node_id))
            try:
                intent = self._provision(
                    name, size, access_type, fs_type, params, requirement, existing_id, source
                )
            except _NameTaken as exc:
                # Another controller process claimed the name meanwhile.
                raise Aborted(OPERATION_PENDING.format(key=name)) from exc
            return self._finish_create(*intent)

    def _provision(
        self,
        name: str,
        size: int,
        access_type: AccessType,
        fs_type: FsType | None,
        params: StorageParameters,
        requirement: TopologyRequirement | None,
        claimed_id: str | None,
        source: CloneSource | None,
    ) -> tuple[Volume, Versioned[ImageSpec]]:
        """Place the volume and write its intent; the volume and its image spec as written."""
        volume_id = claimed_id or f"vol-{uuid.uuid4().hex}"
        thin = params.provisioning is Provisioning.THIN

        def intent(node_id: str) -> tuple[Volume, ImageSpec]:
            volume = Volume(
                volume_id=volume_id,
                name=name,
                capacity_bytes=size,
                access_type=access_type,
                fs_type=fs_type,
                primary_node=node_id,
                epoch=1,
                state=VolumeState.CREATING,
                parameters=tuple(sorted(params.as_dict().items())),
                created_at=self._clock(),
                content_source=source.described if source else "",
            )
            image = ImageSpec(
                volume_id,
                node_id,
                size,
                volume.epoch,
                thin=thin,
                source=source.image if source else None,
            )
            return volume, image

        if claimed_id is None and source is None:
            made = self._provision_ahead(size, requirement, intent)
            if made is not None:
                return made
        written: list[tuple[Volume, ImageSpec]] = []

        def stage(node_id: str) -> Staged:
            volume, image = intent(node_id)
            written.append((volume, image))
            return self._images.staged(volume, image, claim_name=not claimed_id)

        revision = self._placed(volume_id, name, size, requirement, stage)
        volume, image = written[-1]
        return volume, Versioned(image, revision)

    def _placed(
        self,
        volume_id: str,
        name: str,
        size: int,
        requirement: TopologyRequirement | None,
        stage: Callable[[str], Staged],
        *,
        only: str | None = None,
    ) -> int:
        """Place the volume and commit ``stage(its primary)``, the records of a new
        volume on that node, with the node's charge; returns the txn's revision.

        Concurrent creates are placed and committed together, one batch at a time
        (see :meth:`_place`). ``only``: the node the volume must go to;
        :class:`_PlacedElsewhere` when placement now picks another.
        """
        placing = _Placing(volume_id, name, size, requirement, stage, only)
        self._placing.submit(placing, self._place)
        if placing.error is not None:
            raise placing.error
        log.info(
            "volume placed",
            extra={
                "volume": volume_id,
                "volume_name": name,
                "node": placing.node_id,
                "bytes": size,
            },
        )
        return placing.revision

    def _place(self, batch: Sequence[_Placing]) -> None:
        """Under the placement lock: choose each create's primary in turn on one view of
        the accounting, charging it as it goes, and commit them all in one txn
        (:meth:`ImageIntents.provision_all`), which compares each charged node's
        accounting as read. Decides again on a fresh view when the remembered one had
        no room or an accounting moved. Each create ends with its revision or its error.

        One txn per batch is what lets creates overlap: each charge depends on the
        accounting the one before it wrote, so one at a time every create would wait
        for the previous one's commit (an fsync, or an etcd round trip).
        """
        with self._placement:
            waiting = list(batch)
            fresh = False
            for _ in range(_CAS_ATTEMPTS):
                if not waiting:
                    return
                accounts = self._placement_accounts(fresh)
                chosen = self._choose(waiting, accounts, self._placement_nodes(fresh), fresh)
                if chosen is None:
                    fresh = True  # the remembered view may be stale: decide on a fresh one
                    continue
                placed, later = chosen
                if not placed:
                    waiting = later
                    continue
                try:
                    revision, charged = self._images.provision_all(
                        [staged for _, staged in placed],
                        {staged.node_id: accounts.get(staged.node_id) for _, staged in placed},
                    )
                except Conflict as exc:
                    # Nothing was written: the create whose own key it names fails (a
                    # name taken meanwhile); else an accounting moved, to be read again.
                    owner = next((p for p, staged in placed if exc.key in staged.keys), None)
                    if owner is None:
                        fresh = True
                    elif exc.key is not None and exc.key.startswith(NAMES):
                        owner.error = _NameTaken(exc.message, key=exc.key)
                    else:
                        owner.error = exc
                    waiting = [p for p in waiting if p.error is None]
                    continue
                except Exception as exc:  # the txn's outcome, each create's (maybe unknown)
                    for p, _ in placed:
                        p.error = exc
                    waiting = later
                    continue
                PLACEMENT_BATCH.observe(len(placed))
                for node_id, account in charged.items():
                    self._remembered_accounts[node_id] = Versioned(account, revision)
                for p, staged in placed:
                    p.node_id, p.revision = staged.node_id, revision
                waiting = later
            for p in waiting:
                p.error = StoreError(f"placement of {p.name!r} kept losing races; retry")

    def _choose(
        self,
        waiting: Sequence[_Placing],
        accounts: Mapping[str, Versioned[NodeAccounting]],
        nodes: _RememberedNodes,
        fresh: bool,
    ) -> tuple[list[tuple[_Placing, Staged]], list[_Placing]] | None:
        """Each create's primary, in turn, each charged before the next is placed: the
        creates placed with their records, and those left for the next txn (one
        that writes a key an earlier one does). None when one found no room on a
        remembered view (``fresh`` False); on a fresh view, its error is its own.
        """
        charged = dict(accounts)  # for the views only: the batch's charges so far
        placed: list[tuple[_Placing, Staged]] = []
        later: list[_Placing] = []
        keys: set[str] = set()
        for placing in waiting:
            try:
                # The readiness replica placement reads too: no drained or down node.
                views = self._readings.views(charged, nodes.records, nodes.drained)
                primary = choose_primary(views, placing.size, placing.requirement)
            except (ResourceExhausted, OutOfRange) as exc:
                if not fresh:
                    return None
                placing.error = exc
                continue
            if placing.only is not None and primary.node_id != placing.only:
                placing.error = _PlacedElsewhere(f"placed on {primary.node_id}, not {placing.only}")
                continue
            staged = placing.stage(primary.node_id)
            touched = staged.keys
            if keys & touched:
                later.append(placing)
                continue
            keys |= touched
            read = charged.get(primary.node_id)
            account = read.value if read else NodeAccounting(primary.node_id)
            charged[primary.node_id] = Versioned(
                account.charge(placing.size), read.revision if read else 0
            )
            placed.append((placing, staged))
        return placed, later

    def _provision_ahead(
        self,
        size: int,
        requirement: TopologyRequirement | None,
        intent: Callable[[str], tuple[Volume, ImageSpec]],
    ) -> tuple[Volume, Versioned[ImageSpec]] | None:
        """A new empty volume on this process's own node (the all-in-one): the image
        first, then the volume READY, its name, its image spec and status and the
        node's charge in one txn (see LocalImages.create_ahead): one commit and one
        round of watch events per create instead of three.

        A txn whose outcome is unknown (etcd's answer lost) leaves the image for the
        node to settle by the catalog, and the call fails UNAVAILABLE: its retry with
        the same name finds the volume if the txn was committed, else creates it.

        None when the volume goes to another node, when the call's time is nearly
        spent, or when the image cannot be made here: the intent is then written
        and the node asked as for any other node (it reports why it cannot).
        """
        ahead = self._ahead
        left = deadline.remaining()
        if ahead is None or (left is not None and left <= REPLY_MARGIN_S):
            return None
        nodes = self._nodes_now()
        # With other nodes to choose from, decide before making an image here (the
        # txn's placement decides again); alone, this node is the only choice.
        if any(node.node_id != ahead.node_id for node in nodes.records):
            try:
                views = self._readings.views(self._accounts_now(), nodes.records, nodes.drained)
                if choose_primary(views, size, requirement).node_id != ahead.node_id:
                    return None
            except (ResourceExhausted, OutOfRange):
                return None  # the intent path decides on a fresh view, and says why
        volume, image = intent(ahead.node_id)
        ready = replace(volume, state=VolumeState.READY)
        committed: list[int] = []
        entered: list[bool] = []

        def commit(status: ImageStatus) -> int:
            entered.append(True)

            def stage(node_id: str) -> Staged:
                return self._images.staged(ready, image, claim_name=True, status=status)

            placed = self._placed(
                volume.volume_id, volume.name, size, requirement, stage, only=ahead.node_id
            )
            committed.append(placed)
            return committed[0]

        try:
            ahead.create_ahead(image, commit)
        except _PlacedElsewhere:
            return None
        except (FerryError, OSError) as exc:
            if entered and undecided(exc):
                raise Unavailable(
                    f"the catalog did not confirm the creation of volume {volume.name!r} "
                    f"({exc}); retry CreateVolume with the same name: it returns the volume "
                    "if it was created, or creates it anew"
                ) from exc
            if entered:
                raise  # the txn's own outcome: a taken name, no room left, a store error
            log.info(
                "image not created ahead; asking the node",
                extra={"volume": volume.volume_id, "error": str(exc)},
            )
            return None
        return ready, Versioned(image, committed[0])

    def _finish_create(self, volume: Volume, image: Versioned[ImageSpec] | None = None) -> Volume:
        if volume.state is VolumeState.READY:
            return volume
        if volume.state is VolumeState.DELETING:
            raise Aborted(
                f"volume {volume.name!r} ({volume.volume_id}) is being deleted; retry "
                "after the deletion completes"
            )
        thin = parse_parameters(dict(volume.parameters)).provisioning is Provisioning.THIN
        try:
            ready = self._images.finish_create(volume, thin, image)
        except FerryError:
            self._forget_placement()  # a refused create released its charge
            raise
        log.info(
            "volume provisioned", extra={"volume": volume.volume_id, "node": volume.primary_node}
        )
        return ready

    def _check_compatible(
        self,
        volume: Volume,
        capacity: CapacityRange,
        capabilities: Sequence[VolumeCapability],
        params: StorageParameters,
        content_source: str,
    ) -> None:
        problems = []
        if volume.content_source != content_source:
            problems.append(f"it was created from {volume.content_source or 'nothing'}")
        if capacity.required_bytes and volume.capacity_bytes < capacity.required_bytes:
            problems.append(f"it has {volume.capacity_bytes} bytes, less than required")
        if capacity.limit_bytes and volume.capacity_bytes > capacity.limit_bytes:
            problems.append(f"it has {volume.capacity_bytes} bytes, more than the limit")
        if not all(_serves(volume, cap) for cap in capabilities):
            problems.append("its access type or filesystem differs")
        # The policy (MUTABLE) may have changed since by ControllerModifyVolume: a
        # retried create of the same claim must still find its volume.
        if _fixed(dict(volume.parameters)) != _fixed(params.as_dict()):
            problems.append("its parameters differ")
        if problems:
            raise AlreadyExists(
                NAME_CONFLICT.format(
                    name=volume.name, volume_id=volume.volume_id, problems="; ".join(problems)
                )
            )

    def delete_volume(self, volume_id: str) -> None:
        """Delete a volume and its image; unknown ids succeed (CSI idempotency)."""
        if not volume_id:
            raise InvalidArgument("volume_id is required")
        if not VOLUME_ID_PATTERN.match(volume_id):
            return
        with self._volumes.hold(volume_id, timeout=self._lock_timeout):
            # The leader's collector may store READY for this volume between the read
            # and the intent's txn (the volume's compare then fails): read again.
            for attempt in range(_CAS_ATTEMPTS):
                volume_read = self._catalog.read_volume(volume_id)
                if volume_read is None:
                    return
                volume = volume_read.value
                if volume.publications:
                    nodes = ", ".join(p.node_id for p in volume.publications)
                    raise FailedPrecondition(
                        STILL_PUBLISHED_ON.format(volume_id=volume_id, nodes=nodes)
                    )
                # Intent first: a crash or a slow node leaves DELETING, which refuses
                # new publications and which the provisioner's retry completes.
                try:
                    self._images.delete(volume_read)
                    break
                except Conflict as exc:
                    if attempt + 1 == _CAS_ATTEMPTS:
                        raise Aborted(
                            f"volume {volume_id} kept changing while being deleted ({exc}); retry"
                        ) from exc
                finally:
                    self._forget_placement()
        log.info("volume deleted", extra={"volume": volume_id})

    # -- publication -----------------------------------------------------------

    def publish(
        self, volume_id: str, node_id: str, capability: VolumeCapability, readonly: bool
    ) -> dict[str, str]:
        """Make the volume available on ``node_id``; return the publish context."""
        volume = self._require_volume(volume_id)
        node = self._catalog.get_node(node_id)
        if node is None:
            raise NotFound(f"node {node_id} is not a Ferry node (no agent registered)")
        if not _serves(volume, capability):
            raise InvalidArgument(
                f"volume {volume_id} ({volume.access_type.value}"
                f"{', ' + volume.fs_type.value if volume.fs_type else ''}) cannot be used "
                "with the requested capability"
            )
        wanted = Publication(node_id, readonly, capability.access_type, capability.access_mode)
        self._follow(volume_id, node_id)

        def add(current: Volume) -> Volume:
            if current.state is not VolumeState.READY:
                raise FailedPrecondition(
                    f"volume {volume_id} is {current.state.value}; retry when it is ready"
                )
            existing = current.published_on(node_id)
            if existing is not None:
                if existing != wanted:
                    raise AlreadyExists(
                        CONTROLLER_PUBLISH_INCOMPATIBLE.format(volume_id=volume_id, node_id=node_id)
                    )
                return current
            if current.publications:
                raise FailedPrecondition(
                    PUBLISHED_ON_OTHER_NODE.format(
                        volume_id=volume_id, node=current.publications[0].node_id
                    )
                )
            if node_id != current.primary_node:
                raise Aborted(
                    f"volume {volume_id} moved to node {current.primary_node} meanwhile; retry"
                )
            return replace(current, publications=(*current.publications, wanted))

        def room(account: NodeAccounting) -> None:
            if node.max_volumes and account.published_count >= node.max_volumes:
                raise ResourceExhausted(
                    f"node {node_id} already has its maximum of {node.max_volumes} "
                    "Ferry volumes published"
                )

        with self._volumes.hold(volume_id, timeout=self._lock_timeout):
            published = self._change_publications(volume_id, add, room)
        if published is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return {EPOCH_CONTEXT_KEY: str(published.epoch), PRIMARY_CONTEXT_KEY: node_id}

    def _follow(self, volume_id: str, node_id: str) -> None:
        """Make ``node_id`` the volume's primary first: a move, waited for within the
        deadline (ABORTED with its progress past it; the attacher retries)."""
        volume_read = self._catalog.read_volume(volume_id)
        if volume_read is None:
            raise NotFound(f"volume {volume_id} does not exist")
        volume = volume_read.value
        in_flight = self._moves.in_flight(volume_id)
        if volume.primary_node == node_id and in_flight is None:
            return
        if volume.published_on(node_id) is not None:
            return  # a repeat: the publish below answers it
        if volume.publications:
            raise FailedPrecondition(
                PUBLISHED_ON_OTHER_NODE.format(
                    volume_id=volume_id, node=volume.publications[0].node_id
                )
            )
        if volume.state is not VolumeState.READY:
            raise FailedPrecondition(
                f"volume {volume_id} is {volume.state.value}; retry when it is ready"
            )
        if in_flight is not None and in_flight[0].target_node != node_id:
            raise Aborted(
                f"volume {volume_id} is moving to node {in_flight[0].target_node}; retry "
                "once that move is done"
            )
        self._moves.bring(volume_read, node_id)

    def unpublish(self, volume_id: str, node_id: str) -> None:
        """Withdraw the volume from ``node_id`` (every node when empty); idempotent.

        From a lost node it is fenced, not just withdrawn (controller/fencing.py)."""
        if not VOLUME_ID_PATTERN.match(volume_id):
            return

        def withdraw(v: Volume) -> Volume:
            kept = tuple(p for p in v.publications if node_id and p.node_id != node_id)
            return replace(v, publications=kept)

        with self._volumes.hold(volume_id, timeout=self._lock_timeout):
            if node_id and self._fences.fence(volume_id, node_id):
                self._forget_placement()
                return
            self._change_publications(volume_id, withdraw, None)

    def _change_publications(
        self,
        volume_id: str,
        change: Callable[[Volume], Volume],
        room: Callable[[NodeAccounting], None] | None,
    ) -> Volume | None:
        """One txn: the volume's publications and each affected node's published count.

        ``change`` may raise to refuse; ``room`` checks a node that gains a
        publication. None: the volume is gone.
        """
        self._accounts()  # counts publications of a catalog older than accounting
        for _ in range(_CAS_ATTEMPTS):
            volume_read = self._catalog.read_volume(volume_id)
            if volume_read is None:
                return None
            current = volume_read.value
            updated = change(current)
            if updated == current:
                return current
            before = {p.node_id for p in current.publications}
            after = {p.node_id for p in updated.publications}
            compares = [self._catalog.volume_unchanged(volume_read)]
            ops: list[Put] = [self._catalog.volume_op(updated)]
            for node_id in sorted(before ^ after):
                read_as = self._catalog.account(node_id)
                account = read_as.value if read_as else NodeAccounting(node_id)
                if node_id in after and room is not None:
                    room(account)
                compares.append(unchanged_since(account.key, read_as))
                ops.append(put(account.publications(1 if node_id in after else -1)))
            try:
                self._images.txn(compares, ops)
            except Conflict:
                continue
            if len(ops) > 1:
                self._forget_placement()
            return updated
        raise StoreError(f"volume {volume_id} kept changing under concurrent updates; retry")

    # -- queries ---------------------------------------------------------------

    def get_volume(self, volume_id: str) -> Volume:
        return self._require_volume(volume_id)

    def validate_capabilities(
        self,
        volume_id: str,
        capabilities: Sequence[VolumeCapability],
        parameters: Mapping[str, str],
        mutable_parameters: Mapping[str, str] | None = None,
    ) -> str:
        """Return "" when every capability is served, else the reason it is not."""
        volume = self._require_volume(volume_id)
        for cap in capabilities:
            if cap.access_mode not in SUPPORTED_ACCESS_MODES:
                return f"access mode {cap.access_mode.value} is not supported by Ferry"
            if not _serves(volume, cap):
                return f"volume {volume_id} is a {volume.access_type.value} volume" + (
                    f" formatted {volume.fs_type.value}" if volume.fs_type else ""
                )
        if parameters or mutable_parameters:
            try:
                params = parse_parameters(parameters).with_mutable(mutable_parameters or {})
            except InvalidArgument as exc:
                return exc.message
            if params.as_dict() != dict(volume.parameters):
                return "the parameters differ from those the volume was created with"
        return ""

    def list_volumes(self, max_entries: int, starting_token: str) -> tuple[list[Volume], str]:
        """A page of volumes in id order and the token for the next page ("" at the end)."""
        if max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        if starting_token and not VOLUME_ID_PATTERN.match(starting_token):
            raise Aborted(UNKNOWN_STARTING_TOKEN.format(token=starting_token))
        page = self._catalog.list_volumes(starting_token, max_entries + 1 if max_entries else 0)
        if max_entries and len(page) > max_entries:
            page = page[:max_entries]
            return page, page[-1].volume_id
        return page, ""

    def capacity(
        self,
        capabilities: Sequence[VolumeCapability],
        parameters: Mapping[str, str],
        segment: Topology | None,
    ) -> Capacity:
        """Capacity available for volumes of this shape within ``segment``."""
        params = parse_parameters(parameters)
        fs_type: FsType | None = DEFAULT_FS
        if capabilities:
            try:
                _, fs_type = volume_shape(capabilities, params)
            except InvalidArgument:
                return Capacity(0, 0, 0)
        # Only nodes CreateVolume would place on count: a drained, silent or lost
        # node's free space would draw the scheduler to a node that refuses it.
        ready = [
            v for v in self._readings.views(self._accounts()) if v.readiness is NodeReadiness.READY
        ]
        views = eligible(ready, [segment] if segment else [])
        free = [v.free_bytes // ALLOCATION_UNIT * ALLOCATION_UNIT for v in views]
        minimum = MINIMUM_SIZE[fs_type]
        largest = max(free, default=0)
        return Capacity(
            available_bytes=sum(free),
            maximum_volume_bytes=largest if largest >= minimum else 0,
            minimum_volume_bytes=minimum,
        )

    def accessible_topology(self, volume: Volume) -> list[Topology]:
        """From the registrations placement last read (a node's topology does not
        change while it holds volumes); read afresh for a node not among them.

        Not under the placement lock: the remembered registrations are replaced
        whole, never changed in place, so one read of the attribute is a
        consistent view; waiting for the lock made every reply queue behind
        the placement txns of the creates in flight."""
        remembered = self._remembered_nodes
        nodes = {n.node_id: n for n in remembered.records} if remembered else {}
        node = nodes.get(volume.primary_node) or self._catalog.get_node(volume.primary_node)
        return [accessible_segment(node)] if node else []

    def condition(self, volume: Volume) -> Condition:
        node = self._catalog.get_node(volume.primary_node)
        if node is None:
            return Condition(True, f"node {volume.primary_node} holding the data is not registered")
        silent = self._readings.silence(node)  # a catalog outage is not the node's silence
        if silent > NODE_STALE_AFTER_S:
            return Condition(
                True, f"node {node.node_id} holding the data has not reported for {silent:.0f}s"
            )
        reported = dict(node.volume_conditions).get(volume.volume_id)
        if reported:
            return Condition(True, f"node {node.node_id} reports: {reported}")
        if volume.state is not VolumeState.READY:
            return Condition(True, f"volume is {volume.state.value}")
        return Condition(False, "volume is healthy")

    # -- expansion -------------------------------------------------------------

    def expand(self, volume_id: str, capacity: CapacityRange) -> int:
        """Grow the volume's image to satisfy ``capacity``; return the new size."""
        volume = self._require_volume(volume_id)
        if capacity.limit_bytes and capacity.limit_bytes < volume.capacity_bytes:
            raise OutOfRange(
                f"volume {volume_id} already has {volume.capacity_bytes} bytes, more than "
                f"limit_bytes {capacity.limit_bytes}; volumes cannot shrink"
            )
        if capacity.required_bytes <= volume.capacity_bytes:
            return volume.capacity_bytes
        size = resolve_size(capacity, MINIMUM_SIZE[volume.fs_type])
        with self._volumes.hold(volume_id, timeout=self._lock_timeout):
            volume = self._require_volume(volume_id)
            node = self._require_node(volume.primary_node)

            def check_room(growth: int, view: NodeView) -> None:
                if growth > view.free_bytes:
                    if size > node.capacity_bytes:
                        raise OutOfRange(
                            f"{size} bytes exceeds node {node.node_id}'s whole pool "
                            f"({node.capacity_bytes} bytes)"
                        )
                    raise ResourceExhausted(
                        f"node {node.node_id} has {view.free_bytes} bytes free; growing "
                        f"volume {volume_id} needs {growth} more"
                        f"{snapshots_hold(view.snapshot_bytes, 'there')}"
                    )

            with self._placement:
                for _ in range(_CAS_ATTEMPTS):
                    accounts = self._accounts()
                    (view,) = self._readings.views(accounts, [node])
                    try:
                        grown = self._images.grow(
                            volume,
                            size,
                            accounts.get(node.node_id),
                            functools.partial(check_room, view=view),
                        )
                    except Conflict:
                        continue  # the accounting or the image moved: read again
                    break
                else:
                    raise StoreError(f"expansion of {volume_id} kept losing races; retry")
                self._remembered_accounts = {}
            try:
                new_size = self._images.finish_grow(volume, grown)
            finally:
                self._forget_placement()  # a refused growth released its charge
        log.info("volume expanded", extra={"volume": volume_id, "bytes": new_size})
        return new_size

    # -- policy ----------------------------------------------------------------

    def modify(self, volume_id: str, mutable_parameters: Mapping[str, str]) -> Volume:
        """Change the volume's replication policy (ControllerModifyVolume); idempotent."""
        check_mutable(mutable_parameters)
        with self._volumes.hold(volume_id, timeout=self._lock_timeout):
            return modify_volume(self._catalog, volume_id, mutable_parameters)

    # -- internals -------------------------------------------------------------

    def _require_volume(self, volume_id: str) -> Volume:
        if not volume_id:
            raise InvalidArgument("volume_id is required")
        volume = self._catalog.get_volume(volume_id) if VOLUME_ID_PATTERN.match(volume_id) else None
        if volume is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return volume

    def _require_node(self, node_id: str) -> NodeRecord:
        node = self._catalog.get_node(node_id)
        if node is None:
            raise Unavailable(
                f"node {node_id} holding the volume is not registered; start its Ferry "
                "node agent and retry"
            )
        return node

    def _accounts(self) -> dict[str, Versioned[NodeAccounting]]:
        if not self._accounted:
            # Once per process, at first use rather than at start: a catalog that
            # is down at start must not keep the controller from serving.
            self._catalog.backfill_accounting()
            self._accounted = True
        return self._catalog.accounts()

    def _placement_accounts(self, fresh: bool) -> dict[str, Versioned[NodeAccounting]]:
        if fresh or not self._remembered_accounts:
            self._remembered_accounts = self._accounts()
        return dict(self._remembered_accounts)

    def _accounts_now(self) -> dict[str, Versioned[NodeAccounting]]:
        """:meth:`_placement_accounts` for a caller that only looks: those remembered,
        without the placement lock (which a batch holds across its commit) once
        placement has read them."""
        remembered = self._remembered_accounts
        if remembered:
            return dict(remembered)
        with self._placement:
            return self._placement_accounts(False)

    def _placement_nodes(self, fresh: bool) -> _RememberedNodes:
        """Under the placement lock: the registrations and drains, read again when
        ``fresh`` or when those remembered are older than NODES_REMEMBERED_S."""
        remembered = self._remembered_nodes
        if fresh or remembered is None or not remembered.recent(time.monotonic()):
            remembered = self._read_nodes()
        return remembered

    def _nodes_now(self) -> _RememberedNodes:
        """:meth:`_placement_nodes` for a caller that only looks (a create's check
        before its image): without the placement lock, which a batch of creates
        holds across its commit (an etcd round trip)."""
        remembered = self._remembered_nodes
        if remembered is not None and remembered.recent(time.monotonic()):
            return remembered
        return self._read_nodes()

    def _read_nodes(self) -> _RememberedNodes:
        """The registrations and drains as they are now, remembered. Two readers at
        once each remember a snapshot as current as the other's."""
        # Drains too: on etcd each read is a round trip (under the placement lock when
        # placing), and both change rarely.
        remembered = _RememberedNodes(
            time.monotonic(), tuple(self._catalog.list_nodes()), frozenset(self._readings.drained())
        )
        self._remembered_nodes = remembered
        return remembered

    def _forget_placement(self) -> None:
        """Called after this process changed an accounting outside placement."""
        with self._placement:
            self._remembered_accounts = {}
