"""Conversions between CSI protobuf messages and Ferry's domain values.

Field presence rules of the CSI spec that apply to every RPC (a capability
must name its access type and mode, ...) are enforced here, so servicers
receive only well-formed values.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from csi_driver.core.errors import InvalidArgument
from csi_driver.core.model import (
    AccessMode,
    AccessType,
    CapacityRange,
    FsType,
    Topology,
    TopologyRequirement,
    VolumeCapability,
)
from csi_driver.gen import csi_pb2

_MODE = csi_pb2.VolumeCapability.AccessMode


def capability_from_proto(cap: Any, field: str = "volume_capability") -> VolumeCapability:
    """A CSI VolumeCapability as a domain value; malformed ones are refused."""
    kind = cap.WhichOneof("access_type")
    if kind is None:
        raise InvalidArgument(f"{field} must set access_type (block or mount)")
    if not cap.HasField("access_mode") or cap.access_mode.mode == _MODE.UNKNOWN:
        raise InvalidArgument(f"{field} must set access_mode.mode")
    try:
        mode = AccessMode(_MODE.Mode.Name(cap.access_mode.mode))
    except ValueError:
        raise InvalidArgument(f"{field} has unknown access mode {cap.access_mode.mode}") from None
    if kind == "block":
        return VolumeCapability(mode, AccessType.BLOCK)
    fs_text = cap.mount.fs_type.strip().lower()
    return VolumeCapability(
        access_mode=mode,
        access_type=AccessType.MOUNT,
        fs_type=FsType.parse(fs_text) if fs_text else None,
        mount_flags=tuple(cap.mount.mount_flags),
        mount_group=cap.mount.volume_mount_group,
    )


def capabilities_from_proto(caps: Iterable[Any]) -> list[VolumeCapability]:
    return [capability_from_proto(c, f"volume_capabilities[{i}]") for i, c in enumerate(caps)]


def capability_to_proto(cap: VolumeCapability) -> Any:
    out = csi_pb2.VolumeCapability(
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=cap.access_mode.value)
    )
    if cap.access_type is AccessType.BLOCK:
        out.block.SetInParent()
    else:
        out.mount.fs_type = cap.fs_type.value if cap.fs_type else ""
        out.mount.mount_flags.extend(cap.mount_flags)
        out.mount.volume_mount_group = cap.mount_group
    return out


def capacity_from_proto(request: Any) -> CapacityRange:
    if not request.HasField("capacity_range"):
        return CapacityRange()
    rng = request.capacity_range
    return CapacityRange(required_bytes=rng.required_bytes, limit_bytes=rng.limit_bytes)


def topology_from_proto(topology: Any) -> Topology:
    return Topology.of(dict(topology.segments))


def topology_to_proto(topology: Topology) -> Any:
    return csi_pb2.Topology(segments=topology.as_dict())


def requirement_from_proto(request: Any) -> TopologyRequirement | None:
    if not request.HasField("accessibility_requirements"):
        return None
    req = request.accessibility_requirements
    return TopologyRequirement(
        requisite=tuple(topology_from_proto(t) for t in req.requisite),
        preferred=tuple(topology_from_proto(t) for t in req.preferred),
    )


def content_source_from_proto(source: Any) -> tuple[str, str]:
    """CreateVolume's volume_content_source as (snapshot id, volume id): one is set."""
    kind = source.WhichOneof("type")
    if kind == "snapshot" and source.snapshot.snapshot_id:
        return source.snapshot.snapshot_id, ""
    if kind == "volume" and source.volume.volume_id:
        return "", source.volume.volume_id
    raise InvalidArgument(
        "volume_content_source must name a snapshot (snapshot.snapshot_id) or a volume "
        "(volume.volume_id)"
    )
