"""Backup targets: a flat namespace of immutable objects, in a directory or a bucket.

A target stores whole objects under ``/``-separated keys: put (visible at
once), stage (visible by the next flush), get, list by prefix, delete, and
flush. Invariants every target keeps:

- A put is atomic: readers see no object or the whole one, never part of it
  (a directory writes a temporary file and renames it; S3 has a single PUT).
- An object that is visible after a crash has all its bytes, except plain
  ``put``s without ``durable`` (claims and heartbeats, worthless after a
  crash anyway). Staged objects (chunks) become visible only once durable.
- ``put(..., durable=True)`` returns only once the object and everything
  staged before it survive a crash: the manifest, a backup's commit point,
  is put so.
- Keys are made by Ferry, never by users: they are checked against a narrow
  alphabet, so no key can name a path outside a directory target.
- Every put is counted (objects and bytes): what a backup uploaded is
  measured, not estimated.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from csi_driver.core.errors import (
    DataLoss,
    FailedPrecondition,
    FerryError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from csi_driver.node.pool import fsync_dir

_KEY = re.compile(r"^[a-z]+(/[A-Za-z0-9_.-]+)*$")
#: Where a directory target writes staged objects until a flush renames them
#: into place: chunk directories change only at flushes, so the directory
#: fsyncs of one flush share one journal commit instead of one each.
STAGING = ".staging"
#: fsyncs of one flush run this many at a time: concurrent fsyncs on one
#: filesystem share journal commits (ext4, xfs), where one after another
#: each pays its own.
_SYNC_THREADS = 8

Blob = bytes | bytearray | memoryview


def check_key(key: str) -> str:
    if not _KEY.match(key) or "/." in key:
        raise InvalidArgument(f"{key!r} is not a backup object key")
    return key


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    modified: float  # seconds since the epoch, as the target reports it


@dataclass
class PutCounter:
    """Objects and bytes put through a target (thread-safe)."""

    objects: int = 0
    bytes: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, size: int) -> None:
        with self._lock:
            self.objects += 1
            self.bytes += size


class Target(Protocol):
    description: str
    uploaded: PutCounter

    def put(self, key: str, data: bytes, *, durable: bool = False) -> None:
        """Store ``data``, visible to every reader on return; ``durable``: and on disk,
        with every object staged before it."""
        ...

    def stage(self, key: str, *parts: Blob) -> None:
        """Store the object made of ``parts`` (one after the other: no copy joins them),
        visible (and durable) by the next :meth:`flush` at the latest."""
        ...

    def get(self, key: str) -> bytes:
        """The object's bytes; NotFound when there is none."""
        ...

    def get_range(
        self, key: str, offset: int, length: int, *, into: bytearray | None = None
    ) -> Blob:
        """``length`` bytes of the object from ``offset`` (an S3 Range GET, a pread),
        in ``into`` when the target can read into a buffer (valid until ``into`` is
        reused); NotFound when there is no object, DataLoss when it is shorter."""
        ...

    def list(self, prefix: str) -> Iterator[StoredObject]: ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing one is already deleted."""
        ...

    def flush(self) -> None:
        """Make every staged object visible and durable."""
        ...

    def remove_leftovers(self, older_than_s: float) -> int:
        """Remove what puts that died left behind; how many objects."""
        ...


class FilesystemTarget:
    """Objects as files under ``root`` (the embedded default target).

    A staged object is written to a hidden temporary file in ``.staging/``
    and renamed into place only by a flush, after an fsync: so a name that
    survives a crash always has its bytes. Every ``flush_bytes`` staged, a
    flush of what is staged so far starts in the background (at most one at
    a time: the staging that would start a second waits for the first), so
    writing the next objects overlaps waiting for the disk; :meth:`flush`
    and every durable put wait for all of them.
    """

    def __init__(self, root: Path, *, flush_bytes: int = 256 * 1024 * 1024) -> None:
        self.root = Path(root)
        self.description = str(self.root)
        self.uploaded = PutCounter()
        self.flush_bytes = flush_bytes
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise FailedPrecondition(f"cannot use {root} as a backup target: {exc}") from exc
        self._lock = threading.Lock()  # the staged list
        # Starting a background flush and flushing: one at a time, so that a
        # flush always knows of (and waits for) every background flush begun.
        self._flush_lock = threading.Lock()
        self._staged: list[tuple[Path, Path]] = []
        self._staged_bytes = 0
        self._background: Future[None] | None = None

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write(
        self, key: str, parts: Sequence[Blob], *, sync: bool, staged: bool
    ) -> tuple[Path, Path]:
        path = self._path(key)
        directory = self.root / STAGING if staged else path.parent
        tmp = directory / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            # The directory usually exists: made only when missing (a syscall per chunk
            # saved), and again if a delete removed it in between.
            for attempt in (1, 2, 3):
                try:
                    size = _write_file(tmp, parts, sync=sync)
                    break
                except FileNotFoundError:
                    if attempt == 3:
                        raise  # the directory keeps vanishing: not a race with delete
                    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _os_error(exc, f"write {key} to {self.root}") from exc
        self.uploaded.add(size)
        return tmp, path

    def put(self, key: str, data: bytes, *, durable: bool = False) -> None:
        if durable:
            self.flush()
        tmp, path = self._write(key, (data,), sync=durable, staged=False)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _os_error(exc, f"write {key} to {self.root}") from exc
        if durable:
            _sync_dirs({path.parent}, self.root)

    def stage(self, key: str, *parts: Blob) -> None:
        staged = self._write(key, parts, sync=False, staged=True)
        with self._lock:
            self._staged.append(staged)
            self._staged_bytes += sum(len(part) for part in parts)
            due = self._staged_bytes >= self.flush_bytes
        if due:
            self._flush_in_background()

    def _take_staged(self) -> list[tuple[Path, Path]]:
        with self._lock:
            staged, self._staged, self._staged_bytes = self._staged, [], 0
        return staged

    def _flush_in_background(self) -> None:
        with self._flush_lock:
            self._wait_background()  # one at a time: bounds what is written but not durable
            staged = self._take_staged()
            if not staged:
                return
            done: Future[None] = Future()

            def commit() -> None:
                try:
                    self._commit(staged)
                except BaseException as exc:
                    done.set_exception(exc)
                else:
                    done.set_result(None)

            self._background = done
            # A daemon thread: a process that dies mid-flush has written no manifest
            # yet (flush waits for this), and leaves temporary files remove_leftovers
            # collects.
            threading.Thread(target=commit, name="backup-target-flush", daemon=True).start()

    def _wait_background(self) -> None:
        """Wait for the background flush, if one runs (the caller holds ``_flush_lock``)."""
        running, self._background = self._background, None
        if running is not None:
            running.result()

    def flush(self) -> None:
        with self._flush_lock:
            try:
                self._commit(self._take_staged())
            finally:
                self._wait_background()

    def _commit(self, staged: list[tuple[Path, Path]]) -> None:
        """Make ``staged`` durable, then visible under their names, then those names durable."""
        if not staged:
            return
        try:
            with ThreadPoolExecutor(
                min(_SYNC_THREADS, len(staged)), thread_name_prefix="backup-target-fsync"
            ) as pool:
                list(pool.map(_fsync_path, (tmp for tmp, _ in staged)))
                for tmp, path in staged:
                    for attempt in (1, 2, 3):
                        try:
                            os.replace(tmp, path)
                            break
                        except FileNotFoundError:
                            if attempt == 3:
                                raise  # the directory keeps vanishing: not a race with delete
                            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                # Names left in .staging after a crash are leftovers: only the new
                # names need to be durable.
                _sync_dirs({path.parent for _, path in staged}, self.root, pool)
        except OSError as exc:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise _os_error(exc, f"flush objects to {self.root}") from exc

    def remove_leftovers(self, older_than_s: float) -> int:
        """Delete temporary files of puts that died (a crashed backup's); return how many."""
        removed = 0
        cutoff = time.time() - older_than_s
        for directory, _, files in os.walk(self.root):
            for name in files:
                path = Path(directory) / name
                if name.startswith(".") and name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        if path.stat().st_mtime < cutoff:
                            path.unlink()
                            removed += 1
        return removed

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no object {key} in backup target {self.root}") from None
        except OSError as exc:
            raise _os_error(exc, f"read {key} from {self.root}") from exc

    def get_range(
        self, key: str, offset: int, length: int, *, into: bytearray | None = None
    ) -> Blob:
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"no object {key} in backup target {self.root}") from None
        except OSError as exc:
            raise _os_error(exc, f"read {key} from {self.root}") from exc
        buffer = into if into is not None and len(into) >= length else bytearray(length)
        view = memoryview(buffer)[:length]
        done = 0
        try:
            while done < length:  # short reads are rare: finish them
                got = os.preadv(fd, [view[done:]], offset + done)
                if got == 0:
                    break
                done += got
        except OSError as exc:
            raise _os_error(exc, f"read {key} from {self.root}") from exc
        finally:
            os.close(fd)
        return _whole(view[:done], length, key, self.description)

    def list(self, prefix: str) -> Iterator[StoredObject]:
        start = self.root / prefix.rstrip("/") if prefix else self.root
        if not start.is_dir():
            return
        for directory, _, files in os.walk(start):
            for name in sorted(files):
                if name.startswith("."):
                    continue  # a put in flight (or interrupted)
                path = Path(directory) / name
                try:
                    info = path.stat()
                except FileNotFoundError:
                    continue
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield StoredObject(key, info.st_size, info.st_mtime)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise _os_error(exc, f"delete {key} from {self.root}") from exc
        # Directories exist only for the objects in them (a put makes its own again).
        if path.parent != self.root:
            with contextlib.suppress(OSError):
                path.parent.rmdir()


