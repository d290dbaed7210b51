"""Release every mount and loop device Ferry made under one directory.

Used by the demo and the test suites to leave the host as they found it,
whether or not the run succeeded.
"""

from __future__ import annotations

from pathlib import Path

from csi_driver.node.loop import LoopDevices
from csi_driver.node.mounts import Mounts
from csi_driver.node.runner import CommandRunner

_UMOUNT_NOT_MOUNTED = 32


def release_under(base: Path, runner: CommandRunner | None = None) -> None:
    """Unmount everything mounted below ``base`` (deepest first), then detach
    loop devices whose backing file is below it."""
    runner = runner or CommandRunner()
    prefix = str(base.resolve()) + "/"
    for entry in reversed(Mounts(runner).table()):
        if entry.mountpoint.startswith(prefix):
            runner.run(["umount", "--lazy", entry.mountpoint], ok_codes=(0, _UMOUNT_NOT_MOUNTED))
    loops = LoopDevices(runner)
    for loop in loops.attached():
        if loop.backing_file.startswith(prefix):
            loops.detach(loop.device)
