"""The one door to external commands (mount, losetup, mkfs, ...).

Every command Ferry runs goes through :class:`CommandRunner`: it is logged
with its duration, bounded by a timeout, and a failure becomes a
:class:`~csi_driver.core.errors.CommandFailed` carrying argv, exit code and
stderr. Nothing else in Ferry calls ``subprocess``. Long-running daemons
(the sandbox's etcd and Ferry processes) start here too, detached in their own
session so that they outlive the command that started them.

Commands die with their RPC: inside a call, a command's timeout is the
smaller of its own and what is left of the call's deadline
(``csi_driver.core.deadline``) less :data:`DEADLINE_MARGIN_S`, and a command
whose deadline is already spent is not started at all; both raise
:class:`~csi_driver.core.errors.DeadlineExceeded`. Outside a call (startup
recovery) a command keeps its own timeout. A command whose interruption could
damage a filesystem (``interruptible=False``: offline ``e2fsck`` and
``resize2fs``) is not started on a spent deadline but, once started, runs to
its own timeout.

Each command runs in its own session, so a signal sent to Ferry's process
group (Ctrl-C, ``kill -- -PGID``) does not cut a command short behind
Ferry's back; :meth:`CommandRunner.kill_running` is how Ferry stops the
interruptible ones when it shuts down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from csi_driver.core import deadline
from csi_driver.core.errors import CommandFailed, DeadlineExceeded, Unavailable

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
#: Left of an RPC's deadline when its command is stopped, so the handler can
#: still answer the caller with a clear status before the caller gives up.
DEADLINE_MARGIN_S = 0.5


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration_s: float


@dataclass(frozen=True)
class Daemon:
    pid: int
    argv: tuple[str, ...]
    log_path: Path


class CommandRunner:
    """Runs host commands with a timeout, logging and typed failures."""

    def __init__(self, default_timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._default_timeout = default_timeout_s
        # A fixed locale keeps parsed output (mkfs, xfs_growfs) stable.
        self._env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        self._daemons: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._running: dict[subprocess.Popen[str], tuple[str, ...]] = {}
        self._killed: set[subprocess.Popen[str]] = set()
        #: Counts :meth:`kill_running` calls: a command that sees it move while it was
        #: being started (between its Popen and its record) was missed by a kill.
        self._kills = 0

    def _timeout(self, args: list[str], limit: float, interruptible: bool) -> tuple[float, bool]:
        """The timeout to run with, and whether it is the RPC's deadline that set it."""
        left = deadline.remaining()
        if left is None:
            return limit, False
        usable = left - DEADLINE_MARGIN_S
        if usable <= 0:
            raise DeadlineExceeded(
                f"the RPC's deadline left no time to start {args[0]} "
                f"({' '.join(args)} was not run); the caller's retry resumes from here"
            )
        if interruptible and usable < limit:
            return usable, True
        return limit, False

    def start_daemon(self, argv: Sequence[str], *, log_path: Path) -> Daemon:
        """Start ``argv`` in its own session (its own process group), output appended
        to ``log_path``, and return without waiting: the caller tracks its pid."""
        args = [str(a) for a in argv]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as output:
            try:
                child = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env=self._env,
                    start_new_session=True,
                )
            except FileNotFoundError as exc:
                raise CommandFailed(
                    args, 127, f"{args[0]} is not installed on this host (install it and retry)"
                ) from exc
        self._daemons[child.pid] = child
        log.info("started daemon", extra={"argv": args, "pid": child.pid, "log": str(log_path)})
        return Daemon(child.pid, tuple(args), log_path)

    def reap(self, pid: int) -> None:
        """Collect the exit status of a daemon this runner started, once it has exited
        (so it does not linger as a zombie); other pids are left alone."""
        child = self._daemons.get(pid)
        if child is not None and child.poll() is not None:
            del self._daemons[pid]

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float | None = None,
        ok_codes: Collection[int] = (0,),
        input_text: str | None = None,
        interruptible: bool = True,
    ) -> CommandResult:
        """Run ``argv``; raise :class:`CommandFailed` on a timeout or an exit code
        outside ``ok_codes``, :class:`DeadlineExceeded` when the RPC's deadline
        stops it or leaves no time to start it."""
        args = [str(a) for a in argv]
        limit = self._default_timeout if timeout_s is None else timeout_s
        timeout, by_deadline = self._timeout(args, limit, interruptible)
        started = time.monotonic()
        with self._lock:
            kills_before = self._kills
        try:
            process = subprocess.Popen(
                args,
                stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=self._env,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise CommandFailed(
                args, 127, f"{args[0]} is not installed on this node (install it and retry)"
            ) from exc
        if interruptible:
            with self._lock:
                self._running[process] = tuple(args)
                # A kill that ran while Popen was starting this command found no record
                # of it: it is this command's to carry out, as the kill would have.
                missed = self._kills != kills_before
                if missed:
                    self._killed.add(process)
            if missed:
                _kill_group(process)
        try:
            stdout, stderr = process.communicate(input_text, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            _, stderr = process.communicate()
            waited = time.monotonic() - started
            log.error(
                "command timed out",
                extra={"argv": args, "timeout_s": round(timeout, 3), "by_deadline": by_deadline},
            )
            if by_deadline:
                raise DeadlineExceeded(
                    f"{' '.join(args)} was stopped at the RPC's deadline after {waited:.1f}s; "
                    "retrying resumes the operation where it stopped"
                ) from None
            raise CommandFailed(args, None, stderr) from None
        finally:
            with self._lock:
                self._running.pop(process, None)
                killed = process in self._killed and process.returncode == -signal.SIGKILL
                self._killed.discard(process)
        if killed:
            raise Unavailable(
                f"{' '.join(args)} was stopped because Ferry is shutting down; retry once "
                "it is back"
            )
        duration = time.monotonic() - started
        result = CommandResult(tuple(args), process.returncode, stdout, stderr, duration)
        level = logging.DEBUG if process.returncode in ok_codes else logging.WARNING
        log.log(
            level,
            "ran command",
            extra={
                "argv": args,
                "exit": process.returncode,
                "duration_s": round(duration, 4),
                "stderr": stderr.strip()[-500:],
            },
        )
        if process.returncode not in ok_codes:
            raise CommandFailed(args, process.returncode, stderr or stdout)
        return result

    def kill_running(self) -> list[tuple[str, ...]]:
        """Kill every interruptible command still running; return their argv.

        For shutdown: the calls they ran for have been cancelled, and every
        interruptible command leaves a state that a retry completes. A command
        being started at this moment (its process may exist before the runner
        records it) is killed too, by the thread starting it, and is not among
        those returned.
        """
        with self._lock:
            self._kills += 1
            victims = dict(self._running)
            self._killed.update(victims)
        for process in victims:
            _kill_group(process)
        return list(victims.values())


def _kill_group(process: subprocess.Popen[str]) -> None:
    """Kill a command and whatever it started (its session is its process group):
    a surviving grandchild would hold its output pipes open, and the runner with them."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
