"""``ferry sandbox`` end to end: real namespaces, etcd, controller and node processes.

A volume lives its whole life through node 2's socket; faults (kill, stop,
cut) show in ``status`` and heal; ``down`` leaves nothing behind, also after
the sandbox's processes were killed mid-way with nothing cleaned up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.core.model import MiB
from csi_driver.csi.client import CsiClient, mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.pki import CertificateAuthority, Identity
from csi_driver.sandbox.plan import SANDBOX_NODE_LOST_AFTER_S
from tests.sandbox.conftest import ROOT, Place, leftovers, parse_table, requires_host

pytestmark = [requires_host, pytest.mark.root, pytest.mark.slow]

NODE_KEY = "topology.ferry.csi.dev/node"
RPC_TIMEOUT_S = 60


def create_on(place: Place, node: str, name: str, timeout: float = RPC_TIMEOUT_S) -> Any:
    request = csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
        volume_capabilities=[mount_capability()],
    )
    request.accessibility_requirements.requisite.add().segments[NODE_KEY] = node
    with place.client("controller") as client:
        return client.controller.CreateVolume(request, timeout=timeout).volume


def paths(place: Place, node: str, volume_id: str) -> tuple[str, str]:
    kubelet = place.node_dir(node) / "kubelet"
    staging = kubelet / "plugins" / "kubernetes.io" / "csi" / volume_id / "globalmount"
    target = kubelet / "pods" / "pod-1" / "volumes" / "kubernetes.io~csi" / volume_id / "mount"
    return str(staging), str(target)


def attach_and_mount(place: Place, node: str, volume_id: str) -> str:
    """ControllerPublish to ``node``, then NodeStage and NodePublish through its socket."""
    capability = mount_capability()
    with place.client("controller") as controller:
        context = controller.controller.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=volume_id, node_id=node, volume_capability=capability
            ),
            timeout=RPC_TIMEOUT_S,
        ).publish_context
    staging, target = paths(place, node, volume_id)
    with place.client(node) as client:
        client.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume_id,
                staging_target_path=staging,
                volume_capability=capability,
                publish_context=context,
            ),
            timeout=RPC_TIMEOUT_S,
        )
        client.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume_id,
                staging_target_path=staging,
                target_path=target,
                volume_capability=capability,
                publish_context=context,
            ),
            timeout=RPC_TIMEOUT_S,
        )
    return target


def unmount(place: Place, node: str, volume_id: str) -> None:
    """NodeUnpublish and NodeUnstage through ``node``'s socket."""
    staging, target = paths(place, node, volume_id)
    with place.client(node) as client:
        client.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target),
            timeout=RPC_TIMEOUT_S,
        )
        client.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging),
            timeout=RPC_TIMEOUT_S,
        )


def mount_source(mountpoint: str) -> str | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if left.split()[4] == mountpoint:
            return right.split()[1]
    return None


def probe(place: Place, member: str) -> bool:
    with CsiClient(place.socket(member)) as client:
        try:
            return bool(client.identity.Probe(csi_pb2.ProbeRequest(), timeout=5).ready.value)
        except grpc.RpcError:
            return False


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


# -- one shared three-node sandbox --------------------------------------------------


def test_up_reports_every_member_ready(running: Place) -> None:
    table = running.status()
    assert list(table) == ["etcd", "controller", "node-1", "node-2", "node-3"]
    assert {row["STATE"] for row in table.values()} == {"alive"}
    assert table["node-2"]["NAMESPACE"] == f"{running.prefix}-node-2"
    assert table["node-2"]["SOCKET"] == f"{running.directory}/nodes/node-2/csi.sock"
    addresses = {row["ADDRESS"] for name, row in table.items() if name.startswith("node-")}
    assert len(addresses) == 3
    for name in ("controller", "node-1", "node-2", "node-3"):
        assert probe(running, name), name
    # The catalog is etcd, reached over the bridge: no catalog file anywhere.
    assert not list(running.directory.rglob("*.db*"))
    for row in table.values():
        assert pid_alive(int(row["PID"]))
        assert os.getsid(int(row["PID"])) == int(row["PID"])  # detached: its own session
        # Each member runs in its namespace: its network namespace is that netns file's.
        netns = os.stat(f"/run/netns/{row['NAMESPACE']}").st_ino
        assert os.readlink(f"/proc/{row['PID']}/ns/net") == f"net:[{netns}]"


