"""Filesystems on volume devices: probe, create (first use only), grow."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from csi_driver.core.errors import CommandFailed, FailedPrecondition
from csi_driver.core.model import FsType
from csi_driver.node.runner import CommandRunner

log = logging.getLogger(__name__)

# blkid's exit status when it found no signature at all.
_BLKID_NOTHING = 2
MKFS_TIMEOUT_S = 600.0

#: 4 KiB blocks and sectors whatever the volume's size: the pool's filesystem
#: allocates in 4 KiB blocks, and a smaller write lands inside one of them,
#: which the pool's filesystem handles on a slower path (ext4 serialises
#: sub-block direct I/O). Debian's mke2fs.conf picks 1 KiB blocks below
#: 512 MiB, and mkfs.xfs copies the loop device's 512-byte sectors into its log.
FS_BLOCK = "4096"

_MKFS: dict[FsType, list[str]] = {
    # No discard: the image already reads as zeros. Inode tables are zeroed by
    # mkfs, not lazily after mount: the kernel's lazy init zeroes them with
    # "write zeroes" requests, which a loop device turns into holes punched
    # in the image, undoing a thick image's reservation, and its writes
    # compete with the volume's first I/O. mkfs zeroes them with
    # FALLOC_FL_ZERO_RANGE on the device, which keeps the blocks allocated and
    # writes no data. The journal needs no zeroing: the image reads as zeros.
    FsType.EXT4: [
        "mkfs.ext4",
        "-F",
        "-q",
        "-m",
        "0",
        "-b",
        FS_BLOCK,
        "-E",
        "nodiscard,lazy_itable_init=0,lazy_journal_init=1",
    ],
    FsType.XFS: ["mkfs.xfs", "-f", "-q", "-K", "-s", f"size={FS_BLOCK}"],
}


class Filesystems:
    def __init__(self, runner: CommandRunner) -> None:
        self._runner = runner

    def probe(self, device: str) -> str | None:
        """The signature on ``device`` (``ext4``, ``xfs``, ``dos``...), or None if blank."""
        result = self._runner.run(
            ["blkid", "--probe", "--output", "value", "--match-tag", "TYPE", device],
            ok_codes=(0, _BLKID_NOTHING),
        )
        if result.returncode == _BLKID_NOTHING:
            # No filesystem; make sure there is no partition table either.
            parts = self._runner.run(
                ["blkid", "--probe", "--output", "value", "--match-tag", "PTTYPE", device],
                ok_codes=(0, _BLKID_NOTHING),
            )
            return parts.stdout.strip() or None
        return result.stdout.strip() or None

    def needs_mkfs(self, device: str, fs_type: FsType) -> bool:
        """True if ``device`` is blank; False if it already holds ``fs_type``.

        Never says yes to a device that holds anything else: a different
        filesystem or partition table is refused, so a wrong StorageClass
        cannot wipe data.
        """
        found = self.probe(device)
        if found == fs_type.value:
            return False
        if found is not None:
            raise FailedPrecondition(
                f"{device} already holds {found!r}, not {fs_type.value}: Ferry does not "
                "reformat volumes; request the volume's existing fsType"
            )
        return True

    def mkfs(self, device: str, fs_type: FsType, *, encrypted: bool = False) -> None:
        """Create ``fs_type`` on ``device``, whatever it holds: callers check first.

        ``encrypted`` turns on ext4's ``encrypt`` feature, without which the
        kernel refuses to give a directory an fscrypt policy.
        """
        argv = [*_MKFS[fs_type]]
        if encrypted:
            if fs_type is not FsType.EXT4:
                raise FailedPrecondition(
                    f"{fs_type.value} has no filesystem encryption; encrypted volumes are ext4"
                )
            argv += ["-O", "encrypt"]
        self._runner.run([*argv, device], timeout_s=MKFS_TIMEOUT_S)
        log.info(
            "filesystem created",
            extra={"device": device, "fs": fs_type.value, "encrypted": encrypted},
        )

    def wipe(self, path: str) -> None:
        """Erase every filesystem signature on ``path`` (a device or an image file)."""
        self._runner.run(["wipefs", "--all", "--quiet", path])
        log.info("signatures wiped", extra={"path": path})

    def grow(self, device: str, mountpoint: Path, fs_type: FsType) -> None:
        """Grow a mounted filesystem to fill its (already grown) device."""
        if fs_type is FsType.EXT4:
            try:
                self._runner.run(["resize2fs", device], timeout_s=MKFS_TIMEOUT_S)
            except CommandFailed as exc:
                if "Permission denied" not in exc.stderr:
                    raise
                raise FailedPrecondition(
                    "the kernel refused to grow ext4 while mounted: the Ferry node service "
                    "lacks CAP_SYS_RESOURCE (run it privileged). Unstaging and restaging the "
                    "volume grows it offline instead."
                ) from exc
        else:
            self._runner.run(["xfs_growfs", "-d", str(mountpoint)], timeout_s=MKFS_TIMEOUT_S)
        log.info("filesystem grown", extra={"device": device, "fs": fs_type.value})

    def freeze(self, mountpoint: Path) -> None:
        """Flush a mounted filesystem and block its writers until :meth:`thaw`."""
        self._runner.run(["fsfreeze", "--freeze", str(mountpoint)])

    def thaw(self, mountpoint: Path, *, if_frozen: bool = False) -> None:
        """Let writers of a frozen filesystem go on. Never cut short: a filesystem
        left frozen hangs every writer of the volume. ``if_frozen``: a filesystem
        that is not frozen is fine (the kernel answers EINVAL, fsfreeze exits 1)."""
        self._runner.run(
            ["fsfreeze", "--unfreeze", str(mountpoint)],
            ok_codes=(0, 1) if if_frozen else (0,),
            interruptible=False,
        )

    def ext4_size(self, device: str) -> int:
        """The size in bytes an ext4 filesystem on ``device`` spans."""
        result = self._runner.run(["dumpe2fs", "-h", device])
        fields = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
        return int(fields["Block count"]) * int(fields["Block size"])

    def grow_unmounted(self, device: str, fs_type: FsType, device_bytes: int) -> bool:
        """Grow an unmounted ext4 filesystem that is smaller than its device.

        This is how a volume expanded while it was not staged (or whose online
        grow was refused) catches up: at its next stage, before it is mounted.
        xfs can only grow mounted; :meth:`grow` handles it after mounting.
        """
        if fs_type is not FsType.EXT4 or self.ext4_size(device) >= device_bytes:
            return False
        # resize2fs insists on a freshly checked filesystem; -p repairs only what is safe.
        # Offline repair and resize rewrite metadata in place: cut short, they could leave
        # a filesystem no retry can mount, so the RPC's deadline does not interrupt them.
        self._runner.run(
            ["e2fsck", "-f", "-p", device],
            ok_codes=(0, 1),
            timeout_s=MKFS_TIMEOUT_S,
            interruptible=False,
        )
        self._runner.run(["resize2fs", device], timeout_s=MKFS_TIMEOUT_S, interruptible=False)
        log.info("filesystem grown before mount", extra={"device": device, "bytes": device_bytes})
        return True


# linux/fs.h: _IOWR('X', 119, int) and _IOWR('X', 120, int).
_FIFREEZE = 0xC0045877
_FITHAW = 0xC0045878


@contextlib.contextmanager
def frozen(mountpoint: Path) -> Iterator[None]:
    """Hold the filesystem mounted at ``mountpoint`` frozen (FIFREEZE): its dirty data
    is flushed and writes block until the thaw, so an image copied meanwhile is
    crash-consistent. An ioctl on a descriptor Ferry opens, so no external command.
    A process killed while frozen leaves it frozen: :func:`thaw` at the next start.
    """
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.ioctl(fd, _FIFREEZE, 0)
        except OSError as exc:
            raise FailedPrecondition(f"cannot freeze {mountpoint}: {exc.strerror}") from exc
        try:
            yield
        finally:
            fcntl.ioctl(fd, _FITHAW, 0)
    finally:
        os.close(fd)


def thaw(mountpoint: Path) -> bool:
    """Thaw the filesystem at ``mountpoint``; True if it was frozen."""
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, _FITHAW, 0)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # not frozen
            return False
        raise
    finally:
        os.close(fd)
    return True
