"""Every argument check, and every refusal the agent's persisted state decides, comes
before any host action.

The agent here has a real pool and real stage records under tmp_path, and
host interfaces that fail the test on any use (``hands_off_agent``), so
these run as any user, anywhere. One row per rule.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from csi_driver.core.encryption import KEY_BYTES, VolumeKey
from csi_driver.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    FerryError,
    InvalidArgument,
    NotFound,
)
from csi_driver.core.model import AccessMode, AccessType, FsType, MiB, VolumeCapability
from csi_driver.node.agent import NodeAgent, Staged, StateStore, Target

MOUNT_RW = VolumeCapability(AccessMode.SINGLE_NODE_WRITER, AccessType.MOUNT)
BLOCK_RW = VolumeCapability(AccessMode.SINGLE_NODE_WRITER, AccessType.BLOCK)
STAGED = f"vol-{1:032x}"  # has an image and a stage record
IMAGE_ONLY = f"vol-{2:032x}"  # has an image, never staged
BLOCK_STAGED = f"vol-{3:032x}"  # staged for block access
UNKNOWN = f"vol-{9:032x}"  # Ferry never issued it on this node


def kubelet_of(agent: NodeAgent) -> Path:
    return agent.paths.roots[0]


def staging_of(agent: NodeAgent, vid: str) -> str:
    return str(kubelet_of(agent) / "plugins" / vid / "globalmount")


def target_of(agent: NodeAgent, vid: str, pod: str = "pod") -> str:
    return str(kubelet_of(agent) / "pods" / pod / "volumes" / vid / "mount")


@pytest.fixture
def agent(hands_off_agent: NodeAgent) -> NodeAgent:
    """Volumes in every state these rules need, made from real records, not the host."""
    states = StateStore(hands_off_agent.pool.state_dir)
    for vid, access in ((STAGED, AccessType.MOUNT), (BLOCK_STAGED, AccessType.BLOCK)):
        hands_off_agent.pool.create_image(vid, 64 * MiB, epoch=1)
        states.save(
            Staged(
                volume_id=vid,
                staging_path=staging_of(hands_off_agent, vid),
                access_type=access,
                fs_type=FsType.EXT4 if access is AccessType.MOUNT else None,
                mount_flags=(),
                read_only=False,
                targets={target_of(hands_off_agent, vid): Target(read_only=True)},
            )
        )
        Path(staging_of(hands_off_agent, vid)).mkdir(parents=True)  # what a stage leaves
    hands_off_agent.pool.create_image(IMAGE_ONLY, 64 * MiB, epoch=1)
    # A symlink inside the kubelet directory pointing out of it.
    (kubelet_of(hands_off_agent) / "evil").symlink_to(kubelet_of(hands_off_agent).parent)
    return hands_off_agent


Call = Callable[[NodeAgent], object]


def stage(
    vid: str, staging: str | None = None, cap: VolumeCapability = MOUNT_RW, fs: FsType = FsType.EXT4
) -> Call:
    return lambda a: a.stage(vid, staging or staging_of(a, vid), cap, fs)


def encrypted(vid: str, cap: VolumeCapability = MOUNT_RW, fs: FsType = FsType.EXT4) -> Call:
    key = VolumeKey(bytes(KEY_BYTES))
    return lambda a: a.stage(vid, staging_of(a, vid), cap, fs, key)


def publish(
    vid: str,
    target: str | None = None,
    staging: str | None = None,
    cap: VolumeCapability = MOUNT_RW,
    readonly: bool = False,
) -> Call:
    return lambda a: a.publish(
        vid, staging or staging_of(a, vid), target or target_of(a, vid), cap, readonly
    )


def under_kubelet(relative: str) -> Callable[[NodeAgent], str]:
    return lambda a: f"{kubelet_of(a)}/{relative}"


def with_path(make: Callable[[str], Call], path: Callable[[NodeAgent], str]) -> Call:
    return lambda a: make(path(a))(a)


OUTSIDE = "/etc/ferry-never"
FLAGGED = VolumeCapability(AccessMode.SINGLE_NODE_WRITER, AccessType.MOUNT, mount_flags=("bind",))
ODD_FLAG = VolumeCapability(AccessMode.SINGLE_NODE_WRITER, AccessType.MOUNT, mount_flags=("a b",))

REFUSALS: list[tuple[str, Call, type[FerryError]]] = [
    # NodeStageVolume
    ("stage: staging path outside kubelet", stage(IMAGE_ONLY, OUTSIDE), InvalidArgument),
    ("stage: relative staging path", stage(IMAGE_ONLY, "some/path"), InvalidArgument),
    (
        "stage: empty staging path",
        lambda a: a.stage(IMAGE_ONLY, "", MOUNT_RW, FsType.EXT4),
        InvalidArgument,
    ),
    (
        "stage: '..' in staging path",
        with_path(lambda p: stage(IMAGE_ONLY, p), under_kubelet("a/../../etc")),
        InvalidArgument,
    ),
    (
        "stage: symlink in staging path",
        with_path(lambda p: stage(IMAGE_ONLY, p), under_kubelet("evil/x")),
        InvalidArgument,
    ),
    ("stage: bind mount flag", stage(IMAGE_ONLY, cap=FLAGGED), InvalidArgument),
    ("stage: malformed mount flag", stage(IMAGE_ONLY, cap=ODD_FLAG), InvalidArgument),
    ("stage: unknown volume", stage(UNKNOWN), NotFound),
    (
        "stage: second staging path",
        with_path(lambda p: stage(STAGED, p), under_kubelet("other/globalmount")),
        FailedPrecondition,
    ),
    ("stage: same path, other fsType", stage(STAGED, fs=FsType.XFS), AlreadyExists),
    ("stage: same path, other access type", stage(STAGED, cap=BLOCK_RW), AlreadyExists),
    ("stage: encrypted block volume", encrypted(IMAGE_ONLY, cap=BLOCK_RW), InvalidArgument),
    ("stage: encrypted xfs volume", encrypted(IMAGE_ONLY, fs=FsType.XFS), InvalidArgument),
    ("stage: same path, now encrypted", encrypted(STAGED), AlreadyExists),
    # NodePublishVolume
    ("publish: target outside kubelet", publish(STAGED, OUTSIDE), InvalidArgument),
    ("publish: staging outside kubelet", publish(STAGED, staging=OUTSIDE), InvalidArgument),
    (
        "publish: target is the staging path",
        lambda a: a.publish(STAGED, staging_of(a, STAGED), staging_of(a, STAGED), MOUNT_RW, False),
        InvalidArgument,
    ),
    (
        "publish: target inside staging",
        lambda a: a.publish(
            STAGED, staging_of(a, STAGED), staging_of(a, STAGED) + "/t", MOUNT_RW, False
        ),
        InvalidArgument,
    ),
    ("publish: unknown volume", publish(UNKNOWN), NotFound),
    ("publish: before stage", publish(IMAGE_ONLY), FailedPrecondition),
    (
        "publish: at another staging path",
        with_path(lambda p: publish(STAGED, staging=p), under_kubelet("other/globalmount")),
        FailedPrecondition,
    ),
    ("publish: block-staged volume as mount", publish(BLOCK_STAGED), InvalidArgument),
    ("publish: repeat with other read-only flag", publish(STAGED, readonly=False), AlreadyExists),
    # NodeUnstageVolume, NodeUnpublishVolume
    (
        "unstage: staging path outside kubelet",
        lambda a: a.unstage(STAGED, OUTSIDE),
        InvalidArgument,
    ),
    ("unpublish: target outside kubelet", lambda a: a.unpublish(STAGED, OUTSIDE), InvalidArgument),
    # NodeGetVolumeStats
    (
        "stats: relative path (the spec: not found there)",
        lambda a: a.stats(STAGED, "some/path"),
        NotFound,
    ),
    ("stats: unknown volume", lambda a: a.stats(UNKNOWN, staging_of(a, STAGED)), NotFound),
    (
        "stats: not where the volume is",
        lambda a: a.stats(STAGED, target_of(a, STAGED, "other")),
        NotFound,
    ),
    # NodeExpandVolume
    (
        "expand: unstaged volume",
        lambda a: a.expand(IMAGE_ONLY, staging_of(a, IMAGE_ONLY), None),
        NotFound,
    ),
    (
        "expand: other access type",
        lambda a: a.expand(STAGED, staging_of(a, STAGED), BLOCK_RW),
        InvalidArgument,
    ),
]


@pytest.mark.parametrize(
    ("call", "error"), [pytest.param(c, e, id=name) for name, c, e in REFUSALS]
)
def test_refusals_come_before_any_host_action(
    agent: NodeAgent, call: Call, error: type[FerryError]
) -> None:
    with pytest.raises(error):
        call(agent)


def test_a_refused_stage_records_nothing(agent: NodeAgent) -> None:
    with pytest.raises(NotFound):
        stage(UNKNOWN)(agent)
    with pytest.raises(InvalidArgument):
        stage(IMAGE_ONLY, cap=FLAGGED)(agent)
    assert StateStore(agent.pool.state_dir).load(UNKNOWN) is None
    assert StateStore(agent.pool.state_dir).load(IMAGE_ONLY) is None


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(
            lambda a: a.unstage(IMAGE_ONLY, staging_of(a, IMAGE_ONLY)), id="unstage-never-staged"
        ),
        pytest.param(lambda a: a.unstage(UNKNOWN, staging_of(a, UNKNOWN)), id="unstage-unknown"),
        pytest.param(
            lambda a: a.unstage(STAGED, staging_of(a, IMAGE_ONLY)), id="unstage-elsewhere"
        ),
        pytest.param(
            lambda a: a.unpublish(STAGED, target_of(a, STAGED, "never")),
            id="unpublish-never-published",
        ),
        pytest.param(lambda a: a.unpublish(UNKNOWN, target_of(a, UNKNOWN)), id="unpublish-unknown"),
    ],
)
def test_repeats_of_finished_teardown_succeed_without_the_host(
    agent: NodeAgent, call: Call
) -> None:
    """Nothing to undo: the call returns (touching the host would fail the test) and
    every stage record, the staged volumes' targets included, stays as it was."""
    states = StateStore(agent.pool.state_dir)
    before = states.all()
    assert call(agent) is None
    assert states.all() == before
    assert [s.volume_id for s in before] == [STAGED, BLOCK_STAGED]
