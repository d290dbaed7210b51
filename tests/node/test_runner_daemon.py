"""CommandRunner.start_daemon: detached, logged, reaped; a missing binary is a typed error."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from csi_driver.core.errors import CommandFailed
from csi_driver.node.runner import CommandRunner
from csi_driver.sandbox.processes import start_ticks, wait_gone


def test_a_daemon_runs_in_its_own_session_and_writes_its_log(tmp_path: Path) -> None:
    runner = CommandRunner()
    log = tmp_path / "logs" / "d.log"
    daemon = runner.start_daemon(
        ["sh", "-c", "echo hello; echo oops >&2; exec sleep 30"], log_path=log
    )
    try:
        assert os.getsid(daemon.pid) == daemon.pid != os.getsid(0)
        assert os.getpgid(daemon.pid) == daemon.pid
        deadline = time.monotonic() + 10
        while log.read_text() != "hello\noops\n":
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert daemon.argv[0] == "sh" and daemon.log_path == log
    finally:
        os.kill(daemon.pid, signal.SIGKILL)
    assert wait_gone([daemon.pid], timeout_s=10) == []
    assert Path(f"/proc/{daemon.pid}").exists()  # a zombie until reaped
    runner.reap(daemon.pid)
    assert not Path(f"/proc/{daemon.pid}").exists()
    assert start_ticks(daemon.pid) is None


def test_reap_leaves_running_and_foreign_pids_alone(tmp_path: Path) -> None:
    runner = CommandRunner()
    daemon = runner.start_daemon(["sleep", "30"], log_path=tmp_path / "d.log")
    try:
        runner.reap(daemon.pid)  # still running: nothing to collect
        runner.reap(os.getpid())  # not ours
        assert start_ticks(daemon.pid) is not None
    finally:
        os.kill(daemon.pid, signal.SIGKILL)
        wait_gone([daemon.pid], timeout_s=10)
        runner.reap(daemon.pid)


def test_a_missing_program_is_a_typed_failure(tmp_path: Path) -> None:
    with pytest.raises(CommandFailed) as failed:
        CommandRunner().start_daemon(["no-such-ferry-tool"], log_path=tmp_path / "d.log")
    assert failed.value.returncode == 127
    assert "not installed" in failed.value.message
