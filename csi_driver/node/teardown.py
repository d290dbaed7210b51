"""Release every mount and loop device Ferry made under one directory.

Used by the demo, ``ferry sandbox down`` and the test suites to leave the
host as they found it, whether or not the run succeeded.

A filesystem is thawed before it is unmounted: a node killed while it held
one frozen for a capture (``fsfreeze``) never thaws it, and a frozen
filesystem outlives its lazy unmount: the kernel keeps its superblock, and
so its loop device, attached and invisible (in no mount table) until a
reboot.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from csi_driver.node.filesystem import thaw
from csi_driver.node.loop import LoopDevices
from csi_driver.node.mounts import Mounts
from csi_driver.node.runner import CommandRunner

_UMOUNT_NOT_MOUNTED = 32


def release_under(base: Path, runner: CommandRunner | None = None) -> None:
    """Thaw and unmount everything mounted below ``base`` (deepest first), then
    detach loop devices whose backing file is below it."""
    runner = runner or CommandRunner()
    prefix = str(base.resolve()) + "/"
    for entry in reversed(Mounts(runner).table()):
        if entry.mountpoint.startswith(prefix):
            with contextlib.suppress(OSError):  # not a directory, or gone meanwhile
                thaw(Path(entry.mountpoint))
            runner.run(["umount", "--lazy", entry.mountpoint], ok_codes=(0, _UMOUNT_NOT_MOUNTED))
    loops = LoopDevices(runner)
    for loop in loops.attached():
        if loop.backing_file.startswith(prefix):
            loops.detach(loop.device)
