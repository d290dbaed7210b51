"""The kubernetes-csi sanity suite's cases for the RPCs Ferry offers, as tables.

kubernetes-csi/csi-test (``pkg/sanity``) is the outside conformance suite
Kubernetes drivers are held to. Its expectations (and the CSI spec's error
tables behind them) are restated here, one row per rule, and every row runs
for mount and for block access against a real all-in-one Ferry on a real
socket. Argument and unknown-volume rows use ids Ferry never issued, like
the suite's ``fake-vol-id-...``: the answer must not depend on the id's
shape. Conflict rows check the status code and the exact message (the
templates in csi_driver/core/errors.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver import DRIVER_NAME
from csi_driver.core.errors import (
    CONTROLLER_PUBLISH_INCOMPATIBLE,
    NAME_CONFLICT,
    NOT_STAGED,
    PUBLISH_INCOMPATIBLE,
    PUBLISHED_ON_OTHER_NODE,
    SINGLE_WRITER_CONFLICT,
    STAGE_INCOMPATIBLE,
    STAGED_ELSEWHERE,
    STAGING_PATH_NOT_SET,
    STILL_PUBLISHED_AT,
    STILL_PUBLISHED_ON,
    UNKNOWN_STARTING_TOKEN,
)
from csi_driver.core.model import MiB
from csi_driver.gen import csi_pb2
from csi_driver.gen.ferry.v1 import agent_pb2, agent_pb2_grpc
from csi_driver.rpc.validate import REQUIRED_MESSAGE
from csi_driver.transport import channel_target
from tests.csi.conftest import (
    NODE_ID,
    Ferry,
    block_capability,
    expect_code,
    mount_capability,
    node_config,
)
from tests.node.conftest import has_cap_sys_resource

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
SNW = "SINGLE_NODE_WRITER"
SNSW = "SINGLE_NODE_SINGLE_WRITER"
SNMW = "SINGLE_NODE_MULTI_WRITER"
SIZE = 64 * MiB

#: Ids Ferry never issued: the suite's shape, Ferry's shape, and a hostile one.
FOREIGN_IDS = ("fake-vol-id-28f63c1d-a", "vol-" + "0" * 32, "../../../etc/passwd")


@pytest.fixture(params=["mount", "block"])
def access(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def capability(access: str, mode: str = SNW) -> Any:
    return block_capability(mode) if access == "block" else mount_capability(mode=mode)


@dataclass
class Case:
    """One Ferry, one access type, one volume id: the requests the rows send."""

    ferry: Ferry
    access: str
    volume_id: str = ""

    @property
    def node(self) -> Any:
        return self.ferry.client.node

    @property
    def controller(self) -> Any:
        return self.ferry.client.controller

    def staging(self, n: int = 1) -> str:
        return str(self.ferry.kubelet / "plugins" / "kubernetes.io" / "csi" / f"pv{n}" / "mount")

    def target(self, pod: str = "pod-1") -> str:
        return str(self.ferry.kubelet / "pods" / pod / "volumes" / "kubernetes.io~csi" / "pv")

    def create(self, name: str = "sanity", mode: str = SNW) -> str:
        self.volume_id = self.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=name,
                capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
                volume_capabilities=[capability(self.access, mode)],
            )
        ).volume.volume_id
        return self.volume_id

    # Each method below returns (stub method, request): a row's step or the call under test.

    def stage(self, n: int = 1, mode: str = SNW) -> tuple[Any, Any]:
        return self.node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
            volume_id=self.volume_id,
            staging_target_path=self.staging(n),
            volume_capability=capability(self.access, mode),
        )

    def unstage(self) -> tuple[Any, Any]:
        return self.node.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(
            volume_id=self.volume_id, staging_target_path=self.staging()
        )

    def publish(
        self, pod: str = "pod-1", mode: str = SNW, readonly: bool = False, staged: bool = True
    ) -> tuple[Any, Any]:
        return self.node.NodePublishVolume, csi_pb2.NodePublishVolumeRequest(
            volume_id=self.volume_id,
            staging_target_path=self.staging() if staged else "",
            target_path=self.target(pod),
            volume_capability=capability(self.access, mode),
            readonly=readonly,
        )

    def unpublish(self, pod: str = "pod-1") -> tuple[Any, Any]:
        return self.node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=self.volume_id, target_path=self.target(pod)
        )

    def stats(self, path: str) -> tuple[Any, Any]:
        return self.node.NodeGetVolumeStats, csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=self.volume_id, volume_path=path
        )

    def node_expand(self, path: str) -> tuple[Any, Any]:
        return self.node.NodeExpandVolume, csi_pb2.NodeExpandVolumeRequest(
            volume_id=self.volume_id, volume_path=path
        )

    def controller_publish(self, node_id: str = NODE_ID, readonly: bool = False) -> tuple[Any, Any]:
        return self.controller.ControllerPublishVolume, csi_pb2.ControllerPublishVolumeRequest(
            volume_id=self.volume_id,
            node_id=node_id,
            volume_capability=capability(self.access),
            readonly=readonly,
        )


Step = Callable[[Case], tuple[Any, Any]]


def run(step: Step, case: Case) -> Any:
    call, request = step(case)
    return call(request)


# -- every required field, every RPC, ids Ferry never issued ---------------------------

#: The RPCs with required fields: a complete request for a given id, and the
#: fields the spec marks REQUIRED (in the order Ferry checks them).
REQUIRED: list[tuple[str, Callable[[Case, str], Any], tuple[str, ...]]] = [
    (
        "CreateVolume",
        lambda c, vid: csi_pb2.CreateVolumeRequest(
            name=f"sanity-{vid}", volume_capabilities=[capability(c.access)]
        ),
        ("name", "volume_capabilities"),
    ),
    ("DeleteVolume", lambda c, vid: csi_pb2.DeleteVolumeRequest(volume_id=vid), ("volume_id",)),
    (
        "ControllerPublishVolume",
        lambda c, vid: csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vid, node_id=NODE_ID, volume_capability=capability(c.access)
        ),
        ("volume_id", "node_id", "volume_capability"),
    ),
    (
        "ControllerUnpublishVolume",
        lambda c, vid: csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=NODE_ID),
        ("volume_id",),
    ),
    (
        "ValidateVolumeCapabilities",
        lambda c, vid: csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=vid, volume_capabilities=[capability(c.access)]
        ),
        ("volume_id", "volume_capabilities"),
    ),
    (
        "ControllerGetVolume",
        lambda c, vid: csi_pb2.ControllerGetVolumeRequest(volume_id=vid),
        ("volume_id",),
    ),
    (
        "ControllerExpandVolume",
        lambda c, vid: csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=2 * SIZE)
        ),
        ("volume_id", "capacity_range"),
    ),
    (
        "ControllerModifyVolume",
        lambda c, vid: csi_pb2.ControllerModifyVolumeRequest(
            volume_id=vid, mutable_parameters={"replicas": "1"}
        ),
        ("volume_id", "mutable_parameters"),
    ),
    (
        "NodeStageVolume",
        lambda c, vid: csi_pb2.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=c.staging(), volume_capability=capability(c.access)
        ),
        ("volume_id", "staging_target_path", "volume_capability"),
    ),
    (
        "NodeUnstageVolume",
        lambda c, vid: csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=c.staging()
        ),
        ("volume_id", "staging_target_path"),
    ),
    (
        "NodePublishVolume",
        lambda c, vid: csi_pb2.NodePublishVolumeRequest(
            volume_id=vid,
            staging_target_path=c.staging(),
            target_path=c.target(),
            volume_capability=capability(c.access),
        ),
        ("volume_id", "target_path", "volume_capability"),
    ),
    (
        "NodeUnpublishVolume",
        lambda c, vid: csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=c.target()),
        ("volume_id", "target_path"),
    ),
    (
        "NodeGetVolumeStats",
        lambda c, vid: csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=c.target()),
        ("volume_id", "volume_path"),
    ),
    (
        "NodeExpandVolume",
        lambda c, vid: csi_pb2.NodeExpandVolumeRequest(volume_id=vid, volume_path=c.target()),
        ("volume_id", "volume_path"),
    ),
    (
        "CreateImage",
        lambda c, vid: agent_pb2.CreateImageRequest(volume_id=vid, size_bytes=SIZE, epoch=1),
        ("volume_id", "size_bytes"),
    ),
    ("DeleteImage", lambda c, vid: agent_pb2.DeleteImageRequest(volume_id=vid), ("volume_id",)),
    (
        "ExpandImage",
        lambda c, vid: agent_pb2.ExpandImageRequest(volume_id=vid, size_bytes=SIZE),
        ("volume_id", "size_bytes"),
    ),
]


@pytest.fixture
def agent_stub(ferry: Ferry) -> Iterator[Any]:
    """The node's internal ferry.v1 NodeAgent, on its own socket."""
    endpoint = node_config(ferry.base).agent_endpoint
    with grpc.insecure_channel(channel_target(endpoint)) as channel:
        yield agent_pb2_grpc.NodeAgentStub(channel)


