"""A throwaway real filesystem on a loop device, for tests and benchmarks.

Pools with a given filesystem (xfs with reflink, a small ext4 that another
writer fills, ext2 without fallocate) are made this way: a sparse file in a
scratch directory, ``mkfs``, a loop device, a mount. Leaving it releases
everything below the mountpoint first (the volumes' own mounts and loop
devices), then the mount and the loop device, whether or not the body failed.
A mount still busy (a process working below it) is not left behind silently:
leaving raises, naming the processes, and the loop device frees itself once
the mount goes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from csi_driver.node.loop import DETACH_SETTLE_S, LoopDevices
from csi_driver.node.runner import CommandRunner
from csi_driver.node.teardown import release_under, unmount


@contextmanager
def scratch_filesystem(
    base: Path, size: int, mkfs: Sequence[str], name: str = "fs"
) -> Iterator[Path]:
    """A ``size``-byte filesystem made by ``mkfs`` over ``base/<name>.img``, mounted at
    ``base/<name>``."""
    runner = CommandRunner()
    backing, mountpoint = base / f"{name}.img", base / name
    mountpoint.mkdir()
    with open(backing, "wb") as handle:
        handle.truncate(size)
    runner.run([*mkfs, str(backing)])
    device = runner.run(["losetup", "--find", "--show", str(backing)]).stdout.strip()
    unmounted = True
    try:
        runner.run(["mount", device, str(mountpoint)])
        unmounted = False
        try:
            yield mountpoint
        finally:
            release_under(mountpoint, runner)
            unmount(mountpoint, runner)
            unmounted = True
    finally:
        # Once unmounted, the device goes when its last user does (waited for, then
        # warned about: a caller's lazy unmount under a file still open holds it);
        # still mounted, the error says why and it frees itself when the mount goes.
        LoopDevices(runner).detach(device, settle_s=DETACH_SETTLE_S if unmounted else 0)
