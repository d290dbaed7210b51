"""Ferry's volume model: plain, immutable values shared by every layer.

Nothing here knows about gRPC or the host; the CSI layer converts protobuf
messages into these values and back.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from csi_driver.core.errors import InvalidArgument

MiB = 1024 * 1024
GiB = 1024 * MiB

# Volume ids are Ferry's own (``pvc-...`` names are *names*, not ids). They
# end up in file names on nodes, so the alphabet is deliberately small.
VOLUME_ID_PATTERN = re.compile(r"^vol-[0-9a-f]{32}$")
NODE_ID_PATTERN = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")


class AccessMode(enum.Enum):
    """How many nodes and writers a volume may have (mirrors CSI's AccessMode)."""

    SINGLE_NODE_WRITER = "SINGLE_NODE_WRITER"
    SINGLE_NODE_READER_ONLY = "SINGLE_NODE_READER_ONLY"
    MULTI_NODE_READER_ONLY = "MULTI_NODE_READER_ONLY"
    MULTI_NODE_SINGLE_WRITER = "MULTI_NODE_SINGLE_WRITER"
    MULTI_NODE_MULTI_WRITER = "MULTI_NODE_MULTI_WRITER"
    SINGLE_NODE_SINGLE_WRITER = "SINGLE_NODE_SINGLE_WRITER"
    SINGLE_NODE_MULTI_WRITER = "SINGLE_NODE_MULTI_WRITER"

    @property
    def single_node(self) -> bool:
        return self.name.startswith("SINGLE_NODE")

    @property
    def read_only(self) -> bool:
        return self.name.endswith("READER_ONLY")


#: Ferry volumes live on one node at a time: these are the modes it serves.
SUPPORTED_ACCESS_MODES = frozenset(m for m in AccessMode if m.single_node)


class AccessType(enum.Enum):
    """Whether the pod sees a filesystem or a raw block device."""

    MOUNT = "mount"
    BLOCK = "block"


class FsType(enum.Enum):
    EXT4 = "ext4"
    XFS = "xfs"

    @classmethod
    def parse(cls, text: str) -> FsType:
        try:
            return cls(text)
        except ValueError:
            allowed = ", ".join(f.value for f in cls)
            raise InvalidArgument(
                f"unsupported fsType {text!r}: Ferry formats volumes as one of {allowed}"
            ) from None


@dataclass(frozen=True)
class VolumeCapability:
    """One way a workload wants to use a volume."""

    access_mode: AccessMode
    access_type: AccessType
    fs_type: FsType | None = None  # MOUNT only; None means "the volume's default"
    mount_flags: tuple[str, ...] = ()  # MOUNT only
    mount_group: str = ""  # MOUNT only; unused by Ferry for now


@dataclass(frozen=True)
class CapacityRange:
    """Bounds on a volume's size; 0 means "not set" as in CSI."""

    required_bytes: int = 0
    limit_bytes: int = 0


@dataclass(frozen=True)
class Topology:
    """A topology segment: label key -> value, e.g. ``{zone: a, node: n1}``."""

    segments: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, mapping: dict[str, str]) -> Topology:
        return cls(tuple(sorted(mapping.items())))

    def as_dict(self) -> dict[str, str]:
        return dict(self.segments)

    def satisfies(self, wanted: Topology) -> bool:
        """True when this (a node's) segment has every key of ``wanted`` with its value."""
        mine = self.as_dict()
        return all(mine.get(k) == v for k, v in wanted.segments)


@dataclass(frozen=True)
class TopologyRequirement:
    """CSI's TopologyRequirement: where a new volume must / should be reachable."""

    requisite: tuple[Topology, ...] = ()
    preferred: tuple[Topology, ...] = ()


class VolumeState(enum.Enum):
    CREATING = "creating"  # catalog entry written, image not yet confirmed on the node
    READY = "ready"
    DELETING = "deleting"  # delete intent persisted, image removal may be pending


@dataclass(frozen=True)
class Publication:
    """A volume made available to one node (ControllerPublishVolume)."""

    node_id: str
    readonly: bool
    access_type: AccessType
    access_mode: AccessMode


@dataclass(frozen=True)
class Volume:
    """A Ferry volume as the catalog records it."""

    volume_id: str
    name: str
    capacity_bytes: int
    access_type: AccessType
    fs_type: FsType | None
    primary_node: str
    epoch: int
    state: VolumeState
    parameters: tuple[tuple[str, str], ...] = ()
    publications: tuple[Publication, ...] = ()
    created_at: float = 0.0
    #: Bumped (records.revise) when the volume's policy (parameters) changes,
    #: so the reconcilers that add or retire replicas can report which policy
    #: they acted on; publications and state are not part of it.
    generation: int = 1
    #: What the volume was created from: "" (empty), "snapshot:<id>" or "volume:<id>".
    content_source: str = ""

    def published_on(self, node_id: str) -> Publication | None:
        return next((p for p in self.publications if p.node_id == node_id), None)


@dataclass(frozen=True)
class NodeRecord:
    """A node agent as it registered itself in the catalog."""

    node_id: str
    agent_endpoint: str
    topology: Topology
    capacity_bytes: int
    max_volumes: int
    heartbeat_at: float = 0.0
    labels: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    #: Volumes the node found abnormal at its last heartbeat: (volume id, why).
    volume_conditions: tuple[tuple[str, str], ...] = ()
    #: Where other nodes pull chunks (snapshots) from this node; "" if it serves none.
    chunk_endpoint: str = ""


def check_volume_id(volume_id: str) -> str:
    """Return ``volume_id`` if it has Ferry's shape, else raise InvalidArgument.

    Callers that look up a volume treat a malformed id as "not found"; this is
    for places where an id becomes part of a path on a node.
    """
    if not VOLUME_ID_PATTERN.match(volume_id):
        raise InvalidArgument(
            f"malformed volume id {volume_id!r}: Ferry ids look like vol-<32 hex>"
        )
    return volume_id
