"""The wire contract: csi.v1 as the CSI spec numbers it, and generated code in step."""

from __future__ import annotations

import filecmp
import importlib.util
import sys
from pathlib import Path

import pytest

from csi_driver.gen import csi_pb2
from csi_driver.gen.ferry.v1 import agent_pb2

ROOT = Path(__file__).resolve().parent.parent

# (message, field, number) as the CSI specification assigns them; kubelet and
# the sidecars encode by these numbers, so any drift breaks interoperability.
SPEC_FIELDS = [
    ("GetPluginInfoResponse", "name", 1),
    ("GetPluginInfoResponse", "vendor_version", 2),
    ("ProbeResponse", "ready", 1),
    ("CreateVolumeRequest", "name", 1),
    ("CreateVolumeRequest", "capacity_range", 2),
    ("CreateVolumeRequest", "volume_capabilities", 3),
    ("CreateVolumeRequest", "parameters", 4),
    ("CreateVolumeRequest", "secrets", 5),
    ("CreateVolumeRequest", "volume_content_source", 6),
    ("CreateVolumeRequest", "accessibility_requirements", 7),
    ("CreateVolumeRequest", "mutable_parameters", 8),
    ("Volume", "capacity_bytes", 1),
    ("Volume", "volume_id", 2),
    ("Volume", "volume_context", 3),
    ("Volume", "accessible_topology", 5),
    ("VolumeCapability", "block", 1),
    ("VolumeCapability", "mount", 2),
    ("VolumeCapability", "access_mode", 3),
    ("VolumeCapability.MountVolume", "volume_mount_group", 3),
    ("ControllerPublishVolumeRequest", "node_id", 2),
    ("ControllerPublishVolumeRequest", "readonly", 4),
    ("ControllerPublishVolumeResponse", "publish_context", 1),
    ("ListVolumesRequest", "starting_token", 2),
    ("ListVolumesResponse.VolumeStatus", "volume_condition", 2),
    ("GetCapacityRequest", "accessible_topology", 3),
    ("GetCapacityResponse", "maximum_volume_size", 2),
    ("GetCapacityResponse", "minimum_volume_size", 3),
    ("ControllerExpandVolumeResponse", "node_expansion_required", 2),
    ("NodeStageVolumeRequest", "publish_context", 2),
    ("NodeStageVolumeRequest", "staging_target_path", 3),
    ("NodeStageVolumeRequest", "volume_capability", 4),
    ("NodeStageVolumeRequest", "volume_context", 6),
    ("NodePublishVolumeRequest", "staging_target_path", 3),
    ("NodePublishVolumeRequest", "target_path", 4),
    ("NodePublishVolumeRequest", "readonly", 6),
    ("NodePublishVolumeRequest", "volume_context", 8),
    ("NodeGetVolumeStatsRequest", "staging_target_path", 3),
    ("VolumeUsage", "available", 1),
    ("VolumeUsage", "total", 2),
    ("VolumeUsage", "used", 3),
    ("VolumeUsage", "unit", 4),
    ("NodeGetInfoResponse", "max_volumes_per_node", 2),
    ("NodeGetInfoResponse", "accessible_topology", 3),
    ("NodeExpandVolumeRequest", "staging_target_path", 4),
    ("NodeExpandVolumeRequest", "volume_capability", 5),
    ("Snapshot", "group_snapshot_id", 6),
]

SPEC_ENUMS = [
    ("VolumeCapability.AccessMode.Mode", "SINGLE_NODE_WRITER", 1),
    ("VolumeCapability.AccessMode.Mode", "MULTI_NODE_MULTI_WRITER", 5),
    ("VolumeCapability.AccessMode.Mode", "SINGLE_NODE_SINGLE_WRITER", 6),
    ("VolumeCapability.AccessMode.Mode", "SINGLE_NODE_MULTI_WRITER", 7),
    ("PluginCapability.Service.Type", "VOLUME_ACCESSIBILITY_CONSTRAINTS", 2),
    ("PluginCapability.Service.Type", "GROUP_CONTROLLER_SERVICE", 3),
    ("PluginCapability.VolumeExpansion.Type", "ONLINE", 1),
    ("ControllerServiceCapability.RPC.Type", "EXPAND_VOLUME", 9),
    ("ControllerServiceCapability.RPC.Type", "LIST_VOLUMES_PUBLISHED_NODES", 10),
    ("ControllerServiceCapability.RPC.Type", "GET_VOLUME", 12),
    ("ControllerServiceCapability.RPC.Type", "SINGLE_NODE_MULTI_WRITER", 13),
    ("ControllerServiceCapability.RPC.Type", "GET_SNAPSHOT", 15),
    ("NodeServiceCapability.RPC.Type", "STAGE_UNSTAGE_VOLUME", 1),
    ("NodeServiceCapability.RPC.Type", "VOLUME_CONDITION", 4),
    ("NodeServiceCapability.RPC.Type", "VOLUME_MOUNT_GROUP", 6),
    ("VolumeUsage.Unit", "INODES", 2),
]

