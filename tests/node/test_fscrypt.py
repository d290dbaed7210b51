"""fscrypt's ioctls: the structures against the kernel's header, the calls on a real ext4."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.core.encryption import KEY_BYTES, VolumeKey
from csi_driver.core.errors import FailedPrecondition
from csi_driver.node import fscrypt
from csi_driver.node.fscrypt import Fscrypt
from tests.node.conftest import small_filesystem

HEADER = Path("/usr/include/linux/fscrypt.h")

#: What the C compiler says about linux/fscrypt.h, printed as "name value" lines.
PROBE = r"""
#include <stddef.h>
#include <stdio.h>
#include <linux/fscrypt.h>
#define SHOW(name, value) printf("%s %lu\n", name, (unsigned long)(value))
int main(void) {
    SHOW("FS_IOC_SET_ENCRYPTION_POLICY", FS_IOC_SET_ENCRYPTION_POLICY);
    SHOW("FS_IOC_GET_ENCRYPTION_POLICY_EX", FS_IOC_GET_ENCRYPTION_POLICY_EX);
    SHOW("FS_IOC_ADD_ENCRYPTION_KEY", FS_IOC_ADD_ENCRYPTION_KEY);
    SHOW("FS_IOC_REMOVE_ENCRYPTION_KEY", FS_IOC_REMOVE_ENCRYPTION_KEY);
    SHOW("PolicyV1", sizeof(struct fscrypt_policy_v1));
    SHOW("PolicyV2", sizeof(struct fscrypt_policy_v2));
    SHOW("PolicyV2.master_key_identifier",
         offsetof(struct fscrypt_policy_v2, master_key_identifier));
    SHOW("GetPolicyExArg", sizeof(struct fscrypt_get_policy_ex_arg));
    SHOW("GetPolicyExArg.policy", offsetof(struct fscrypt_get_policy_ex_arg, policy));
    SHOW("KeySpecifier", sizeof(struct fscrypt_key_specifier));
    SHOW("KeySpecifier.u", offsetof(struct fscrypt_key_specifier, u));
    SHOW("AddKeyArg", sizeof(struct fscrypt_add_key_arg));
    SHOW("AddKeyArg.raw_size", offsetof(struct fscrypt_add_key_arg, raw_size));
    SHOW("AddKeyArg.raw", offsetof(struct fscrypt_add_key_arg, raw));
    SHOW("RemoveKeyArg", sizeof(struct fscrypt_remove_key_arg));
    SHOW("RemoveKeyArg.removal_status_flags",
         offsetof(struct fscrypt_remove_key_arg, removal_status_flags));
    SHOW("POLICY_V2", FSCRYPT_POLICY_V2);
    SHOW("MODE_AES_256_XTS", FSCRYPT_MODE_AES_256_XTS);
    SHOW("MODE_AES_256_CTS", FSCRYPT_MODE_AES_256_CTS);
    SHOW("POLICY_FLAGS_PAD_32", FSCRYPT_POLICY_FLAGS_PAD_32);
    SHOW("KEY_SPEC_TYPE_IDENTIFIER", FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER);
    SHOW("KEY_BYTES", FSCRYPT_MAX_KEY_SIZE);
    return 0;
}
"""


def ours() -> dict[str, int]:
    f = fscrypt
    return {
        "FS_IOC_SET_ENCRYPTION_POLICY": f.FS_IOC_SET_ENCRYPTION_POLICY,
        "FS_IOC_GET_ENCRYPTION_POLICY_EX": f.FS_IOC_GET_ENCRYPTION_POLICY_EX,
        "FS_IOC_ADD_ENCRYPTION_KEY": f.FS_IOC_ADD_ENCRYPTION_KEY,
        "FS_IOC_REMOVE_ENCRYPTION_KEY": f.FS_IOC_REMOVE_ENCRYPTION_KEY,
        "PolicyV1": ctypes.sizeof(f.PolicyV1),
        "PolicyV2": ctypes.sizeof(f.PolicyV2),
        "PolicyV2.master_key_identifier": f.PolicyV2.master_key_identifier.offset,
        "GetPolicyExArg": ctypes.sizeof(f.GetPolicyExArg),
        "GetPolicyExArg.policy": f.GetPolicyExArg.policy.offset,
        "KeySpecifier": ctypes.sizeof(f.KeySpecifier),
        "KeySpecifier.u": f.KeySpecifier.u.offset,
        "AddKeyArg": ctypes.sizeof(f.AddKeyArg),
        "AddKeyArg.raw_size": f.AddKeyArg.raw_size.offset,
        "AddKeyArg.raw": ctypes.sizeof(f.AddKeyArg),  # raw[] starts where the header ends
        "RemoveKeyArg": ctypes.sizeof(f.RemoveKeyArg),
        "RemoveKeyArg.removal_status_flags": f.RemoveKeyArg.removal_status_flags.offset,
        "POLICY_V2": f.POLICY_V2,
        "MODE_AES_256_XTS": f.MODE_AES_256_XTS,
        "MODE_AES_256_CTS": f.MODE_AES_256_CTS,
        "POLICY_FLAGS_PAD_32": f.POLICY_FLAGS_PAD_32,
        "KEY_SPEC_TYPE_IDENTIFIER": f.KEY_SPEC_TYPE_IDENTIFIER,
        "KEY_BYTES": KEY_BYTES,
    }


@pytest.mark.skipif(
    not (HEADER.exists() and shutil.which("cc")), reason="needs a C compiler and linux/fscrypt.h"
)
def test_structures_and_request_numbers_match_the_kernel_header(tmp_path: Path) -> None:
    source, binary = tmp_path / "probe.c", tmp_path / "probe"
    source.write_text(PROBE)
    subprocess.run(["cc", "-o", str(binary), str(source)], check=True, capture_output=True)
    printed = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    kernel = {name: int(value) for name, value in (line.split() for line in printed.splitlines())}
    assert ours() == kernel


def key() -> VolumeKey:
    return VolumeKey(os.urandom(KEY_BYTES))


@pytest.fixture
def encryptable(host_dir: Path) -> Iterator[Path]:
    """A mounted ext4 with the encrypt feature."""
    mkfs = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "encrypt"]
    with small_filesystem(host_dir, 32 * 1024 * 1024, mkfs) as root:
        yield root


@pytest.mark.root
def test_a_directory_is_encrypted_with_the_key_that_names_it(encryptable: Path) -> None:
    crypt = Fscrypt()
    first, other = key(), key()
    identifier = crypt.add_key(encryptable, first)
    assert crypt.add_key(encryptable, first) == identifier  # a repeat: same identifier
    assert crypt.add_key(encryptable, other) != identifier
    data = encryptable / "data"
    data.mkdir()
    assert crypt.policy(data) is None
    crypt.set_policy(data, identifier)
    policy = crypt.policy(data)
    assert policy is not None and policy.identifier == identifier
    assert (policy.contents_mode, policy.filenames_mode) == (1, 4)
    (data / "note").write_bytes(b"secret words")
    with pytest.raises(FailedPrecondition, match="already has another encryption policy"):
        crypt.set_policy(data, crypt.add_key(encryptable, other))

    assert crypt.remove_key(encryptable, identifier) == 0
    assert crypt.remove_key(encryptable, identifier) == 0  # gone already: done
    (name,) = os.listdir(data)
    assert name != "note"
    with pytest.raises(OSError) as caught:
        (data / name).read_bytes()
    assert caught.value.errno == errno.ENOKEY
    assert crypt.policy(data) == policy  # readable without the key

    crypt.add_key(encryptable, first)
    assert (data / "note").read_bytes() == b"secret words"


@pytest.mark.root
def test_an_ext4_without_the_encrypt_feature_is_a_clear_refusal(host_dir: Path) -> None:
    with small_filesystem(host_dir, 32 * 1024 * 1024, ["mkfs.ext4", "-q", "-F"]) as root:
        with pytest.raises(FailedPrecondition, match="does not support encryption"):
            Fscrypt().add_key(root, key())
        (root / "data").mkdir()
        with pytest.raises(FailedPrecondition, match="made with the 'encrypt' feature"):
            Fscrypt().policy(root / "data")


@pytest.mark.root
def test_a_non_empty_directory_is_never_encrypted(encryptable: Path) -> None:
    crypt = Fscrypt()
    identifier = crypt.add_key(encryptable, key())
    (encryptable / "data").mkdir()
    (encryptable / "data" / "plain").write_bytes(b"x")
    with pytest.raises(FailedPrecondition, match="already holds unencrypted files"):
        crypt.set_policy(encryptable / "data", identifier)
