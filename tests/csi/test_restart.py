"""Ferry as a real process: killed and restarted, it keeps every volume and mount."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.core.model import MiB
from csi_driver.csi.client import CsiClient, mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.node.loop import LoopDevices
from csi_driver.node.runner import CommandRunner
from csi_driver.node.teardown import release_under
from tests.node.conftest import host_can_mount

pytestmark = [pytest.mark.root, pytest.mark.slow]


class FerryProcess:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.endpoint = f"unix://{base}/csi.sock"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> CsiClient:
        argv = [
            sys.executable, "-m", "csi_driver.cli", "all-in-one",
            "--endpoint", self.endpoint,
            "--catalog", str(self.base / "catalog.db"),
            "--node-id", "node-a",
            "--pool", str(self.base / "pool"),
            "--pool-capacity", "1Gi",
            "--kubelet-dir", str(self.base / "kubelet"),
            "--agent-endpoint", f"unix://{self.base}/agent.sock",
        ]  # fmt: skip
        log = open(self.base / "ferry.log", "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(argv, stdout=log, stderr=log)
        client = CsiClient(self.endpoint)
        client.wait_ready(timeout_s=30)
        return client

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout=30)


@pytest.fixture
def ferry_process(tmp_path: Path) -> Iterator[FerryProcess]:
    if not host_can_mount():
        pytest.skip("needs root and /dev/loop-control (loop devices, mkfs, mount)")
    (tmp_path / "kubelet").mkdir()
    proc = FerryProcess(tmp_path)
    try:
        yield proc
    finally:
        if proc.process and proc.process.poll() is None:
            proc.kill()
        release_under(tmp_path)


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
    assert leaked not in [loop.device for loop in loops.attached()]
    client.close()
    assert ferry_process.kill(signal.SIGTERM) == 0