SPEC_METHODS = {
    "Identity": ["GetPluginInfo", "GetPluginCapabilities", "Probe"],
    "Controller": [
        "CreateVolume", "DeleteVolume", "ControllerPublishVolume", "ControllerUnpublishVolume",
        "ValidateVolumeCapabilities", "ListVolumes", "GetCapacity", "ControllerGetCapabilities",
        "CreateSnapshot", "DeleteSnapshot", "ListSnapshots", "GetSnapshot",
        "ControllerExpandVolume", "ControllerGetVolume", "ControllerModifyVolume",
    ],
    "Node": [
        "NodeStageVolume", "NodeUnstageVolume", "NodePublishVolume", "NodeUnpublishVolume",
        "NodeGetVolumeStats", "NodeExpandVolume", "NodeGetCapabilities", "NodeGetInfo",
    ],
}  # fmt: skip


def _message(path: str) -> object:
    descriptor = csi_pb2.DESCRIPTOR.message_types_by_name[path.split(".")[0]]
    for part in path.split(".")[1:]:
        descriptor = descriptor.nested_types_by_name[part]
    return descriptor


def test_package_is_csi_v1() -> None:
    assert csi_pb2.DESCRIPTOR.package == "csi.v1"


@pytest.mark.parametrize(("service", "methods"), SPEC_METHODS.items())
def test_services_have_the_spec_methods_in_order(service: str, methods: list[str]) -> None:
    descriptor = csi_pb2.DESCRIPTOR.services_by_name[service]
    assert [m.name for m in descriptor.methods] == methods
    assert descriptor.full_name == f"csi.v1.{service}"


@pytest.mark.parametrize(("message", "field", "number"), SPEC_FIELDS)
def test_field_numbers_match_the_spec(message: str, field: str, number: int) -> None:
    assert _message(message).fields_by_name[field].number == number  # type: ignore[attr-defined]


@pytest.mark.parametrize(("enum", "value", "number"), SPEC_ENUMS)
def test_enum_values_match_the_spec(enum: str, value: str, number: int) -> None:
    *owner, name = enum.split(".")
    enum_type = _message(".".join(owner)).enum_types_by_name[name]  # type: ignore[attr-defined]
    assert enum_type.values_by_name[value].number == number


def test_secret_fields_carry_the_csi_secret_option() -> None:
    field = csi_pb2.CreateVolumeRequest.DESCRIPTOR.fields_by_name["secrets"]
    assert field.GetOptions().Extensions[csi_pb2.csi_secret] is True


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    fresh = module.generate(ROOT, tmp_path)
    installed = ROOT / "csi_driver" / "gen"
    for path in fresh:
        relative = path.relative_to(tmp_path / "csi_driver" / "gen")
        assert filecmp.cmp(path, installed / relative, shallow=False), (
            f"{relative} is stale: run `make protos`"
        )


def test_agent_messages_round_trip() -> None:
    image = agent_pb2.ImageInfo(
        volume_id="vol-1", size_bytes=1 << 30, allocated_bytes=4096, epoch=3, attached=True,
        device="/dev/loop7",
    )  # fmt: skip
    assert agent_pb2.ImageInfo.FromString(image.SerializeToString()) == image
    pool = agent_pb2.PoolInfo(node_id="n", capacity_bytes=10, image_count=2, reflink=True)
    assert agent_pb2.PoolInfo.FromString(pool.SerializeToString()) == pool
    listing = agent_pb2.ListImagesResponse(images=[image, image])
    assert len(agent_pb2.ListImagesResponse.FromString(listing.SerializeToString()).images) == 2
