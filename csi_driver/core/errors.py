"""Ferry's one error vocabulary.

Every failure that crosses a module boundary is a :class:`FerryError`. Each
subclass names *what kind* of failure it is; the CSI layer maps the kind to a
gRPC status code in exactly one place (``csi_driver.rpc.errors``). Messages
are written for the operator: say what is wrong and what to do next.

Tree::

    FerryError
    ├── InvalidArgument        bad or missing input              -> INVALID_ARGUMENT
    ├── NotFound               volume, node or path is unknown   -> NOT_FOUND
    ├── AlreadyExists          same name/key, incompatible args  -> ALREADY_EXISTS
    ├── FailedPrecondition     valid request, wrong state        -> FAILED_PRECONDITION
    ├── OutOfRange             capacity outside what is possible -> OUT_OF_RANGE
    ├── ResourceExhausted      not enough space / volume slots   -> RESOURCE_EXHAUSTED
    ├── Aborted                conflicting operation in flight   -> ABORTED
    ├── DeadlineExceeded       the RPC's deadline cut work short -> DEADLINE_EXCEEDED
    ├── Unavailable            retry later (node down, busy)     -> UNAVAILABLE
    │   ├── BackupFailed       a snapshot's backup did not commit
    │   └── StoreUnavailable   catalog backend unreachable / no quorum
    ├── Unimplemented          feature not offered               -> UNIMPLEMENTED
    ├── Unauthenticated        caller is not a Ferry agent       -> UNAUTHENTICATED
    ├── PermissionDenied       a Ferry agent, not allowed here   -> PERMISSION_DENIED
    ├── DataLoss               bytes do not match their hash     -> DATA_LOSS
    └── InternalError          a bug or a host failure           -> INTERNAL
        ├── CommandFailed      an external command failed
        └── StoreError         the catalog store failed
            ├── Conflict       compare-and-swap lost a race (retry the read)
            ├── Compacted      a watch asked for history already compacted
            └── CorruptRecord  a stored record cannot be decoded as its type

The messages for the conflicts the CSI spec names a code for (a second
writer, a volume staged or published elsewhere, an incompatible repeat, an
operation in progress) are the named templates at the end of this module:
every raise site formats one of them, and the tests compare against the
same template, so the words an operator sees are fixed in one place.
"""

from __future__ import annotations


class FerryError(Exception):
    """Base of all of Ferry's domain errors."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(FerryError):
    """The request is malformed: a field is missing, empty or not allowed."""


class NotFound(FerryError):
    """The named volume, node, image or path does not exist."""


class AlreadyExists(FerryError):
    """An object with this name exists with arguments incompatible with the request."""


class FailedPrecondition(FerryError):
    """The request is valid but the object is not in a state that allows it."""


class OutOfRange(FerryError):
    """A capacity request cannot be met by any volume Ferry can create."""


class ResourceExhausted(FerryError):
    """There is not enough capacity (bytes or volume slots) to satisfy the request."""


class Aborted(FerryError):
    """Another operation on the same object is in progress; retry later."""


class DeadlineExceeded(FerryError):
    """The call's deadline passed before the work was done; a retry resumes it.

    Non-final by design: kubelet and the sidecars treat DEADLINE_EXCEEDED as
    "the operation may be in progress", keep the volume's state uncertain and
    call again (or clean up), which is what a convergent operation needs.
    """


class Unavailable(FerryError):
    """A dependency (node agent, catalog) cannot be reached right now; retry later."""


class BackupFailed(Unavailable):
    """A snapshot was taken but its backup could not be committed in the target."""


class StoreUnavailable(Unavailable):
    """The catalog backend cannot be reached or has no quorum; nothing was half-written.

    A write that failed this way either took effect whole or not at all (the
    backends are transactional); when the request may have reached the backend
    the message says the outcome is unknown, so re-read before retrying.
    """


class OutcomeUnknown(StoreUnavailable):
    """A write that may have reached the backend failed before its answer came.

    It took effect whole or not at all, and may still take effect after this
    is raised (etcd applies a request that reached its log, whatever became
    of the caller). Every other error from a write means it did not apply.
    Only a later write that the lost one compares against decides it for
    good (see :func:`csi_driver.node.reconcile.images.settle_left`).
    """


class Unimplemented(FerryError):
    """Ferry does not offer this operation."""


class Unauthenticated(FerryError):
    """The caller's certificate does not name a Ferry agent of this cluster."""


class PermissionDenied(FerryError):
    """The caller is a Ferry agent, but not one allowed to make this call."""


