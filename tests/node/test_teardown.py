"""release_under leaves nothing attached, even a filesystem a killed node left frozen.

Real loop device, ext4 and mount under tmp_path. A node killed (SIGKILL)
between ``fsfreeze --freeze`` and ``--unfreeze`` leaves its volume's
filesystem frozen; lazily unmounted as it is, the kernel would keep its
superblock, and its loop device, attached and in no mount table.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from csi_driver.node.teardown import release_under
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


def test_a_frozen_filesystem_is_thawed_so_its_loop_device_goes(tmp_path: Path) -> None:
    image, mountpoint = tmp_path / "image", tmp_path / "staged"
    mountpoint.mkdir()
    subprocess.run(["truncate", "--size", "32M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    device = subprocess.run(
        ["losetup", "--show", "--find", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
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