def test_a_volume_lives_its_whole_life_through_node_2(running: Place) -> None:
    volume = create_on(running, "node-2", f"pvc-{uuid.uuid4()}")
    volume_id = volume.volume_id
    image = f"pool/images/{volume_id}.img"
    assert (running.node_dir("node-2") / image).exists()
    assert not (running.node_dir("node-1") / image).exists()
    assert not (running.node_dir("node-3") / image).exists()

    # (A publish to another node moves the volume there: tests/sandbox/test_mobility.py.)
    with running.client("controller") as controller:
        with pytest.raises(grpc.RpcError) as no_node:
            controller.controller.ControllerPublishVolume(
                csi_pb2.ControllerPublishVolumeRequest(
                    volume_id=volume_id, node_id="node-9", volume_capability=mount_capability()
                ),
                timeout=RPC_TIMEOUT_S,
            )
        assert no_node.value.code() is grpc.StatusCode.NOT_FOUND

    target = attach_and_mount(running, "node-2", volume_id)
    source = mount_source(target)
    assert source is not None and source.startswith("/dev/loop")
    backing = Path(f"/sys/block/{Path(source).name}/loop/backing_file").read_text().strip()
    assert backing == str(running.node_dir("node-2") / image)
    data = os.urandom(4 * MiB)
    with open(Path(target) / "data", "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    assert (Path(target) / "data").read_bytes() == data

    staging, _ = paths(running, "node-2", volume_id)
    unmount(running, "node-2", volume_id)
    assert mount_source(target) is None and mount_source(staging) is None
    with running.client("controller") as controller:
        controller.controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id="node-2"),
            timeout=RPC_TIMEOUT_S,
        )
        controller.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=RPC_TIMEOUT_S
        )
    assert not (running.node_dir("node-2") / image).exists()
    assert {row["STATE"] for row in running.status().values()} == {"alive"}


@pytest.mark.parametrize(("fault", "node"), [("kill", "node-1"), ("stop", "node-3")])
def test_a_node_killed_or_stopped_shows_dead_and_starts_again(
    running: Place, fault: str, node: str
) -> None:
    before = running.status()[node]
    row = running.fault(fault, node)
    assert row["STATE"] == "dead" and row["PID"] == "-"
    assert not pid_alive(int(before["PID"]))
    assert running.status()[node]["STATE"] == "dead"
    assert not probe(running, node)
    assert {r["STATE"] for n, r in running.status().items() if n != node} == {"alive"}

    row = running.fault("start", node)
    assert row["STATE"] == "alive" and row["PID"] != before["PID"]
    assert probe(running, node)
    # Restarted with the same command line: same namespace, and the controller
    # reaches its agent at the same address again.
    after = Path(f"/proc/{row['PID']}/cmdline").read_bytes().split(b"\0")
    assert f"tcp://{before['ADDRESS']}:7400".encode() in after
    assert create_on(running, node, f"pvc-{uuid.uuid4()}").volume_id


RETRYABLE = (
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
)


