"""Release every mount and loop device Ferry made under one directory.

Used by the demo, ``ferry sandbox down`` and the test suites to leave the
host as they found it, whether or not the run succeeded.

Invariants:

- Teardown leaves nothing behind, or raises
  :class:`~csi_driver.core.errors.InternalError` saying exactly what it could
  not remove and why (the processes holding it, when it finds them). It never
  reports success over a mount or loop device that is still there.
- A filesystem is thawed before it is unmounted: a node killed while it held
  one frozen for a capture (``fsfreeze``) never thaws it, and a frozen
  filesystem outlives its lazy unmount: the kernel keeps its superblock, and
  so its loop device, attached and invisible (in no mount table). Such a
  filesystem (left by an earlier teardown or a crash) is recovered by
  mounting its device again, which finds the same superblock, thawing that
  mount and unmounting it: the loop device is then free.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from csi_driver.core.errors import CommandFailed, InternalError
from csi_driver.node.filesystem import thaw
from csi_driver.node.loop import LoopDevices
from csi_driver.node.mounts import Mounts
from csi_driver.node.runner import CommandRunner

_UMOUNT_NOT_MOUNTED = 32
#: How long a busy mount is retried before it counts as held by its users.
BUSY_S = 3.0
#: How long a loop device is given to go after its detach before it counts as held:
#: its last user may be a filesystem lazily unmounted under a file still open
#: (a stopped service's last read), which frees it once that file is closed.
SETTLE_S = 15.0
_POLL_S = 0.05
_FIRST_LOOK_S = 1.0


def release_under(
    base: Path, runner: CommandRunner | None = None, settle_s: float = SETTLE_S
) -> None:
    """Thaw and unmount everything mounted below ``base`` (deepest first), then
    detach loop devices whose backing file is below it (see the module doc),
    waiting ``settle_s`` for each to go."""
    runner = runner or CommandRunner()
    prefix = str(base.resolve()) + "/"
    for entry in reversed(Mounts(runner).table()):
        if entry.mountpoint.startswith(prefix):
            with contextlib.suppress(OSError):  # not a directory, or gone meanwhile
                thaw(Path(entry.mountpoint))
            runner.run(["umount", "--lazy", entry.mountpoint], ok_codes=(0, _UMOUNT_NOT_MOUNTED))
    loops = LoopDevices(runner)
    below = [lp.device for lp in loops.attached() if lp.backing_file.startswith(prefix)]
    release_loops(below, runner, settle_s)


def unmount(mountpoint: Path, runner: CommandRunner | None = None) -> None:
    """Thaw and unmount ``mountpoint`` for good (no lazy unmount); nothing mounted
    there is fine. A mount still busy after :data:`BUSY_S` is an InternalError
    naming the processes that use it."""
    runner = runner or CommandRunner()
    mounts = Mounts(runner)
    deadline = time.monotonic() + BUSY_S
    while mounts.at(mountpoint) is not None:
        with contextlib.suppress(OSError):
            thaw(mountpoint)
        # umount exits 32 both for "not mounted" and "target is busy": the table decides.
        done = runner.run(["umount", str(mountpoint)], ok_codes=(0, _UMOUNT_NOT_MOUNTED))
        if done.returncode == 0 or mounts.at(mountpoint) is None:
            continue
        if time.monotonic() > deadline:
            users = _users(str(mountpoint))
            raise InternalError(
                f"cannot unmount {mountpoint}: {done.stderr.strip() or 'busy'}; "
                f"{_held_by(users)}. Stop them, then unmount it (`umount {mountpoint}`)"
            )
        time.sleep(_POLL_S)


def release_loops(
    devices: Sequence[str], runner: CommandRunner | None = None, settle_s: float = SETTLE_S
) -> None:
    """Detach ``devices`` and wait (``settle_s``) until the kernel has let them go;
    recover one held by a frozen filesystem no mount table shows; else raise saying
    what holds it."""
    runner = runner or CommandRunner()
    loops = LoopDevices(runner)
    # A device is ours while it keeps its backing file: once freed, the same name may
    # already serve someone else, whom teardown must not touch.
    ours = {lp.device: lp.backing_file for lp in loops.attached() if lp.device in devices}
    for device in ours:
        loops.detach(device, settle_s=0)  # one in use is marked to free itself (autoclear)
    # A moment for the usual case (the kernel letting go at once), then the recovery
    # of a frozen filesystem (which nothing else would free), then the long wait.
    held = _still_attached(loops, ours, min(settle_s, _FIRST_LOOK_S))
    for device in held:
        if not _users(device):  # a process holding it open is what is to be named
            _thaw_unmounted(device, runner)
    held = _still_attached(loops, {d: ours[d] for d in held}, settle_s)
    if held:
        reasons = "; ".join(
            f"{device} ({ours[device]}): {_why_held(device, runner)}" for device in held
        )
        raise InternalError(f"loop devices still attached after detaching them: {reasons}")


def _still_attached(loops: LoopDevices, ours: dict[str, str], settle_s: float) -> list[str]:
    deadline = time.monotonic() + settle_s
    while True:
        attached = {(lp.device, lp.backing_file) for lp in loops.attached()}
        left = [d for d, backing in ours.items() if (d, backing) in attached]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(_POLL_S)


def _thaw_unmounted(device: str, runner: CommandRunner) -> None:
    """Mount ``device`` again (the kernel hands back its superblock if one is still
    alive), thaw that mount and unmount it, so a frozen filesystem's last user goes."""
    if any(entry.source == device for entry in Mounts(runner).table()):
        return  # mounted where we can see it: not this case
    scratch = Path(tempfile.mkdtemp(prefix="ferry-thaw-"))
    try:
        try:
            runner.run(["mount", device, str(scratch)])
        except CommandFailed:
            return  # no filesystem on it (a raw block volume), or not mountable: reported
        try:
            thaw(scratch)
        finally:
            runner.run(["umount", str(scratch)], ok_codes=(0, _UMOUNT_NOT_MOUNTED))
    finally:
        with contextlib.suppress(OSError):
            scratch.rmdir()


def _why_held(device: str, runner: CommandRunner) -> str:
    mounted = [e.mountpoint for e in Mounts(runner).table() if e.source == device]
    if mounted:
        return f"mounted at {', '.join(mounted)}"
    users = _users(device)
    if users:
        return _held_by(users)
    return (
        "held by no process this host shows and mounted nowhere here (a mount in "
        "another mount namespace, or a filesystem that could not be thawed); find it "
        f"with `grep {os.path.basename(device)} /proc/*/mountinfo`"
    )


def _users(path: str) -> dict[int, str]:
    """Processes with ``path`` (or a file below it) open, as cwd or as root: pid to
    command name."""
    below = path.rstrip("/") + "/"
    found: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        links = [proc / "cwd", proc / "root"]
        with contextlib.suppress(OSError):
            links += list((proc / "fd").iterdir())
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == path or target.startswith(below):
                with contextlib.suppress(OSError):
                    found[int(proc.name)] = (proc / "comm").read_text().strip()
                break
    return found


def _held_by(users: dict[int, str]) -> str:
    if not users:
        return "no process holds it open (a mount below it, or the kernel)"
    return "used by " + ", ".join(f"pid {pid} ({name})" for pid, name in sorted(users.items()))
