"""The kernel's filesystem encryption (fscrypt), through its v2 policy ioctls.

fscrypt encrypts file contents and names per directory tree: a directory
gets a *policy* naming the master key (by its identifier) and the ciphers,
and every file created below it is encrypted with a key the kernel derives
from that master key. Ferry talks to the kernel directly with four ioctls
(``linux/fscrypt.h``), so no fscrypt tool is needed on the node:

- ``FS_IOC_ADD_ENCRYPTION_KEY`` gives the filesystem a master key; the
  kernel answers with the key's *identifier*, a hash of the key. Keys live
  in the filesystem's own keyring (not a process's), so they survive the
  Ferry process that added them and vanish when the filesystem is unmounted.
- ``FS_IOC_SET_ENCRYPTION_POLICY`` gives an empty directory a v2 policy
  (AES-256-XTS contents, AES-256-CTS names, the identifier), and never
  changes one. The kernel would take an identifier whose key nobody added
  from root (CAP_FOWNER), so Ferry only ever sets one it just got back from
  adding the key.
- ``FS_IOC_GET_ENCRYPTION_POLICY_EX`` reads a directory's policy, which
  needs no key: that is how Ferry tells a wrong key from the right one
  (the identifiers differ) before anything is read or written.
- ``FS_IOC_REMOVE_ENCRYPTION_KEY`` withdraws this user's claim on a key;
  once no claim is left the kernel evicts the plaintext from its caches.

Invariants: a key goes nowhere but into the ioctl's buffer, which is zeroed
right after the call, and nothing here logs or formats a key (Python makes
no promise about copies it keeps, so callers hold a key only for the call).
Errors say what the errno means for a volume, never which key was used.
The structures below are ``linux/fscrypt.h``'s, field for field;
``tests/node/test_fscrypt.py`` compiles the header and compares sizes,
offsets and request numbers.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from csi_driver.core.encryption import VolumeKey
from csi_driver.core.errors import FailedPrecondition, InternalError

log = logging.getLogger(__name__)

POLICY_V2 = 2
MODE_AES_256_XTS = 1
MODE_AES_256_CTS = 4
#: Pad encrypted file names to 32 bytes, so their lengths leak as little as possible.
POLICY_FLAGS_PAD_32 = 0x03
KEY_SPEC_TYPE_IDENTIFIER = 2
KEY_IDENTIFIER_SIZE = 16
KEY_REMOVAL_FILES_BUSY = 0x1
KEY_REMOVAL_OTHER_USERS = 0x2


class PolicyV2(ctypes.Structure):
    """``struct fscrypt_policy_v2``."""

    _fields_ = (
        ("version", ctypes.c_uint8),
        ("contents_encryption_mode", ctypes.c_uint8),
        ("filenames_encryption_mode", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 4),
        ("master_key_identifier", ctypes.c_uint8 * KEY_IDENTIFIER_SIZE),
    )


class PolicyV1(ctypes.Structure):
    """``struct fscrypt_policy_v1`` (only its size matters: the ioctl number encodes it)."""

    _fields_ = (
        ("version", ctypes.c_uint8),
        ("contents_encryption_mode", ctypes.c_uint8),
        ("filenames_encryption_mode", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("master_key_descriptor", ctypes.c_uint8 * 8),
    )


class _AnyPolicy(ctypes.Union):
    _fields_ = (("version", ctypes.c_uint8), ("v1", PolicyV1), ("v2", PolicyV2))


class GetPolicyExArg(ctypes.Structure):
    """``struct fscrypt_get_policy_ex_arg``."""

    _fields_ = (("policy_size", ctypes.c_uint64), ("policy", _AnyPolicy))


class _KeySpecifierName(ctypes.Union):
    _fields_ = (
        ("reserved", ctypes.c_uint8 * 32),
        ("descriptor", ctypes.c_uint8 * 8),
        ("identifier", ctypes.c_uint8 * KEY_IDENTIFIER_SIZE),
    )


class KeySpecifier(ctypes.Structure):
    """``struct fscrypt_key_specifier``."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("u", _KeySpecifierName),
    )


class AddKeyArg(ctypes.Structure):
    """``struct fscrypt_add_key_arg`` without its flexible ``raw[]``, which follows it."""

    _fields_ = (
        ("key_spec", KeySpecifier),
        ("raw_size", ctypes.c_uint32),
        ("key_id", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 8),
    )


class RemoveKeyArg(ctypes.Structure):
    """``struct fscrypt_remove_key_arg``."""

    _fields_ = (
        ("key_spec", KeySpecifier),
        ("removal_status_flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 5),
    )


_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, number: int, size: int) -> int:
    """``_IOC(dir, 'f', nr, size)`` of ``asm-generic/ioctl.h``."""
    return (direction << 30) | (size << 16) | (ord("f") << 8) | number


# The kernel's names say _IOR for SET (sic) and _IOWR for the rest; the
# number is what matters, and it must equal the header's bit for bit.
FS_IOC_SET_ENCRYPTION_POLICY = _ioc(_IOC_READ, 19, ctypes.sizeof(PolicyV1))
FS_IOC_GET_ENCRYPTION_POLICY_EX = _ioc(_IOC_READ | _IOC_WRITE, 22, 9)
FS_IOC_ADD_ENCRYPTION_KEY = _ioc(_IOC_READ | _IOC_WRITE, 23, ctypes.sizeof(AddKeyArg))
FS_IOC_REMOVE_ENCRYPTION_KEY = _ioc(_IOC_READ | _IOC_WRITE, 24, ctypes.sizeof(RemoveKeyArg))


