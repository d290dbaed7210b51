"""Bringing a sandbox up, reporting on it, breaking it on purpose, taking it down.

Order of ``up``: persist the plan; create the sandbox's CA and the agents'
certificates; build the bridge and the namespaces; start etcd (unless the
catalog is SQLite) and wait for its health; start the controller and wait
for CSI Probe; start every node and wait for each one's Probe. State is
saved before each step and after each process starts. If any step fails,
everything built so far is taken down again (logs stay) and the error names
the member and ends with its log.

``down`` works from the state file when there is one and from the prefix
alone otherwise: it stops the recorded processes and every process found
inside the sandbox's namespaces, unmounts and detaches whatever is mounted or
attached from below the directory, deletes the namespaces and links carrying
the prefix, removes the runtime data (the logs stay) and checks that nothing
is left.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from csi_driver.core.errors import (
    CommandFailed,
    FailedPrecondition,
    FerryError,
    InternalError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from csi_driver.csi.client import CsiClient
from csi_driver.gen import csi_pb2
from csi_driver.node.mounts import Mounts
from csi_driver.node.runner import CommandRunner
from csi_driver.node.teardown import release_under
from csi_driver.pki import CA_CERT, CERT, KEY, CertificateAuthority, Identity
from csi_driver.pki import Role as PkiRole
from csi_driver.sandbox import processes
from csi_driver.sandbox.network import SandboxNetwork, in_namespace, netns_file
from csi_driver.sandbox.plan import CONTROLLER, CatalogKind, Member, Role, SandboxPlan
from csi_driver.sandbox.state import ProcessRecord, SandboxState, StateFile

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0
#: What the sandbox runs on the host besides Ferry itself.
HOST_TOOLS = ("ip", "nsenter")
ETCD_TOOLS = ("etcd", "etcdctl")
STOP_GRACE_S = 10.0
_PROBE_TIMEOUT_S = 2.0
_POLL_S = 0.2
_LOG_TAIL_LINES = 15
#: What ``down`` deletes below the directory; ``logs/`` stays for the post-mortem.
RUNTIME_DIRS = ("etcd", "controller", "nodes", "tls")


class MemberState(enum.Enum):
    ALIVE = "alive"  # the process runs and its link is up
    DEAD = "dead"  # the process does not run (killed, stopped, crashed)
    CUT = "cut"  # the process runs but its link is down


@dataclass(frozen=True)
class MemberStatus:
    name: str
    namespace: str
    address: str
    pid: int | None
    socket: Path | None
    state: MemberState


@dataclass(frozen=True)
class Teardown:
    """What ``down`` removed."""

    processes: tuple[int, ...]
    namespaces: tuple[str, ...]
    links: tuple[str, ...]


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(lines[-_LOG_TAIL_LINES:])


def _issue_certificates(plan: SandboxPlan) -> None:
    """A CA for this sandbox alone, and a certificate for each member naming its address.

    etcd's is the ``catalog`` identity, the one Ferry's clients demand of it.
    """
    authority = CertificateAuthority.create(f"Ferry sandbox {plan.prefix} CA")
    authority.save(plan.tls / "ca")
    for member in plan.members():
        if member.role is Role.CONTROLLER:
            identity = Identity.controller()
        elif member.role is Role.NODE:
            identity = Identity.node(member.name)
        else:
            identity = Identity(PkiRole.CATALOG)
        bundle = authority.issue(identity, ips=(member.namespace.address,))
        bundle.write(plan.tls / member.name)


class Sandbox:
    """One sandbox, known by its directory."""

    def __init__(self, directory: Path, runner: CommandRunner | None = None) -> None:
        # Loop devices report their backing files by real path: so must we.
        directory = directory.resolve()
        self.directory = directory
        self._runner = runner or CommandRunner()
        self._network = SandboxNetwork(self._runner)
        self._states = StateFile(directory)

    # -- up ------------------------------------------------------------------------

    def up(self, plan: SandboxPlan, timeout_s: float = READY_TIMEOUT_S) -> list[MemberStatus]:
        """Build and start the whole sandbox; return once every member is ready."""
        if plan.directory != self.directory:
            raise InvalidArgument(f"the plan is for {plan.directory}, not {self.directory}")
        if os.geteuid() != 0:
            raise FailedPrecondition(
                "ferry sandbox up needs root (network namespaces, loop devices, mounts)"
            )
        tools = HOST_TOOLS + (ETCD_TOOLS if plan.catalog is CatalogKind.ETCD else ())
        absent = [tool for tool in tools if shutil.which(tool) is None]
        if absent:
            raise FailedPrecondition(
                f"ferry sandbox needs {', '.join(absent)}: install iproute2, util-linux, "
                "etcd-server and etcd-client (bash scripts/setup.sh does)"
            )
        with self._states.locked():
            existing = self._states.load()
            if existing is not None:
                raise FailedPrecondition(
                    f"{self.directory} already holds sandbox {existing.plan.prefix!r} "
                    f"({existing.phase}): run `ferry sandbox down --dir {self.directory}` first"
                )
            taken = self._network.namespaces(plan.prefix) + self._network.links(plan.prefix)
            if taken:
                raise FailedPrecondition(
                    f"prefix {plan.prefix!r} is in use on this host ({', '.join(taken)}): "
                    "choose another --prefix, or take that sandbox down"
                )
            state = SandboxState(plan, "up: building the network")
            self._states.save(state)
            try:
                self._build(state, time.monotonic() + timeout_s)
            except BaseException:
                try:
                    self._teardown(plan.prefix, self._states.load() or state)
                    self._states.remove()
                except FerryError:  # keep the first error: it says why up failed
                    log.exception(
                        "could not take the half-built sandbox down",
                        extra={"hint": f"run `ferry sandbox down --dir {self.directory}`"},
                    )
                raise
        return self.status()

    def _build(self, state: SandboxState, deadline: float) -> None:
        plan = state.plan
        for directory in (plan.logs, plan.directory / "controller"):
            directory.mkdir(parents=True, exist_ok=True)
        for node_id in plan.node_ids():
            for sub in ("pool", "kubelet"):
                (plan.node_dir(node_id) / sub).mkdir(parents=True, exist_ok=True)
        _issue_certificates(plan)
        self._network.create_bridge(plan.bridge)
        for namespace in plan.namespaces():
            self._network.add_namespace(namespace, plan.bridge, plan.prefixlen)
        members = plan.members()
        control = [m for m in members if m.role is not Role.NODE]
        nodes = [m for m in members if m.role is Role.NODE]
        for member in control:  # etcd first: the controller needs its catalog
            state = self._start(state, member)
            self._wait_ready(state, member, deadline)
        for member in nodes:
            state = self._start(state, member)
        for member in nodes:
            self._wait_ready(state, member, deadline)
        self._states.save(state.at("ready"))

    def _start(
        self, state: SandboxState, member: Member, argv: tuple[str, ...] = ()
    ) -> SandboxState:
        state = state.at(f"starting {member.name}")
        self._states.save(state)
        command = argv or in_namespace(member.namespace.name, state.plan.command(member))
        daemon = self._runner.start_daemon(command, log_path=member.log)
        # A process that exits at once leaves no start time; record 0, which no
        # running process has, so it reads as dead.
        ticks = processes.start_ticks(daemon.pid) or 0
        state = state.with_process(ProcessRecord(member.name, daemon.pid, ticks, command))
        self._states.save(state)
        return state

    def _wait_ready(self, state: SandboxState, member: Member, deadline: float) -> None:
        record = state.process(member.name)
        assert record is not None
        while True:
            if not processes.is_running(record):
                self._runner.reap(record.pid)
                raise Unavailable(
                    f"sandbox {member.name} exited while starting; its log "
                    f"({member.log}) ends:\n{_log_tail(member.log)}"
                )
            if self._ready(state.plan, member):
                log.info("sandbox member ready", extra={"member": member.name})
                return
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"sandbox {member.name} was not ready in time; its log "
                    f"({member.log}) ends:\n{_log_tail(member.log)}"
                )
            time.sleep(_POLL_S)

    def _ready(self, plan: SandboxPlan, member: Member) -> bool:
        if member.role is Role.ETCD:
            return self._etcd_healthy(plan, member)
        assert member.socket is not None
        if not member.socket.exists():
            return False
        with CsiClient(f"unix://{member.socket}") as client:
            try:
                reply = client.identity.Probe(csi_pb2.ProbeRequest(), timeout=_PROBE_TIMEOUT_S)
            except grpc.RpcError:
                return False
        return bool(reply.ready.value)

    def _etcd_healthy(self, plan: SandboxPlan, member: Member) -> bool:
        # The health check runs inside the control namespace: the host has no
        # route to the sandbox's subnet, by design.
        # It asks as the controller: etcd admits only certificates of the sandbox's CA.
        tls = plan.tls / CONTROLLER
        health = (
            "etcdctl", "--endpoints", f"https://{plan.etcd_endpoint}",
            "--cacert", str(tls / CA_CERT), "--cert", str(tls / CERT), "--key", str(tls / KEY),
            "--dial-timeout", "1s", "--command-timeout", "2s", "endpoint", "health",
        )  # fmt: skip
        try:
            self._runner.run(in_namespace(member.namespace.name, health), timeout_s=5.0)
        except CommandFailed as exc:
            if exc.returncode == 127:
                raise
            return False
        return True

    # -- status --------------------------------------------------------------------

    def status(self) -> list[MemberStatus]:
        state = self._states.require()
        return [self._member_status(state, member) for member in state.plan.members()]

    def _member_status(self, state: SandboxState, member: Member) -> MemberStatus:
        record = state.process(member.name)
        running = record is not None and processes.is_running(record)
        if not running:
            condition = MemberState.DEAD
        elif not self._network.link_up(member.namespace.host_link):
            condition = MemberState.CUT
        else:
            condition = MemberState.ALIVE
        return MemberStatus(
            name=member.name,
            namespace=member.namespace.name,
            address=member.namespace.address,
            pid=record.pid if record is not None and running else None,
            socket=member.socket,
            state=condition,
        )

    # -- faults --------------------------------------------------------------------

    def kill(self, name: str) -> MemberStatus:
        """SIGKILL ``name``'s process (a crash)."""
        return self._signal(name, signal.SIGKILL, grace_s=STOP_GRACE_S)

    def stop(self, name: str) -> MemberStatus:
        """SIGTERM ``name``'s process (an orderly stop); SIGKILL if it lingers."""
        return self._signal(name, signal.SIGTERM, grace_s=STOP_GRACE_S)

    def _signal(self, name: str, signum: signal.Signals, grace_s: float) -> MemberStatus:
        with self._states.locked():
            state = self._states.require()
            member = state.plan.member(name)
            record = state.process(name)
            if record is not None and processes.is_running(record):
                self._end([record.pid], signum, grace_s)
            return self._member_status(state, member)

    def start(self, name: str, timeout_s: float = READY_TIMEOUT_S) -> MemberStatus:
        """Start ``name`` again with the same command line; return once it is ready."""
        with self._states.locked():
            state = self._states.require()
            member = state.plan.member(name)
            if not netns_file(member.namespace.name).exists():
                raise FailedPrecondition(
                    f"namespace {member.namespace.name} is gone; take the sandbox down and up again"
                )
            record = state.process(name)
            if record is None or not processes.is_running(record):
                state = self._start(state, member, record.argv if record else ())
                self._wait_ready(state, member, time.monotonic() + timeout_s)
                self._states.save(state.at("ready"))
            return self._member_status(state, member)

    def cut(self, name: str) -> MemberStatus:
        """Take ``name``'s link down (etcd and the controller share the control link)."""
        return self._set_link(name, up=False)

    def heal(self, name: str) -> MemberStatus:
        return self._set_link(name, up=True)

    def _set_link(self, name: str, *, up: bool) -> MemberStatus:
        with self._states.locked():
            state = self._states.require()
            member = state.plan.member(name)
            self._network.set_link(member.namespace.host_link, up=up)
            return self._member_status(state, member)

    # -- down ----------------------------------------------------------------------

    def down(self, prefix: str | None = None) -> Teardown:
        """Remove everything of the sandbox; works after a crash of any part of it."""
        with self._states.locked():
            state = self._states.load()
            if state is not None:
                if prefix is not None and prefix != state.plan.prefix:
                    raise InvalidArgument(
                        f"{self.directory} holds sandbox {state.plan.prefix!r}, not {prefix!r}"
                    )
                prefix = state.plan.prefix
            if prefix is None:
                raise NotFound(
                    f"no sandbox state in {self.directory}: pass --prefix to clean up by name"
                )
            SandboxPlan(self.directory, prefix, 1)  # validates the prefix
            removed = self._teardown(prefix, state)
            self._states.remove()
            return removed

    def _teardown(self, prefix: str, state: SandboxState | None) -> Teardown:
        recorded = [p.pid for p in (state.processes if state else ()) if processes.is_running(p)]
        namespaces = self._network.namespaces(prefix)
        inside = processes.pids_in_namespaces(netns_file(n) for n in namespaces)
        pids = sorted(set(recorded) | set(inside))
        self._end(pids, signal.SIGTERM, STOP_GRACE_S)
        release_under(self.directory, self._runner)
        links = self._network.links(prefix)
        bridge = f"{prefix}-br"
        for link in links:
            if link != bridge:
                self._network.delete_link(link)
        for name in namespaces:
            self._network.delete_namespace(name)
        if bridge in links:
            self._network.delete_link(bridge)
        self._remove_runtime_data()
        self._check_nothing_left(prefix)
        return Teardown(tuple(pids), tuple(namespaces), tuple(links))

    def _end(self, pids: list[int], signum: signal.Signals, grace_s: float) -> None:
        for pid in pids:
            processes.signal_process(pid, signum, group=True)
        lingering = processes.wait_gone(pids, grace_s)
        for pid in lingering:
            processes.signal_process(pid, signal.SIGKILL, group=True)
        lingering = processes.wait_gone(lingering, grace_s)
        for pid in pids:
            self._runner.reap(pid)
        if lingering:
            raise InternalError(
                f"processes {lingering} survived SIGKILL (stuck in the kernel?); "
                "check them with `ps -o pid,stat,wchan -p PID` and run down again"
            )

    def _remove_runtime_data(self) -> None:
        base = str(self.directory) + "/"
        mounted = [m.mountpoint for m in Mounts(self._runner).table()]
        still = [m for m in mounted if m.startswith(base)]
        if still:
            raise InternalError(
                f"cannot remove the sandbox's data: still mounted {still}; unmount and retry"
            )
        for name in RUNTIME_DIRS:
            shutil.rmtree(self.directory / name, ignore_errors=True)

    def _check_nothing_left(self, prefix: str) -> None:
        # Namespaces are torn down by the kernel asynchronously, veth ends with them.
        deadline = time.monotonic() + STOP_GRACE_S
        while True:
            left = self._network.namespaces(prefix) + self._network.links(prefix)
            if not left:
                return
            if time.monotonic() > deadline:
                raise InternalError(
                    f"sandbox {prefix!r} left {', '.join(left)} behind; run down again"
                )
            time.sleep(_POLL_S)
