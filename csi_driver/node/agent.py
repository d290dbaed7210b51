"""The node agent: stage, publish, expand and report on this node's volumes.

Every operation is convergent: it compares what the kernel shows (loop
devices, mounts) with what is wanted and does only the missing steps, so a
repeat after a crash, a kubelet retry or a node-service restart completes
the job instead of failing or doing it twice. What was asked for (the
staging path, each target, a format under way) is persisted in
``<pool>/state`` before the host is touched, so a restarted agent knows
which loop devices and mounts are its own, and a retry finishes a step that
was cut short (a deadline, a shutdown, a killed pod) instead of trusting
what it half left.

An encrypted volume's files live in one directory of its filesystem,
:data:`ENCRYPTED_DIR`, whose fscrypt policy names the volume's key; pods
are given that directory, never the filesystem's root, so nothing a pod
writes is stored in plaintext. The key is given to the kernel at stage and
taken back at unstage; Ferry keeps no copy of it, on disk or in memory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from csi_driver.core.encryption import VolumeKey, check_encryptable
from csi_driver.core.errors import (
    NOT_STAGED,
    PUBLISH_INCOMPATIBLE,
    SINGLE_WRITER_CONFLICT,
    STAGE_INCOMPATIBLE,
    STAGED_ELSEWHERE,
    STILL_PUBLISHED_AT,
    WRONG_VOLUME_KEY,
    AlreadyExists,
    FailedPrecondition,
    FerryError,
    InternalError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from csi_driver.core.locks import KeyedLocks
from csi_driver.core.model import AccessMode, AccessType, FsType, VolumeCapability
from csi_driver.node.filesystem import Filesystems
from csi_driver.node.fscrypt import Fscrypt, KeyIdentifier
from csi_driver.node.health import KernelLog, ext4_errors, xfs_shut_down
from csi_driver.node.host import EncryptionHost, FilesystemHost, LoopDeviceHost, MountHost
from csi_driver.node.loop import LoopDevices
from csi_driver.node.mounts import Mounts, check_mount_flags
from csi_driver.node.paths import PathPolicy
from csi_driver.node.pool import ImageInfo, Pool, fsync_dir, write_json_atomic
from csi_driver.node.runner import CommandRunner
from csi_driver.node.snapshots import SnapshotStore

log = logging.getLogger(__name__)

#: How long an RPC waits for another operation on the same volume before ABORTED.
VOLUME_LOCK_TIMEOUT_S = 30.0
#: Where abnormal-volume messages send the operator.
RUNBOOK = "docs/operations.md, 'A volume is reported abnormal'"
#: The directory of an encrypted volume's filesystem that pods get: everything in it
#: is encrypted with the volume's key.
ENCRYPTED_DIR = "data"


@dataclass(frozen=True)
class Target:
    """One NodePublishVolume: how, and the read-only device it got (block).

    ``access_mode`` is None only in records written before Ferry kept it; the
    next publish at that target records it.
    """

    read_only: bool
    device: str = ""
    access_mode: AccessMode | None = None

    @property
    def single_writer(self) -> bool:
        return self.access_mode is AccessMode.SINGLE_NODE_SINGLE_WRITER

    def compatible(self, other: Target) -> bool:
        """Whether a repeat publish asking for ``other`` may reuse this target."""
        same_mode = self.access_mode is None or self.access_mode is other.access_mode
        return self.read_only == other.read_only and same_mode

    def to_json(self) -> dict[str, object]:
        mode = self.access_mode.value if self.access_mode else None
        return {"read_only": self.read_only, "device": self.device, "access_mode": mode}

    @classmethod
    def from_json(cls, doc: dict[str, object]) -> Target:
        mode = doc.get("access_mode")
        return cls(
            read_only=bool(doc["read_only"]),
            device=str(doc.get("device") or ""),
            access_mode=AccessMode(mode) if mode else None,
        )


@dataclass(frozen=True)
class Staged:
    """The persisted record of a volume staged on this node."""

    volume_id: str
    staging_path: str
    access_type: AccessType
    fs_type: FsType | None
    mount_flags: tuple[str, ...]
    read_only: bool
    targets: dict[str, Target] = field(default_factory=dict)
    #: mkfs was started on the (then blank) device and has not finished.
    formatting: bool = False
    #: Files are encrypted (fscrypt) under ENCRYPTED_DIR, which is what pods get.
    encrypted: bool = False

    def to_json(self) -> dict[str, object]:
        doc = asdict(self)
        doc["access_type"] = self.access_type.value
        doc["fs_type"] = self.fs_type.value if self.fs_type else None
        doc["mount_flags"] = list(self.mount_flags)
        doc["targets"] = {path: t.to_json() for path, t in self.targets.items()}
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, object]) -> Staged:
        targets = doc.get("targets") or {}
        assert isinstance(targets, dict)
        fs = doc.get("fs_type")
        flags = doc.get("mount_flags") or []
        assert isinstance(flags, list)
        return cls(
            volume_id=str(doc["volume_id"]),
            staging_path=str(doc["staging_path"]),
            access_type=AccessType(doc["access_type"]),
            fs_type=FsType(fs) if fs else None,
            mount_flags=tuple(str(f) for f in flags),
            read_only=bool(doc.get("read_only", False)),
            targets={str(k): Target.from_json(v) for k, v in targets.items()},
            formatting=bool(doc.get("formatting", False)),
            encrypted=bool(doc.get("encrypted", False)),
        )


@dataclass(frozen=True)
class Quiesced:
    """A volume held at a point in time by :meth:`NodeAgent.quiesced`."""

    volume_id: str
    image: Path
    frozen: bool  # its filesystem is frozen: any copy of the image is consistent
    in_use: bool  # attached but not frozen (a block volume): only a reflink is consistent


@dataclass(frozen=True)
class VolumeStats:
    total_bytes: int
    used_bytes: int
    available_bytes: int
    total_inodes: int | None
    used_inodes: int | None
    available_inodes: int | None
    abnormal: bool
    message: str


class StateStore:
    """``<pool>/state/<volume-id>.json``: one atomic file per staged volume."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def _path(self, volume_id: str) -> Path:
        return self._dir / f"{volume_id}.json"

    def load(self, volume_id: str) -> Staged | None:
        try:
            text = self._path(volume_id).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return Staged.from_json(json.loads(text))

    def save(self, staged: Staged) -> None:
        write_json_atomic(self._path(staged.volume_id), staged.to_json())

    def remove(self, volume_id: str) -> None:
        self._path(volume_id).unlink(missing_ok=True)
        fsync_dir(self._dir)

    def all(self) -> list[Staged]:
        found = []
        for path in sorted(self._dir.glob("vol-*.json")):
            try:
                found.append(Staged.from_json(json.loads(path.read_text(encoding="utf-8"))))
            except (ValueError, KeyError, TypeError, AssertionError):
                log.error("unreadable stage record; ignoring it", extra={"path": str(path)})
        return found


