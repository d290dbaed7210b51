"""``python -m bench.snapshots``: how long CreateSnapshot takes, by volume size.

Starts Ferry all-in-one with its pool on a scratch filesystem and times
CreateSnapshot over the real CSI socket, from the call to its answer with
``ready_to_use: true`` (the node has taken the snapshot and made it
durable):

* on xfs (``reflink=1``): volumes of 1, 4 and 16 GiB, each with some data
  written into it (``--data-mib``), not staged; and one 4 GiB volume staged
  and mounted, so the snapshot includes its fsfreeze and thaw. A reflink
  shares the extents, so the time should be flat in the volume's size;
* the copy fallback, on ext4 (no reflink): volumes whose every byte is
  data (``--copy-sizes-mib``), since a copy costs what the volume holds.

Each case is snapshotted ``--repeat`` times (a new snapshot each time, each
deleted once timed, and the volume deleted after its case: Ferry charges
every snapshot its volume's full size, so keeping them all would need a pool
many times the volumes' size); medians and maxima are reported. Thick
images hold their size as reserved (unwritten) extents, which a sparse
scratch backing file stores for free, so the 16 GiB case needs no 16 GiB of
disk. Needs root.

Prints a table and writes JSON (default ``bench/results/snapshots-latest.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from csi_driver.core.model import GiB, MiB
from csi_driver.csi.client import CsiClient, mount_capability
from csi_driver.gen import csi_pb2
from csi_driver.runtime import NodeConfig, start_all_in_one
from csi_driver.sandbox.scratch import scratch_filesystem

NODE_ID = "bench-node"
XFS = ("mkfs.xfs", "-q", "-m", "reflink=1")
EXT4 = ("mkfs.ext4", "-q", "-m", "0")


@dataclass(frozen=True)
class Case:
    pool_fs: str
    method: str  # reflink or copy
    volume_bytes: int
    data_bytes: int
    staged: bool
    seconds: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return round(statistics.median(self.seconds), 4)

    @property
    def max_s(self) -> float:
        return round(max(self.seconds), 4)


@contextmanager
def ferry_on(pool_root: Path, work: Path, capacity: int) -> Iterator[CsiClient]:
    kubelet = work / "kubelet"
    kubelet.mkdir(exist_ok=True)
    config = NodeConfig(
        node_id=NODE_ID,
        pool_root=pool_root,
        kubelet_dirs=(kubelet,),
        agent_endpoint=f"unix://{work}/agent.sock",
        pool_capacity_bytes=capacity,
    )
    services = start_all_in_one(f"unix://{work}/csi.sock", config, work / "catalog.db")
    client = CsiClient(f"unix://{work}/csi.sock")
    try:
        client.wait_ready()
        yield client
    finally:
        client.close()
        services.stop(grace_s=0)
        (work / "catalog.db").unlink(missing_ok=True)


def _volume(client: CsiClient, name: str, size: int) -> str:
    request = csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[mount_capability()],
    )
    return str(client.controller.CreateVolume(request, timeout=300).volume.volume_id)


def _fill(image: Path, data_bytes: int) -> None:
    """Write ``data_bytes`` of random data spread over the image (real extents)."""
    size = image.stat().st_size
    block = os.urandom(4 * MiB)
    stride = max(len(block), size // max(1, data_bytes // len(block)))
    written = 0
    with open(image, "r+b") as handle:
        for offset in range(0, size, stride):
            if written >= data_bytes:
                break
            handle.seek(offset)
            handle.write(block[: min(len(block), data_bytes - written)])
            written += len(block)
        handle.flush()
        os.fsync(handle.fileno())


def _time_snapshots(client: CsiClient, volume_id: str, label: str, repeat: int) -> list[float]:
    """Seconds each of ``repeat`` CreateSnapshot calls took; each snapshot is deleted
    after it is timed (its space charge would otherwise add up)."""
    seconds = []
    for n in range(repeat):
        request = csi_pb2.CreateSnapshotRequest(name=f"{label}-{n}", source_volume_id=volume_id)
        started = time.perf_counter()
        snapshot = client.controller.CreateSnapshot(request, timeout=600).snapshot
        seconds.append(time.perf_counter() - started)
        if not snapshot.ready_to_use:
            raise RuntimeError(f"snapshot {snapshot.snapshot_id} answered not ready")
        client.controller.DeleteSnapshot(
            csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id), timeout=300
        )
    return seconds


def _delete_volume(client: CsiClient, volume_id: str) -> None:
    client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=300)


def reflink_cases(work: Path, sizes_gib: list[int], data: int, repeat: int) -> list[Case]:
    cases = []
    # One volume and one snapshot of it charged at a time, the staged 4 GiB case too.
    total = 2 * max([*sizes_gib, 4]) * GiB + 8 * GiB
    with scratch_filesystem(work, total + 4 * GiB, XFS, name="xfs") as mount:
        pool = mount / "pool"
        with ferry_on(pool, work, total) as client:
            for gib in sizes_gib:
                volume = _volume(client, f"v{gib}", gib * GiB)
                _fill(pool / "images" / f"{volume}.img", data)
                seconds = _time_snapshots(client, volume, f"s{gib}", repeat)
                cases.append(Case("xfs", "reflink", gib * GiB, data, False, tuple(seconds)))
                _delete_volume(client, volume)
            staged = _volume(client, "staged", 4 * GiB)
            staging = work / "kubelet" / "staged"
            client.node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=staged,
                    staging_target_path=str(staging),
                    volume_capability=mount_capability(),
                ),
                timeout=300,
            )
            try:
                (staging / "data").write_bytes(os.urandom(data))
                seconds = _time_snapshots(client, staged, "staged", repeat)
                cases.append(Case("xfs", "reflink", 4 * GiB, data, True, tuple(seconds)))
            finally:
                client.node.NodeUnstageVolume(
                    csi_pb2.NodeUnstageVolumeRequest(
                        volume_id=staged, staging_target_path=str(staging)
                    ),
                    timeout=60,
                )
    return cases


def copy_cases(work: Path, sizes_mib: list[int], repeat: int) -> list[Case]:
    cases = []
    total = sum(sizes_mib) * MiB * (repeat + 1) + GiB
    with scratch_filesystem(work, total + GiB, EXT4, name="ext4") as mount:
        pool = mount / "pool"
        with ferry_on(pool, work, total) as client:
            for mib in sizes_mib:
                volume = _volume(client, f"c{mib}", mib * MiB)
                _fill(pool / "images" / f"{volume}.img", mib * MiB)
                seconds = _time_snapshots(client, volume, f"c{mib}", repeat)
                cases.append(Case("ext4", "copy", mib * MiB, mib * MiB, False, tuple(seconds)))
                _delete_volume(client, volume)
    return cases


def _size(n: int) -> str:
    return f"{n // GiB} GiB" if n >= GiB and n % GiB == 0 else f"{n // MiB} MiB"


def render(cases: list[Case]) -> str:
    lines = [
        "| pool | method | volume | data in it | staged (fsfreeze) | median | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        lines.append(
            f"| {c.pool_fs} | {c.method} | {_size(c.volume_bytes)} | {_size(c.data_bytes)} "
            f"| {'yes' if c.staged else 'no'} | {c.median_s} s | {c.max_s} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.snapshots", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--sizes-gib", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--data-mib", type=int, default=256, help="data written in each")
    parser.add_argument("--copy-sizes-mib", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch (default /var/tmp)")
    parser.add_argument("--output", type=Path, default=Path("bench/results/snapshots-latest.json"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the snapshot benchmark needs root: loop devices, mounts")
        return 2
    if shutil.which("mkfs.xfs") is None:
        print("mkfs.xfs is missing: run scripts/setup.sh")
        return 2
    work = Path(tempfile.mkdtemp(prefix="ferry-bench-snapshots-", dir=args.workdir or "/var/tmp"))
    try:
        cases = reflink_cases(work, args.sizes_gib, args.data_mib * MiB, args.repeat)
        cases += copy_cases(work, args.copy_sizes_mib, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(render(cases))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    document = {"cases": [asdict(c) | {"median_s": c.median_s, "max_s": c.max_s} for c in cases]}
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
