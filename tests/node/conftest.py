"""Fixtures that build a node: a pool, loop devices, filesystems, mounts.

``agent`` is a real node (root only): everything a test creates lives under
its tmp_path; teardown unmounts what is mounted there and detaches loop
devices backed by files there, whether the test passed or not.

``hands_off_agent`` runs anywhere, as any user: a real pool and state under
tmp_path, and host interfaces that fail the test on any use. It is for
proving what the agent refuses *before* it touches the host; it never
stands in for a kernel.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from csi_driver.core.model import GiB, MiB
from csi_driver.node.agent import NodeAgent
from csi_driver.node.pool import Pool
from csi_driver.node.runner import CommandRunner
from csi_driver.node.teardown import release_under
from csi_driver.sandbox.scratch import scratch_filesystem

ROOT_REASON = "needs root and /dev/loop-control (loop devices, mkfs, mount)"


def host_can_mount() -> bool:
    return os.geteuid() == 0 and Path("/dev/loop-control").exists()


requires_root = pytest.mark.skipif(not host_can_mount(), reason=ROOT_REASON)
CAP_SYS_RESOURCE = 24


def loops_under(base: Path) -> list[str]:
    """The loop devices attached to a backing file below ``base``."""
    listed = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    prefix = str(base.resolve()) + "/"
    return [line.split()[0] for line in listed.splitlines() if prefix in line]


def loops_gone_under(base: Path, ceiling_s: float = 30.0) -> list[str]:
    """:func:`loops_under` once none is left or ``ceiling_s`` passed: the kernel
    lets an auto-clearing loop device go asynchronously after its last user."""
    ends = time.monotonic() + ceiling_s
    while (left := loops_under(base)) and time.monotonic() < ends:
        time.sleep(0.05)
    return left


def has_cap_sys_resource() -> bool:
    """Whether this process may grow a mounted ext4 (the kernel asks for CAP_SYS_RESOURCE)."""
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes (other than this one) that contain ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.fixture
def host_dir(tmp_path: Path) -> Iterator[Path]:
    if not host_can_mount():
        pytest.skip(ROOT_REASON)
    try:
        yield tmp_path
    finally:
        release_under(tmp_path)


@pytest.fixture
def pool(host_dir: Path) -> Pool:
    return Pool(host_dir / "pool", capacity_bytes=4 * GiB)


@pytest.fixture
def kubelet(host_dir: Path) -> Path:
    path = host_dir / "kubelet"
    path.mkdir()
    return path


@pytest.fixture
def agent(pool: Pool, kubelet: Path) -> NodeAgent:
    return NodeAgent("node-a", pool, CommandRunner(), [kubelet])


class HostUntouchable:
    """Loop devices, filesystems or mounts that fail the test when used at all."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, method: str) -> Callable[..., NoReturn]:
        def touched(*args: Any, **kwargs: Any) -> NoReturn:
            pytest.fail(f"the agent touched the host ({self._name}.{method}{args}) first")

        return touched


@pytest.fixture
def hands_off_agent(tmp_path: Path) -> NodeAgent:
    kubelet = tmp_path / "kubelet"
    kubelet.mkdir()
    return NodeAgent(
        "node-a",
        Pool(tmp_path / "pool", capacity_bytes=4 * GiB),
        CommandRunner(),
        [kubelet],
        loops=HostUntouchable("loops"),  # type: ignore[arg-type]
        filesystems=HostUntouchable("filesystems"),  # type: ignore[arg-type]
        mounts=HostUntouchable("mounts"),  # type: ignore[arg-type]
        encryption=HostUntouchable("encryption"),  # type: ignore[arg-type]
    )


def new_volume_id(n: int) -> str:
    return f"vol-{n:032x}"


DEFAULT_SIZE = 64 * MiB
XFS_SIZE = 320 * MiB


#: A real filesystem on a loop device, mounted at ``base/fs`` (see csi_driver.sandbox.scratch).
small_filesystem = scratch_filesystem
