"""Teardown leaves nothing attached, or says exactly what it could not remove and why.

Real loop devices, ext4 and mounts under tmp_path. A node killed (SIGKILL)
between ``fsfreeze --freeze`` and ``--unfreeze`` leaves its volume's
filesystem frozen; lazily unmounted as it is, the kernel would keep its
superblock, and its loop device, attached and in no mount table. A teardown
that ran before the fix (or crashed) left exactly that: it is recovered too.
A busy mount or a device a process holds is reported with the process.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from csi_driver.core.errors import InternalError
from csi_driver.core.model import MiB
from csi_driver.node.loop import LoopDevices
from csi_driver.node.runner import CommandRunner
from csi_driver.node.teardown import release_under
from csi_driver.sandbox.scratch import scratch_filesystem
from tests.node.conftest import loops_gone_under, loops_under, requires_root

pytestmark = [requires_root]


def _recover(device: str, base: Path) -> None:
    """Free a frozen filesystem's device whatever the test found: mounting the device
    again reaches its superblock, which can then be thawed and unmounted."""
    again = base / "recover"
    again.mkdir(exist_ok=True)
    if subprocess.run(["mount", device, str(again)], check=False).returncode == 0:
        subprocess.run(["fsfreeze", "--unfreeze", str(again)], check=False)
        subprocess.run(["umount", str(again)], check=False)
    subprocess.run(["losetup", "--detach", device], check=False)


def _attach(image: Path, mkfs: bool = True) -> str:
    subprocess.run(["truncate", "--size", "32M", str(image)], check=True)
    if mkfs:
        subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    return subprocess.run(
        ["losetup", "--show", "--find", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_a_frozen_filesystem_is_thawed_so_its_loop_device_goes(tmp_path: Path) -> None:
    image, mountpoint = tmp_path / "image", tmp_path / "staged"
    mountpoint.mkdir()
    device = _attach(image)
    try:
        subprocess.run(["mount", device, str(mountpoint)], check=True)
        (mountpoint / "data").write_bytes(b"written before the freeze")
        subprocess.run(["fsfreeze", "--freeze", str(mountpoint)], check=True)

        release_under(tmp_path)

        assert loops_gone_under(tmp_path) == []
        assert not (Path("/proc/fs/ext4") / Path(device).name).exists()  # superblock gone
    finally:
        if loops_under(tmp_path):
            _recover(device, tmp_path)
    # Thawed before it went: what was written before the freeze is on the image.
    assert subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True).returncode == 0
    dumped = subprocess.run(
        ["debugfs", "-R", "cat /data", str(image)], capture_output=True, check=True
    ).stdout
    assert dumped == b"written before the freeze"


def test_a_frozen_filesystem_already_lazily_unmounted_is_recovered(tmp_path: Path) -> None:
    """What an earlier teardown (or a crash during one) left: invisible, still attached."""
    image, mountpoint = tmp_path / "image", tmp_path / "staged"
    mountpoint.mkdir()
    device = _attach(image)
    try:
        subprocess.run(["mount", device, str(mountpoint)], check=True)
        subprocess.run(["fsfreeze", "--freeze", str(mountpoint)], check=True)
        subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)
        subprocess.run(["losetup", "--detach", device], check=True)
        assert loops_under(tmp_path) == [device]  # held by the frozen superblock

        release_under(tmp_path)

        assert loops_gone_under(tmp_path) == []
    finally:
        if loops_under(tmp_path):
            _recover(device, tmp_path)
    assert subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True).returncode == 0


def test_a_device_a_process_holds_is_reported_with_the_process(tmp_path: Path) -> None:
    device = _attach(tmp_path / "raw", mkfs=False)  # a raw block volume: nothing to mount
    holder = subprocess.Popen(["sh", "-c", f"exec 3<{device}; exec sleep 120"])
    try:
        with pytest.raises(InternalError) as held:
            release_under(tmp_path, settle_s=1.0)
        raw = tmp_path / "raw"
        assert f"{device} ({raw}): used by pid {holder.pid} (sleep)" in held.value.message
    finally:
        holder.kill()
        holder.wait()
        if device in loops_under(tmp_path):  # a freed device may already serve another test
            subprocess.run(["losetup", "--detach", device], check=False)
    assert loops_gone_under(tmp_path) == []


def test_a_busy_scratch_filesystem_is_not_left_behind_silently(tmp_path: Path) -> None:
    holder: subprocess.Popen[bytes] | None = None
    try:
        with (
            pytest.raises(InternalError) as busy,
            scratch_filesystem(tmp_path, 32 * MiB, ["mkfs.ext4", "-q"]) as mount,
        ):
            holder = subprocess.Popen(["sleep", "120"], cwd=mount)
        assert holder is not None
        assert f"cannot unmount {tmp_path / 'fs'}" in busy.value.message
        assert f"pid {holder.pid} (sleep)" in busy.value.message
        assert any(line.split()[4] == str(tmp_path / "fs") for line in _mountinfo())
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        subprocess.run(["umount", str(tmp_path / "fs")], check=False)
    assert loops_gone_under(tmp_path) == []  # freed itself once the mount went


def _mountinfo() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()


def test_detach_returns_once_the_kernel_let_the_device_go(tmp_path: Path) -> None:
    """A device something still has open is only marked to free itself at its last
    close: detach waits for that, so its caller never meets the device again."""
    device = _attach(tmp_path / "raw", mkfs=False)
    holder = subprocess.Popen(["sh", "-c", f"exec 3<{device}; exec sleep 1"])
    try:
        time.sleep(0.2)  # the holder has the device open (else detach is immediate anyway)
        LoopDevices(CommandRunner()).detach(device)
        assert loops_under(tmp_path) == []
    finally:
        holder.kill()
        holder.wait()
        if device in loops_under(tmp_path):
            subprocess.run(["losetup", "--detach", device], check=False)
