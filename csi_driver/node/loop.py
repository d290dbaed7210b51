"""Loop devices backing pool images.

The kernel is the source of truth: which loop device backs which image is
read from sysfs, never remembered, so a restarted node service finds its
devices again instead of attaching an image twice.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from csi_driver.core.errors import CommandFailed, InternalError
from csi_driver.node.health import KernelLog
from csi_driver.node.runner import CommandRunner

log = logging.getLogger(__name__)

SYS_BLOCK = Path("/sys/block")
DELETED_SUFFIX = " (deleted)"
SECTOR = 512


@dataclass(frozen=True)
class LoopDevice:
    device: str  # /dev/loopN
    backing_file: str
    deleted: bool  # the backing file was unlinked while attached
    direct_io: bool
    read_only: bool
    size_bytes: int


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
            except (FileNotFoundError, ValueError):
                continue  # not attached, or detached while we looked
            deleted = name.endswith(DELETED_SUFFIX)
            found.append(
                LoopDevice(
                    device=f"/dev/{entry.name}",
                    backing_file=name.removesuffix(DELETED_SUFFIX),
                    deleted=deleted,
                    direct_io=dio,
                    read_only=read_only,
                    size_bytes=sectors * SECTOR,
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
        """Attach ``image`` with direct I/O, or return the device already backing it."""
        existing = self.find(image)
        if existing:
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
        if not self.info(device).direct_io:
            # The pool's filesystem cannot do O_DIRECT (tmpfs, some overlays): the
            # volume still works, through the page cache twice.
            log.warning("direct I/O unavailable for loop device", extra={"device": device})
        log.info("loop attached", extra={"device": device, "image": str(image), "options": options})
        return device

    def info(self, device: str) -> LoopDevice:
        for loop in self.attached():
            if loop.device == device:
                return loop
        raise InternalError(f"{device} is not an attached loop device")

    def detach(self, device: str) -> None:
        """Detach ``device``; a device that is already free is fine."""
        if not any(loop.device == device for loop in self.attached()):
            return
        try:
            self._runner.run(["losetup", "--detach", device])
        except CommandFailed:
            if any(loop.device == device for loop in self.attached()):
                raise
        log.info("loop detached", extra={"device": device})

    def refresh_capacity(self, device: str) -> int:
        """Make the kernel see a grown backing file; return the device's new size."""
        self._runner.run(["losetup", "--set-capacity", device])
        return self.info(device).size_bytes