class NodeAgent:
    """Host side of CSI's Node service for one node's pool.

    The host is reached only through ``loops``, ``filesystems``, ``mounts``
    and ``encryption`` (``csi_driver.node.host``); each defaults to Ferry's
    real one (built on ``runner``, but for the ioctls of ``encryption``).
    Every method checks its arguments, then its persisted state, before its
    first host call.
    """

    def __init__(
        self,
        node_id: str,
        pool: Pool,
        runner: CommandRunner,
        allowed_roots: Iterable[Path],
        *,
        loops: LoopDeviceHost | None = None,
        filesystems: FilesystemHost | None = None,
        mounts: MountHost | None = None,
        encryption: EncryptionHost | None = None,
    ) -> None:
        self.node_id = node_id
        self.pool = pool
        self.kernel_log = KernelLog()
        self.loops: LoopDeviceHost = loops or LoopDevices(runner, kernel_log=self.kernel_log)
        self.filesystems: FilesystemHost = filesystems or Filesystems(runner)
        self.mounts: MountHost = mounts or Mounts(runner)
        self.encryption: EncryptionHost = encryption or Fscrypt()
        self.paths = PathPolicy(allowed_roots)
        self._states = StateStore(pool.state_dir)
        self.snapshots = SnapshotStore(pool.root)
        self._locks = KeyedLocks()
        # losetup picks "the first free device" racily across volumes; serialise attach.
        self._attach_lock = threading.Lock()

    # -- readiness ---------------------------------------------------------------

    def check(self) -> None:
        """Raise unless the pool is writable and loop devices can be created."""
        probe = self.pool.root / ".probe"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise Unavailable(f"pool {self.pool.root} is not writable: {exc}") from exc
        if not Path("/dev/loop-control").exists():
            raise Unavailable("/dev/loop-control is missing: the node cannot create loop devices")

    # -- stage ---------------------------------------------------------------------

    def stage(
        self,
        volume_id: str,
        staging_path: str,
        capability: VolumeCapability,
        fs_type: FsType,
        key: VolumeKey | None = None,
        admit: Callable[[], None] | None = None,
    ) -> None:
        """Stage the volume; ``key`` (an encrypted volume's) unlocks its files.
        ``admit`` (the epoch fence) runs under the volume's lock before anything
        else is looked at, and raises to refuse the stage."""
        staging = self.paths.check(staging_path, "staging_target_path")
        flags = check_mount_flags(capability.mount_flags)
        wanted = Staged(
            volume_id=volume_id,
            staging_path=str(staging),
            access_type=capability.access_type,
            fs_type=fs_type if capability.access_type is AccessType.MOUNT else None,
            mount_flags=flags,
            read_only=capability.access_mode.read_only,
            encrypted=key is not None,
        )
        if key is not None:
            check_encryptable(wanted.access_type, wanted.fs_type)
        with self._locks.hold(volume_id, timeout=VOLUME_LOCK_TIMEOUT_S):
            if admit is not None:
                admit()
            image = self.pool.require(volume_id)
            current = self._states.load(volume_id)
            if current is not None:
                if current.staging_path != wanted.staging_path:
                    raise FailedPrecondition(
                        STAGED_ELSEWHERE.format(
                            volume_id=volume_id,
                            staged=current.staging_path,
                            requested=staging,
                        )
                    )
                if replace(current, targets={}, formatting=False) != wanted:
                    raise AlreadyExists(
                        STAGE_INCOMPATIBLE.format(volume_id=volume_id, path=staging)
                    )
                wanted = current
            else:
                self._states.save(wanted)
            with self._attach_lock:
                device = self.loops.attach(image.path)
            if wanted.access_type is AccessType.BLOCK:
                staging.mkdir(parents=True, exist_ok=True)
                return
            assert wanted.fs_type is not None
            was_mounted = self.mounts.at(staging) is not None
            self._mount_staging(device, staging, wanted)
            if key is None:
                return
            try:
                self._unlock(staging, wanted, key)
            except FerryError:
                if not was_mounted and not wanted.targets:
                    # Refused (a wrong key): leave nothing mounted, since kubelet does
                    # not unstage after a final error and nothing else would clean up.
                    self._release(wanted, staging)
                raise

    def _unlock(self, staging: Path, staged: Staged, key: VolumeKey) -> None:
        """Give the mounted filesystem the volume's key and check that its data is
        encrypted with it; the first time, encrypt :data:`ENCRYPTED_DIR` with it.

        The key's identifier is compared with the directory's policy before
        anything is read or written: a wrong key is refused (and taken back
        from the kernel), never used to write files the right key cannot read.
        """
        identifier = self.encryption.add_key(staging, key)
        data = staging / ENCRYPTED_DIR
        try:
            if not os.path.lexists(data):
                self._require_writable(staged, "create its encrypted directory")
                _make_encrypted_dir(data, like=staging)
            elif data.is_symlink() or not data.is_dir():
                raise FailedPrecondition(
                    f"{data} is not a directory: the volume's filesystem was changed outside "
                    "Ferry; inspect it before staging it again"
                )
            policy = self.encryption.policy(data)
            if policy is None:
                # New, or a first stage cut short before its policy: the kernel sets one
                # on an empty directory only, so no plaintext file can be inside.
                self._require_writable(staged, "encrypt its directory")
                self.encryption.set_policy(data, identifier)
                fsync_dir(data)
                log.info(
                    "volume encrypted", extra={"volume": staged.volume_id, "key": str(identifier)}
                )
                return
        except FerryError:
            self._take_back(staging, identifier)  # nothing is encrypted with it
            raise
        if policy.identifier != identifier:
            self._take_back(staging, identifier)
            raise FailedPrecondition(
                WRONG_VOLUME_KEY.format(
                    volume_id=staged.volume_id, expected=policy.identifier, given=identifier
                )
            )
        log.info("volume unlocked", extra={"volume": staged.volume_id, "key": str(identifier)})

    def _require_writable(self, staged: Staged, what: str) -> None:
        if staged.read_only:
            raise FailedPrecondition(
                f"encrypted volume {staged.volume_id} has never been staged writable, so it "
                f"has no encrypted directory yet, and a read-only stage cannot {what}: "
                "stage it read-write once first"
            )

    def _take_back(self, staging: Path, identifier: KeyIdentifier) -> None:
        """Withdraw a key from the filesystem mounted at ``staging``; warn if files held it."""
        flags = self.encryption.remove_key(staging, identifier)
        if flags:
            log.warning(
                "volume key still in use after removal",
                extra={"path": str(staging), "key": str(identifier), "flags": flags},
            )

    def _mount_staging(self, device: str, staging: Path, staged: Staged) -> None:
        assert staged.fs_type is not None
        mounted = self.mounts.at(staging)
        if mounted is not None:
            if mounted.source == device:
                return
            raise FailedPrecondition(
                f"{staging} already has {mounted.source} mounted; unmount it and retry"
            )
        created = self._format_if_blank(device, staged)
        grown = False
        if not created and not staged.read_only:
            size = self.loops.info(device).size_bytes
            grown = self.filesystems.grow_unmounted(device, staged.fs_type, size)
        staging.mkdir(parents=True, exist_ok=True)
        flags = list(staged.mount_flags)
        if staged.read_only:
            flags.append("ro")
        self.mounts.mount(device, staging, staged.fs_type.value, flags)
        if staged.fs_type is FsType.XFS and not created and not staged.read_only:
            self.filesystems.grow(device, staging, staged.fs_type)  # no-op unless expanded
        log.info(
            "volume staged",
            extra={
                "volume": staged.volume_id,
                "device": device,
                "path": str(staging),
                "formatted": created,
                "grown": grown,
            },
        )

    def _format_if_blank(self, device: str, staged: Staged) -> bool:
        """Create the filesystem on a blank device; return True if it was created.

        The intent is persisted before mkfs runs: a mkfs cut short (the RPC's
        deadline, a shutdown, a killed pod) can leave a signature that blkid
        reports but no kernel mounts (xfs does), so a retry must finish the
        format instead of trusting the probe. Re-running mkfs then destroys
        nothing: the device was blank when the intent was recorded and is
        never mounted before the format completes.
        """
        assert staged.fs_type is not None
        if not staged.formatting:
            if not self.filesystems.needs_mkfs(device, staged.fs_type):
                return False
            self._states.save(replace(staged, formatting=True))
        self.filesystems.mkfs(device, staged.fs_type, encrypted=staged.encrypted)
        self._states.save(replace(staged, formatting=False))
        return True

    def unstage(self, volume_id: str, staging_path: str) -> None:
        staging = self.paths.check(staging_path, "staging_target_path")
        with self._locks.hold(volume_id, timeout=VOLUME_LOCK_TIMEOUT_S):
            current = self._states.load(volume_id)
            if current is None or current.staging_path != str(staging):
                return  # not staged there: already done
            live = {t: p for t, p in current.targets.items() if self.mounts.at(Path(t))}
            if live:
                raise FailedPrecondition(
                    STILL_PUBLISHED_AT.format(volume_id=volume_id, targets=", ".join(sorted(live)))
                )
            self._release(current, staging)
            log.info("volume unstaged", extra={"volume": volume_id, "path": str(staging)})

    def _release(self, current: Staged, staging: Path) -> None:
        """Undo a stage whose targets are unmounted: key, mount, loop devices, record."""
        for target in current.targets.values():
            if target.device:
                self.loops.detach(target.device)
        data = staging / ENCRYPTED_DIR
        if current.encrypted and self.mounts.at(staging) is not None and data.is_dir():
            # The ioctl needs the mounted filesystem, so before the unmount.
            policy = self.encryption.policy(data)
            if policy is not None:
                self._take_back(staging, policy.identifier)
        self.mounts.unmount(staging)
        image = self.pool.image_path(current.volume_id)
        backing = os.path.realpath(image)
        # Every device of the image, not only the writable one: a read-only attach
        # cut short before its target was recorded left one that nothing claims.
        detached = True
        for loop in self.loops.attached():
            if loop.backing_file == backing:
                detached = self._detach_unused(loop.device) and detached
        if current.formatting and detached:
            # The next stage must see the device blank again, not a half-made filesystem.
            self.filesystems.wipe(str(image))
        self._states.remove(current.volume_id)
        self.pool.written(current.volume_id)  # a scan restats only the images in use

    # -- delete --------------------------------------------------------------------

    def delete_image(self, volume_id: str) -> None:
        """Delete the volume's image unless anything on this node still uses it.

        Runs under the volume's lock, so a stage or publish cannot attach the
        image between the check and the unlink. A volume that is staged,
        published, attached to a loop device or mounted anywhere is refused
        with FAILED_PRECONDITION naming every place it is still in use.
        """
        with self._locks.hold(volume_id, timeout=VOLUME_LOCK_TIMEOUT_S):
            users = self._users(volume_id)
            if users:
                raise FailedPrecondition(
                    f"volume {volume_id} is still in use on node {self.node_id}: "
                    f"{'; '.join(users)}. Its image is kept: unpublish and unstage it "
                    "(kubelet does once no pod uses it), then delete it again"
                )
            self.pool.delete_image(volume_id)

    @contextlib.contextmanager
    def holding(self, volume_id: str) -> Iterator[None]:
        """Hold the volume's lock: no stage, unstage, publish or unpublish meanwhile
        (a capture holding the mountpoint open would make an unmount fail busy)."""
        with self._locks.hold(volume_id, timeout=VOLUME_LOCK_TIMEOUT_S):
            yield

    def staged_volumes(self) -> list[str]:
        return [s.volume_id for s in self._states.all()]

    def mounted_at(self, volume_id: str) -> Path | None:
        """Where the volume's filesystem is staged on this node, if it is."""
        staged = self._states.load(volume_id)
        if staged is None or staged.access_type is not AccessType.MOUNT:
            return None
        path = Path(staged.staging_path)
        return path if self.mounts.at(path) is not None else None

    @contextlib.contextmanager
    def unused(self, volume_id: str) -> Iterator[None]:
        """Hold the volume's lock while nothing on this node uses its image.

        Raises FailedPrecondition naming the users otherwise. Inside, no stage
        or publish can start: a move's final capture reads a quiescent image.
        """
        with self._locks.hold(volume_id, timeout=VOLUME_LOCK_TIMEOUT_S):
            users = self._users(volume_id)
            if users:
                raise FailedPrecondition(
                    f"volume {volume_id} is still in use on node {self.node_id}: "
                    f"{'; '.join(users)}; it moves once kubelet has unpublished and "
                    "unstaged it there"
                )
            yield

    def _users(self, volume_id: str) -> list[str]:
        """Where the volume is in use on this node, as phrases for an operator."""
        users = []
        staged = self._states.load(volume_id)
        if staged is not None:
            users.append(f"staged at {staged.staging_path}")
            users += [f"published at {target}" for target in sorted(staged.targets)]
        image = os.path.realpath(self.pool.image_path(volume_id))
        devices = [loop.device for loop in self.loops.attached() if loop.backing_file == image]
        users += [f"attached to loop device {device}" for device in devices]
        names = {"/" + os.path.basename(device) for device in devices}
        for entry in self.mounts.table():
            bound = entry.fs_type == "devtmpfs" and entry.root in names
            if entry.source in devices or bound:
                users.append(f"mounted at {entry.mountpoint}")
        return list(dict.fromkeys(users))

    # -- point in time ---------------------------------------------------------------

    @contextlib.contextmanager
    def quiesced(self, volume_ids: Sequence[str]) -> Iterator[list[Quiesced]]:
        """Hold the volumes still at one point in time while the caller copies them.

        Takes every volume's lock (in id order, so two callers never deadlock),
        then freezes each writable filesystem staged here (fsfreeze flushes it
        and blocks its writers), yields, and thaws them all whatever happens.
        A block volume in use cannot be frozen: it is reported ``in_use`` and
        only a reflink of it (atomic with respect to its writes) is a point in time.
        """
        with contextlib.ExitStack() as stack:
            for volume_id in sorted(set(volume_ids)):
                stack.enter_context(self._locks.hold(volume_id, timeout=VOLUME_LOCK_TIMEOUT_S))
            found = []
            for volume_id in volume_ids:
                image = self.pool.require(volume_id)
                staged = self._states.load(volume_id)
                mounted = (
                    staged is not None
                    and staged.access_type is AccessType.MOUNT
                    and not staged.read_only
                    and self.mounts.at(Path(staged.staging_path)) is not None
                )
                if staged is not None and mounted:
                    staging = Path(staged.staging_path)
                    self.filesystems.freeze(staging)
                    stack.callback(self.filesystems.thaw, staging)
                in_use = bool(self._users(volume_id)) and not mounted
                found.append(Quiesced(volume_id, image.path, frozen=mounted, in_use=in_use))
            yield found

    # -- publish -------------------------------------------------------------------

    def publish(
        self,
        volume_id: str,
        staging_path: str,
        target_path: str,
        capability: VolumeCapability,
        readonly: bool,
    ) -> None:
        staging = self.paths.check(staging_path, "staging_target_path")
        target = self.paths.check(target_path, "target_path")
        if target == staging or target.is_relative_to(staging) or staging.is_relative_to(target):
            raise InvalidArgument("target_path and staging_target_path must not nest")
        read_only = readonly or capability.access_mode.read_only
        with self._locks.hold(volume_id, timeout=VOLUME_LOCK_TIMEOUT_S):
            self.pool.require(volume_id)
            current = self._states.load(volume_id)
            if current is None or current.staging_path != str(staging):
                raise FailedPrecondition(NOT_STAGED.format(volume_id=volume_id, staging=staging))
            if current.access_type is not capability.access_type:
                raise InvalidArgument(
                    f"volume {volume_id} was staged for {current.access_type.value} access, "
                    f"cannot publish it for {capability.access_type.value} access"
                )
            wanted = Target(read_only, access_mode=capability.access_mode)
            existing = current.targets.get(str(target))
            if existing is not None and not existing.compatible(wanted):
                raise AlreadyExists(
                    PUBLISH_INCOMPATIBLE.format(
                        volume_id=volume_id, target=target, how=_described(existing)
                    )
                )
            _check_single_writer(current, str(target), wanted)
            if current.access_type is AccessType.BLOCK:
                entry = replace(existing, access_mode=wanted.access_mode) if existing else wanted
                self._publish_block(current, target, entry)
            else:
                self._publish_mount(current, staging, target, wanted)

    def _remember(self, staged: Staged, target: Path, entry: Target) -> Staged:
        updated = replace(staged, targets={**staged.targets, str(target): entry})
        self._states.save(updated)
        return updated

    def _publish_mount(self, staged: Staged, staging: Path, target: Path, entry: Target) -> None:
        mounted = self.mounts.at(staging)
        if mounted is None:
            raise FailedPrecondition(
                f"volume {staged.volume_id} is not mounted at {staging} (node restarted?); "
                "stage it again"
            )
        source, root = staging, mounted.root
        if staged.encrypted:
            source, root = staging / ENCRYPTED_DIR, os.path.join(mounted.root, ENCRYPTED_DIR)
            if source.is_symlink() or not source.is_dir():
                raise FailedPrecondition(
                    f"encrypted volume {staged.volume_id} has no encrypted directory at "
                    f"{source}; unstage and stage it again"
                )
        on_target = self.mounts.at(target)
        if on_target is not None:
            if on_target.source == mounted.source and on_target.root == root:
                if entry.read_only and not on_target.read_only:
                    # A publish cut short between its bind and its read-only remount.
                    self.mounts.remount_read_only(target)
                self._remember(staged, target, entry)
                return
            raise FailedPrecondition(f"{target} already has {on_target.source} mounted")
        _require_fresh_mountpoint(target, directory=True)
        self._remember(staged, target, entry)
        target.mkdir(parents=True, exist_ok=True)
        self.mounts.bind(source, target, read_only=entry.read_only)
        log.info(
            "volume published",
            extra={"volume": staged.volume_id, "path": str(target), "read_only": entry.read_only},
        )

    def _publish_block(self, staged: Staged, target: Path, entry: Target) -> None:
        image = self.pool.image_path(staged.volume_id)
        with self._attach_lock:
            device = self.loops.find(image)
            if device is None:
                raise FailedPrecondition(
                    f"volume {staged.volume_id} has no loop device (node restarted?); "
                    "stage it again"
                )
            if entry.read_only:
                # A read-only bind of a device node still lets writes through, so a
                # read-only publication gets its own read-only loop device.
                if not entry.device or not self._is_loop_of(entry.device, image):
                    entry = replace(entry, device=self.loops.attach_read_only(image))
                device = entry.device
        if self.mounts.at(target) is not None:
            self._remember(staged, target, entry)
            return
        _require_fresh_mountpoint(target, directory=False)
        self._remember(staged, target, entry)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(mode=0o600, exist_ok=True)
        self.mounts.bind(device, target, read_only=entry.read_only)
        log.info(
            "block volume published",
            extra={"volume": staged.volume_id, "path": str(target), "device": device},
        )

    def _is_loop_of(self, device: str, image: Path) -> bool:
        return any(
            loop.device == device and loop.backing_file == os.path.realpath(image)
            for loop in self.loops.attached()
        )

    def unpublish(self, volume_id: str, target_path: str) -> None:
        target = self.paths.check(target_path, "target_path")
        with self._locks.hold(volume_id, timeout=VOLUME_LOCK_TIMEOUT_S):
            current = self._states.load(volume_id)
            entry = current.targets.get(str(target)) if current else None
            if current is None or entry is None:
                return  # never published there, or already unpublished
            self.mounts.unmount(target)
            if entry.device:
                self.loops.detach(entry.device)
            _remove_target(target)
            remaining = {k: v for k, v in current.targets.items() if k != str(target)}
            self._states.save(replace(current, targets=remaining))
            log.info("volume unpublished", extra={"volume": volume_id, "path": str(target)})

    # -- stats and expansion ---------------------------------------------------------

    def _where(self, volume_id: str, volume_path: str) -> tuple[Staged, Path]:
        """The volume's record and ``volume_path``, which must be its staging path or a target.

        A path that is neither is NOT_FOUND (the spec's code for "the volume
        does not exist at that path"), whatever the path is: relative,
        missing, another volume's, or outside the kubelet directory. Only a
        recorded path is then checked by the path policy and touched.
        """
        current = self._states.load(volume_id)
        if current is None:
            raise NotFound(f"volume {volume_id} is not staged on node {self.node_id}")
        trimmed = volume_path.rstrip("/") or volume_path
        if trimmed != current.staging_path and trimmed not in current.targets:
            raise NotFound(
                f"volume {volume_id} is neither staged nor published at {volume_path!r}; "
                "pass its staging path or one of its target paths"
            )
        path = self.paths.check(trimmed, "volume_path")
        if not os.path.lexists(path) and self.mounts.at(path) is None:
            raise NotFound(f"{path} does not exist")  # (a broken mount fails lstat)
        return current, path

    def stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        current, path = self._where(volume_id, volume_path)
        lost, problems = self._health(current, path, None)
        if current.access_type is AccessType.BLOCK:
            size = self.pool.require(volume_id).size_bytes
            message = "; ".join(lost + problems)
            return VolumeStats(size, 0, 0, None, None, None, bool(message), message or "ok")
        fs = None
        if not lost:
            try:
                fs = os.statvfs(path)
            except OSError as exc:
                lost.append(f"statfs of {path} failed: {exc}")
        message = "; ".join(lost + problems)
        if fs is None:
            return VolumeStats(0, 0, 0, None, None, None, True, message)
        total = fs.f_blocks * fs.f_frsize
        return VolumeStats(
            total_bytes=total,
            used_bytes=total - fs.f_bfree * fs.f_frsize,
            available_bytes=fs.f_bavail * fs.f_frsize,
            total_inodes=fs.f_files,
            used_inodes=fs.f_files - fs.f_ffree,
            available_inodes=fs.f_favail,
            abnormal=bool(message),
            message=message or "ok",
        )

    def conditions(self, images: Sequence[ImageInfo] | None = None) -> dict[str, str]:
        """Why each abnormal volume in this node's pool is abnormal (for the controller).

        ``images``: a scan of the pool just taken (else one is taken)."""
        staged = {s.volume_id: s for s in self._states.all()}
        images = self.pool.images() if images is None else images
        shortfall = self.pool.shortfall(images)
        found = {}
        for image in images:
            record = staged.get(image.volume_id)
            if record is not None:
                lost, problems = self._health(record, Path(record.staging_path), shortfall)
                problems = lost + problems
            else:
                problems = self._backing(image, shortfall)
            if problems:
                found[image.volume_id] = "; ".join(problems)
        return found

    def _health(
        self, staged: Staged, path: Path, shortfall: int | None
    ) -> tuple[list[str], list[str]]:
        """Why the volume at ``path`` is not usable (``lost``: its usage figures would
        be meaningless) or not healthy (``problems``); both empty when all is well.
        ``shortfall`` is the pool's, or None to compute it only if it matters."""
        image = self.pool.get(staged.volume_id)
        if image is None:
            return [f"the image of volume {staged.volume_id} is missing from the pool"], []
        device = self.loops.find(image.path)
        if device is None:
            return [f"volume {staged.volume_id} has no loop device; restage it"], []
        problems = []
        failed = self.kernel_log.failed_io(device)
        if failed:
            problems.append(
                f"the kernel reported failed I/O on the volume's loop device {device} since it "
                f"was attached (first: {failed!r}), so writes may not have reached the "
                "image: stop the pods "
                f"using it, unstage it and check its filesystem before using it again "
                f"({RUNBOOK})"
            )
        problems += self._backing(image, shortfall)
        unmounted = staged.access_type is AccessType.BLOCK and str(path) == staged.staging_path
        if not unmounted and self.mounts.at(path) is None:
            return [f"nothing is mounted at {path}; the mount was lost"], problems
        if staged.fs_type is FsType.EXT4:
            errors = ext4_errors(device)
            if errors:
                problems.append(
                    self._repair(
                        errors, device, "unstage it, run e2fsck -f on its image and restage"
                    )
                )
        elif staged.fs_type is FsType.XFS:
            shut = xfs_shut_down(path)
            if shut:
                problems.append(
                    self._repair(
                        shut,
                        device,
                        "unstage and restage it (mounting replays its log); if that mount "
                        "fails, run xfs_repair on its image",
                    )
                )
        return [], problems

    def _repair(self, what: str, device: str, how: str) -> str:
        return (
            f"the volume's filesystem on {device}: {what}; the kernel may have made it "
            f"read-only. Stop the pods using it, {how} ({RUNBOOK})"
        )

    def _backing(self, image: ImageInfo, shortfall: int | None) -> list[str]:
        """Whether the pool's filesystem can still hold what ``image`` may write."""
        if not image.unallocated_bytes:
            return []  # a thick image: its space is the pool's already
        if shortfall is None:
            shortfall = self.pool.shortfall()
        if not shortfall:
            return []
        kind = "thin" if image.thin else "thick, but with blocks punched out by discard,"
        return [
            f"the pool's filesystem at {self.pool.root} is {shortfall} bytes short of what "
            f"its images may still write, and this {kind} volume has {image.unallocated_bytes} "
            "bytes not yet allocated: its writes can fail with I/O errors. Free space on "
            f"the pool's filesystem now, or move the data to a thick volume ({RUNBOOK})"
        ]

    def expand(self, volume_id: str, volume_path: str, capability: VolumeCapability | None) -> int:
        """Grow the device and, for filesystems, the filesystem; return the size in bytes."""
        with self._locks.hold(volume_id, timeout=VOLUME_LOCK_TIMEOUT_S):
            current, path = self._where(volume_id, volume_path)
            if capability is not None and capability.access_type is not current.access_type:
                raise InvalidArgument(
                    f"volume {volume_id} is a {current.access_type.value} volume on this node"
                )
            image = self.pool.require(volume_id)
            device = self.loops.find(image.path)
            if device is None:
                raise FailedPrecondition(f"volume {volume_id} is not attached; stage it first")
            size = self.loops.refresh_capacity(device)
            for target in current.targets.values():
                if target.device:
                    self.loops.refresh_capacity(target.device)
            if current.access_type is AccessType.MOUNT:
                assert current.fs_type is not None
                staging = Path(current.staging_path)
                if self.mounts.at(staging) is None:
                    raise FailedPrecondition(f"volume {volume_id} is not mounted at {staging}")
                if current.read_only:
                    raise FailedPrecondition(f"volume {volume_id} is mounted read-only")
                self.filesystems.grow(device, staging, current.fs_type)
            log.info(
                "volume expanded", extra={"volume": volume_id, "bytes": size, "path": str(path)}
            )
            return size

    # -- restart recovery ----------------------------------------------------------------

    def recover(self) -> list[str]:
        """Detach loop devices of this pool that nothing stages or mounts; return them.

        Called when the node service starts. Loop devices and mounts of staged
        volumes are kept (kubelet keeps using them); devices left behind by a
        crash between attach and recording, or by deleted images, are freed.
        """
        staged = {s.volume_id: s for s in self._states.all()}
        wanted_devices = {t.device for s in staged.values() for t in s.targets.values() if t.device}
        images_dir = os.path.realpath(self.pool.images_dir) + "/"
        freed = []
        for loop in self.loops.attached():
            if not loop.backing_file.startswith(images_dir):
                continue
            volume_id = Path(loop.backing_file).stem
            keep = volume_id in staged and not loop.deleted
            if loop.read_only:
                keep = keep and loop.device in wanted_devices
            if keep:
                continue
            try:
                if self._detach_unused(loop.device):
                    freed.append(loop.device)
            except FerryError as exc:
                log.error(
                    "could not free leaked loop device",
                    extra={"device": loop.device, "error": exc.message},
                )
        for volume_id, record in staged.items():
            if self.pool.get(volume_id) is None:
                log.error("staged volume has no image in the pool", extra={"volume": volume_id})
            self._thaw_if_frozen(record)
        log.info(
            "node agent recovered",
            extra={"staged": len(staged), "freed_loop_devices": freed},
        )
        return freed

    def _thaw_if_frozen(self, staged: Staged) -> None:
        """A snapshot cut short by a crash can leave the filesystem frozen, and every
        writer of the volume hung: thaw it (a no-op when it is not frozen)."""
        staging = Path(staged.staging_path)
        if staged.access_type is not AccessType.MOUNT or self.mounts.at(staging) is None:
            return
        try:
            self.filesystems.thaw(staging, if_frozen=True)
        except FerryError as exc:
            log.error(
                "could not thaw a staged filesystem",
                extra={"volume": staged.volume_id, "error": exc.message},
            )

    def _detach_unused(self, device: str) -> bool:
        """Detach ``device`` unless something still mounts it; True if detached."""
        name = "/" + os.path.basename(device)
        for entry in self.mounts.table():
            if entry.source == device or (entry.fs_type == "devtmpfs" and entry.root == name):
                log.warning(
                    "loop device still mounted; leaving it attached",
                    extra={"device": device, "mountpoint": entry.mountpoint},
                )
                return False
        self.loops.detach(device)
        return True


