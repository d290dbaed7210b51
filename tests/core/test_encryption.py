"""Which volumes can be encrypted, and reading the key from the node-stage secret."""

from __future__ import annotations

import base64

import pytest

from csi_driver.core.encryption import (
    KEY_BYTES,
    SECRET_KEY,
    VolumeKey,
    check_encryptable,
    encrypted_context,
    volume_key,
)
from csi_driver.core.errors import InvalidArgument
from csi_driver.core.model import AccessType, FsType
from csi_driver.core.params import parse_parameters

RAW = bytes(range(KEY_BYTES))
ENCODED = base64.b64encode(RAW).decode()


def test_the_key_is_base64_of_64_bytes_and_whitespace_is_forgiven() -> None:
    assert volume_key({SECRET_KEY: ENCODED}).raw == RAW
    wrapped = "\n".join(ENCODED[i : i + 76] for i in range(0, len(ENCODED), 76)) + "\n"
    assert volume_key({SECRET_KEY: wrapped}).raw == RAW


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("%%%%", "is not base64"),
        (base64.b64encode(RAW[:32]).decode(), "decodes to 32 bytes"),
        (base64.b64encode(RAW + b"x").decode(), "decodes to 65 bytes"),
        ("", "decodes to 0 bytes"),
    ],
)
def test_a_malformed_key_is_refused_without_quoting_it(value: str, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words) as caught:
        volume_key({SECRET_KEY: value})
    if value:
        assert value not in caught.value.message
    assert "head -c 64 /dev/urandom" in caught.value.message


def test_a_missing_key_names_the_storage_class_parameters() -> None:
    with pytest.raises(InvalidArgument) as caught:
        volume_key({"password": "hunter2"})
    assert "csi.storage.k8s.io/node-stage-secret-name" in caught.value.message
    assert "keys present: password" in caught.value.message
    assert "hunter2" not in caught.value.message


def test_a_key_never_shows_its_bytes() -> None:
    key = VolumeKey(RAW)
    for shown in (repr(key), str(key), f"{key}", repr([key])):
        assert RAW.hex() not in shown and str(RAW) not in shown and ENCODED not in shown


def test_block_and_xfs_cannot_be_encrypted_and_say_why() -> None:
    check_encryptable(AccessType.MOUNT, FsType.EXT4)
    check_encryptable(AccessType.MOUNT, None)
    with pytest.raises(InvalidArgument, match="raw block device has no files"):
        check_encryptable(AccessType.BLOCK, None)
    with pytest.raises(InvalidArgument, match="xfs has no filesystem encryption"):
        check_encryptable(AccessType.MOUNT, FsType.XFS)


@pytest.mark.parametrize(("value", "wanted"), [("", False), ("false", False), ("True", True)])
def test_the_volume_context_flag(value: str, wanted: bool) -> None:
    assert encrypted_context(value) is wanted


@pytest.mark.parametrize("value", ["yes", "1", "on"])
def test_a_mistyped_volume_context_flag_is_refused(value: str) -> None:
    with pytest.raises(InvalidArgument, match="volumeAttributes"):
        encrypted_context(value)


def test_the_storage_class_parameter() -> None:
    assert parse_parameters({}).encrypted is False
    params = parse_parameters({"encrypted": " TRUE "})
    assert params.encrypted is True
    assert params.as_dict()["encrypted"] == "true"
    assert parse_parameters(params.as_dict()) == params
    # Only "true" is recorded: volumes recorded before the parameter compare equal.
    assert "encrypted" not in parse_parameters({"encrypted": "false"}).as_dict()
    with pytest.raises(InvalidArgument, match=r'encrypted=.yes. is invalid: use "true" or "false"'):
        parse_parameters({"encrypted": "yes"})


def test_a_volume_attributes_class_cannot_turn_encryption_on_or_off() -> None:
    params = parse_parameters({"encrypted": "true"})
    for value in ("false", "true"):
        with pytest.raises(InvalidArgument, match="'encrypted' cannot be changed"):
            params.with_mutable({"encrypted": value})