def stub_method(ferry: Ferry, agent_stub: Any, name: str) -> Any:
    for stub in (ferry.client.controller, ferry.client.node, agent_stub):
        if hasattr(stub, name):
            return getattr(stub, name)
    raise AssertionError(f"no stub serves {name}")


@pytest.mark.parametrize(("rpc", "build", "required"), REQUIRED, ids=[row[0] for row in REQUIRED])
def test_each_missing_required_field_is_invalid_whatever_the_id(
    ferry: Ferry,
    agent_stub: Any,
    access: str,
    rpc: str,
    build: Callable[[Case, str], Any],
    required: tuple[str, ...],
) -> None:
    case = Case(ferry, access)
    call = stub_method(ferry, agent_stub, rpc)
    for volume_id in FOREIGN_IDS:
        for field in required:
            request = build(case, volume_id)
            request.ClearField(field)
            details = expect_code(INVALID, call, request)
            assert details == REQUIRED_MESSAGE.format(field=field), (volume_id, field)
    # The suite's "no volume id" cases send an otherwise empty request.
    empty = type(build(case, ""))()
    assert expect_code(INVALID, call, empty) == REQUIRED_MESSAGE.format(field=required[0])


#: Complete requests about a volume Ferry never issued (changed where a row says so),
#: and the spec's answer: NOT_FOUND, or OK where "already done" is the idempotent answer.
UNKNOWN: list[tuple[str, grpc.StatusCode, dict[str, str]]] = [
    ("DeleteVolume", OK, {}),
    ("ControllerPublishVolume", NOT_FOUND, {}),
    ("ControllerUnpublishVolume", OK, {}),
    ("ValidateVolumeCapabilities", NOT_FOUND, {}),
    ("ControllerGetVolume", NOT_FOUND, {}),
    ("ControllerExpandVolume", NOT_FOUND, {}),
    ("ControllerModifyVolume", NOT_FOUND, {}),
    ("NodeStageVolume", NOT_FOUND, {}),
    ("NodeUnstageVolume", OK, {}),
    ("NodePublishVolume", NOT_FOUND, {}),
    ("NodeUnpublishVolume", OK, {}),
    ("NodeGetVolumeStats", NOT_FOUND, {}),
    ("NodeGetVolumeStats", NOT_FOUND, {"volume_path": "some/path"}),
    ("NodeExpandVolume", NOT_FOUND, {}),
    ("NodeExpandVolume", NOT_FOUND, {"volume_path": "some/path"}),
]
BUILD = {rpc: build for rpc, build, _ in REQUIRED}