@dataclass(frozen=True)
class KeyIdentifier:
    """What names a master key in a v2 policy: 16 bytes the kernel derives from it.

    Not secret (it is stored in every encrypted inode), but useless without
    the key; shown in hex in messages and logs.
    """

    value: bytes

    def __str__(self) -> str:
        return self.value.hex()


@dataclass(frozen=True)
class Policy:
    """A directory's v2 encryption policy."""

    identifier: KeyIdentifier
    contents_mode: int
    filenames_mode: int
    flags: int


class Fscrypt:
    """fscrypt ioctls on paths of a mounted filesystem."""

    def add_key(self, mountpoint: Path, key: VolumeKey) -> KeyIdentifier:
        """Give the filesystem mounted at ``mountpoint`` this master key; return its identifier.

        Adding a key this user already added is a no-op for the kernel, so a
        repeated stage changes nothing.
        """
        header = AddKeyArg()
        header.key_spec.type = KEY_SPEC_TYPE_IDENTIFIER
        header.raw_size = len(key.raw)
        buffer = bytearray(bytes(header))
        buffer += key.raw
        try:
            _ioctl(mountpoint, FS_IOC_ADD_ENCRYPTION_KEY, buffer, "add the volume's key")
            answered = AddKeyArg.from_buffer_copy(buffer[: ctypes.sizeof(AddKeyArg)])
        finally:
            buffer[:] = bytes(len(buffer))
        return KeyIdentifier(bytes(answered.key_spec.u.identifier))

    def remove_key(self, mountpoint: Path, identifier: KeyIdentifier) -> int:
        """Withdraw this user's claim on a key; return the kernel's removal status flags.

        A key the filesystem does not hold (removed already, or never added
        since it was mounted) is not an error: the wanted state holds.
        """
        arg = RemoveKeyArg()
        arg.key_spec.type = KEY_SPEC_TYPE_IDENTIFIER
        arg.key_spec.u.identifier[:] = list(identifier.value)
        buffer = bytearray(bytes(arg))
        what = "remove the volume's key"
        if not _ioctl(mountpoint, FS_IOC_REMOVE_ENCRYPTION_KEY, buffer, what, errno.ENOKEY):
            return 0
        return int(RemoveKeyArg.from_buffer_copy(buffer).removal_status_flags)

    def policy(self, directory: Path) -> Policy | None:
        """``directory``'s v2 policy, or None if it is not encrypted (no key needed)."""
        arg = GetPolicyExArg()
        arg.policy_size = ctypes.sizeof(PolicyV2)
        buffer = bytearray(bytes(arg))
        what = "read the encryption policy"
        if not _ioctl(directory, FS_IOC_GET_ENCRYPTION_POLICY_EX, buffer, what, errno.ENODATA):
            return None
        answered = GetPolicyExArg.from_buffer_copy(buffer)
        if answered.policy.version != POLICY_V2:
            raise FailedPrecondition(
                f"{directory} is encrypted with a version {answered.policy.version} fscrypt "
                "policy, not version 2: it was not made by Ferry; move its data to a new volume"
            )
        v2 = answered.policy.v2
        return Policy(
            identifier=KeyIdentifier(bytes(v2.master_key_identifier)),
            contents_mode=v2.contents_encryption_mode,
            filenames_mode=v2.filenames_encryption_mode,
            flags=v2.flags,
        )

    def set_policy(self, directory: Path, identifier: KeyIdentifier) -> None:
        """Encrypt everything that will be created in the empty ``directory``."""
        policy = PolicyV2(
            version=POLICY_V2,
            contents_encryption_mode=MODE_AES_256_XTS,
            filenames_encryption_mode=MODE_AES_256_CTS,
            flags=POLICY_FLAGS_PAD_32,
        )
        policy.master_key_identifier[:] = list(identifier.value)
        what = "set the encryption policy"
        _ioctl(directory, FS_IOC_SET_ENCRYPTION_POLICY, bytearray(bytes(policy)), what)
        log.info("encryption policy set", extra={"path": str(directory), "key": str(identifier)})


def _ioctl(
    path: Path, request: int, buffer: bytearray, what: str, tolerated: int | None = None
) -> bool:
    """Run ``request`` on ``path`` (a directory, never followed if a link) with ``buffer``,
    which the kernel may update. False if it failed with errno ``tolerated``; any other
    failure raises the domain error that says what it means."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise InternalError(f"cannot {what} at {path}: cannot open it: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, request, buffer, True)
    except OSError as exc:
        if exc.errno is not None and exc.errno == tolerated:
            return False
        raise _explain(exc.errno or 0, path, what) from None
    finally:
        os.close(fd)
    return True


def _explain(number: int, path: Path, what: str) -> InternalError | FailedPrecondition:
    reason = os.strerror(number)
    if number in (errno.ENOTTY, errno.EOPNOTSUPP):
        return FailedPrecondition(
            f"cannot {what} at {path}: the filesystem does not support encryption ({reason}). "
            "Encrypted volumes need ext4 made with the 'encrypt' feature and a kernel built "
            "with CONFIG_FS_ENCRYPTION; a volume created unencrypted stays unencrypted"
        )
    if number == errno.ENOTEMPTY:
        return FailedPrecondition(
            f"cannot {what} at {path}: the directory already holds unencrypted files; "
            "Ferry encrypts only a fresh, empty directory"
        )
    if number == errno.EEXIST:
        return FailedPrecondition(
            f"cannot {what} at {path}: it already has another encryption policy"
        )
    return InternalError(f"cannot {what} at {path}: {reason} (errno {number})")
