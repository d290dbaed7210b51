"""Host commands die with their RPC: real gRPC calls with short deadlines, real commands.

The server here is a real gRPC server on a unix socket whose one method is
wrapped by Ferry's own ``rpc`` wrapper (what binds the deadline) and runs a
real command through Ferry's own ``CommandRunner``; only the choice of
command (a shell that sleeps) is the test's.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.core import deadline
from csi_driver.core.errors import Aborted, DeadlineExceeded, FerryError, Unavailable
from csi_driver.core.locks import KeyedLocks
from csi_driver.metrics import RPC_REQUESTS
from csi_driver.node import runner as runner_module
from csi_driver.node.runner import DEADLINE_MARGIN_S, CommandRunner
from csi_driver.rpc.errors import rpc
from csi_driver.transport import start_server
from tests.node.conftest import processes_mentioning

#: Far beyond any deadline used here: a command still running this long was not stopped.
SLOW_S = 120
#: Bound on waiting for the server's handler to return (a hang fails, never blocks the suite).
HANDLER_BOUND_S = 30.0


class CommandCall:
    """A unary method that runs one host command for each call, as the node agent does."""

    def __init__(self, runner: CommandRunner) -> None:
        self.runner = runner
        self.argv: list[str] = []
        self.interruptible = True
        self.remaining: float | None = None
        self.outcomes: queue.Queue[FerryError | None] = queue.Queue()

    @rpc
    def Run(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.remaining = deadline.remaining()
        try:
            self.runner.run(self.argv, timeout_s=SLOW_S * 2, interruptible=self.interruptible)
        except FerryError as exc:
            self.outcomes.put(exc)
            raise
        self.outcomes.put(None)
        return b""

    def outcome(self) -> FerryError | None:
        return self.outcomes.get(timeout=HANDLER_BOUND_S)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[CommandCall, Callable[[float], Any]]]:
    servicer = CommandCall(CommandRunner())
    handler = grpc.method_handlers_generic_handler(
        "ferry.test.Commands", {"Run": grpc.unary_unary_rpc_method_handler(servicer.Run)}
    )
    server, endpoint = start_server(
        f"unix://{tmp_path}/commands.sock", [lambda s: s.add_generic_rpc_handlers((handler,))]
    )
    channel = grpc.insecure_channel(str(endpoint))
    call = channel.unary_unary("/ferry.test.Commands/Run")

    def run(timeout_s: float | None) -> Any:
        return call(b"", timeout=timeout_s)

    try:
        yield servicer, run
    finally:
        servicer.runner.kill_running()
        channel.close()
        server.stop(0).wait()


def deadline_exceeded_count() -> float:
    return RPC_REQUESTS.labels("Run", "DEADLINE_EXCEEDED")._value.get()


def _not_started(outcome: FerryError | None) -> bool:
    """The call reached its handler too late to start its command (a loaded machine)."""
    return isinstance(outcome, DeadlineExceeded) and "was not run" in outcome.message


#: Deadlines tried in turn while a loaded machine delivers a call too late to start
#: its command at all (the property is about a command that did start).
STARTING_DEADLINES_S = (1.0, 2.0, 4.0, 8.0)


def test_a_slow_command_is_killed_at_its_rpc_deadline(served: Any, tmp_path: Path) -> None:
    servicer, run = served
    tag = f"slow-{tmp_path}"
    servicer.argv = ["sh", "-c", f"sleep {SLOW_S}", tag]
    before = deadline_exceeded_count()
    calls = 0
    for deadline_s in STARTING_DEADLINES_S[1:]:
        calls += 1
        with pytest.raises(grpc.RpcError) as caught:
            run(deadline_s)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        outcome = servicer.outcome()  # the handler returned: its command did not run SLOW_S
        if not _not_started(outcome):
            break
    assert isinstance(outcome, DeadlineExceeded), outcome
    assert "stopped at the RPC's deadline" in outcome.message
    assert processes_mentioning(tag) == []
    assert deadline_exceeded_count() == before + calls  # mapped in the one place, and counted


def test_a_spent_deadline_starts_no_command(served: Any, tmp_path: Path) -> None:
    servicer, run = served
    marker = tmp_path / "ran"
    servicer.argv = ["touch", str(marker)]
    with pytest.raises(grpc.RpcError) as caught:
        run(DEADLINE_MARGIN_S / 2)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    outcome = servicer.outcome()
    assert isinstance(outcome, DeadlineExceeded) and "was not run" in outcome.message
    assert not marker.exists()


def test_an_uninterruptible_command_finishes_past_the_deadline(served: Any, tmp_path: Path) -> None:
    servicer, run = served
    marker = tmp_path / "finished"
    servicer.interruptible = False
    for deadline_s in STARTING_DEADLINES_S:
        servicer.argv = ["sh", "-c", f"sleep {2 * deadline_s} && touch {marker}"]
        with pytest.raises(grpc.RpcError) as caught:
            run(deadline_s)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED  # the caller gave up
        outcome = servicer.outcome()
        if not _not_started(outcome):
            break
    assert outcome is None  # ... but the command ran to its end
    assert marker.exists()


def test_a_call_with_time_left_runs_its_command(served: Any, tmp_path: Path) -> None:
    servicer, run = served
    marker = tmp_path / "ran"
    servicer.argv = ["touch", str(marker)]
    run(30.0)
    assert servicer.outcome() is None and marker.exists()


def test_a_call_without_a_deadline_binds_none(served: Any, tmp_path: Path) -> None:
    servicer, run = served
    servicer.argv = ["true"]
    run(None)
    assert servicer.outcome() is None and servicer.remaining is None
    run(30.0)
    assert servicer.outcome() is None
    assert servicer.remaining is not None and 0 < servicer.remaining < 31.0  # wire rounding


def test_outside_any_rpc_commands_keep_their_own_timeout(tmp_path: Path) -> None:
    assert deadline.remaining() is None
    done = CommandRunner().run(["sh", "-c", "sleep 0.2; echo done"], timeout_s=30)
    assert done.stdout.strip() == "done"


def test_kill_running_stops_interruptible_commands(tmp_path: Path) -> None:
    runner = CommandRunner()
    tag = f"victim-{tmp_path}"
    failures: queue.Queue[BaseException] = queue.Queue()

    def run() -> None:
        try:
            runner.run(["sh", "-c", f"sleep {SLOW_S}", tag])
        except BaseException as exc:
            failures.put(exc)

    worker = threading.Thread(target=run)
    worker.start()
    started_by = time.monotonic() + HANDLER_BOUND_S
    while not processes_mentioning(tag):
        assert time.monotonic() < started_by, "the command never started"
        time.sleep(0.01)
    # Recorded by now, named in the answer; or (a loaded machine) still between its
    # Popen and its record, killed by the thread starting it (the next test).
    killed = runner.kill_running()
    assert [argv[-1] for argv in killed] in ([tag], [])
    worker.join(HANDLER_BOUND_S)
    assert isinstance(failures.get_nowait(), Unavailable)
    assert processes_mentioning(tag) == []


def test_a_kill_while_a_command_starts_stops_it_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race between starting a command and recording it: a kill_running that
    lands after the process exists but before the runner recorded it still stops it.
    The real Popen runs; only its return is held until the kill has happened."""
    runner = CommandRunner()
    tag = f"starting-{tmp_path}"
    started, killed = threading.Event(), threading.Event()
    real_popen = runner_module.subprocess.Popen

    def popen_then_wait(*args: Any, **kwargs: Any) -> Any:
        process = real_popen(*args, **kwargs)
        started.set()
        assert killed.wait(HANDLER_BOUND_S)
        return process

    monkeypatch.setattr(runner_module.subprocess, "Popen", popen_then_wait)
    failures: queue.Queue[BaseException] = queue.Queue()

    def run() -> None:
        try:
            runner.run(["sh", "-c", f"sleep {SLOW_S}", tag], timeout_s=HANDLER_BOUND_S)
        except BaseException as exc:
            failures.put(exc)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        assert started.wait(HANDLER_BOUND_S)
        assert runner.kill_running() == []  # not recorded yet: the starting thread kills it
    finally:
        killed.set()
    worker.join(HANDLER_BOUND_S)
    assert not worker.is_alive()
    failure = failures.get_nowait()
    assert isinstance(failure, Unavailable), failure
    assert processes_mentioning(tag) == []
    # A command started after the kill runs as usual.
    monkeypatch.setattr(runner_module.subprocess, "Popen", real_popen)
    assert runner.run(["true"]).returncode == 0


def test_a_lock_wait_ends_with_the_deadline() -> None:
    locks = KeyedLocks()
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with locks.hold("vol"):
            held.set()
            release.wait(HANDLER_BOUND_S)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        held.wait(HANDLER_BOUND_S)
        with deadline.bound(0.2), pytest.raises(Aborted):
            locks.hold("vol", timeout=HANDLER_BOUND_S).__enter__()
    finally:
        release.set()
        thread.join()


def test_nested_deadlines_only_shorten() -> None:
    with deadline.bound(100.0):
        with deadline.bound(1.0):
            left = deadline.remaining()
            assert left is not None and left <= 1.0
        with deadline.bound(1000.0):
            left = deadline.remaining()
            assert left is not None and left <= 100.0
        with deadline.bound(None):
            assert deadline.remaining() is not None
    assert deadline.remaining() is None
