"""The one door to external commands (mount, losetup, mkfs, ...).

Every command Ferry runs goes through :class:`CommandRunner`: it is logged
with its duration, bounded by a timeout, and a failure becomes a
:class:`~csi_driver.core.errors.CommandFailed` carrying argv, exit code and
stderr. Nothing else in Ferry calls ``subprocess``. Long-running daemons
(the sandbox's etcd and Ferry processes) start here too, detached in their own
session so that they outlive the command that started them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from csi_driver.core.errors import CommandFailed

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0


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
    ) -> CommandResult:
        """Run ``argv``; raise :class:`CommandFailed` on a timeout or an exit code
        outside ``ok_codes``."""
        args = [str(a) for a in argv]
        timeout = self._default_timeout if timeout_s is None else timeout_s
        started = time.monotonic()
        try:
            done = subprocess.run(
                args,
                input=input_text,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self._env,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            log.error(
                "command timed out",
                extra={"argv": args, "timeout_s": timeout},
            )
            raise CommandFailed(args, None, str(exc.stderr or "")) from exc
        except FileNotFoundError as exc:
            raise CommandFailed(
                args, 127, f"{args[0]} is not installed on this node (install it and retry)"
            ) from exc
        duration = time.monotonic() - started
        result = CommandResult(tuple(args), done.returncode, done.stdout, done.stderr, duration)
        level = logging.DEBUG if done.returncode in ok_codes else logging.WARNING
        log.log(
            level,
            "ran command",
            extra={
                "argv": args,
                "exit": done.returncode,
                "duration_s": round(duration, 4),
                "stderr": done.stderr.strip()[-500:],
            },
        )
        if done.returncode not in ok_codes:
            raise CommandFailed(args, done.returncode, done.stderr or done.stdout)
        return result
