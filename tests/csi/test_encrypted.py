"""Encrypted volumes over the CSI socket, on real loop devices, ext4 and fscrypt.

What is proved: the image on the pool holds none of the plaintext written
through the mount (its raw bytes are scanned after unstage, and the same scan
finds the pattern in an unencrypted volume's image); a node without the key
reads only ciphertext; a wrong, missing or malformed key is refused with the
code the spec means and leaves nothing staged; block and xfs volumes are
refused with the reason; stats and expansion work as on any volume.
"""

from __future__ import annotations

import base64
import errno
import mmap
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.core.encryption import ENCRYPTED_CONTEXT_KEY, SECRET_KEY
from csi_driver.core.model import MiB
from csi_driver.gen import csi_pb2
from csi_driver.node.agent import ENCRYPTED_DIR
from csi_driver.node.loop import LoopDevices
from csi_driver.node.runner import CommandRunner
from csi_driver.node.teardown import release_under
from tests.csi.conftest import Ferry, block_capability, expect_code, mount_capability
from tests.csi.test_restart import FerryProcess
from tests.node.conftest import has_cap_sys_resource, host_can_mount

pytestmark = pytest.mark.root

ENCRYPTED = {"encrypted": "true"}
#: Written through the mount; must never be found in the image of an encrypted volume.
PATTERN = b"FERRY-PLAINTEXT-PATTERN-0123456789abcdef/"
NAME = "ferry-plaintext-file-name"
DIRECT_PATTERN = b"FERRY-DIRECT-IO-PATTERN-fedcba9876543210/"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def new_key() -> str:
    return base64.b64encode(os.urandom(64)).decode()


def stage_request(ferry: Ferry, volume: Any, key: str | None, **fields: Any) -> Any:
    request = csi_pb2.NodeStageVolumeRequest(
        volume_id=volume.volume_id,
        staging_target_path=ferry.staging(volume.volume_id),
        volume_capability=fields.pop("capability", mount_capability()),
        volume_context=dict(volume.volume_context),
        secrets={SECRET_KEY: key} if key is not None else {},
        **fields,
    )
    return request


def stage(ferry: Ferry, volume: Any, key: str) -> None:
    ferry.client.node.NodeStageVolume(stage_request(ferry, volume, key))


def unstage(ferry: Ferry, volume_id: str) -> None:
    ferry.client.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=ferry.staging(volume_id)
        )
    )


def unpublish(ferry: Ferry, volume_id: str) -> None:
    ferry.client.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=ferry.target(volume_id))
    )


def write_pattern(target: str, mib: int = 4) -> bytes:
    payload = PATTERN * (mib * MiB // len(PATTERN))
    with open(Path(target) / NAME, "wb") as handle:
        handle.write(payload)
        os.fsync(handle.fileno())
    return payload


def write_direct(path: Path, payload: bytes) -> None:
    """Write ``payload`` (whole 4 KiB blocks) with O_DIRECT, as a database would."""
    buffer = mmap.mmap(-1, len(payload))  # page-aligned, as O_DIRECT wants
    buffer.write(payload)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        assert os.write(fd, buffer) == len(payload)
        os.fsync(fd)
    finally:
        os.close(fd)
        buffer.close()


def image_of(ferry: Ferry, volume_id: str) -> Path:
    return ferry.base / "node-a" / "pool" / "images" / f"{volume_id}.img"


def holds(path: Path, *needles: bytes) -> bool:
    """Whether any of ``needles`` (up to 128 bytes) occurs in the raw bytes of ``path``."""
    tail = b""
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * MiB):
            if any(needle in tail + chunk for needle in needles):
                return True
            tail = chunk[-128:]
    return False


def written_and_unstaged(ferry: Ferry, key: str) -> tuple[Any, bytes]:
    """An encrypted volume with the pattern written through its mount, unstaged."""
    volume = ferry.create("enc", parameters=ENCRYPTED)
    vid = volume.volume_id
    stage(ferry, volume, key)
    payload = write_pattern(ferry.publish(vid))
    unpublish(ferry, vid)
    unstage(ferry, vid)
    return volume, payload


