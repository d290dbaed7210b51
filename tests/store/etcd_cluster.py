"""Real etcd processes for the store tests: one member or a cluster on loopback.

Each member gets free loopback ports and its own data directory; members
can be killed and restarted with their data (a crash and a reboot), and
:meth:`EtcdCluster.close` always stops every process it started. Elections
are tuned fast (50 ms heartbeat, 500 ms election timeout, pre-vote) so
losing and regaining quorum takes a second, not ten.

With :class:`EtcdTls` the members serve clients over mutual TLS
(``--client-cert-auth``) with certificates made by Ferry's own pki, and
the fixture's own requests (health, wipe) present a client certificate.
Peers stay on plain loopback: they are not what these tests examine.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests

from csi_driver.pki import CA_CERT, CERT, KEY

ETCD = shutil.which("etcd")
SKIP_REASON = "needs Debian's etcd-server (the etcd binary); scripts/setup.sh installs it"

_START_TIMEOUT_S = 20.0


SETPRIV = shutil.which("setpriv") or "setpriv"


def dying_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run so that the kernel kills it if the test process dies first.

    Fixture teardown stops children normally; this covers a crashed or killed
    pytest, so no etcd or contender outlives its test run on a shared machine.
    util-linux's ``setpriv`` sets the parent-death signal and execs ``argv``
    (the signal survives exec). A ``preexec_fn`` did the same inside the
    forked child, but Python code between fork and exec can deadlock on a lock
    another of pytest's threads held at the fork (gRPC's, the import lock):
    the child then hung before exec and printed nothing.
    """
    return [SETPRIV, "--pdeathsig", "KILL", "--", *argv]


def _free_ports(count: int) -> list[int]:
    probes = []
    for _ in range(count):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        probes.append(probe)
    ports = [p.getsockname()[1] for p in probes]
    for probe in probes:
        probe.close()
    return ports


