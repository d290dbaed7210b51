"""StorageClass parameter validation."""

from __future__ import annotations

import pytest

from csi_driver.core.errors import InvalidArgument
from csi_driver.core.model import FsType
from csi_driver.core.params import StorageParameters, parse_parameters


def test_defaults() -> None:
    assert parse_parameters({}) == StorageParameters(None, 0)


def test_known_values() -> None:
    assert parse_parameters({"fsType": "XFS", "replicas": "2"}) == StorageParameters(FsType.XFS, 2)


def test_provisioner_metadata_is_accepted() -> None:
    params = {"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "db"}
    assert parse_parameters(params) == StorageParameters()


@pytest.mark.parametrize("key", ["fstype", "replica", "foo.bar/baz"])
def test_unknown_parameter_is_named(key: str) -> None:
    with pytest.raises(InvalidArgument, match=repr(key)):
        parse_parameters({key: "x"})


@pytest.mark.parametrize("value", ["-1", "4", "two", "1.5", ""])
def test_bad_replicas(value: str) -> None:
    with pytest.raises(InvalidArgument, match="replicas"):
        parse_parameters({"replicas": value})


def test_bad_fs_type() -> None:
    with pytest.raises(InvalidArgument, match="btrfs"):
        parse_parameters({"fsType": "btrfs"})
