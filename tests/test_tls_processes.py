"""mTLS between real Ferry processes: ``ferry ca``, a node and a controller on loopback TCP.

Proves the issue's "a client without a certificate of this cluster is
refused and logged" where an operator would look: the node process's own
stderr, as JSON lines. And the multi-node shape end to end: a controller and
a node that share nothing but an etcd spoken to over mutual TLS (``etcds://``).
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.core.model import MiB
from csi_driver.csi.client import CsiClient, mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.gen.ferry.v1 import agent_pb2, agent_pb2_grpc
from csi_driver.pki import Identity, TlsBundle
from tests.certs import ForeignPki
from tests.store.etcd_cluster import ETCD, SKIP_REASON, EtcdCluster, EtcdTls
from tests.test_cli import ferry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and bundles made by the real ``ferry ca`` commands."""
    ca = tmp_path_factory.mktemp("pki") / "ca"
    done = ferry("ca", "init", "--dir", str(ca))
    assert done.returncode == 0 and f"cluster CA written to {ca}" in done.stdout, done.stderr
    for name in ("controller", "node/n1"):
        done = ferry("ca", "issue", "--dir", str(ca), "--name", name, "--ip", "127.0.0.1")
        assert done.returncode == 0, done.stderr
    return ca


def test_ferry_ca_writes_secret_shaped_directories(ca_dir: Path) -> None:
    assert (ca_dir / "tls.key").stat().st_mode & 0o777 == 0o600
    bundle = TlsBundle.load(ca_dir / "node-n1")
    assert str(bundle.identity) == "node/n1"
    assert (ca_dir / "node-n1" / "tls.key").stat().st_mode & 0o777 == 0o600
    out = ca_dir.parent / "elsewhere"
    done = ferry(
        "ca", "issue", "--dir", str(ca_dir), "--name", "node/n2",
        "--dns", "n2.lan", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert str(TlsBundle.load(out).identity) == "node/n2"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("init",), "already holds a CA"),
        (("issue", "--name", "admin"), "is not 'controller', 'catalog' or 'node/<node-id>'"),
        (("issue", "--name", "node/N1"), "is not a Kubernetes node name"),
        (("issue", "--name", "controller", "--ip", "10.0.0"), "'10.0.0' is not an IP address"),
        (("issue", "--name", "controller", "--dns", "a b"), "'a b' is not a DNS name"),
    ],
)
def test_ferry_ca_bad_input_is_exit_1_with_a_message(
    ca_dir: Path, args: tuple[str, ...], message: str
) -> None:
    done = ferry("ca", *args, "--dir", str(ca_dir))
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr


def test_ferry_ca_into_a_directory_it_cannot_write_is_exit_1(ca_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for args in (
        ("init", "--dir", str(blocker / "ca")),
        ("issue", "--dir", str(ca_dir), "--name", "controller", "--out", str(blocker / "x")),
    ):
        done = ferry("ca", *args)
        assert done.returncode == 1
        assert "cannot write" in done.stderr and "Traceback" not in done.stderr


def test_ferry_ca_issue_without_a_ca_says_how_to_make_one(tmp_path: Path) -> None:
    done = ferry("ca", "issue", "--dir", str(tmp_path), "--name", "controller")
    assert done.returncode == 1
    assert f"ferry ca init --dir {tmp_path}" in done.stderr


@dataclass
class Process:
    """A ``ferry`` service process whose stderr goes to a file."""

    popen: subprocess.Popen[bytes]
    log: Path

    def lines(self) -> list[dict[str, Any]]:
        """Every complete line, parsed: each must be JSON."""
        complete = self.log.read_text().splitlines(keepends=True)
        return [json.loads(line) for line in complete if line.endswith("\n")]

    def wait_for(self, message: str, timeout_s: float = 30, **fields: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [
                line
                for line in self.lines()
                if line["msg"] == message
                and all(line.get(key, "").startswith(value) for key, value in fields.items())
            ]
            if found:
                return found[-1]
            assert self.popen.poll() is None, self.log.read_text()
            time.sleep(0.1)
        raise AssertionError(f"no {message!r} in {self.log.read_text()}")


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    started: list[Process] = []

    def start(name: str, *args: str) -> Process:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "csi_driver.cli", *args], stdout=out, stderr=out
            )
        started.append(Process(popen, log))
        return started[-1]

    try:
        yield start
    finally:
        for process in started:
            process.popen.kill()
            process.popen.wait(timeout=30)


def _node_args(base: Path, *extra: str) -> list[str]:
    (base / "kubelet").mkdir(exist_ok=True)
    return [
        "node", "--node-id", "n1",
        "--endpoint", f"unix://{base}/node.sock",
        "--catalog", str(base / "catalog.db"),
        "--pool", str(base / "pool"), "--pool-capacity", "1Gi",
        "--kubelet-dir", str(base / "kubelet"),
        "--agent-endpoint", "tcp://127.0.0.1:0",
        *extra,
    ]  # fmt: skip