class DataLoss(FerryError):
    """Bytes do not match the hash they were promised under (a chunk corrupted on
    the wire or on disk); they were not committed anywhere.

    ``chunks`` names the chunk indexes that failed, when known.
    """

    def __init__(self, message: str, chunks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.chunks = chunks


class InternalError(FerryError):
    """Something failed that the caller cannot fix by changing the request."""


class CommandFailed(InternalError):
    """An external command (mount, losetup, mkfs, ...) failed or timed out."""

    def __init__(self, argv: list[str], returncode: int | None, stderr: str) -> None:
        shown = " ".join(argv)
        if returncode is None:
            message = f"command timed out: {shown}"
        else:
            message = f"command failed (exit {returncode}): {shown}: {stderr.strip()}"
        super().__init__(message)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


class StoreError(InternalError):
    """The catalog store could not complete an operation."""


class Conflict(StoreError):
    """A compare-and-swap write lost a race: the key changed since it was read.

    ``key`` names the compared key that did not match (when the backend knows).
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class Compacted(StoreError):
    """A watch asked for revisions that compaction has already discarded.

    The watcher has missed history: it must re-list (which returns the revision
    it read at) and watch again from that revision + 1.
    """

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class CorruptRecord(StoreError):
    """A catalog record is not a valid value of its type (damaged, or from a newer Ferry)."""


# -- Messages for the conflicts the CSI spec names a status code for ---------------
# str.format templates; the code each one is raised with follows its name.

#: NodePublishVolume, FAILED_PRECONDITION: a second target while one workload owns it.
SINGLE_WRITER_CONFLICT = (
    "volume {volume_id} uses SINGLE_NODE_SINGLE_WRITER access mode and is already "
    "published at a different target path ({other}); unpublish it there first"
)
#: NodePublishVolume, FAILED_PRECONDITION: Ferry stages every volume (STAGE_UNSTAGE_VOLUME).
STAGING_PATH_NOT_SET = (
    "staging_target_path is required: Ferry stages every volume before publishing it; "
    "pass the path given to NodeStageVolume"
)
#: NodePublishVolume, FAILED_PRECONDITION: published before it was staged.
NOT_STAGED = "volume {volume_id} is not staged at {staging}; call NodeStageVolume first"
#: NodePublishVolume, ALREADY_EXISTS: same target, other read-only flag or access mode.
PUBLISH_INCOMPATIBLE = (
    "volume {volume_id} is already published at {target} {how}; unpublish it there "
    "to publish it differently"
)
#: NodeStageVolume, FAILED_PRECONDITION: a single-node volume has one staging path.
STAGED_ELSEWHERE = (
    "volume {volume_id} is already staged at {staged}; unstage it there before "
    "staging it at {requested}"
)
#: NodeStageVolume, ALREADY_EXISTS: same staging path, other capability.
STAGE_INCOMPATIBLE = (
    "volume {volume_id} is already staged at {path} with a different capability "
    "(access type, fsType, mount flags, read-only or encryption); unstage it to stage it "
    "differently"
)
#: NodeStageVolume, FAILED_PRECONDITION: the secret's key is not the one the volume's data
#: is encrypted with (the request is well formed; it does not fit the volume's state).
WRONG_VOLUME_KEY = (
    "volume {volume_id} is encrypted with another key: its data needs the key with "
    "identifier {expected}, and the node-stage secret's encryptionKey has identifier "
    "{given}. Put the volume's own key in the Secret that the StorageClass's "
    "csi.storage.k8s.io/node-stage-secret-name names; kubelet retries the stage"
)
#: NodeUnstageVolume, FAILED_PRECONDITION: targets still mounted from the staging path.
STILL_PUBLISHED_AT = "volume {volume_id} is still published at {targets}; unpublish it first"
#: CreateVolume, ALREADY_EXISTS: the name is taken by a volume that does not fit.
NAME_CONFLICT = (
    "volume {name!r} already exists as {volume_id} and is incompatible with this "
    "request: {problems}"
)
#: DeleteVolume, FAILED_PRECONDITION: the volume is in use.
STILL_PUBLISHED_ON = (
    "volume {volume_id} is still published on {nodes}; delete the pods using it first"
)
#: ControllerPublishVolume, FAILED_PRECONDITION: published to another node.
PUBLISHED_ON_OTHER_NODE = (
    "volume {volume_id} is published on node {node}; a single-node volume is published "
    "on one node at a time: unpublish it there first"
)
#: ControllerPublishVolume, ALREADY_EXISTS: same node, other capability or read-only flag.
CONTROLLER_PUBLISH_INCOMPATIBLE = (
    "volume {volume_id} is already published on {node_id} with another capability or "
    "read-only flag; unpublish it first"
)
#: ListVolumes, ABORTED: a token Ferry did not issue.
UNKNOWN_STARTING_TOKEN = (
    "starting_token {token!r} is not one Ferry issued; list again without a token"
)
#: Any RPC, ABORTED: another operation holds the volume (or name).
OPERATION_PENDING = "an operation on {key} is already in progress; retry shortly"
#: CreateSnapshot / CreateVolumeGroupSnapshot, ALREADY_EXISTS: the name is another source's.
SNAPSHOT_NAME_CONFLICT = (
    "snapshot name {name!r} is already used by {snapshot_id} of {source}; choose another "
    "name or snapshot that source"
)
#: DeleteSnapshot, FAILED_PRECONDITION: members go with their group.
SNAPSHOT_IN_GROUP = (
    "snapshot {snapshot_id} belongs to group snapshot {group_id}; delete the group snapshot"
)
#: ListSnapshots, ABORTED: a token Ferry did not issue.
UNKNOWN_SNAPSHOT_TOKEN = (
    "starting_token {token!r} is not one Ferry issued for snapshots; list again without a token"
)
#: DeleteVolumeGroupSnapshot / GetVolumeGroupSnapshot, INVALID_ARGUMENT: other members named.
GROUP_MEMBERS_MISMATCH = (
    "group snapshot {group_id} holds snapshots {members}, not the snapshot_ids given; pass "
    "exactly its members"
)