@pytest.mark.parametrize(
    ("rpc", "code", "changes"),
    UNKNOWN,
    ids=[" ".join([rpc, *changes.values()]) for rpc, _, changes in UNKNOWN],
)
def test_a_volume_ferry_never_issued(
    ferry: Ferry,
    agent_stub: Any,
    access: str,
    rpc: str,
    code: grpc.StatusCode,
    changes: dict[str, str],
) -> None:
    call = stub_method(ferry, agent_stub, rpc)
    for volume_id in FOREIGN_IDS:
        request = BUILD[rpc](Case(ferry, access), volume_id)
        for field, value in changes.items():
            setattr(request, field, value)
        if code is OK:
            call(request)
        else:
            expect_code(code, call, request)
    # Nothing was created or touched for a volume that does not exist.
    assert list(ferry.kubelet.iterdir()) == []


# -- rules on a real volume: stage, publish, stats (real loop devices and mounts) ------


@dataclass(frozen=True)
class Rule:
    """One spec rule: steps that must succeed, then the call under test and its answer."""

    name: str
    prepare: tuple[Step, ...]
    act: Step
    code: grpc.StatusCode = OK
    message: Callable[[Case], str] | None = None
    #: Whether the rule is about a volume created for it (most are).
    volume: bool = True


def _other_directory(c: Case) -> tuple[Any, Any]:
    other = c.ferry.kubelet / "pods" / "someone-else" / "volumes"
    other.mkdir(parents=True)
    return c.stats(str(other))


