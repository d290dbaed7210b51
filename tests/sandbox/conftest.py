"""Real sandboxes for the tests: ``ferry sandbox`` run as a user runs it.

Each sandbox gets its own short directory under /tmp (unix socket paths are
short) and a unique name prefix, so parallel runs never share a namespace, a
link or a file. Teardown always runs ``down`` by prefix, whatever the test
did, then removes the directory. ``leftovers`` looks at the host directly
(``/run/netns``, ``/sys``, ``/proc``), not through the sandbox's own code.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from csi_driver.csi.client import CsiClient
from csi_driver.sandbox.harness import Sandbox

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("ip", "nsenter", "etcd", "etcdctl", "losetup", "mkfs.ext4")


def _missing() -> str | None:
    if os.geteuid() != 0 or not Path("/dev/loop-control").exists():
        return "needs root and /dev/loop-control (namespaces, loop devices, mounts)"
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if absent:
        return f"needs {', '.join(absent)} (bash scripts/setup.sh installs them)"
    return None


requires_host = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def run_ferry(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "csi_driver.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"ferry {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done


def parse_table(text: str) -> dict[str, dict[str, str]]:
    """The sandbox's table as {member: {column: cell}}."""
    lines = text.strip().splitlines()
    header = lines[0].split()
    rows = [dict(zip(header, line.split(), strict=True)) for line in lines[1:]]
    return {row["NODE"]: row for row in rows}


@dataclass
class Place:
    """Where one test's sandbox lives."""

    directory: Path
    prefix: str

    def sandbox(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_ferry("sandbox", *args, "--dir", str(self.directory), check=check)

    def up(self, nodes: int) -> dict[str, dict[str, str]]:
        done = self.sandbox("up", "--nodes", str(nodes), "--prefix", self.prefix)
        return parse_table(done.stdout)

    def status(self) -> dict[str, dict[str, str]]:
        return parse_table(self.sandbox("status").stdout)

    def fault(self, action: str, member: str) -> dict[str, str]:
        return parse_table(self.sandbox(action, member).stdout)[member]

    def socket(self, member: str) -> str:
        if member == "controller":
            return f"unix://{self.directory}/controller/csi.sock"
        return f"unix://{self.directory}/nodes/{member}/csi.sock"

    def client(self, member: str) -> CsiClient:
        return CsiClient(self.socket(member))

    def node_dir(self, member: str) -> Path:
        return self.directory / "nodes" / member

    def end_connections(self, member: str) -> None:
        """Reset ``member``'s TCP connections, as a long partition ends them (keepalives,
        a peer's reset): its watches break and its channels connect again."""
        namespace = self.status()[member]["NAMESPACE"]
        subprocess.run(
            ["ip", "netns", "exec", namespace, "ss", "-K", "state", "established"],
            check=True,
            capture_output=True,
        )


def leftovers(place: Place) -> list[str]:
    """Everything of the sandbox still on the host, read from the kernel directly."""
    prefix, base = place.prefix + "-", str(place.directory) + "/"
    found = []
    netns = Path("/run/netns")
    if netns.exists():
        found += [f"netns {n.name}" for n in netns.iterdir() if n.name.startswith(prefix)]
    links = Path("/sys/class/net").iterdir()
    found += [f"link {n.name}" for n in links if n.name.startswith(prefix)]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mountpoint = line.split()[4]
        if mountpoint.startswith(base):
            found.append(f"mount {mountpoint}")
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().startswith(base):
                found.append(f"loop {backing.parent.parent.name}")
        except FileNotFoundError:
            continue
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z" and (str(place.directory) in cmdline or prefix in cmdline):
            found.append(f"process {proc.name}: {cmdline[:80]}")
    return found


@contextmanager
def _new_place() -> Iterator[Place]:
    directory = Path(tempfile.mkdtemp(prefix="fysb-", dir="/tmp"))
    spot = Place(directory, "t" + secrets.token_hex(3))
    try:
        yield spot
    finally:
        try:
            Sandbox(directory).down(spot.prefix)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def place() -> Iterator[Place]:
    with _new_place() as spot:
        yield spot


@pytest.fixture(scope="module")
def running() -> Iterator[Place]:
    """One three-node sandbox shared by a module's tests (bringing one up takes seconds)."""
    if _missing():
        pytest.skip(_missing() or "")
    with _new_place() as spot:
        spot.up(3)
        yield spot
