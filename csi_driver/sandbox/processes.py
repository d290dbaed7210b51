"""The sandbox's processes as the kernel sees them, read from ``/proc``.

A pid alone is not an identity: after a crash and a reboot of the tools, the
pid a state file remembers may belong to somebody else. A process is
therefore known by (pid, start time in clock ticks), and a zombie counts as
gone. Processes the state file never learnt about (a crash between start and
save) are found by the network namespace they run in.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Collection, Iterable
from pathlib import Path

from csi_driver.sandbox.state import ProcessRecord

PROC = Path("/proc")
_POLL_S = 0.05


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None if it is not running."""
    try:
        stat = (PROC / str(pid) / "stat").read_text(encoding="utf-8")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    state, started = fields[0], fields[19]
    return None if state in ("Z", "X") else int(started)


def is_running(record: ProcessRecord) -> bool:
    return start_ticks(record.pid) == record.start_ticks


def _namespace_inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except (FileNotFoundError, PermissionError):
        return None


def pids_in_namespaces(netns_files: Iterable[Path]) -> list[int]:
    """Every live process whose network namespace is one of ``netns_files``."""
    wanted = {ino for ino in (_namespace_inode(p) for p in netns_files) if ino is not None}
    if not wanted:
        return []
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            link = os.readlink(entry / "ns" / "net")  # "net:[4026532281]"
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        if int(link[link.index("[") + 1 : -1]) in wanted and start_ticks(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def signal_process(pid: int, signum: signal.Signals, *, group: bool) -> None:
    """Send ``signum`` to ``pid`` (and its process group when it leads one)."""
    try:
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        pass  # already gone


def wait_gone(pids: Collection[int], timeout_s: float) -> list[int]:
    """Wait until none of ``pids`` runs; return those still running at the deadline."""
    deadline = time.monotonic() + timeout_s
    remaining = [pid for pid in pids if start_ticks(pid) is not None]
    while remaining and time.monotonic() < deadline:
        time.sleep(_POLL_S)
        remaining = [pid for pid in remaining if start_ticks(pid) is not None]
    return remaining
