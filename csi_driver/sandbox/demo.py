"""``ferry demo``: the point of Ferry on this machine, in under a minute.

Brings up a three-node sandbox (etcd, a controller, three node processes
in network namespaces, mutual TLS), then plays kubelet and the sidecars
over the real CSI sockets:

1. a volume with a warm replica (``replicas: 1``, ``rpoSeconds: 1``,
   ``failoverPolicy: promote``) is provisioned on node-1 and mounted;
2. a workload writes to it, fsyncing every record and keeping a checksum
   of each one acknowledged;
3. the workload moves to node-2 as Kubernetes moves it (unpublish,
   unstage, detach, then attach on node-2, retried while the move runs);
   every acknowledged record reads back identical there; the downtime
   and the bytes the final sync shipped are printed;
4. node-2 is killed (SIGKILL): its replica is promoted, the data-loss
   window is printed, and the volume is mounted on its new node.

Everything is taken down at the end (``--keep`` leaves the sandbox up).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from csi_driver.core.errors import FerryError
from csi_driver.core.placement import NODE_KEY
from csi_driver.csi.client import CsiClient, mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.node.runner import CommandRunner
from csi_driver.sandbox.harness import Sandbox
from csi_driver.sandbox.plan import SandboxPlan

T = TypeVar("T")
MiB = 1024 * 1024
RECORD = 64 * 1024
RETRYABLE = (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE)
PARAMETERS = {"replicas": "1", "rpoSeconds": "1", "failoverPolicy": "promote"}


class Demo:
    """One sandbox and the CSI calls a CO would make on it."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.directory = sandbox.directory
        self._started = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self._started:5.1f}s] {text}", flush=True)

    def client(self, member: str) -> CsiClient:
        if member == "controller":
            return CsiClient(f"unix://{self.directory}/controller/csi.sock")
        return CsiClient(f"unix://{self.directory}/nodes/{member}/csi.sock")

    def paths(self, node: str, volume_id: str) -> tuple[str, str]:
        kubelet = self.directory / "nodes" / node / "kubelet"
        staging = kubelet / "plugins" / "kubernetes.io" / "csi" / volume_id / "globalmount"
        target = kubelet / "pods" / "app" / "volumes" / "kubernetes.io~csi" / volume_id / "mount"
        return str(staging), str(target)

    def create(self, size: int, parameters: dict[str, str] = PARAMETERS) -> str:
        """A volume on node-1."""
        request = csi_pb2.CreateVolumeRequest(
            name=f"pvc-demo-{secrets.token_hex(3)}",
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[mount_capability()],
            parameters=parameters,
        )
        request.accessibility_requirements.requisite.add().segments[NODE_KEY] = "node-1"
        with self.client("controller") as csi:
            return str(csi.controller.CreateVolume(request, timeout=60).volume.volume_id)

    def attach(self, volume_id: str, node: str) -> dict[str, str]:
        """ControllerPublishVolume as the external-attacher makes it: retried."""
        request = csi_pb2.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=node, volume_capability=mount_capability()
        )
        ends = time.monotonic() + 60
        while True:
            try:
                with self.client("controller") as csi:
                    reply = csi.controller.ControllerPublishVolume(request, timeout=5)
                return dict(reply.publish_context)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or time.monotonic() > ends:
                    raise
                self.say(f"  attacher retries: {exc.details()}")
                time.sleep(0.5)

    def detach(self, volume_id: str, node: str) -> None:
        with self.client("controller") as csi:
            csi.controller.ControllerUnpublishVolume(
                csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node),
                timeout=30,
            )

    def mount(self, volume_id: str, node: str, context: dict[str, str]) -> Path:
        staging, target = self.paths(node, volume_id)
        capability = mount_capability()
        with self.client(node) as csi:
            csi.node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=volume_id,
                    staging_target_path=staging,
                    volume_capability=capability,
                    publish_context=context,
                ),
                timeout=60,
            )
            csi.node.NodePublishVolume(
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=volume_id,
                    staging_target_path=staging,
                    target_path=target,
                    volume_capability=capability,
                    publish_context=context,
                ),
                timeout=60,
            )
        return Path(target)

    def unmount(self, volume_id: str, node: str) -> None:
        staging, target = self.paths(node, volume_id)
        with self.client(node) as csi:
            csi.node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target),
                timeout=30,
            )
            csi.node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging),
                timeout=30,
            )

    def volume(self, volume_id: str) -> dict[str, Any]:
        """What ``ferry volumes --json`` reports of the volume (read in the sandbox)."""
        argv = (sys.executable, "-m", "csi_driver.cli", "volumes", "--json")
        done = CommandRunner().run((*argv, "--sandbox", str(self.directory)), timeout_s=30)
        found: list[dict[str, Any]] = json.loads(done.stdout)
        return next(v for v in found if v["volume_id"] == volume_id)

    def wait(self, what: str, check: Callable[[], T | None], timeout_s: float = 30) -> T:
        ends = time.monotonic() + timeout_s
        while (found := check()) is None or found is False:
            if time.monotonic() > ends:
                raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
            time.sleep(0.2)
        return found