#: Paths where a staged and published volume is not: NOT_FOUND, and never touched.
ELSEWHERE: list[tuple[str, Step]] = [
    ("the relative path some/path", lambda c: c.stats("some/path")),
    ("a path that does not exist", lambda c: c.stats(c.target("pod-9"))),
    ("an existing directory that is not the volume's", _other_directory),
    ("a path outside the kubelet directory", lambda c: c.stats("/etc")),
]

NODE_RULES = [
    Rule("stage repeated with the same arguments", (Case.stage,), Case.stage),
    Rule(
        "stage at a second staging path",
        (Case.stage,),
        lambda c: c.stage(n=2),
        FAILED_PRECONDITION,
        lambda c: STAGED_ELSEWHERE.format(
            volume_id=c.volume_id, staged=c.staging(), requested=c.staging(2)
        ),
    ),
    Rule(
        "stage again with another capability",
        (Case.stage,),
        lambda c: c.stage(mode="SINGLE_NODE_READER_ONLY"),
        ALREADY_EXISTS,
        lambda c: STAGE_INCOMPATIBLE.format(volume_id=c.volume_id, path=c.staging()),
    ),
    Rule(
        "publish before stage",
        (),
        Case.publish,
        FAILED_PRECONDITION,
        lambda c: NOT_STAGED.format(volume_id=c.volume_id, staging=c.staging()),
    ),
    Rule(
        "publish without staging_target_path",
        (Case.stage,),
        lambda c: c.publish(staged=False),
        FAILED_PRECONDITION,
        lambda c: STAGING_PATH_NOT_SET,
    ),
    Rule("publish repeated with the same arguments", (Case.stage, Case.publish), Case.publish),
    Rule(
        "publish at the same target read-only after read-write",
        (Case.stage, Case.publish),
        lambda c: c.publish(readonly=True),
        ALREADY_EXISTS,
        lambda c: PUBLISH_INCOMPATIBLE.format(
            volume_id=c.volume_id,
            target=c.target(),
            how="read-write with access mode SINGLE_NODE_WRITER",
        ),
    ),
    Rule(
        "SINGLE_NODE_SINGLE_WRITER at a second target",
        (lambda c: c.stage(mode=SNSW), lambda c: c.publish(mode=SNSW)),
        lambda c: c.publish(pod="pod-2", mode=SNSW),
        FAILED_PRECONDITION,
        lambda c: SINGLE_WRITER_CONFLICT.format(volume_id=c.volume_id, other=c.target()),
    ),
    Rule(
        "SINGLE_NODE_SINGLE_WRITER while another workload's target exists",
        (Case.stage, Case.publish),
        lambda c: c.publish(pod="pod-2", mode=SNSW),
        FAILED_PRECONDITION,
        lambda c: SINGLE_WRITER_CONFLICT.format(volume_id=c.volume_id, other=c.target()),
    ),
    Rule(
        "another target while a SINGLE_NODE_SINGLE_WRITER one exists",
        (Case.stage, lambda c: c.publish(mode=SNSW)),
        lambda c: c.publish(pod="pod-2", mode=SNW),
        FAILED_PRECONDITION,
        lambda c: SINGLE_WRITER_CONFLICT.format(volume_id=c.volume_id, other=c.target()),
    ),
    Rule(
        "SINGLE_NODE_SINGLE_WRITER repeated at the same target",
        (lambda c: c.stage(mode=SNSW), lambda c: c.publish(mode=SNSW)),
        lambda c: c.publish(mode=SNSW),
    ),
    Rule(
        "SINGLE_NODE_MULTI_WRITER at a second target",
        (lambda c: c.stage(mode=SNMW), lambda c: c.publish(mode=SNMW)),
        lambda c: c.publish(pod="pod-2", mode=SNMW),
    ),
    Rule(
        "SINGLE_NODE_WRITER at a second target (pods sharing a node)",
        (Case.stage, Case.publish),
        lambda c: c.publish(pod="pod-2"),
    ),
    Rule(
        "unstage while published",
        (Case.stage, Case.publish),
        Case.unstage,
        FAILED_PRECONDITION,
        lambda c: STILL_PUBLISHED_AT.format(volume_id=c.volume_id, targets=c.target()),
    ),
    Rule("stats at the target", (Case.stage, Case.publish), lambda c: c.stats(c.target())),
    *(
        Rule(f"stats at {where}", (Case.stage, Case.publish), step, NOT_FOUND)
        for where, step in ELSEWHERE
    ),
    Rule(
        "node expansion at the relative path some/path",
        (Case.stage, Case.publish),
        lambda c: c.node_expand("some/path"),
        NOT_FOUND,
    ),
    Rule("unpublish of a target never published", (Case.stage,), Case.unpublish),
    Rule("unstage of a volume never staged", (), Case.unstage),
]


