"""The sandbox's state file and its view of processes, against the real kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from csi_driver.core.errors import Aborted, FailedPrecondition, NotFound
from csi_driver.sandbox import processes
from csi_driver.sandbox.plan import SandboxPlan
from csi_driver.sandbox.state import ProcessRecord, SandboxState, StateFile


def test_state_round_trips_and_replaces_processes_by_name(tmp_path: Path) -> None:
    files = StateFile(tmp_path)
    state = SandboxState(SandboxPlan(tmp_path, "ab", 2), "starting etcd")
    state = state.with_process(ProcessRecord("etcd", 10, 5, ("etcd",)))
    state = state.with_process(ProcessRecord("etcd", 11, 6, ("etcd", "-x")))
    files.save(state)
    loaded = files.load()
    assert loaded == state
    assert loaded.process("etcd") == ProcessRecord("etcd", 11, 6, ("etcd", "-x"))
    assert loaded.process("node-1") is None
    assert [p.name for p in tmp_path.iterdir()] == ["sandbox.json"]  # no temporary left


def test_missing_and_corrupt_state_get_clear_errors(tmp_path: Path) -> None:
    files = StateFile(tmp_path)
    assert files.load() is None
    with pytest.raises(NotFound, match="ferry sandbox up"):
        files.require()
    files.path.write_text("{not json")
    with pytest.raises(FailedPrecondition, match="--prefix"):
        files.load()


def test_one_changing_command_at_a_time(tmp_path: Path) -> None:
    files = StateFile(tmp_path)
    with files.locked(), pytest.raises(Aborted), StateFile(tmp_path).locked():
        pass
    with files.locked():  # released again
        pass


def test_a_process_is_known_by_pid_and_start_time() -> None:
    ticks = processes.start_ticks(os.getpid())
    assert ticks is not None
    assert processes.is_running(ProcessRecord("me", os.getpid(), ticks, ()))
    assert not processes.is_running(ProcessRecord("me", os.getpid(), ticks + 1, ()))


def test_a_zombie_or_finished_process_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    assert processes.wait_gone([child.pid], timeout_s=30) == []
    assert processes.start_ticks(child.pid) is None  # a zombie until reaped
    child.wait()
    assert processes.start_ticks(child.pid) is None


def test_a_lingering_process_is_reported() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert processes.wait_gone([child.pid], timeout_s=0.2) == [child.pid]
    finally:
        child.kill()
        child.wait()