def test_the_image_holds_no_plaintext_and_the_key_reads_it_back(mountable: Ferry) -> None:
    ferry = mountable
    key = new_key()
    volume = ferry.create("enc", parameters=ENCRYPTED)
    assert volume.volume_context[ENCRYPTED_CONTEXT_KEY] == "true"
    stage(ferry, volume, key)
    target = Path(ferry.publish(volume.volume_id))
    payload = write_pattern(str(target))
    # O_DIRECT cannot bypass the encryption (ext4 serves it through the page cache).
    direct = (DIRECT_PATTERN * (MiB // len(DIRECT_PATTERN) + 1))[:MiB]
    write_direct(target / "direct", direct)
    unpublish(ferry, volume.volume_id)
    unstage(ferry, volume.volume_id)
    image = image_of(ferry, volume.volume_id)
    assert not holds(image, PATTERN[:24])
    assert not holds(image, DIRECT_PATTERN[:24])
    assert not holds(image, NAME.encode())
    # The same scan finds both in an unencrypted volume: it can fail.
    plain = ferry.create("plain")
    ferry.stage(plain.volume_id)
    plain_target = Path(ferry.publish(plain.volume_id))
    write_pattern(str(plain_target))
    write_direct(plain_target / "direct", direct)
    unpublish(ferry, plain.volume_id)
    unstage(ferry, plain.volume_id)
    for needle in (PATTERN[:24], DIRECT_PATTERN[:24], NAME.encode()):
        assert holds(image_of(ferry, plain.volume_id), needle)

    stage(ferry, volume, key)
    ferry.publish(volume.volume_id)
    assert sorted(os.listdir(target)) == ["direct", NAME]  # the encrypted directory only
    assert (target / NAME).read_bytes() == payload
    assert (target / "direct").read_bytes() == direct
    unpublish(ferry, volume.volume_id)
    unstage(ferry, volume.volume_id)


@contextmanager
def mounted_without_key(image: Path, where: Path) -> Iterator[Path]:
    """The image's filesystem mounted read-only by hand, as a node without the key would."""
    runner = CommandRunner()
    loops = LoopDevices(runner)
    device = loops.attach_read_only(image)
    try:
        where.mkdir()
        runner.run(["mount", "-o", "ro,noload", device, str(where)])
        try:
            yield where
        finally:
            runner.run(["umount", str(where)])
    finally:
        loops.detach(device)


def test_a_node_without_the_key_reads_only_ciphertext(mountable: Ferry) -> None:
    ferry = mountable
    volume, _ = written_and_unstaged(ferry, new_key())
    with mounted_without_key(image_of(ferry, volume.volume_id), ferry.base / "thief") as root:
        names = os.listdir(root / ENCRYPTED_DIR)
        assert len(names) == 1 and names[0] != NAME
        with pytest.raises(OSError) as caught:
            (root / ENCRYPTED_DIR / names[0]).read_bytes()
        assert caught.value.errno == errno.ENOKEY


def staged_anywhere(ferry: Ferry, volume_id: str) -> list[str]:
    """Mounts at the staging path and loop devices of the image: what a stage leaves."""
    staging = ferry.staging(volume_id)
    mounts = [
        line for line in Path("/proc/self/mountinfo").read_text().splitlines() if staging in line
    ]
    backing = os.path.realpath(image_of(ferry, volume_id))
    loops = [
        loop.device
        for loop in LoopDevices(CommandRunner()).attached()
        if loop.backing_file == backing
    ]
    return mounts + loops


def test_a_wrong_key_is_refused_and_leaves_nothing_staged(mountable: Ferry) -> None:
    ferry = mountable
    key = new_key()
    volume, payload = written_and_unstaged(ferry, key)
    vid = volume.volume_id
    wrong = stage_request(ferry, volume, new_key())
    details = expect_code(
        grpc.StatusCode.FAILED_PRECONDITION, ferry.client.node.NodeStageVolume, wrong
    )
    assert "encrypted with another key" in details
    assert "node-stage-secret-name" in details
    assert staged_anywhere(ferry, vid) == []
    assert not (ferry.base / "node-a" / "pool" / "state" / f"{vid}.json").exists()

    # The right key still opens it; a wrong key while it is in use changes nothing.
    stage(ferry, volume, key)
    target = Path(ferry.publish(vid))
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, ferry.client.node.NodeStageVolume, wrong)
    assert (target / NAME).read_bytes() == payload
    unpublish(ferry, vid)
    unstage(ferry, vid)


@pytest.mark.parametrize(
    ("secrets", "words"),
    [
        ({}, "carried no 'encryptionKey' secret"),
        ({"other": "x"}, "keys present: other"),
        ({SECRET_KEY: "not base64!!"}, "is not base64"),
        ({SECRET_KEY: base64.b64encode(b"k" * 32).decode()}, "decodes to 32 bytes"),
    ],
)
def test_a_missing_or_malformed_key_is_invalid_argument(
    mountable: Ferry, secrets: dict[str, str], words: str
) -> None:
    ferry = mountable
    volume = ferry.create("enc", parameters=ENCRYPTED)
    request = stage_request(ferry, volume, None)
    request.secrets.update(secrets)
    details = expect_code(INVALID, ferry.client.node.NodeStageVolume, request)
    assert words in details
    for value in secrets.values():
        assert value not in details
    assert staged_anywhere(ferry, volume.volume_id) == []


def test_block_and_xfs_volumes_cannot_be_encrypted(mountable: Ferry) -> None:
    ferry = mountable
    create = ferry.client.controller.CreateVolume
    block = csi_pb2.CreateVolumeRequest(
        name="enc-block",
        capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
        volume_capabilities=[block_capability()],
        parameters=ENCRYPTED,
    )
    assert "raw block device has no files" in expect_code(INVALID, create, block)
    xfs = csi_pb2.CreateVolumeRequest(
        name="enc-xfs",
        capacity_range=csi_pb2.CapacityRange(required_bytes=320 * MiB),
        volume_capabilities=[mount_capability("xfs")],
        parameters={**ENCRYPTED, "fsType": "xfs"},
    )
    assert "xfs has no filesystem encryption" in expect_code(INVALID, create, xfs)
    # A node asked to stage an encrypted volume as a block device or as xfs refuses too.
    volume = ferry.create("enc", parameters=ENCRYPTED)
    for capability, words in ((block_capability(), "raw block"), (mount_capability("xfs"), "xfs")):
        request = stage_request(ferry, volume, new_key(), capability=capability)
        assert words in expect_code(INVALID, ferry.client.node.NodeStageVolume, request)
    assert staged_anywhere(ferry, volume.volume_id) == []


def test_a_mistyped_encrypted_context_is_refused(mountable: Ferry) -> None:
    ferry = mountable
    volume = ferry.create("enc", parameters=ENCRYPTED)
    request = stage_request(ferry, volume, new_key())
    request.volume_context[ENCRYPTED_CONTEXT_KEY] = "yes"
    assert "volumeAttributes" in expect_code(INVALID, ferry.client.node.NodeStageVolume, request)


def test_stats_and_expansion_work_on_an_encrypted_volume(mountable: Ferry) -> None:
    ferry = mountable
    key = new_key()
    volume = ferry.create("enc", size=32 * MiB, parameters=ENCRYPTED)
    vid = volume.volume_id
    stage(ferry, volume, key)
    target = ferry.publish(vid)
    payload = write_pattern(target, mib=2)
    stats = ferry.client.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=target)
    )
    used = {u.unit: u for u in stats.usage}[csi_pb2.VolumeUsage.BYTES]
    assert 24 * MiB < used.total <= 32 * MiB
    assert used.used >= 2 * MiB
    assert not stats.volume_condition.abnormal, stats.volume_condition.message

    ferry.client.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB)
        )
    )
    expand = csi_pb2.NodeExpandVolumeRequest(volume_id=vid, volume_path=target)
    if has_cap_sys_resource():
        assert ferry.client.node.NodeExpandVolume(expand).capacity_bytes == 64 * MiB
    else:  # the kernel grows a mounted ext4 only with CAP_SYS_RESOURCE: offline, at restage
        expect_code(grpc.StatusCode.FAILED_PRECONDITION, ferry.client.node.NodeExpandVolume, expand)
        unpublish(ferry, vid)
        unstage(ferry, vid)
        stage(ferry, volume, key)
        ferry.publish(vid)
    stats = ferry.client.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=target)
    )
    assert {u.unit: u for u in stats.usage}[csi_pb2.VolumeUsage.BYTES].total > 56 * MiB
    assert (Path(target) / NAME).read_bytes() == payload
    unpublish(ferry, vid)
    unstage(ferry, vid)


