"""Settings for the whole suite, and the one fixture tests in several packages share.

Hypothesis runs without its per-example deadline: no property here is about
speed (speed is measured in bench/), and on a loaded shared machine a
generated example can take longer than the 200 ms default for reasons that
say nothing about the code. Its "too slow to generate" health check goes for
the same reason. Every property still runs all its examples.

``no_direct_io`` is a directory on a real filesystem that refuses
``O_DIRECT`` (ramfs: EINVAL at open), for the buffered fallbacks of Ferry's
direct I/O, which the test machine's ext4 and tmpfs never take.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ferry", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ferry")


@pytest.fixture
def no_direct_io(tmp_path: Path) -> Iterator[Path]:
    """A ramfs mounted under ``tmp_path`` (root only), unmounted whether the test
    passed or not."""
    if os.geteuid() != 0:
        pytest.skip("mounting a ramfs needs root")
    mountpoint = tmp_path / "ramfs"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "-o", "mode=700", "ramfs", mountpoint], check=True)
    try:
        probe = mountpoint / "probe"
        probe.touch()
        try:
            os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        except OSError as exc:
            assert exc.errno == errno.EINVAL, exc
        else:
            pytest.fail(f"{mountpoint} (ramfs) took O_DIRECT: these tests need a refusal")
        probe.unlink()
        yield mountpoint
    finally:
        # A file a failed test left open keeps the mount busy: detach it anyway.
        if subprocess.run(["umount", mountpoint], check=False).returncode:
            subprocess.run(["umount", "--lazy", mountpoint], check=True)