def _get_pool(channel: grpc.Channel) -> grpc.StatusCode:
    with channel:
        try:
            agent_pb2_grpc.NodeAgentStub(channel).GetPool(agent_pb2.GetPoolRequest(), timeout=10)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[attr-defined,no-any-return]
    return grpc.StatusCode.OK


def _create(endpoint: str, name: str) -> Any:
    with CsiClient(endpoint) as client:
        client.wait_ready(timeout_s=30)
        return client.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=name,
                capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MiB),
                volume_capabilities=[mount_capability()],
            ),
            timeout=30,
        )


def _pair_creates_a_volume(
    ca_dir: Path, tmp_path: Path, spawn: Any, catalog: str, name: str, *catalog_args: str
) -> None:
    """A node and a controller under mTLS on ``catalog``; the controller creates ``name``.

    ``catalog_args``: more flags both give for the catalog (``--catalog-tls-dir``).
    """
    node_args = _node_args(
        tmp_path, "--tls-dir", str(ca_dir / "node-n1"), "--catalog", catalog, *catalog_args
    )
    spawn("node", *node_args).wait_for("ferry started")
    spawn(
        "controller", "controller", "--endpoint", f"unix://{tmp_path}/controller.sock",
        "--catalog", catalog, "--tls-dir", str(ca_dir / "controller"), *catalog_args,
    ).wait_for("ferry started")  # fmt: skip
    created = _create(f"unix://{tmp_path}/controller.sock", name)
    assert created.volume.capacity_bytes == 16 * MiB
    assert (tmp_path / "pool" / "images" / f"{created.volume.volume_id}.img").exists()


def test_node_refuses_and_logs_clients_without_this_clusters_certificate(
    ca_dir: Path, tmp_path: Path, spawn: Any
) -> None:
    node = spawn("node", *_node_args(tmp_path, "--tls-dir", str(ca_dir / "node-n1")))
    node.wait_for("ferry started")
    # The agent API is served first; the chunk source (for other nodes) after it.
    served = [line for line in node.lines() if line["msg"] == "serving"]
    address = served[0]["endpoint"].removeprefix("tcp://")
    assert re.fullmatch(r"127\.0\.0\.1:\d+", address)

    stranger = tmp_path / "stranger"
    assert ferry("ca", "init", "--dir", str(stranger)).returncode == 0
    assert ferry("ca", "issue", "--dir", str(stranger), "--name", "controller").returncode == 0
    ours = TlsBundle.load(ca_dir / "controller")
    theirs = TlsBundle.load(stranger / "controller")
    override = [("grpc.ssl_target_name_override", "n1.node.ferry.csi.dev")]
    clients = {
        "PEER_DID_NOT_RETURN_A_CERTIFICATE": grpc.secure_channel(
            address, grpc.ssl_channel_credentials(ours.ca_pem), options=override
        ),
        "CERTIFICATE_VERIFY_FAILED": grpc.secure_channel(
            address,
            grpc.ssl_channel_credentials(ours.ca_pem, theirs.key_pem, theirs.cert_pem),
            options=override,
        ),
        "WRONG_VERSION_NUMBER": grpc.insecure_channel(address),  # plaintext
    }
    for reason, channel in clients.items():
        assert _get_pool(channel) is grpc.StatusCode.UNAVAILABLE, reason
    authenticated = grpc.secure_channel(
        address,
        grpc.ssl_channel_credentials(ours.ca_pem, ours.key_pem, ours.cert_pem),
        options=override,
    )
    assert _get_pool(authenticated) is grpc.StatusCode.OK

    # gRPC core's lines cross the stderr pipe as JSON records of the "grpc.core" logger.
    for reason in clients:
        refusal = node.wait_for("tls handshake failed", reason=reason)
        assert (refusal["level"], refusal["logger"]) == ("warning", "grpc.core")
        assert refusal["source"].startswith("ssl_transport_security.cc:")


def test_controllers_provision_through_the_catalog_not_the_agent_api(
    ca_dir: Path, tmp_path: Path, spawn: Any
) -> None:
    """Image intents travel as catalog records, which the node reconciles.

    So a controller never dials a node's agent API to provision, with or
    without a certificate; the agent client's own refusal of plaintext TCP
    is proven in tests/test_agent_tls.py.
    """
    catalog = str(tmp_path / "catalog.db")
    _pair_creates_a_volume(ca_dir, tmp_path, spawn, catalog, "pvc-mtls")

    plain = spawn(
        "plain", "controller", "--endpoint", f"unix://{tmp_path}/plain.sock", "--catalog", catalog
    )
    plain.wait_for("ferry started")
    again = _create(f"unix://{tmp_path}/plain.sock", "pvc-plain")
    assert (tmp_path / "pool" / "images" / f"{again.volume.volume_id}.img").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), "refusing plaintext TCP for the agent API"),
        (("--tls-dir", "{ca}/controller"), "is for controller, but this process runs as node/n1"),
        (("--tls-dir", "{ca}/absent"), "absent/ca.crt does not exist"),
    ],
)
def test_a_node_with_unusable_security_does_not_start(
    ca_dir: Path, tmp_path: Path, extra: tuple[str, ...], message: str
) -> None:
    args = [arg.format(ca=ca_dir) for arg in extra]
    done = ferry(*_node_args(tmp_path, *args))
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr


