"""Arbitrary CreateVolume input never crashes Ferry: it gets a spec code or a volume."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from csi_driver.csi.client import CsiClient, block_capability, mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.runtime import start_all_in_one
from tests.csi.conftest import node_config

EXPECTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
}
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
# (required, limit): plausible most of the time, any pair of int64 sometimes.
RANGES = st.one_of(
    st.just((0, 0)),
    st.tuples(st.integers(1, 3 * 2**30), st.just(0)),
    st.tuples(st.integers(0, 2**30), st.integers(0, 2**31)),
    st.tuples(INT64, INT64),
)
MODES = st.one_of(
    st.sampled_from(["SINGLE_NODE_WRITER", "SINGLE_NODE_SINGLE_WRITER"]),
    st.sampled_from(list(csi_pb2.VolumeCapability.AccessMode.Mode.keys())),
)


@pytest.fixture(scope="module")
def client() -> Iterator[CsiClient]:
    """One Ferry for every example: earlier examples' volumes are part of the input."""
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        (base / "kubelet").mkdir()
        # Sparse images cost no space, so the pool's accounting can be large.
        config = node_config(base, capacity=2**40)
        services = start_all_in_one(f"unix://{base}/csi.sock", config, base / "c.db")
        client = CsiClient(f"unix://{base}/csi.sock")
        try:
            client.wait_ready()
            yield client
        finally:
            client.close()
            services.stop(grace_s=0)


@st.composite
def capabilities(draw: st.DrawFn) -> csi_pb2.VolumeCapability:
    kind = draw(st.sampled_from(["mount"] * 4 + ["block", "none"]))
    mode = draw(MODES)
    if kind == "block":
        return block_capability(mode) if mode != "UNKNOWN" else csi_pb2.VolumeCapability()
    cap = mount_capability(mode=mode) if mode != "UNKNOWN" else csi_pb2.VolumeCapability()
    if kind == "mount":
        cap.mount.fs_type = draw(st.sampled_from(["", "ext4", "xfs", "XFS", "ntfs", " ext4 "]))
        cap.mount.mount_flags.extend(draw(st.lists(st.text(max_size=20), max_size=2)))
    return cap


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    name=st.one_of(*[st.text(min_size=1, max_size=300)] * 4, st.just("")),
    capacity=RANGES,
    caps=st.one_of(*[st.lists(capabilities(), min_size=1, max_size=2)] * 4, st.just([])),
    params=st.one_of(
        st.just({}),
        st.just({}),
        st.fixed_dictionaries({"fsType": st.sampled_from(["ext4", "xfs"])}),
        st.dictionaries(
            st.sampled_from(["fsType", "replicas", "csi.storage.k8s.io/pvc/name", "x", ""]),
            st.text(max_size=10),
            max_size=3,
        ),
    ),
)
def test_create_volume_answers_every_input_with_a_spec_code(
    client: CsiClient,
    name: str,
    capacity: tuple[int, int],
    caps: list[csi_pb2.VolumeCapability],
    params: dict[str, str],
) -> None:
    required, limit = capacity
    request = csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit),
        volume_capabilities=caps,
        parameters=params,
    )
    try:
        volume = client.controller.CreateVolume(request, timeout=30).volume
    except grpc.RpcError as exc:
        event(f"refused: {exc.code().name}")  # type: ignore[attr-defined]
        assert exc.code() in EXPECTED, f"{exc.code()}: {exc.details()}"  # type: ignore[attr-defined]
        assert exc.details()  # type: ignore[attr-defined]
    else:
        event("created")
        assert volume.capacity_bytes >= max(required, 0)
        assert not limit or volume.capacity_bytes <= limit
        again = client.controller.CreateVolume(request, timeout=30).volume
        assert again.volume_id == volume.volume_id


SEGMENTS = st.sampled_from(["pods", "..", ".", "", "x", "mount", "link", "a b", "\u00e9"])


@st.composite
def target_paths(draw: st.DrawFn, kubelet: str) -> str:
    parts = draw(st.lists(SEGMENTS, max_size=5))
    prefix = draw(st.sampled_from([kubelet, kubelet + "/pods", "/tmp", "", "relative", "/"]))
    return "/".join([prefix, *parts])


@pytest.mark.root
def test_node_publish_never_acts_outside_the_kubelet_directory(tmp_path: Path) -> None:
    from csi_driver.node.teardown import release_under
    from tests.node.conftest import host_can_mount

    if not host_can_mount():
        pytest.skip("needs root and /dev/loop-control (loop devices, mkfs, mount)")
    kubelet = tmp_path / "kubelet"
    (kubelet / "pods").mkdir(parents=True)
    (kubelet / "pods" / "link").symlink_to(tmp_path)  # a trap: must never be followed
    outside_before = sorted(p.name for p in tmp_path.iterdir())
    services = start_all_in_one(
        f"unix://{tmp_path}/csi.sock", node_config(tmp_path), tmp_path / "c.db"
    )
    client = CsiClient(f"unix://{tmp_path}/csi.sock")
    try:
        client.wait_ready()
        volume = client.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(name="v", volume_capabilities=[mount_capability()])
        ).volume
        staging = str(kubelet / "plugins" / "v" / "globalmount")
        client.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume.volume_id,
                staging_target_path=staging,
                volume_capability=mount_capability(),
            )
        )

        @settings(max_examples=120, deadline=None)
        @given(target=target_paths(str(kubelet)))
        def publish_anywhere(target: str) -> None:
            request = csi_pb2.NodePublishVolumeRequest(
                volume_id=volume.volume_id,
                staging_target_path=staging,
                target_path=target,
                volume_capability=mount_capability(),
            )
            try:
                client.node.NodePublishVolume(request, timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() in {  # type: ignore[attr-defined]
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.FAILED_PRECONDITION,
                }, exc.details()  # type: ignore[attr-defined]
                return
            resolved = Path(target).resolve()
            assert resolved.is_relative_to(kubelet.resolve()) and resolved != kubelet.resolve()
            assert ".." not in Path(target).parts
            client.node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=target)
            )

        publish_anywhere()
        created_outside = sorted(p.name for p in tmp_path.iterdir())
        assert set(created_outside) - set(outside_before) <= {
            "csi.sock", "c.db", "c.db-wal", "c.db-shm", "node-a-agent.sock", "node-a",
            "c.db.leaders-controller.lock",  # the controller election's lock, by its catalog
        }  # fmt: skip
    finally:
        client.close()
        services.stop(grace_s=0)
        release_under(tmp_path)
