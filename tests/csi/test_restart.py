"""Ferry as a real process: killed and restarted, it keeps every volume and mount."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.core.model import MiB
from csi_driver.core.records import IMAGE_SPECS, ImageSpec, NodeAccounting, decode
from csi_driver.csi.client import CsiClient, block_capability, mount_capability
from csi_driver.faults import CRASH_FILE_ENV
from csi_driver.gen import csi_pb2
from csi_driver.node.loop import LoopDevices
from csi_driver.node.runner import CommandRunner
from csi_driver.node.teardown import release_under
from csi_driver.store.catalog import Catalog
from csi_driver.store.records import read
from csi_driver.store.url import open_store
from tests.node.conftest import host_can_mount

pytestmark = [pytest.mark.root, pytest.mark.slow]


NODE_ARGS = ("--node-id", "node-a", "--pool-capacity", "1Gi")


class FerryProcess:
    """``ferry <command>`` as a child process serving a unix socket under ``base``."""

    def __init__(self, base: Path, command: str = "all-in-one", name: str = "csi") -> None:
        self.base = base
        self.command = command
        self.endpoint = f"unix://{base}/{name}.sock"
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        argv = [
            sys.executable, "-m", "csi_driver.cli", self.command,
            "--endpoint", self.endpoint,
            "--catalog", str(self.base / "catalog.db"),
        ]  # fmt: skip
        if self.command != "controller":
            argv += [
                *NODE_ARGS,
                "--pool", str(self.base / "pool"),
                "--kubelet-dir", str(self.base / "kubelet"),
                "--agent-endpoint", f"unix://{self.base}/agent.sock",
            ]  # fmt: skip
        return argv

    def start(self) -> CsiClient:
        log = open(self.base / f"{self.command}.log", "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(self.argv(), stdout=log, stderr=log)
        client = CsiClient(self.endpoint)
        client.wait_ready(timeout_s=30)
        return client

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout=30)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[FerryProcess]]:
    """Processes a test starts; all are killed and the host cleaned afterwards."""
    if not host_can_mount():
        pytest.skip("needs root and /dev/loop-control (loop devices, mkfs, mount)")
    (tmp_path / "kubelet").mkdir()
    started: list[FerryProcess] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.process and proc.process.poll() is None:
                proc.kill()
        release_under(tmp_path)


@pytest.fixture
def ferry_process(tmp_path: Path, processes: list[FerryProcess]) -> FerryProcess:
    proc = FerryProcess(tmp_path)
    processes.append(proc)
    return proc


def test_killed_ferry_restarts_with_its_volumes_mounts_and_data(
    ferry_process: FerryProcess,
) -> None:
    base = ferry_process.base
    staging = str(base / "kubelet" / "plugins" / "v" / "globalmount")
    target = str(base / "kubelet" / "pods" / "p" / "volumes" / "mount")
    client = ferry_process.start()
    volume = client.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name="pvc-restart",
            capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
            volume_capabilities=[mount_capability()],
        )
    ).volume
    vid = volume.volume_id
    stage = csi_pb2.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=staging, volume_capability=mount_capability()
    )
    publish = csi_pb2.NodePublishVolumeRequest(
        volume_id=vid,
        staging_target_path=staging,
        target_path=target,
        volume_capability=mount_capability(),
    )
    client.node.NodeStageVolume(stage)
    client.node.NodePublishVolume(publish)
    (Path(target) / "acknowledged").write_bytes(b"x" * MiB)
    os.sync()
    client.close()
    ferry_process.kill(signal.SIGKILL)

    # A loop device left by a crash between attach and record must be freed.
    leaked_image = base / "pool" / "images" / f"vol-{'f' * 32}.img"
    leaked_image.write_bytes(b"\0" * MiB)
    (base / "pool" / "images" / f"vol-{'f' * 32}.json").write_text('{"epoch": 1}')
    loops = LoopDevices(CommandRunner())
    leaked = loops.attach(leaked_image)

    client = ferry_process.start()
    listed = client.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
    assert [e.volume.volume_id for e in listed] == [vid]
    client.node.NodeStageVolume(stage)  # kubelet repeats after a plugin restart
    client.node.NodePublishVolume(publish)
    assert (Path(target) / "acknowledged").read_bytes() == b"x" * MiB
    backing = os.path.realpath(base / "pool" / "images" / f"{vid}.img")
    assert [loop.device for loop in loops.attached() if loop.backing_file == backing] != []
    assert len([loop for loop in loops.attached() if loop.backing_file == backing]) == 1
    # By backing file, not device name: a parallel test may reuse the freed name at once.
    leaked_backing = os.path.realpath(leaked_image)
    assert leaked.startswith("/dev/loop")
    assert not [loop for loop in loops.attached() if loop.backing_file == leaked_backing]
    client.close()
    assert ferry_process.kill(signal.SIGTERM) == 0


def test_controller_and_node_as_separate_processes(
    tmp_path: Path, processes: list[FerryProcess]
) -> None:
    node_process = FerryProcess(tmp_path, "node", "node")
    controller_process = FerryProcess(tmp_path, "controller", "controller")
    processes += [node_process, controller_process]
    node = node_process.start()  # registers its agent in the shared catalog
    controller = controller_process.start()
    volume = controller.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name="pvc-split",
            capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MiB),
            volume_capabilities=[mount_capability()],
        )
    ).volume
    assert (tmp_path / "pool" / "images" / f"{volume.volume_id}.img").stat().st_size == 32 * MiB
    info = node.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    context = controller.controller.ControllerPublishVolume(
        csi_pb2.ControllerPublishVolumeRequest(
            volume_id=volume.volume_id, node_id=info.node_id, volume_capability=mount_capability()
        )
    ).publish_context
    staging = str(tmp_path / "kubelet" / "plugins" / "split" / "globalmount")
    node.node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=volume.volume_id,
            staging_target_path=staging,
            volume_capability=mount_capability(),
            publish_context=context,
        )
    )
    assert os.path.ismount(staging)
    capabilities = controller.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    node_capabilities = node.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    # The controller adds the Controller and GroupController services.
    assert len(capabilities.capabilities) == len(node_capabilities.capabilities) + 2
    node.close()
    controller.close()


@pytest.mark.parametrize(
    ("step", "committed"),
    [("node:image:created-ahead", False), ("node:image:ahead-committed", True)],
)
def test_a_crash_around_the_one_txn_create_orphans_nothing(
    ferry_process: FerryProcess, monkeypatch: pytest.MonkeyPatch, step: str, committed: bool
) -> None:
    """The all-in-one on SQLite makes a new volume's image durable before the one txn
    that writes every record of it. Killed between the two, its next start removes
    the image nothing refers to; killed after the txn, it keeps it for the volume.
    Either way the pool holds exactly the catalog's images and the node's accounting
    equals their sizes."""
    base = ferry_process.base
    crash = base / "crash"
    crash.write_text(f"{step}\n")
    monkeypatch.setenv(CRASH_FILE_ENV, str(crash))
    request = csi_pb2.CreateVolumeRequest(
        name="pvc-ahead",
        capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MiB),
        volume_capabilities=[block_capability()],
    )
    client = ferry_process.start()
    with pytest.raises(grpc.RpcError) as died:
        client.controller.CreateVolume(request, timeout=30)
    assert died.value.code() == grpc.StatusCode.UNAVAILABLE
    client.close()
    assert ferry_process.process is not None
    assert ferry_process.process.wait(30) == -signal.SIGKILL
    images = base / "pool" / "images"
    ahead = sorted(p.name for p in images.iterdir() if p.name.endswith(".ahead"))
    assert len(ahead) == 2, sorted(p.name for p in images.iterdir())
    volume_id = ahead[0].split(".")[0]
    assert ahead == [f"{volume_id}.img.ahead", f"{volume_id}.json.ahead"]
    store = open_store(base / "catalog.db")
    try:
        assert (Catalog(store).get_volume(volume_id) is not None) == committed

        client = ferry_process.start()
        assert not [p.name for p in images.iterdir() if p.name.endswith(".ahead")]
        assert (images / f"{volume_id}.img").exists() == committed
        again = client.controller.CreateVolume(request, timeout=30).volume
        assert (again.volume_id == volume_id) == committed
        specs = [decode(ImageSpec, r.value) for r in store.list(IMAGE_SPECS)]
        assert [s.volume_id for s in specs] == [again.volume_id]
        on_disk = sorted(p.name for p in images.iterdir() if not p.name.startswith("."))
        assert on_disk == [f"{again.volume_id}.img", f"{again.volume_id}.json"]
        account = read(store, NodeAccounting, NodeAccounting("node-a").key)
        assert account is not None
        assert (account.value.provisioned_bytes, account.value.volume_count) == (16 * MiB, 1)
        client.close()
    finally:
        store.close()
    assert ferry_process.kill(signal.SIGTERM) == 0