@dataclass(frozen=True)
class EtcdTls:
    """Bundle directories (``ca.crt``, ``tls.crt``, ``tls.key``) for a TLS etcd.

    ``server``: the members' certificate; ``client``: what the fixture
    itself presents. The server certificate must name 127.0.0.1.
    """

    server: Path
    client: Path

    def session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # REQUESTS_CA_BUNDLE would replace verify below
        session.verify = str(self.client / CA_CERT)
        session.cert = (str(self.client / CERT), str(self.client / KEY))
        return session


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    scheme: str = "http"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class EtcdCluster:
    """``size`` etcd members on 127.0.0.1, started by :meth:`start`."""

    def __init__(
        self,
        base: Path,
        size: int = 1,
        tls: EtcdTls | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        """``extra_args``: more etcd flags for every member (a test's own limits)."""
        assert ETCD is not None, SKIP_REASON
        self.base = base
        self.tls = tls
        self.extra_args = extra_args
        self._http = tls.session() if tls is not None else requests.Session()
        self.token = f"ferry-test-{uuid.uuid4().hex[:8]}"
        ports = _free_ports(2 * size)
        self.members = [
            EtcdMember(
                name=f"m{i}",
                client_port=ports[2 * i],
                peer_port=ports[2 * i + 1],
                data_dir=base / f"m{i}.etcd",
                log_path=base / f"m{i}.log",
                scheme="https" if tls is not None else "http",
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        """The ``--catalog`` URL naming every member."""
        scheme = "etcds" if self.tls is not None else "etcd"
        return f"{scheme}://" + ",".join(f"127.0.0.1:{m.client_port}" for m in self.members)

    def _argv(self, member: EtcdMember) -> list[str]:
        assert ETCD is not None
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        return [
            ETCD,
            f"--name={member.name}",
            f"--data-dir={member.data_dir}",
            f"--listen-client-urls={member.client_url}",
            f"--advertise-client-urls={member.client_url}",
            f"--listen-peer-urls={member.peer_url}",
            f"--initial-advertise-peer-urls={member.peer_url}",
            f"--initial-cluster={initial}",
            f"--initial-cluster-token={self.token}",
            "--initial-cluster-state=new",
            "--heartbeat-interval=50",
            "--election-timeout=500",
            # etcd >= 3.5's default: a member rejoining after an outage does not
            # disrupt the cluster with a stale term (healing takes 0.3 s, not 1-6 s).
            "--pre-vote=true",
            "--logger=zap",
            "--log-level=warn",
            *self._tls_argv(),
            *self.extra_args,
        ]

    def _tls_argv(self) -> list[str]:
        if self.tls is None:
            return []
        server = self.tls.server
        return [
            "--client-cert-auth",
            f"--trusted-ca-file={server / CA_CERT}",
            f"--cert-file={server / CERT}",
            f"--key-file={server / KEY}",
        ]

    def start_member(self, index: int) -> None:
        member = self.members[index]
        assert not member.running, f"{member.name} is already running"
        with open(member.log_path, "ab") as log:
            member.process = subprocess.Popen(
                dying_with_parent(self._argv(member)),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def start(self) -> EtcdCluster:
        try:
            for index in range(len(self.members)):
                self.start_member(index)
            self.wait_healthy()
        except BaseException:
            self.close()
            raise
        return self

    def healthy(self, member: EtcdMember) -> bool:
        """True when ``member`` runs and sees a leader (etcd's own /health)."""
        try:
            reply = self._http.get(member.client_url + "/health", timeout=0.5)
            return reply.status_code == 200 and reply.json().get("health") == "true"
        except requests.RequestException:
            return False

    def wait_healthy(self, timeout: float = _START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        for member in [m for m in self.members if m.running]:
            while not self.healthy(member):
                if not member.running:
                    raise RuntimeError(
                        f"etcd {member.name} exited: {member.log_path.read_text()[-2000:]}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"etcd {member.name} not healthy after {timeout}s")
                time.sleep(0.05)

    def leaderless(self, member: EtcdMember) -> bool:
        """True when ``member`` answers but knows no leader (it has lost quorum)."""
        try:
            reply = self._http.post(
                member.client_url + "/v3/maintenance/status", json={}, timeout=1
            )
        except requests.RequestException:
            return False
        return reply.status_code == 200 and reply.json().get("leader", "0") in ("0", 0, None)

    def kill_member(self, index: int, sig: signal.Signals = signal.SIGKILL) -> None:
        member = self.members[index]
        if member.process is not None:
            if member.process.poll() is None:
                member.process.send_signal(sig)
            member.process.wait(timeout=10)

    def restart(self) -> None:
        """Stop every member (SIGTERM) and start it again on the same data."""
        for index in range(len(self.members)):
            self.kill_member(index, signal.SIGTERM)
        for index in range(len(self.members)):
            self.start_member(index)
        self.wait_healthy()

    def wipe(self) -> None:
        """Delete every key (between tests sharing one cluster); revisions keep growing.

        Members a failed test left stopped are started again first.
        """
        stopped = [i for i, m in enumerate(self.members) if not m.running]
        for index in stopped:
            self.start_member(index)
        if stopped:
            self.wait_healthy()
        self._http.post(
            self.members[0].client_url + "/v3/kv/deleterange",
            json={"key": "AA==", "range_end": "AA=="},
            timeout=5,
        ).raise_for_status()

    def count_keys(self) -> int:
        """How many keys the cluster holds (read by the fixture, not through Ferry)."""
        reply = self._http.post(
            self.members[0].client_url + "/v3/kv/range",
            json={"key": "AA==", "range_end": "AA==", "count_only": True},
            timeout=5,
        )
        reply.raise_for_status()
        return int(reply.json().get("count", 0))

    def close(self) -> None:
        for member in self.members:
            if member.process is not None and member.process.poll() is None:
                member.process.kill()
            if member.process is not None:
                member.process.wait(timeout=10)
        self._http.close()