def check(rule: Rule, case: Case) -> None:
    if rule.volume:
        case.create()
    for step in rule.prepare:
        run(step, case)
    if rule.code is OK:
        run(rule.act, case)
        return
    details = expect_code(rule.code, *rule.act(case))
    if rule.message is not None:
        assert details == rule.message(case)


@pytest.mark.root
@pytest.mark.parametrize("rule", NODE_RULES, ids=[r.name for r in NODE_RULES])
def test_node_rule(mountable: Ferry, access: str, rule: Rule) -> None:
    check(rule, Case(mountable, access))


# -- controller rules (no host access needed) ------------------------------------------


def _create(c: Case, size: int, name: str = "twice") -> tuple[Any, Any]:
    return c.controller.CreateVolume, csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=size, limit_bytes=size),
        volume_capabilities=[capability(c.access)],
    )


CONTROLLER_RULES = [
    Rule(
        "create with the same name and capacity",
        (lambda c: _create(c, SIZE),),
        lambda c: _create(c, SIZE),
        volume=False,
    ),
    Rule(
        "create with the same name and another capacity",
        (lambda c: _create(c, SIZE),),
        lambda c: _create(c, 2 * SIZE),
        ALREADY_EXISTS,
        lambda c: NAME_CONFLICT.format(
            name="twice",
            volume_id=c.controller.ListVolumes(csi_pb2.ListVolumesRequest())
            .entries[0]
            .volume.volume_id,
            problems=f"it has {SIZE} bytes, less than required",
        ),
        volume=False,
    ),
    Rule(
        "create with a 128-character name",
        (),
        lambda c: _create(c, SIZE, "n" * 128),
        volume=False,
    ),
    Rule(
        "list with a starting token Ferry never issued",
        (),
        lambda c: (
            c.controller.ListVolumes,
            csi_pb2.ListVolumesRequest(starting_token="invalid-token"),
        ),
        grpc.StatusCode.ABORTED,
        lambda c: UNKNOWN_STARTING_TOKEN.format(token="invalid-token"),
    ),
    Rule(
        "capacity with no optional values",
        (),
        lambda c: (c.controller.GetCapacity, csi_pb2.GetCapacityRequest()),
    ),
    Rule(
        "controller publish on a node that does not exist",
        (),
        lambda c: c.controller_publish(node_id="fake-node-id-1"),
        NOT_FOUND,
    ),
    Rule(
        "controller publish repeated with the same arguments",
        (Case.controller_publish,),
        Case.controller_publish,
    ),
    Rule(
        "controller publish again with another read-only flag",
        (Case.controller_publish,),
        lambda c: c.controller_publish(readonly=True),
        ALREADY_EXISTS,
        lambda c: CONTROLLER_PUBLISH_INCOMPATIBLE.format(volume_id=c.volume_id, node_id=NODE_ID),
    ),
    Rule(
        "delete while published",
        (Case.controller_publish,),
        lambda c: (c.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=c.volume_id)),
        FAILED_PRECONDITION,
        lambda c: STILL_PUBLISHED_ON.format(volume_id=c.volume_id, nodes=NODE_ID),
    ),
]