def _described(target: Target) -> str:
    how = "read-only" if target.read_only else "read-write"
    return f"{how} with access mode {target.access_mode.value}" if target.access_mode else how


def _check_single_writer(staged: Staged, target: str, wanted: Target) -> None:
    """Refuse a second target when the new or an existing one is SINGLE_NODE_SINGLE_WRITER.

    SINGLE_NODE_SINGLE_WRITER (ReadWriteOncePod) promises one workload, so
    one target path; the other single-node modes allow several pods on the
    node, each with its own target.
    """
    others = sorted(
        path
        for path, entry in staged.targets.items()
        if path != target and (wanted.single_writer or entry.single_writer)
    )
    if others:
        raise FailedPrecondition(
            SINGLE_WRITER_CONFLICT.format(volume_id=staged.volume_id, other=", ".join(others))
        )


def _require_fresh_mountpoint(target: Path, *, directory: bool) -> None:
    """Refuse to mount over anything but an empty directory (or empty file, for block).

    Mounting over existing content would hide it, and unpublishing could not
    remove the target afterwards.
    """
    if not os.path.lexists(target):
        return
    if directory:
        if not target.is_dir() or any(target.iterdir()):
            raise FailedPrecondition(
                f"target_path {target} exists and is not an empty directory; "
                "Ferry mounts only on a fresh path"
            )
    elif not target.is_file() or target.stat().st_size:
        raise FailedPrecondition(
            f"target_path {target} exists and is not an empty file; a block volume is "
            "published on a fresh file"
        )


def _make_encrypted_dir(data: Path, like: Path) -> None:
    """Create ``data`` with the mode of the filesystem's root ``like``, durably."""
    try:
        data.mkdir()
        os.chmod(data, stat.S_IMODE(os.stat(like).st_mode))
        fsync_dir(like)
    except OSError as exc:
        raise InternalError(
            f"cannot create the encrypted directory {data}: {exc.strerror}; check the "
            "volume's filesystem (docs/operations.md, 'Encrypted volumes')"
        ) from exc


def _remove_target(target: Path) -> None:
    """Remove what NodePublishVolume created at ``target`` (the spec asks us to)."""
    try:
        if target.is_dir() and not target.is_symlink():
            target.rmdir()
        else:
            target.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno == errno.ENOTEMPTY:
            raise InternalError(
                f"{target} is not empty after unmounting; inspect it before retrying"
            ) from exc
        raise InternalError(f"cannot remove {target}: {exc}") from exc
