"""Loop devices backing pool images.

The kernel is the source of truth: which loop device backs which image is
read from sysfs, never remembered, so a restarted node service finds its
devices again instead of attaching an image twice.

Every device Ferry attaches uses direct I/O (no second page cache over the
image) and no I/O scheduler of its own (:data:`SCHEDULER`). Neither weakens
durability: the device keeps its volatile write cache flag, so a volume's
fsync still reaches the loop device as a flush, which the kernel turns into
an fsync of the image on the pool's filesystem. The logical block size is
left at the kernel's default (512 bytes, or the pool disk's own when it is
larger): it is part of what a volume's contents assume (an xfs made with
512-byte sectors does not mount on a 4096-byte device, and a raw block
volume's application may do 512-byte direct I/O), so Ferry aligns the
filesystems it creates to 4 KiB instead (see ``filesystem.py``).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from csi_driver.core.errors import CommandFailed, InternalError
from csi_driver.node.health import KernelLog
from csi_driver.node.runner import CommandRunner

log = logging.getLogger(__name__)

SYS_BLOCK = Path("/sys/block")
#: What sysfs answers for a loop device detached under our feet.
_GONE = frozenset({errno.ENOENT, errno.ENODEV, errno.ENXIO})
DELETED_SUFFIX = " (deleted)"
#: How long :meth:`LoopDevices.detach` waits for the kernel to let a device go.
DETACH_SETTLE_S = 5.0
_SETTLE_POLL_S = 0.02
SECTOR = 512
#: The loop device only hands requests to its worker thread, which submits
#: them to the pool's filesystem; the pool disk's own queue schedules them.
#: A scheduler here adds a lock and a queue per request and nothing to
#: schedule (mq-deadline was the slowest setting for random writes in
#: docs/benchmarks.md), and udev rules on some distributions give one to
#: "rotational" devices, which a loop device over a virtual disk claims to be.
SCHEDULER = "none"


@dataclass(frozen=True)
class LoopDevice:
    device: str  # /dev/loopN
    backing_file: str
    deleted: bool  # the backing file was unlinked while attached
    direct_io: bool
    read_only: bool
    size_bytes: int
    scheduler: str  # the queue's active I/O scheduler
    write_cache: bool  # flushes reach the loop device (and become fsyncs of the image)


class LoopDevices:
    """Attach, find and detach loop devices, through the command runner."""

    def __init__(
        self,
        runner: CommandRunner,
        sys_block: Path = SYS_BLOCK,
        kernel_log: KernelLog | None = None,
    ) -> None:
        self._runner = runner
        self._sys_block = sys_block
        self._kernel_log = kernel_log

    def attached(self) -> list[LoopDevice]:
        """Every attached loop device with its backing file."""
        found = []
        for entry in sorted(self._sys_block.glob("loop*")):
            backing = entry / "loop" / "backing_file"
            try:
                name = backing.read_text(encoding="utf-8").rstrip("\n")
                dio = (entry / "loop" / "dio").read_text(encoding="utf-8").strip() == "1"
                sectors = int((entry / "size").read_text(encoding="utf-8"))
                read_only = (entry / "ro").read_text(encoding="utf-8").strip() == "1"
            except (OSError, ValueError) as exc:
                # Not attached, or detached while we looked: sysfs then answers
                # ENOENT, or ENODEV while the kernel tears the binding down.
                if isinstance(exc, OSError) and exc.errno not in _GONE:
                    raise
                continue
            # Reported, never required: a device is found by its backing file alone.
            scheduler = _active_choice(_read_optional(entry / "queue" / "scheduler"))
            cache = _read_optional(entry / "queue" / "write_cache")
            deleted = name.endswith(DELETED_SUFFIX)
            found.append(
                LoopDevice(
                    device=f"/dev/{entry.name}",
                    backing_file=name.removesuffix(DELETED_SUFFIX),
                    deleted=deleted,
                    direct_io=dio,
                    read_only=read_only,
                    size_bytes=sectors * SECTOR,
                    scheduler=scheduler,
                    write_cache=cache == "write back",
                )
            )
        return found

    def find(self, image: Path) -> str | None:
        """The writable loop device backing ``image``, if one is attached."""
        wanted = os.path.realpath(image)
        for loop in self.attached():
            if loop.backing_file == wanted and not loop.deleted and not loop.read_only:
                return loop.device
        return None

    def attach(self, image: Path) -> str:
        """Attach ``image`` with direct I/O, or return the device already backing it,
        sized to the image as it is now."""
        existing = self.find(image)
        if existing:
            self._tune(existing)  # it may predate the settings this version chooses
            # It may predate the image's growth too (left attached by a node killed
            # after unmounting it, or not let go by the kernel yet): the filesystem
            # grows into what the device shows.
            if self.info(existing).size_bytes < os.stat(image).st_size:
                self.refresh_capacity(existing)
            return existing
        return self._attach(["--nooverlap"], image)

    def attach_read_only(self, image: Path) -> str:
        """A new read-only loop device over ``image`` (one per read-only user)."""
        return self._attach(["--read-only"], image)

    def _attach(self, options: list[str], image: Path) -> str:
        result = self._runner.run(
            ["losetup", "--find", "--show", "--direct-io=on", *options, str(image)]
        )
        device = result.stdout.strip()
        if not device.startswith("/dev/loop"):
            raise InternalError(f"losetup attached {image} but printed {device!r}")
        if self._kernel_log is not None:
            # Kernel errors for this device number from now on are this image's.
            self._kernel_log.mark_attached(device, image)
        self._tune(device)
        if not self.info(device).direct_io:
            # The pool's filesystem cannot do O_DIRECT (ramfs, tmpfs before Linux 6.6,
            # some overlays): the volume still works, through the page cache twice.
            log.warning("direct I/O unavailable for loop device", extra={"device": device})
        log.info("loop attached", extra={"device": device, "image": str(image), "options": options})
        return device

    def _tune(self, device: str) -> None:
        """Give ``device`` Ferry's queue settings (module docstring); idempotent."""
        scheduler = self._sys_block / device.removeprefix("/dev/") / "queue" / "scheduler"
        try:
            scheduler.write_text(SCHEDULER, encoding="utf-8")
        except OSError as exc:
            # Only speed depends on it: the volume works with any scheduler.
            log.warning(
                "could not set the loop device's I/O scheduler",
                extra={"device": device, "scheduler": SCHEDULER, "error": str(exc)},
            )

    def info(self, device: str) -> LoopDevice:
        for loop in self.attached():
            if loop.device == device:
                return loop
        raise InternalError(f"{device} is not an attached loop device")

    def detach(self, device: str, settle_s: float = DETACH_SETTLE_S) -> None:
        """Detach ``device``; a device that is already free is fine.

        Returns once the kernel has let the device go, or after ``settle_s``
        with a warning (0: at once, for a caller that waits its own way).
        ``losetup --detach`` of a device that something still has open (udev
        probing it after an unmount, say) only marks it to free itself at its
        last close, and a caller that goes on at once would find it still
        attached (a delete refused, a stage reusing it).
        """
        if not any(loop.device == device for loop in self.attached()):
            return
        try:
            self._runner.run(["losetup", "--detach", device])
        except CommandFailed:
            if any(loop.device == device for loop in self.attached()):
                raise
        settled = time.monotonic() + settle_s
        while settle_s > 0 and any(loop.device == device for loop in self.attached()):
            if time.monotonic() > settled:
                log.warning(
                    "loop device still held after detaching it; it frees itself at its last close",
                    extra={"device": device, "waited_s": settle_s},
                )
                return
            time.sleep(_SETTLE_POLL_S)
        log.info("loop detached", extra={"device": device})

    def refresh_capacity(self, device: str) -> int:
        """Make the kernel see a grown backing file; return the device's new size."""
        self._runner.run(["losetup", "--set-capacity", device])
        return self.info(device).size_bytes


def _read_optional(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        if exc.errno not in _GONE:
            raise
        return ""


def _active_choice(text: str) -> str:
    """The bracketed entry of a sysfs choice list: ``none [mq-deadline] bfq``."""
    start, end = text.find("["), text.find("]")
    if start < 0 or end < start:
        return text.strip()
    return text[start + 1 : end]
