"""What the kernel knows about a volume's health: failed I/O and filesystem errors.

A write the kernel could not complete on a loop device (for a thin image on
a full pool: ENOSPC from the pool's filesystem) is reported only in the
kernel log — ``critical space allocation error, dev loop5, sector ...``,
``I/O error, dev loop5, ...``, ``Buffer I/O error on dev loop5, ...``. The
filesystem inside records an error of its own only later, if at all (ext4
does when its journal commit fails, seconds after the lost data writes).
So :class:`KernelLog` reads ``/dev/kmsg`` incrementally and remembers, per
loop device, the first such line since Ferry attached it.

Loop device numbers are reused, and the kernel's own "detected capacity
change" line on attach is rate-limited, so on every attach Ferry writes a
marker (``ferry: loop5 attached to <image>``) into the kernel log: the log
itself then says which errors belong to the current attachment, for every
node agent reading it, across agent restarts. A marker lost to a full ring
buffer is harmless: every line still in the buffer is newer than it.

Filesystem errors are read where the kernel keeps them: ext4 counts them in
its superblock (``/sys/fs/ext4/<dev>/errors_count``, kept across mounts
until ``e2fsck`` repairs the filesystem; the kernel copies the count there
from a work item, moments after the error); an xfs filesystem that has
shut down has no such counter, but answers ``fsync`` with EIO. Both also
log lines the kernel-log reader counts, which show at once.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
import weakref
from pathlib import Path

log = logging.getLogger(__name__)

KMSG = Path("/dev/kmsg")
SYS_FS_EXT4 = Path("/sys/fs/ext4")
# The block layer's "<kind> error, dev loopN, sector ..." and "Buffer I/O error on
# dev loopN" are rate-limited host-wide, so a busy host can drop them; the
# filesystems' own lines about the device are rate-limited per filesystem.
_DEVICE_ERROR = re.compile(
    r"\berror, dev (loop\d+),"
    r"|Buffer I/O error on dev(?:ice)? (loop\d+),"
    r"|EXT4-fs (?:error|warning) \(device (loop\d+)\)"
    r"|EXT4-fs \((loop\d+)\): failed to convert unwritten"
    r"|XFS \((loop\d+)\): .*(?:I/O [Ee]rror|[Ss]hut(?:ting)? down)"
)
# "operation not supported" (BLK_STS_NOTSUPP) is a request type the device does
# not offer (e.g. WRITE_ZEROES once discard is off): nothing was written, and
# the submitter falls back (mkfs writes zero pages instead). Not a failure.
_NOT_SUPPORTED = re.compile(r"\boperation not supported error, dev loop\d+,")
_MARKER = re.compile(r"^ferry: (loop\d+) attached\b")
# The kernel's log level "notice" for the marker line.
_NOTICE = "<5>"
_RECORD_MAX = 8192
_SHUT_DOWN = "xfs has shut down after an error (it answers EIO)"


class KernelLog:
    """Failed I/O per loop device since Ferry attached it, from ``/dev/kmsg``."""

    def __init__(self, path: Path = KMSG) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._unreadable = False
        self._failures: dict[str, str] = {}

    def mark_attached(self, device: str, image: Path) -> None:
        """Record in the kernel log that ``device`` now backs ``image``."""
        name = os.path.basename(device)
        line = f"{_NOTICE}ferry: {name} attached to {image}\n".encode()
        try:
            # A descriptor per line: the kernel rate-limits writes per open file.
            fd = os.open(self._path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning(
                "cannot mark the attach in the kernel log; forgetting earlier errors here only",
                extra={"device": device, "error": str(exc)},
            )
            with self._lock:
                self._read_new()
                self._failures.pop(name, None)

    def failed_io(self, device: str) -> str | None:
        """The first kernel line reporting failed I/O (or a filesystem error) on
        ``device`` since its attach."""
        with self._lock:
            self._read_new()
            return self._failures.get(os.path.basename(device))

    def _read_new(self) -> None:
        if self._unreadable:
            return
        if self._fd is None:
            try:
                self._fd = os.open(self._path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                # Kept open to read only what is new each time; closed with the object.
                weakref.finalize(self, os.close, self._fd)
            except OSError as exc:
                self._unreadable = True
                log.warning(
                    "kernel log unreadable: failed loop I/O will not be reported",
                    extra={"path": str(self._path), "error": str(exc)},
                )
                return
        while True:
            try:
                record = os.read(self._fd, _RECORD_MAX)
            except BlockingIOError:
                return  # read everything logged so far
            except BrokenPipeError:
                continue  # records overwritten before we read them; go on with the rest
            except OSError as exc:
                log.warning("kernel log read failed", extra={"error": str(exc)})
                return
            if not record:
                return
            self._note(record.decode("utf-8", "replace"))

    def _note(self, record: str) -> None:
        # "<prio>,<seq>,<usec>,<flags>;<message>\n" then " KEY=value" lines.
        message = record.partition(";")[2].split("\n", 1)[0].strip()
        marker = _MARKER.match(message)
        if marker:
            self._failures.pop(marker.group(1), None)
            return
        failed = _DEVICE_ERROR.search(message)
        if failed and not _NOT_SUPPORTED.search(message):
            device = next(group for group in failed.groups() if group)
            self._failures.setdefault(device, message)


def ext4_errors(device: str, sys_fs_ext4: Path = SYS_FS_EXT4) -> str | None:
    """What a mounted ext4 on ``device`` has recorded as errors, or None."""
    base = sys_fs_ext4 / os.path.basename(device)
    try:
        count = int((base / "errors_count").read_text(encoding="utf-8"))
        last = (base / "last_error_func").read_text(encoding="utf-8").strip()
    except (FileNotFoundError, ValueError):
        return None  # not mounted (any more), or not ext4
    if not count:
        return None
    return f"ext4 has recorded {count} error(s), the last in {last or 'an unnamed function'}"


def xfs_shut_down(mountpoint: Path) -> str | None:
    """Why the xfs mounted at ``mountpoint`` is unusable, or None if it answers.

    A shut-down xfs refuses every further write; fsync of its root
    directory is the cheapest call that says so (EIO) without writing data.
    """
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EIO:
            return _SHUT_DOWN
        return None  # not there: the caller reports the lost mount
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno == errno.EIO:
            return _SHUT_DOWN
        return None
    finally:
        os.close(fd)
    return None