#: O_DIRECT wants buffer addresses, offsets and lengths aligned to the device's blocks.
DIRECT_ALIGN = 4096
#: Objects smaller than this (indexes, manifests, claims), or immutable (``bytes``,
#: never aligned on purpose), are not worth a direct write: the attempt costs a
#: synchronous disk write or a refused one on the backup's driving thread.
_DIRECT_MIN = 64 * DIRECT_ALIGN


def _write_file(path: Path, parts: Sequence[Blob], *, sync: bool) -> int:
    """Write ``parts`` to a new file at ``path`` in as few calls as the kernel allows.

    A single large, writable, page-aligned part (a pack, built in an anonymous
    map) goes to the disk with O_DIRECT but for its last partial page: through the page cache a
    pack cost 1 to 2 s of kernel CPU per GiB written (copying into cache pages
    and reclaiming them on a machine short of free memory), more than sealing
    it, and its fsync waited for all of it; direct, a few hundredths, and the
    fsync that still makes it durable (size, extents, the disk's cache) is
    quick. Anything else, or a filesystem refusing O_DIRECT, is written as is.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        views = [memoryview(part).cast("B") for part in parts]
        total = sum(len(view) for view in views)
        if len(views) == 1 and len(views[0]) >= _DIRECT_MIN and not views[0].readonly:
            direct = _write_direct(path, views[0][: len(views[0]) // DIRECT_ALIGN * DIRECT_ALIGN])
            if direct:
                views = [views[0][direct:]] if direct < len(views[0]) else []
                os.lseek(fd, direct, os.SEEK_SET)
        while views:
            done = os.writev(fd, views)
            while views and done >= len(views[0]):
                done -= len(views[0])
                views.pop(0)
            if views and done:
                views[0] = views[0][done:]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return total


def _write_direct(path: Path, view: memoryview) -> int:
    """Write as much of ``view`` (a whole number of pages) at the start of ``path`` with
    O_DIRECT as the kernel takes aligned; how many bytes (0 when it refuses: the
    buffer is not aligned, or the filesystem has no direct I/O: ramfs, or tmpfs
    before Linux 6.6)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return 0
        raise
    done = 0
    try:
        while done < len(view):
            written = os.write(fd, view[done:])
            done += written
            if not written or written % DIRECT_ALIGN:
                break  # a short, unaligned write: the buffered path finishes
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)
    return done


