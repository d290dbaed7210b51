"""``ferry demo``: Ferry's main job on one machine, shown step by step.

Starts Ferry all-in-one on embedded defaults (SQLite catalog, a pool
directory, real loop devices), then plays kubelet and the sidecars over the
real CSI socket: provision, attach, stage, publish, write and read through
the mount, unpublish, restage and check the data survived, expand (online,
or at restage where the kernel refuses online ext4 growth), tear down.
Each step prints what it did and how long it took.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc

from csi_driver import DRIVER_NAME
from csi_driver.core.errors import FerryError
from csi_driver.csi.client import CsiClient, mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.node.teardown import release_under
from csi_driver.runtime import NodeConfig, Services, start_all_in_one

T = TypeVar("T")
NODE_ID = "demo-node"
WRITE_BYTES = 32 * 1024 * 1024


class Walkthrough:
    """Prints numbered, timed steps and keeps them for the closing table."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []

    def step(self, title: str, action: Callable[[], T], detail: Callable[[T], str] = str) -> T:
        started = time.perf_counter()
        result = action()
        elapsed = time.perf_counter() - started
        self.steps.append((title, elapsed))
        note = detail(result)
        print(f"  {len(self.steps):>2}. {title:<46} {elapsed * 1000:9.1f} ms  {note}", flush=True)
        return result

    def table(self) -> None:
        total = sum(t for _, t in self.steps)
        print(f"\n  {len(self.steps)} steps in {total:.2f} s")