def test_insecure_agent_api_allows_plaintext_tcp_and_says_so(tmp_path: Path, spawn: Any) -> None:
    node = spawn("node", *_node_args(tmp_path, "--insecure-agent-api"))
    warning = node.wait_for("agent API in plaintext")
    assert warning["level"] == "warning"
    node.wait_for("ferry started")
    address = next(line for line in node.lines() if line["msg"] == "serving")["endpoint"]
    assert _get_pool(grpc.insecure_channel(address.removeprefix("tcp://"))) is grpc.StatusCode.OK


@pytest.fixture
def catalog_etcd(ca_dir: Path, tmp_path: Path) -> Iterator[EtcdCluster]:
    """A TLS etcd whose ``catalog`` certificate ``ferry ca issue`` made."""
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    server = tmp_path / "etcd-tls"
    done = ferry(
        "ca", "issue", "--dir", str(ca_dir), "--name", "catalog",
        "--ip", "127.0.0.1", "--out", str(server),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    cluster = EtcdCluster(tmp_path, 1, EtcdTls(server, ca_dir / "controller")).start()
    yield cluster
    cluster.close()


def test_controller_and_node_share_only_a_tls_etcd(
    ca_dir: Path, tmp_path: Path, spawn: Any, catalog_etcd: EtcdCluster
) -> None:
    assert catalog_etcd.url.startswith("etcds://")
    _pair_creates_a_volume(ca_dir, tmp_path, spawn, catalog_etcd.url, "pvc-over-etcds")
    assert not (tmp_path / "catalog.db").exists()  # no file catalog anywhere


def test_controller_and_node_share_an_etcd_with_its_own_pki(
    ca_dir: Path, tmp_path: Path, spawn: Any
) -> None:
    """An existing etcd whose CA is not Ferry's: --catalog-tls-dir carries its credentials
    (one client certificate for both), --tls-dir still secures the agent API."""
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    pki = ForeignPki.create(tmp_path / "etcd-pki")
    server = pki.issue("etcd-member", dns=("localhost",), ips=("127.0.0.1",), server=True)
    client = pki.issue("ferry")
    cluster = EtcdCluster(tmp_path, 1, EtcdTls(server, client)).start()
    try:
        catalog = cluster.url.replace("127.0.0.1", "localhost")
        _pair_creates_a_volume(
            ca_dir, tmp_path, spawn, catalog, "pvc-over-their-etcd",
            "--catalog-tls-dir", str(client),
        )  # fmt: skip
        assert not (tmp_path / "catalog.db").exists()
        assert cluster.count_keys() > 0  # the volume's records are in their etcd
    finally:
        cluster.close()


def test_a_node_enrolled_by_the_controller_serves_it(
    ca_dir: Path, tmp_path: Path, spawn: Any
) -> None:
    """The chart's way, with real processes: only the controller has the CA's key; the
    node holds ca.crt and the token, enrolls with `ferry ca enroll`, and serves."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    catalog = str(tmp_path / "catalog.db")
    spawn(
        "controller", "controller", "--endpoint", f"unix://{tmp_path}/controller.sock",
        "--catalog", catalog, "--tls-dir", str(ca_dir / "controller"),
        "--enroll-listen", f"tcp://127.0.0.1:{port}", "--ca-dir", str(ca_dir),
        "--enroll-token-file", str(token),
    ).wait_for("ferry started")  # fmt: skip
    node_pod = tmp_path / "node-pod"  # what a node pod holds: no CA key
    node_pod.mkdir()
    (node_pod / "ca.crt").write_bytes((ca_dir / "ca.crt").read_bytes())
    enrolled = ferry(
        "ca", "enroll", "--server", f"tcp://127.0.0.1:{port}", "--token-file", str(token),
        "--ca-cert", str(node_pod / "ca.crt"), "--name", "node/n1", "--ip", "127.0.0.1",
        "--out", str(node_pod / "tls"),
    )  # fmt: skip
    assert enrolled.returncode == 0, enrolled.stderr
    assert TlsBundle.load(node_pod / "tls").identity == Identity.node("n1")
    node_args = _node_args(tmp_path, "--tls-dir", str(node_pod / "tls"), "--catalog", catalog)
    spawn("node", *node_args).wait_for("ferry started")
    created = _create(f"unix://{tmp_path}/controller.sock", "pvc-enrolled")
    assert (tmp_path / "pool" / "images" / f"{created.volume.volume_id}.img").exists()