#: What a provisioner retries too: a node that was cut off is not ready for a new
#: volume (RESOURCE_EXHAUSTED) until its heartbeat reaches the catalog again.
RETRIED_BY_THE_PROVISIONER = (*RETRYABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def refused_while_away(error: grpc.RpcError, node: str) -> bool:
    """How a create for a node that cannot be reached fails: its intent recorded and
    the node not answering (a retryable code) or, once the node has been silent past
    the stale threshold (3.3 s in a sandbox: under load the test's own commands take
    that long), refused for want of a ready node, named."""
    if error.code() in RETRYABLE:
        return True
    details = error.details() or ""
    return error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and f"{node} (" in details


def create_with_retries(
    place: Place, node: str, name: str, retried: tuple[grpc.StatusCode, ...] = RETRYABLE
) -> Any:
    """What a provisioner does: retry the same name until it succeeds."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return create_on(place, node, name, timeout=15)
        except grpc.RpcError as exc:
            if exc.code() not in retried or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize(("fault", "member"), [("kill", "etcd"), ("stop", "controller")])
def test_the_control_plane_killed_or_stopped_starts_again(
    running: Place, fault: str, member: str
) -> None:
    """Past the nodes' loss delay, too: a catalog the controller could not read
    made no node silent, so no create is refused for want of a ready node."""
    before = running.status()[member]
    assert running.fault(fault, member)["STATE"] == "dead"
    table = running.status()
    assert table[member]["STATE"] == "dead"
    assert {r["STATE"] for n, r in table.items() if n != member} == {"alive"}
    with pytest.raises(grpc.RpcError) as failed:
        create_on(running, "node-1", f"pvc-{uuid.uuid4()}", timeout=5)
    assert failed.value.code() in RETRYABLE
    if member == "etcd":
        time.sleep(SANDBOX_NODE_LOST_AFTER_S + 1)

    row = running.fault("start", member)
    assert row["STATE"] == "alive" and row["PID"] != before["PID"]
    assert create_with_retries(running, "node-1", f"pvc-{uuid.uuid4()}").volume_id


def test_a_cut_node_shows_cut_and_recovers_when_healed(running: Place) -> None:
    row = running.fault("cut", "node-2")
    assert row["STATE"] == "cut"
    assert running.status()["node-2"]["STATE"] == "cut"
    assert probe(running, "node-2")  # its CSI socket is local: only the network is cut
    name = f"pvc-{uuid.uuid4()}"
    with pytest.raises(grpc.RpcError) as unreachable:
        create_on(running, "node-2", name, timeout=5)
    assert refused_while_away(unreachable.value, "node-2"), unreachable.value.details()

    assert running.fault("heal", "node-2")["STATE"] == "alive"
    volume = create_with_retries(running, "node-2", name, RETRIED_BY_THE_PROVISIONER)
    assert (running.node_dir("node-2") / f"pool/images/{volume.volume_id}.img").exists()


AGENT_CALL = """
import sys, grpc
from pathlib import Path
from csi_driver.gen.ferry.v1 import agent_pb2, agent_pb2_grpc
from csi_driver.pki import Identity, TlsBundle
from csi_driver.transport import AgentSecurity, open_channel

endpoint, tls_dir = sys.argv[1], sys.argv[2]
if tls_dir == "-":
    channel = grpc.insecure_channel(endpoint.removeprefix("tcp://"))
else:
    security = AgentSecurity(TlsBundle.load(Path(tls_dir)))
    channel = open_channel(endpoint, security, Identity.node("node-2"))
request = agent_pb2.DeleteImageRequest(volume_id="vol-" + "0" * 32)
try:
    agent_pb2_grpc.NodeAgentStub(channel).DeleteImage(request, timeout=10)
    print("OK")
except grpc.RpcError as exc:
    print(exc.code().name)
"""


def run_in_node_1(running: Place, script: str, *args: str) -> str:
    """Run a Python ``script`` inside node 1's namespace (on the bridge); its output."""
    enter = ("nsenter", f"--net=/run/netns/{running.prefix}-node-1", "--")
    done = subprocess.run(
        [*enter, sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    return done.stdout.strip()


def call_agent_from_node_1(running: Place, tls_dir: str) -> str:
    """DeleteImage on node 2's agent, from inside node 1's namespace."""
    endpoint = f"tcp://{running.status()['node-2']['ADDRESS']}:7400"
    return run_in_node_1(running, AGENT_CALL, endpoint, tls_dir)


def test_node_agents_refuse_peers_without_the_sandbox_certificate(
    running: Place, tmp_path: Path
) -> None:
    stranger = CertificateAuthority.create("not this sandbox")
    stranger.issue(Identity.controller()).write(tmp_path / "stranger")
    assert call_agent_from_node_1(running, "-") == "UNAVAILABLE"  # plaintext
    assert call_agent_from_node_1(running, str(tmp_path / "stranger")) == "UNAVAILABLE"
    controller = running.directory / "tls" / "controller"
    assert call_agent_from_node_1(running, str(controller)) == "OK"


ETCD_CALL = """
import sys
from pathlib import Path
from csi_driver.core.errors import StoreUnavailable
from csi_driver.pki import CA_CERT, CERT, KEY, Identity, TlsBundle
from csi_driver.store.url import open_store
from csi_driver.transport import AgentSecurity

url, trusted, presented = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
security = None
if url.startswith("etcds://"):
    # Loaded file by file: a stranger's certificate may sit beside the sandbox's CA.
    pems = [d.read_bytes() for d in (trusted / CA_CERT, presented / CERT, presented / KEY)]
    bundle = TlsBundle.load(presented)
    security = AgentSecurity(TlsBundle(*pems, bundle.identity, bundle.not_after))
store = open_store(url, security=security)
try:
    store.get("nodes/node-1")
    print("OK")
except StoreUnavailable as exc:
    print("UNAVAILABLE", exc.message)
"""


def call_etcd_from_node_1(running: Place, url: str, presented: Path) -> str:
    """A catalog read from inside node 1's namespace, trusting the sandbox's CA."""
    trusted = running.directory / "tls" / "node-1"
    return run_in_node_1(running, ETCD_CALL, url, str(trusted), str(presented))


def test_etcd_admits_only_clients_with_the_sandbox_certificate(
    running: Place, tmp_path: Path
) -> None:
    address = running.status()["etcd"]["ADDRESS"]
    stranger = CertificateAuthority.create("not this sandbox")
    stranger.issue(Identity.node("node-1")).write(tmp_path / "stranger")
    own = running.directory / "tls" / "node-1"
    plaintext = call_etcd_from_node_1(running, f"etcd://{address}:2379", own)
    assert plaintext.startswith("UNAVAILABLE") and "etcds://" in plaintext
    refused = call_etcd_from_node_1(running, f"etcds://{address}:2379", tmp_path / "stranger")
    assert refused.startswith("UNAVAILABLE") and "certificate" in refused
    assert call_etcd_from_node_1(running, f"etcds://{address}:2379", own) == "OK"


def test_faults_name_unknown_members_clearly(running: Place) -> None:
    done = running.sandbox("kill", "node-9", check=False)
    assert done.returncode == 1
    assert "no member 'node-9'" in done.stderr and "node-3" in done.stderr


def test_a_second_up_in_the_same_directory_is_refused(running: Place) -> None:
    done = running.sandbox("up", "--nodes", "1", "--prefix", "other", check=False)
    assert done.returncode == 1
    assert "ferry sandbox down" in done.stderr
    assert {row["STATE"] for row in running.status().values()} == {"alive"}


# -- down, after an orderly life and after crashes ------------------------------------


def test_down_leaves_nothing_behind_even_with_a_volume_mounted(place: Place) -> None:
    place.up(2)
    volume = create_on(place, "node-1", "pvc-down")
    target = attach_and_mount(place, "node-1", volume.volume_id)
    assert mount_source(target) is not None
    found = leftovers(place)
    for kind in ("netns", "link", "mount", "loop", "process"):
        assert any(item.startswith(kind) for item in found), (kind, found)

    done = place.sandbox("down")
    assert "stopped 4 processes" in done.stdout
    assert leftovers(place) == []
    assert not (place.directory / "sandbox.json").exists()
    assert (place.directory / "logs" / "node-1.log").exists()  # kept for the post-mortem
    gone = place.sandbox("status", check=False)
    assert gone.returncode == 1 and "no sandbox" in gone.stderr


def _state(place: Place) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads((place.directory / "sandbox.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return doc


def test_down_cleans_up_after_every_process_was_killed(place: Place) -> None:
    place.up(2)
    volume = create_on(place, "node-2", "pvc-crash")
    attach_and_mount(place, "node-2", volume.volume_id)
    for record in _state(place)["processes"]:
        os.kill(record["pid"], signal.SIGKILL)  # a crash: nothing is cleaned up
    time.sleep(0.5)
    assert {row["STATE"] for row in place.status().values()} == {"dead"}
    assert any(item.startswith("mount") for item in leftovers(place))

    place.sandbox("down")
    assert leftovers(place) == []


def test_down_recovers_a_frozen_filesystem_a_lazy_unmount_left_attached(
    place: Place,
) -> None:
    """A node killed mid-capture leaves its volume frozen; an earlier down (or a crash
    during one) unmounted it lazily: in no mount table, its loop device still held."""
    pool = place.node_dir("node-1") / "pool"
    mountpoint = pool / "staged"
    mountpoint.mkdir(parents=True)
    image = pool / "vol.img"
    subprocess.run(["truncate", "--size", "32M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    device = subprocess.run(
        ["losetup", "--show", "--find", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        subprocess.run(["mount", device, str(mountpoint)], check=True)
        subprocess.run(["fsfreeze", "--freeze", str(mountpoint)], check=True)
        subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)
        assert [f for f in leftovers(place) if f.startswith("loop")]

        place.sandbox("down", "--prefix", place.prefix)
        assert leftovers(place) == []
    finally:
        # Only if it is still ours: a freed device may already serve another test.
        backing = Path(f"/sys/block/{Path(device).name}/loop/backing_file")
        ours = backing.exists() and backing.read_text().strip() == str(image)
        again = place.directory / "recover"
        again.mkdir(exist_ok=True)
        if ours and subprocess.run(["mount", device, str(again)], check=False).returncode == 0:
            subprocess.run(["fsfreeze", "--unfreeze", str(again)], check=False)
            subprocess.run(["umount", str(again)], check=False)
        if ours:
            subprocess.run(["losetup", "--detach", device], check=False)


def test_down_cleans_up_after_up_itself_crashed_midway(place: Place) -> None:
    where = ("--dir", str(place.directory), "--prefix", place.prefix)
    up = subprocess.Popen(
        [sys.executable, "-m", "csi_driver.cli", "sandbox", "up", "--nodes", "3", *where],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while len(_state(place).get("processes", [])) < 3 and up.poll() is None:
        assert time.monotonic() < deadline, "up never got to start the nodes"
        time.sleep(0.05)
    up.kill()
    up.wait()
    for record in _state(place)["processes"]:
        os.kill(record["pid"], signal.SIGKILL)
    assert any(item.startswith("netns") for item in leftovers(place))

    place.sandbox("down")
    assert leftovers(place) == []


def test_on_sqlite_the_nodes_reach_the_controllers_catalog_over_the_bridge(
    place: Place,
) -> None:
    done = place.sandbox("up", "--nodes", "2", "--prefix", place.prefix, "--catalog", "sqlite")
    table = parse_table(done.stdout)
    assert list(table) == ["controller", "node-1", "node-2"]
    assert {row["STATE"] for row in table.values()} == {"alive"}
    catalog = place.directory / "controller" / "catalog.db"
    assert catalog.exists()
    for node in ("node-1", "node-2"):
        pid = table[node]["PID"]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        assert argv[argv.index("--catalog") + 1].startswith("ferry://")
        held = {os.path.realpath(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert str(catalog) not in held

    volume = create_on(place, "node-2", "pvc-sqlite")
    target = attach_and_mount(place, "node-2", volume.volume_id)
    (Path(target) / "data").write_bytes(b"sqlite" * 1000)
    assert (Path(target) / "data").read_bytes() == b"sqlite" * 1000

    place.sandbox("down")
    assert leftovers(place) == []


def test_down_by_prefix_when_the_state_file_is_lost(place: Place) -> None:
    place.up(1)
    (place.directory / "sandbox.json").unlink()
    refused = place.sandbox("down", check=False)
    assert refused.returncode == 1 and "--prefix" in refused.stderr
    place.sandbox("down", "--prefix", place.prefix)
    assert leftovers(place) == []


def test_an_up_that_fails_takes_down_what_it_built(place: Place) -> None:
    done = place.sandbox(
        "up", "--nodes", "2", "--prefix", place.prefix, "--timeout", "0.5", check=False
    )
    assert done.returncode == 1
    assert "was not ready in time; its log" in done.stderr
    assert leftovers(place) == []
    assert not (place.directory / "sandbox.json").exists()
    assert (place.directory / "logs" / "etcd.log").exists()