def _fsync_path(path: Path) -> None:
    with open(path, "rb", buffering=0) as handle:
        os.fsync(handle.fileno())


def _sync_dirs(directories: set[Path], root: Path, pool: ThreadPoolExecutor | None = None) -> None:
    """fsync ``directories`` and, for new ones, their parents (their names); on
    ``pool``'s threads when given (concurrent fsyncs share journal commits)."""

    def sync(directory: Path) -> None:
        # A directory emptied and removed since (a released claim's) needs no sync.
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(directory)

    parents = {d.parent for d in directories if d != root}
    ordered = sorted(directories | parents, key=lambda p: len(p.parts), reverse=True)
    if pool is None:
        for directory in ordered:
            sync(directory)
    else:
        list(pool.map(sync, ordered))


def _whole(data: Blob, length: int, key: str, where: str) -> Blob:
    if len(data) != length:
        raise DataLoss(f"object {key} in {where} is shorter than its index says (truncated)")
    return data


def _os_error(exc: OSError, what: str) -> FerryError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"cannot {what}: the target's filesystem is full; free space")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(f"cannot {what}: {exc.strerror}; check the target's permissions")
    return Unavailable(f"cannot {what}: {exc.strerror}")


@dataclass(frozen=True)
class S3Settings:
    """Where a bucket is and how to sign requests to it (None: boto3's own default chain,
    e.g. ``AWS_ACCESS_KEY_ID`` in the environment)."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None

    #: Names of the settings in a config file or a mounted Secret.
    FIELDS = ("endpoint", "region", "access-key-id", "secret-access-key")

    @classmethod
    def load(cls, bucket: str, prefix: str, config: Path | None) -> S3Settings:
        """Settings for ``bucket``, read from ``config``: a JSON object, or a directory
        with one file per setting (a Kubernetes Secret mounted as a volume)."""
        values: dict[str, str] = {}
        if config is not None:
            values = _read_settings(config)
        unknown = set(values) - set(cls.FIELDS)
        if unknown:
            raise InvalidArgument(
                f"unknown S3 settings {sorted(unknown)} in {config}; known: {', '.join(cls.FIELDS)}"
            )
        return cls(
            bucket=bucket,
            prefix=prefix,
            endpoint_url=values.get("endpoint"),
            region=values.get("region"),
            access_key_id=values.get("access-key-id"),
            secret_access_key=values.get("secret-access-key"),
        )


def _read_settings(config: Path) -> dict[str, str]:
    if config.is_dir():
        return {
            p.name: p.read_text(encoding="utf-8").strip()
            for p in sorted(config.iterdir())
            if p.is_file() and not p.name.startswith(".")
        }
    try:
        doc = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFound(f"no S3 settings file at {config}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{config} is not a JSON object of S3 settings: {exc}") from None
    if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
        raise InvalidArgument(f"{config} must be a JSON object of strings")
    return {str(k): str(v) for k, v in doc.items()}


class S3Target:
    """Objects in an S3-compatible bucket, under an optional key prefix."""

    def __init__(self, settings: S3Settings) -> None:
        import boto3
        from botocore.config import Config

        self.settings = settings
        self._prefix = settings.prefix.strip("/") + "/" if settings.prefix.strip("/") else ""
        where = settings.endpoint_url or "AWS"
        self.description = f"s3://{settings.bucket}/{self._prefix} at {where}"
        self.uploaded = PutCounter()
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region or "us-east-1",
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            config=Config(
                retries={"max_attempts": 5, "mode": "standard"},
                max_pool_connections=16,
                connect_timeout=5,
                read_timeout=60,
            ),
        )

    def _call(self, what: str, call: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call(Bucket=self.settings.bucket, **kwargs)
        except ClientError as exc:
            raise _s3_error(exc, what, self.description) from exc
        except BotoCoreError as exc:
            raise Unavailable(f"cannot {what} at {self.description}: {exc}") from exc

    def put(self, key: str, data: bytes, *, durable: bool = False) -> None:
        # One PUT is atomic and, once answered, durable: ``durable`` asks nothing more.
        self._call(
            f"write {key}", self._client.put_object, Key=self._prefix + check_key(key), Body=data
        )
        self.uploaded.add(len(data))

    def stage(self, key: str, *parts: Blob) -> None:
        self.put(key, b"".join(parts))  # one PUT per object: the copy is the network's cost

    def flush(self) -> None:
        """Nothing to do: every answered PUT is already durable."""

    def remove_leftovers(self, older_than_s: float) -> int:
        return 0  # single PUTs leave nothing behind (no multipart uploads)

    def get(self, key: str) -> bytes:
        answer = self._call(
            f"read {key}", self._client.get_object, Key=self._prefix + check_key(key)
        )
        body: bytes = answer["Body"].read()
        return body

    def get_range(
        self, key: str, offset: int, length: int, *, into: bytearray | None = None
    ) -> Blob:
        answer = self._call(
            f"read {key}",
            self._client.get_object,
            Key=self._prefix + check_key(key),
            Range=f"bytes={offset}-{offset + length - 1}",
        )
        body: bytes = answer["Body"].read()
        return _whole(body, length, key, self.description)

    def list(self, prefix: str) -> Iterator[StoredObject]:
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._call(
                f"list {prefix}",
                self._client.list_objects_v2,
                Prefix=self._prefix + prefix,
                **extra,
            )
            for item in page.get("Contents", ()):
                key = str(item["Key"])[len(self._prefix) :]
                yield StoredObject(key, int(item["Size"]), item["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", self._client.delete_object, Key=self._prefix + check_key(key))


def _s3_error(exc: Any, what: str, where: str) -> FerryError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    message = f"cannot {what} at {where}: {code} {error.get('Message', '')}".rstrip()
    if code in ("NoSuchKey", "404", "NotFound"):
        return NotFound(message)
    if code == "InvalidRange":
        return DataLoss(f"{message}: the object is shorter than its index says (truncated)")
    if code == "NoSuchBucket":
        return FailedPrecondition(f"{message}; create the bucket first")
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
        return PermissionDenied(f"{message}; check the target's credentials")
    return Unavailable(f"{message}; retry later")


def open_target(location: str, s3_config: Path | None = None) -> Target:
    """The target at ``location``: a directory path (or ``file://`` URL), or
    ``s3://bucket[/prefix]`` with its settings in ``s3_config``."""
    parsed = urlparse(location)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InvalidArgument(f"{location!r} names no bucket: use s3://BUCKET[/PREFIX]")
        return S3Target(S3Settings.load(parsed.netloc, parsed.path, s3_config))
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme else location
        if not path or not os.path.isabs(path):
            raise InvalidArgument(f"a directory target needs an absolute path, not {location!r}")
        return FilesystemTarget(Path(path))
    raise InvalidArgument(
        f"unknown backup target {location!r}: use an absolute directory or s3://BUCKET[/PREFIX]"
    )
