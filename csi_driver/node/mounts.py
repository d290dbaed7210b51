"""Mounts: read the kernel's mount table, mount, bind and unmount.

What is mounted where is always read from ``/proc/self/mountinfo``; Ferry
keeps no copy that could drift from the truth.

Ferry mounts volume filesystems with the kernel's defaults, which keep
fsync durable (write barriers on, ordered data), and refuses mount flags
that would let an fsync return before its data is on the pool's disk
(:data:`UNSAFE_FLAGS`): a volume's users rely on fsync whatever its
StorageClass says.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from csi_driver.core.errors import InvalidArgument
from csi_driver.node.runner import CommandRunner

log = logging.getLogger(__name__)

MOUNTINFO = Path("/proc/self/mountinfo")
_ESCAPE = re.compile(r"\\([0-7]{3})")
# Mount options a caller may pass: plain words and key=value with a tame alphabet.
_FLAG = re.compile(r"^[A-Za-z0-9_.:+-]+(=[A-Za-z0-9_.:,/+-]*)?$")
# Options that would change what is mounted rather than how.
_FORBIDDEN_FLAGS = frozenset({"bind", "rbind", "remount", "move", "make-shared", "make-rshared"})
#: Options that can lose data an fsync acknowledged: no cache flushes
#: (``nobarrier``, ``barrier=0``) or a journal commit written without waiting
#: for the blocks it commits (``journal_async_commit``).
UNSAFE_FLAGS = frozenset({"nobarrier", "barrier=0", "journal_async_commit"})


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    major_minor: str
    root: str  # the path inside the source filesystem that is mounted
    mountpoint: str
    options: tuple[str, ...]  # per-mount options (ro/rw, nosuid, ...)
    fs_type: str
    source: str
    super_options: tuple[str, ...] = ()  # the filesystem's own (data=ordered, ...)

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        tail = right.split()
        if len(fields) < 6 or len(tail) < 2:
            continue
        entries.append(
            MountEntry(
                mount_id=int(fields[0]),
                major_minor=fields[2],
                root=_unescape(fields[3]),
                mountpoint=_unescape(fields[4]),
                options=tuple(fields[5].split(",")),
                fs_type=tail[0],
                source=_unescape(tail[1]),
                super_options=tuple(tail[2].split(",")) if len(tail) > 2 else (),
            )
        )
    return entries


def check_mount_flags(flags: Sequence[str]) -> tuple[str, ...]:
    """Refuse mount flags that are malformed, would change what gets mounted, or
    would weaken fsync."""
    for flag in flags:
        for option in flag.split(","):
            if not _FLAG.match(option) or option.split("=")[0] in _FORBIDDEN_FLAGS:
                raise InvalidArgument(f"mount flag {option!r} is not allowed")
            if option in UNSAFE_FLAGS:
                raise InvalidArgument(
                    f"mount flag {option!r} can lose data that fsync acknowledged; "
                    "remove it from the StorageClass's mountOptions"
                )
    return tuple(flags)


class Mounts:
    def __init__(self, runner: CommandRunner, mountinfo: Path = MOUNTINFO) -> None:
        self._runner = runner
        self._mountinfo = mountinfo

    def table(self) -> list[MountEntry]:
        return parse_mountinfo(self._mountinfo.read_text(encoding="utf-8"))

    def at(self, path: Path) -> MountEntry | None:
        """The topmost mount at exactly ``path``, if any."""
        wanted = str(path)
        found = None
        for entry in self.table():
            if entry.mountpoint == wanted:
                found = entry  # later lines are stacked on top of earlier ones
        return found

    def mount(self, source: str, target: Path, fs_type: str, flags: Sequence[str]) -> None:
        argv = ["mount", "-t", fs_type]
        if flags:
            argv += ["-o", ",".join(check_mount_flags(flags))]
        self._runner.run([*argv, source, str(target)])
        log.info("mounted", extra={"source": source, "target": str(target), "fs": fs_type})

    def bind(self, source: Path | str, target: Path, *, read_only: bool) -> None:
        self._runner.run(["mount", "--bind", str(source), str(target)])
        if read_only:
            # A bind mount inherits the source's flags; read-only takes a remount.
            self.remount_read_only(target)
        log.info(
            "bind mounted",
            extra={"source": str(source), "target": str(target), "read_only": read_only},
        )

    def remount_read_only(self, target: Path) -> None:
        """Make the bind mount at ``target`` read-only (its source stays as it is)."""
        self._runner.run(["mount", "-o", "remount,bind,ro", str(target)])

    def unmount(self, target: Path) -> None:
        """Unmount every mount stacked at ``target``; nothing mounted is fine."""
        while self.at(target) is not None:
            self._runner.run(["umount", str(target)])
            log.info("unmounted", extra={"target": str(target)})
