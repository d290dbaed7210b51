"""The kernel-log reader, fed through the real /dev/kmsg (root only).

Lines are written the way Ferry writes its attach marker, one open per line
(the kernel rate-limits writes per open file), for a loop device number no
host has (loop9xx), so nothing else's errors can match.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from csi_driver.node.health import KMSG, KernelLog

pytestmark = pytest.mark.root


@pytest.fixture
def device() -> str:
    if os.geteuid() != 0 or not os.access(KMSG, os.W_OK):
        pytest.skip("needs root and a writable /dev/kmsg")
    return f"/dev/loop{random.randrange(900, 999)}"


def kernel_says(line: str) -> None:
    fd = os.open(KMSG, os.O_WRONLY)
    try:
        os.write(fd, f"<3>{line}\n".encode())
    finally:
        os.close(fd)


def test_failed_io_counts_from_the_attach_and_ignores_unsupported_requests(device: str) -> None:
    name = Path(device).name
    log = KernelLog()
    log.mark_attached(device, Path("/pool/images/vol-x.img"))
    assert log.failed_io(device) is None

    # mkfs asks for WRITE_ZEROES; a device without it refuses, mkfs writes zeros itself.
    kernel_says(f"operation not supported error, dev {name}, sector 8 op 0x9:(WRITE_ZEROES)")
    assert log.failed_io(device) is None

    kernel_says(f"critical space allocation error, dev {name}, sector 8 op 0x1:(WRITE)")
    failed = log.failed_io(device)
    assert failed is not None and "critical space allocation" in failed

    # A new attachment of the same number starts clean.
    log.mark_attached(device, Path("/pool/images/vol-y.img"))
    assert log.failed_io(device) is None
