"""Required fields: every RPC Ferry serves declares them, and presence follows the field kind."""

from __future__ import annotations

from typing import Any

import pytest

from csi_driver.agent_api.server import NodeAgentServicer
from csi_driver.core.errors import InvalidArgument
from csi_driver.csi.controller import ControllerServicer
from csi_driver.csi.group_controller import GroupControllerServicer
from csi_driver.csi.identity import IdentityServicer
from csi_driver.csi.node import NodeServicer
from csi_driver.gen import csi_pb2
from csi_driver.gen.ferry.v1 import agent_pb2
from csi_driver.rpc.validate import Required, present
from tests.csi.conftest import mount_capability

SERVED = [
    (IdentityServicer, csi_pb2.DESCRIPTOR.services_by_name["Identity"]),
    (ControllerServicer, csi_pb2.DESCRIPTOR.services_by_name["Controller"]),
    (GroupControllerServicer, csi_pb2.DESCRIPTOR.services_by_name["GroupController"]),
    (NodeServicer, csi_pb2.DESCRIPTOR.services_by_name["Node"]),
    (NodeAgentServicer, agent_pb2.DESCRIPTOR.services_by_name["NodeAgent"]),
]
METHODS = [(servicer, method) for servicer, service in SERVED for method in service.methods]


@pytest.mark.parametrize(
    ("servicer", "method"), METHODS, ids=[f"{s.__name__}.{m.name}" for s, m in METHODS]
)
def test_every_rpc_declares_fields_its_request_has(servicer: type, method: Any) -> None:
    declared = getattr(getattr(servicer, method.name), "required", None)
    assert isinstance(declared, Required), f"{method.name} is not wrapped by @rpc"
    assert declared.undeclared(method.input_type) == []


@pytest.mark.parametrize(
    ("request_message", "field", "expected"),
    [
        (csi_pb2.NodeUnpublishVolumeRequest(volume_id="v"), "volume_id", True),
        (csi_pb2.NodeUnpublishVolumeRequest(volume_id=""), "volume_id", False),
        (csi_pb2.NodeStageVolumeRequest(), "volume_capability", False),
        # An empty message that is set counts as present: HasField, not truthiness.
        (
            csi_pb2.ControllerExpandVolumeRequest(capacity_range=csi_pb2.CapacityRange()),
            "capacity_range",
            True,
        ),
        (csi_pb2.CreateVolumeRequest(), "volume_capabilities", False),
        (
            csi_pb2.CreateVolumeRequest(volume_capabilities=[mount_capability()]),
            "volume_capabilities",
            True,
        ),
        (csi_pb2.CreateVolumeRequest(parameters={"a": "b"}), "parameters", True),
        (agent_pb2.CreateImageRequest(size_bytes=0), "size_bytes", False),
    ],
)
def test_presence_follows_the_field_kind(request_message: Any, field: str, expected: bool) -> None:
    assert present(request_message, field) is expected


def test_the_first_missing_field_in_declared_order_is_named() -> None:
    required = Required(("volume_id", "target_path", "volume_capability"))
    with pytest.raises(InvalidArgument) as caught:
        required.check(csi_pb2.NodePublishVolumeRequest(volume_id="x"))
    assert caught.value.message == "target_path is required"
    required.check(
        csi_pb2.NodePublishVolumeRequest(
            volume_id="x", target_path="/t", volume_capability=mount_capability()
        )
    )


def test_undeclared_names_are_reported() -> None:
    required = Required(("volume_id", "volume_path", "no_such_field"))
    descriptor = csi_pb2.NodeGetVolumeStatsRequest.DESCRIPTOR
    assert required.undeclared(descriptor) == ["no_such_field"]
