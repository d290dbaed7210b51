"""Moves between pools that reflink cost what changed, on every node they touch.

Two real node services (node-a all-in-one with the controller, node-b on its
own socket) keep their pools on one xfs filesystem (reflink=1) on a loop
device. The capture and adoption log records say how many bytes each read:
a move's final capture compares extents with the last capture of the same
volume (a replication round's, or the verified generation a promoted
replica started from), and the demoted primary's image becomes its
replica's base by that final capture, so none of them reads the whole image.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.chunks.manifest import BLOCK_SIZE
from csi_driver.core.model import MiB
from csi_driver.runtime import start_node
from tests.csi.conftest import NODE_ID, Ferry, node_config, running
from tests.csi.test_mobility import _digest, _eventually, _image, _publish, _scribble, _unpublish
from tests.node.conftest import requires_root, small_filesystem

pytestmark = [requires_root, pytest.mark.root]

SECOND = "node-b"
XFS = ["mkfs.xfs", "-q", "-m", "reflink=1"]


@pytest.fixture
def on_xfs(tmp_path: Path) -> Iterator[Ferry]:
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed (scripts/setup.sh installs it)")
    with small_filesystem(tmp_path, 512 * MiB, XFS, "x") as base:
        try:
            with running(base, node_config(base)) as ferry:
                node_b = start_node(
                    f"unix://{base}/csi-b.sock", node_config(base, SECOND), ferry.catalog
                )
                try:
                    yield ferry
                finally:
                    node_b.stop(grace_s=0)
        finally:
            _closed_under(base)
            _unmounted(base)


def _unmounted(base: Path, timeout_s: float = 20) -> None:
    """Unmount ``base`` (before the scratch filesystem tries once): retried while the
    stopped services' last threads still hold it busy, lazily in the end."""
    ends = time.monotonic() + timeout_s
    while subprocess.run(["umount", str(base)], capture_output=True, check=False).returncode:
        if time.monotonic() > ends:
            subprocess.run(["umount", "--lazy", str(base)], capture_output=True, check=False)
            return
        time.sleep(0.2)


def _closed_under(base: Path, timeout_s: float = 20) -> None:
    """Wait until this process holds no file under ``base`` open: a stopped node's
    last reconcile (a capture, an adoption) may still be reading, and the
    filesystem cannot be unmounted under it."""
    ends = time.monotonic() + timeout_s
    while time.monotonic() < ends:
        held = []
        for fd in Path("/proc/self/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd).startswith(f"{base}/"):
                    held.append(fd)
        if not held:
            return
        time.sleep(0.1)


def _read_by(caplog: pytest.LogCaptureFixture, message: str, node: str) -> list[int]:
    """bytes_read of each ``message`` record about a file under ``node``'s directory."""
    return [
        int(getattr(r, "bytes_read", -1))
        for r in caplog.records
        if r.getMessage() == message
        and f"/{node}/" in str(getattr(r, "image", getattr(r, "replica", "")))
    ]


def test_moves_between_reflink_pools_read_only_what_changed(
    on_xfs: Ferry, caplog: pytest.LogCaptureFixture
) -> None:
    ferry = on_xfs
    caplog.set_level(logging.INFO, logger="csi_driver.chunks")
    volume_id = ferry.create("thrifty", size=32 * MiB).volume_id
    _scribble(_image(ferry, NODE_ID, volume_id), [0, 8 * MiB, 16 * MiB, 24 * MiB], b"one")

    _publish(ferry, volume_id, SECOND)
    # The old primary's image becomes its replica's base by the move's final capture.
    _eventually(lambda: bool(_read_by(caplog, "generation adopted", NODE_ID)), "node-a's demotion")
    assert _read_by(caplog, "generation adopted", NODE_ID) == [0]

    _unpublish(ferry, volume_id, SECOND)
    caplog.clear()
    moved = _image(ferry, SECOND, volume_id)
    _scribble(moved, [9 * MiB], b"two")  # one 64 KiB block
    after = _digest(moved)

    context = _publish(ferry, volume_id, NODE_ID)

    assert context["ferry.csi.dev/epoch"] == "3"
    assert _digest(_image(ferry, NODE_ID, volume_id)) == after
    # node-b's captures (its final one, and any round before it) started from the
    # generation it was promoted from: together they read the written block.
    captured = _read_by(caplog, "image captured", SECOND)
    assert captured and 0 < sum(captured) <= 2 * BLOCK_SIZE, captured
    _eventually(lambda: bool(_read_by(caplog, "generation adopted", SECOND)), "node-b's demotion")
    assert _read_by(caplog, "generation adopted", SECOND) == [0]