def _write_pattern(path: Path, size: int) -> tuple[str, float]:
    digest = hashlib.sha256()
    block = os.urandom(1024 * 1024)
    started = time.perf_counter()
    with path.open("wb") as out:
        for i in range(size // len(block)):
            chunk = block[:8] + i.to_bytes(8, "little") + block[16:]
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    rate = size / (time.perf_counter() - started) / 1e6
    return digest.hexdigest(), rate


def _read_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while chunk := src.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _size_of(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_blocks * stats.f_frsize


@contextmanager
def _ferry(workdir: Path) -> Iterator[tuple[Services, str, Path]]:
    kubelet = workdir / "kubelet"
    kubelet.mkdir(parents=True, exist_ok=True)
    config = NodeConfig(
        node_id=NODE_ID,
        pool_root=workdir / "pool",
        kubelet_dirs=(kubelet,),
        agent_endpoint=f"unix://{workdir}/agent.sock",
    )
    endpoint = f"unix://{workdir}/csi.sock"
    services = start_all_in_one(endpoint, config, workdir / "catalog.db")
    try:
        yield services, endpoint, kubelet
    finally:
        services.stop(grace_s=1.0)


def run_demo(workdir: Path, size: int, fs_type: str, *, keep: bool = False) -> int:
    """Run the walkthrough; return a process exit code."""
    if os.geteuid() != 0:
        print("ferry demo needs root: it attaches loop devices and mounts filesystems.")
        return 2
    workdir = workdir.resolve()
    print(f"Ferry demo: one node, SQLite catalog, pool in {workdir}/pool\n")
    walk = Walkthrough()
    try:
        with _ferry(workdir) as (_, endpoint, kubelet), CsiClient(endpoint) as csi:
            csi.wait_ready()
            _walk(walk, csi, kubelet, size, fs_type)
    except FerryError as exc:
        print(f"\ndemo failed: {exc.message}")
        return 1
    except grpc.RpcError as exc:
        print(f"\ndemo failed: {exc.code().name}: {exc.details()}")
        return 1
    finally:
        if not keep:
            release_under(workdir)
            shutil.rmtree(workdir, ignore_errors=True)
    walk.table()
    print("  Ferry works on this machine: the data survived unstage/restage and expansion.")
    return 0


def _walk(walk: Walkthrough, csi: CsiClient, kubelet: Path, size: int, fs_type: str) -> None:
    info = walk.step(
        "GetPluginInfo + Probe",
        lambda: (
            csi.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest()),
            csi.identity.Probe(csi_pb2.ProbeRequest()),
        ),
        lambda r: f"{r[0].name} {r[0].vendor_version}, ready={r[1].ready.value}",
    )
    assert info[0].name == DRIVER_NAME
    cap = mount_capability(fs_type)
    name = f"pvc-demo-{uuid.uuid4().hex[:8]}"
    volume: Any = walk.step(
        f"CreateVolume {name}",
        lambda: (
            csi.controller.CreateVolume(
                csi_pb2.CreateVolumeRequest(
                    name=name,
                    capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                    volume_capabilities=[cap],
                )
            ).volume
        ),
        lambda v: f"{v.volume_id} {v.capacity_bytes >> 20} MiB",
    )
    vid = volume.volume_id
    staging = kubelet / "plugins/kubernetes.io/csi" / DRIVER_NAME / vid[-12:] / "globalmount"
    target = kubelet / "pods" / uuid.uuid4().hex / "volumes/kubernetes.io~csi" / name / "mount"
    staging.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    publish_context: Any = walk.step(
        "ControllerPublishVolume",
        lambda: (
            csi.controller.ControllerPublishVolume(
                csi_pb2.ControllerPublishVolumeRequest(
                    volume_id=vid, node_id=NODE_ID, volume_capability=cap
                )
            ).publish_context
        ),
        lambda c: f"epoch {c.get('ferry.csi.dev/epoch', '?')}",
    )

    def stage() -> None:
        csi.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=vid,
                staging_target_path=str(staging),
                volume_capability=cap,
                publish_context=publish_context,
                volume_context=volume.volume_context,
            )
        )

    def publish() -> None:
        csi.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vid,
                staging_target_path=str(staging),
                target_path=str(target),
                volume_capability=cap,
                publish_context=publish_context,
                volume_context=volume.volume_context,
            )
        )

    def unpublish_unstage() -> None:
        csi.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target))
        )
        csi.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging))
        )

    walk.step(f"NodeStageVolume (new volume: mkfs.{fs_type})", stage, lambda _: "loop + mount")
    walk.step("NodePublishVolume", publish, lambda _: f"bind mount at .../{target.name}")
    data = target / "data.bin"
    digest, _ = walk.step(
        f"write {WRITE_BYTES >> 20} MiB through the mount",
        lambda: _write_pattern(data, WRITE_BYTES),
        lambda r: f"{r[1]:.0f} MB/s, sha256 {r[0][:12]}",
    )
    walk.step(
        "read it back",
        lambda: _read_digest(data),
        lambda d: "matches" if d == digest else "MISMATCH",
    )
    walk.step(
        "NodeUnpublishVolume + NodeUnstageVolume",
        unpublish_unstage,
        lambda _: "unmounted, loop detached",
    )
    walk.step("NodeStageVolume (existing filesystem)", stage, lambda _: "no mkfs")
    walk.step("NodePublishVolume", publish, lambda _: "")
    again = walk.step(
        "read the data after restaging",
        lambda: _read_digest(data),
        lambda d: "identical" if d == digest else "MISMATCH",
    )
    if again != digest:
        raise RuntimeError("data changed across unstage/restage")
    before = _size_of(target)
    grown: Any = walk.step(
        "ControllerExpandVolume (x2)",
        lambda: csi.controller.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=vid,
                capacity_range=csi_pb2.CapacityRange(required_bytes=2 * volume.capacity_bytes),
                volume_capability=cap,
            )
        ),
        lambda r: f"image now {r.capacity_bytes >> 20} MiB",
    )

    def node_expand() -> None:
        csi.node.NodeExpandVolume(
            csi_pb2.NodeExpandVolumeRequest(
                volume_id=vid,
                volume_path=str(target),
                staging_target_path=str(staging),
                capacity_range=csi_pb2.CapacityRange(required_bytes=grown.capacity_bytes),
                volume_capability=cap,
            )
        )

    try:
        walk.step(
            "NodeExpandVolume (online)",
            node_expand,
            lambda _: f"filesystem {before >> 20} -> {_size_of(target) >> 20} MiB",
        )
    except grpc.RpcError as exc:
        if exc.code() is not grpc.StatusCode.FAILED_PRECONDITION:
            raise
        print(f"      online growth refused here: {exc.details()}")
        walk.step("NodeUnpublishVolume + NodeUnstageVolume", unpublish_unstage, lambda _: "")
        walk.step("NodeStageVolume (grows the filesystem offline)", stage, lambda _: "")
        walk.step("NodePublishVolume", publish, lambda _: "")
        walk.step(
            "NodeExpandVolume",
            node_expand,
            lambda _: f"filesystem {before >> 20} -> {_size_of(target) >> 20} MiB",
        )
    if _read_digest(data) != digest:
        raise RuntimeError("data changed across expansion")
    walk.step(
        "NodeGetVolumeStats",
        lambda: csi.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=str(target))
        ),
        lambda r: (
            f"{r.usage[0].used >> 20}/{r.usage[0].total >> 20} MiB used, "
            f"abnormal={r.volume_condition.abnormal}"
        ),
    )
    walk.step("NodeUnpublishVolume + NodeUnstageVolume", unpublish_unstage, lambda _: "")
    walk.step(
        "ControllerUnpublishVolume + DeleteVolume",
        lambda: (
            csi.controller.ControllerUnpublishVolume(
                csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=NODE_ID)
            ),
            csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid)),
        ),
        lambda _: "image removed",
    )