class Workload:
    """Appends records to a file, fsyncing each; remembers the checksums acknowledged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.acknowledged: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while not self._stop.is_set():
                record = secrets.token_bytes(RECORD)
                os.write(fd, record)
                os.fsync(fd)
                self.acknowledged.append(hashlib.sha256(record).hexdigest())
        except OSError:
            return  # the node under it died: what was acknowledged is what counts
        finally:
            os.close(fd)

    def run_for(self, seconds: float) -> None:
        self._thread.start()
        time.sleep(seconds)
        self._stop.set()
        self._thread.join()

    def intact_in(self, path: Path) -> int:
        """How many acknowledged records read back identical from ``path`` (all, or raise)."""
        data = path.read_bytes()
        for index, wanted in enumerate(self.acknowledged):
            found = hashlib.sha256(data[index * RECORD : (index + 1) * RECORD]).hexdigest()
            if found != wanted:
                raise AssertionError(f"acknowledged record {index} differs after the move")
        return len(self.acknowledged)


def run_mobility_demo(workdir: Path, size: int, *, keep: bool = False) -> int:
    """The walkthrough; a process exit code."""
    if os.geteuid() != 0:
        print("ferry demo needs root: network namespaces, loop devices and mounts.")
        return 2
    workdir = workdir.resolve()
    sandbox = Sandbox(workdir)
    plan = SandboxPlan(workdir, f"fd{secrets.token_hex(3)}", 3)
    demo = Demo(sandbox)
    print("Ferry demo: a volume follows its pod between three nodes on this machine\n")
    try:
        sandbox.up(plan)
        demo.say(f"sandbox up in {workdir}: etcd, a controller, node-1..node-3 (mutual TLS)")
        _walk(demo, size)
    except (FerryError, grpc.RpcError, AssertionError, TimeoutError) as exc:
        detail = exc.message if isinstance(exc, FerryError) else str(exc)
        if isinstance(exc, grpc.RpcError):
            detail = f"{exc.code().name}: {exc.details()}"
        print(f"\ndemo failed: {detail}")
        return 1
    finally:
        if not keep:
            try:
                sandbox.down(plan.prefix)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _walk(demo: Demo, size: int) -> None:
    volume_id = demo.create(size)
    demo.say(f"volume {volume_id}: {size // MiB} MiB on node-1, {PARAMETERS}")
    mounted = demo.mount(volume_id, "node-1", demo.attach(volume_id, "node-1"))
    workload = Workload(mounted / "journal")
    workload.run_for(2.0)
    written = len(workload.acknowledged) * RECORD
    demo.say(
        f"workload on node-1 wrote {written / MiB:.1f} MiB in "
        f"{len(workload.acknowledged)} fsynced records"
    )
    replica = demo.wait(
        "a warm replica", lambda: next((r for r in demo.volume(volume_id)["replicas"]), None)
    )
    demo.say(f"warm replica on {replica['node_id']} (lag {replica['lag_s']} s)")

    demo.unmount(volume_id, "node-1")
    demo.detach(volume_id, "node-1")
    demo.say("pod deleted on node-1: unpublished, unstaged, detached")
    started = time.monotonic()
    context = demo.attach(volume_id, "node-2")
    mounted = demo.mount(volume_id, "node-2", context)
    downtime = time.monotonic() - started
    move = demo.volume(volume_id)["move"]
    demo.say(
        f"pod on node-2: attach + stage + publish in {downtime:.2f} s; the final sync shipped "
        f"{move['final_bytes'] / MiB:.1f} MiB; epoch {context['ferry.csi.dev/epoch']}"
    )
    intact = workload.intact_in(mounted / "journal")
    demo.say(f"verified: all {intact} acknowledged records identical on node-2")

    again = Workload(mounted / "journal-2")
    again.run_for(1.0)
    stopped_at = time.time()

    def caught_up() -> dict[str, Any] | None:
        # A capture taken after the second workload stopped: its age (lag_s) is less
        # than the time since. Not a fixed lag: on a loaded machine a round of
        # capture and sync may always take longer than a few seconds.
        since = time.time() - stopped_at  # before the read: its lag_s is older still
        replicas = demo.volume(volume_id)["replicas"]
        return next((r for r in replicas if r["lag_s"] is not None and r["lag_s"] < since), None)

    demo.wait("node-1's replica to catch up", caught_up, timeout_s=120)
    demo.sandbox.kill("node-2")
    demo.say("node-2 killed (SIGKILL) with the volume mounted")
    demo.detach(volume_id, "node-2")  # Kubernetes' force detach (out-of-service taint)
    failover = demo.wait("the failover", lambda: demo.volume(volume_id)["failover"], timeout_s=45)
    demo.say(
        f"promoted {failover['to_node']} (epoch {failover['epoch']}); data-loss window "
        f"{failover['data_loss_window_s']:.1f} s: writes after the replica's last capture"
    )
    survivor = failover["to_node"]
    mounted = demo.mount(volume_id, survivor, demo.attach(volume_id, survivor))
    intact = workload.intact_in(mounted / "journal")
    demo.say(
        f"pod on {survivor}: the first workload's {intact} records intact; "
        "the data survived the move and the node's loss"
    )
    demo.unmount(volume_id, survivor)