@pytest.mark.parametrize("rule", CONTROLLER_RULES, ids=[r.name for r in CONTROLLER_RULES])
def test_controller_rule(ferry: Ferry, access: str, rule: Rule) -> None:
    check(rule, Case(ferry, access))


def test_controller_publish_on_a_second_node(ferry: Ferry, second_node: str, access: str) -> None:
    case = Case(ferry, access)
    case.create()
    run(Case.controller_publish, case)
    details = expect_code(FAILED_PRECONDITION, *case.controller_publish(node_id=second_node))
    assert details == PUBLISHED_ON_OTHER_NODE.format(volume_id=case.volume_id, node=NODE_ID)


def test_identity_and_node_info(ferry: Ferry) -> None:
    info = ferry.client.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == DRIVER_NAME and 0 < len(info.name) <= 63 and info.vendor_version
    assert ferry.client.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    node = ferry.client.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert node.node_id and node.max_volumes_per_node >= 0 and node.accessible_topology.segments


# -- the whole lifecycle, once and repeated (the suite's "should work", "idempotent") ---


@pytest.mark.root
@pytest.mark.parametrize("count", [1, 2])
def test_lifecycle(mountable: Ferry, access: str, count: int) -> None:
    case = Case(mountable, access)
    for _ in range(count):
        case.create()
    setup: tuple[Step, ...] = (Case.controller_publish, Case.stage, Case.publish)
    for step in setup:
        for _ in range(count):
            run(step, case)
    stats = run(lambda c: c.stats(c.target()), case)
    assert stats.usage and stats.usage[0].total > 0
    grown = mountable.client.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=case.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=2 * SIZE)
        )
    )
    assert grown.capacity_bytes == 2 * SIZE
    if access == "mount" and not has_cap_sys_resource():
        # The documented answer where the kernel refuses to grow a mounted ext4.
        expect_code(FAILED_PRECONDITION, *case.node_expand(case.target()))
    else:
        assert run(lambda c: c.node_expand(c.target()), case).capacity_bytes == 2 * SIZE
    teardown: tuple[Step, ...] = (
        Case.unpublish,
        Case.unstage,
        lambda c: (
            c.controller.ControllerUnpublishVolume,
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=c.volume_id, node_id=NODE_ID),
        ),
        lambda c: (c.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=c.volume_id)),
    )
    for step in teardown:
        for _ in range(count):
            run(step, case)
    # The spec: NodeUnpublishVolume removes what NodePublishVolume created.
    assert not Path(case.target()).exists()
    assert not list((mountable.base / NODE_ID / "pool" / "images").glob(f"{case.volume_id}*"))
