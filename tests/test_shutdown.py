"""``ferry all-in-one`` as a real process, stopped by real signals.

One SIGTERM stops it within its grace period even while a call is stuck;
a second signal, in any combination, ends it at once. Whatever way it ends,
its sockets are gone and no process of its own is left behind. Every wait is
bounded; a process that does not end is killed and the test fails.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from csi_driver.core.model import MiB
from csi_driver.csi.client import CsiClient, mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.node.teardown import release_under
from csi_driver.shutdown import FORCE_AFTER_S
from tests.node.conftest import host_can_mount, processes_mentioning

pytestmark = pytest.mark.slow

GRACE_S = 2.0
#: Starting the interpreter and tearing down take well under this; a hang takes forever.
BOUND_S = GRACE_S + FORCE_AFTER_S + 10.0
TERM, INT = signal.SIGTERM, signal.SIGINT


class Ferry:
    """``ferry all-in-one`` in its own process group, serving sockets under ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        (base / "kubelet").mkdir()
        self.sockets = [base / "csi.sock", base / "agent.sock"]
        argv = [
            sys.executable, "-m", "csi_driver.cli", "all-in-one",
            "--endpoint", f"unix://{self.sockets[0]}",
            "--agent-endpoint", f"unix://{self.sockets[1]}",
            "--catalog", str(base / "catalog.db"),
            "--pool", str(base / "pool"), "--pool-capacity", "1Gi",
            "--kubelet-dir", str(base / "kubelet"), "--node-id", "node-a",
            "--grace-period", str(GRACE_S),
        ]  # fmt: skip
        self.log = base / "ferry.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(argv, stderr=log, start_new_session=True)
        self.client = CsiClient(f"unix://{self.sockets[0]}")
        self.client.wait_ready(timeout_s=30)

    def signal(self, sig: int, *, group: bool = False) -> None:
        if group:
            os.killpg(self.process.pid, sig)
        else:
            self.process.send_signal(sig)

    def exit_status(self) -> int:
        """The exit status, waiting at most BOUND_S; kill -9 and fail on a hang."""
        try:
            return self.process.wait(timeout=BOUND_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
            pytest.fail(f"ferry did not exit within {BOUND_S}s:\n{self.log.read_text()}")

    def left_behind(self) -> list[str]:
        """Processes still running whose command line mentions this test's directory."""
        return processes_mentioning(str(self.base))


@pytest.fixture
def ferry(tmp_path: Path) -> Iterator[Ferry]:
    running = Ferry(tmp_path)
    try:
        yield running
    finally:
        running.client.close()
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait(timeout=30)
        if host_can_mount():
            release_under(tmp_path)


def assert_ended_cleanly(ferry: Ferry) -> None:
    assert [s for s in ferry.sockets if os.path.lexists(s)] == []
    assert ferry.left_behind() == []


def test_one_sigterm_stops_within_the_grace_period(ferry: Ferry) -> None:
    ferry.signal(TERM)
    assert ferry.exit_status() == 0
    assert_ended_cleanly(ferry)
    assert '"msg": "stopped"' in ferry.log.read_text()


@pytest.mark.parametrize(
    ("signals", "group"),
    [
        pytest.param([TERM, TERM], False, id="two-sigterms"),
        pytest.param([TERM, INT], False, id="sigterm-then-sigint"),
        pytest.param([TERM, TERM], True, id="group-kill-then-direct-kill"),
    ],
)
@pytest.mark.parametrize("gap_s", [0.0, 0.01, 0.1])
def test_quick_second_signals_never_hang_an_idle_ferry(
    ferry: Ferry, signals: list[signal.Signals], group: bool, gap_s: float
) -> None:
    ferry.signal(signals[0], group=group)
    time.sleep(gap_s)
    ferry.signal(signals[1])
    # Idle, the stop may finish before the second signal lands: either way, promptly.
    assert ferry.exit_status() in (0, 128 + signals[1])
    assert_ended_cleanly(ferry)


class CatalogHeld:
    """Another process's write transaction on the catalog: Ferry's writes wait on it."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self._db.rollback()
        self._db.close()


def stuck_create(ferry: Ferry, pool: futures.ThreadPoolExecutor) -> futures.Future[object]:
    """A CreateVolume that blocks inside Ferry, waiting for the catalog's write lock."""
    request = csi_pb2.CreateVolumeRequest(
        name="pvc-stuck",
        capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MiB),
        volume_capabilities=[mount_capability()],
    )
    call = pool.submit(ferry.client.controller.CreateVolume, request, timeout=60)
    time.sleep(0.5)  # let it reach the catalog
    assert not call.done(), "CreateVolume should be waiting for the held catalog"
    return call


@pytest.mark.parametrize(
    ("signals", "group"),
    [
        pytest.param([TERM], False, id="one-sigterm"),
        pytest.param([TERM, TERM], False, id="two-sigterms"),
        pytest.param([TERM, INT], False, id="sigterm-then-sigint"),
        pytest.param([INT, INT], False, id="ctrl-c-twice"),
        pytest.param([TERM, TERM], True, id="group-kill-then-direct-kill"),
    ],
)
def test_signals_during_a_stuck_call_end_ferry_promptly(
    ferry: Ferry, signals: list[signal.Signals], group: bool
) -> None:
    held = CatalogHeld(ferry.base / "catalog.db")
    try:
        with futures.ThreadPoolExecutor(1) as pool:
            call = stuck_create(ferry, pool)
            ferry.signal(signals[0], group=group)
            for sig in signals[1:]:
                time.sleep(0.2)
                ferry.signal(sig)
            status = ferry.exit_status()
            with pytest.raises(grpc.RpcError):
                call.result(timeout=30)  # the caller learns that the call did not complete
    finally:
        held.release()
    if len(signals) == 1:
        # The stuck call is cancelled at the end of the grace period; it cannot hold the
        # process, and a stop that did all it had to do exits 0.
        assert status == 0
    else:
        assert status == 128 + signals[-1]
    assert_ended_cleanly(ferry)