class DebugFerryProcess(FerryProcess):
    """Ferry all-in-one as a process that logs everything it can (debug, JSON)."""

    def argv(self) -> list[str]:
        return [*super().argv(), "--log-level", "debug"]


def files_holding(base: Path, needles: list[bytes]) -> list[str]:
    """Regular files below ``base`` (logs, catalog, records, images) holding any needle."""
    return [
        str(path)
        for path in sorted(base.rglob("*"))
        if not path.is_symlink() and path.is_file() and holds(path, *needles)
    ]


@pytest.mark.slow
def test_restaged_after_a_node_service_restart_and_the_key_is_written_nowhere(
    tmp_path: Path,
) -> None:
    if not host_can_mount():
        pytest.skip("needs root and /dev/loop-control (loop devices, mkfs, mount)")
    (tmp_path / "kubelet").mkdir()
    process = DebugFerryProcess(tmp_path)
    key, wrong = new_key(), new_key()
    try:
        client = process.start()
        volume = client.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name="pvc-encrypted",
                capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MiB),
                volume_capabilities=[mount_capability()],
                parameters=ENCRYPTED,
            )
        ).volume
        vid = volume.volume_id
        staging = str(tmp_path / "kubelet" / "plugins" / "enc" / "globalmount")
        target = str(tmp_path / "kubelet" / "pods" / "p" / "volumes" / "mount")

        def stage_with(secret: str) -> Any:
            return csi_pb2.NodeStageVolumeRequest(
                volume_id=vid,
                staging_target_path=staging,
                volume_capability=mount_capability(),
                volume_context=dict(volume.volume_context),
                secrets={SECRET_KEY: secret},
            )

        publish = csi_pb2.NodePublishVolumeRequest(
            volume_id=vid,
            staging_target_path=staging,
            target_path=target,
            volume_capability=mount_capability(),
        )
        client.node.NodeStageVolume(stage_with(key))
        client.node.NodePublishVolume(publish)
        payload = write_pattern(target, mib=1)
        expect_code(
            grpc.StatusCode.FAILED_PRECONDITION, client.node.NodeStageVolume, stage_with(wrong)
        )
        expect_code(INVALID, client.node.NodeStageVolume, stage_with(wrong[:40]))
        client.close()
        process.kill(signal.SIGKILL)

        client = process.start()
        client.node.NodeStageVolume(stage_with(key))  # kubelet repeats after a plugin restart
        client.node.NodePublishVolume(publish)
        assert (Path(target) / NAME).read_bytes() == payload
        client.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target)
        )
        client.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging)
        )
        client.close()
        assert process.kill(signal.SIGTERM) == 0
    finally:
        if process.process and process.process.poll() is None:
            process.kill()
        release_under(tmp_path)

    log = (tmp_path / "all-in-one.log").read_text()
    assert "volume unlocked" in log and "volume unstaged" in log  # the log is the full one
    secrets = [key, wrong]
    raw = [base64.b64decode(s) for s in secrets]
    needles = [s.encode() for s in secrets] + raw + [r.hex().encode() for r in raw]
    needles += [wrong[:40].encode()]
    assert files_holding(tmp_path, needles) == []
    assert files_holding(tmp_path, [b"volume unlocked"]) != []  # the scan reads the log


def test_read_only_stages_of_an_encrypted_volume(mountable: Ferry) -> None:
    ferry = mountable
    reader = mount_capability(mode="SINGLE_NODE_READER_ONLY")
    fresh = ferry.create("fresh", parameters=ENCRYPTED, capability=reader)
    request = stage_request(ferry, fresh, new_key(), capability=reader)
    details = expect_code(
        grpc.StatusCode.FAILED_PRECONDITION, ferry.client.node.NodeStageVolume, request
    )
    assert "stage it read-write once first" in details
    assert staged_anywhere(ferry, fresh.volume_id) == []

    key = new_key()
    volume, payload = written_and_unstaged(ferry, key)
    ferry.client.node.NodeStageVolume(stage_request(ferry, volume, key, capability=reader))
    target = Path(ferry.publish(volume.volume_id, capability=reader, readonly=True))
    assert (target / NAME).read_bytes() == payload
    with pytest.raises(OSError) as caught:
        (target / "new").write_bytes(b"x")
    assert caught.value.errno == errno.EROFS
    unpublish(ferry, volume.volume_id)
    unstage(ferry, volume.volume_id)
