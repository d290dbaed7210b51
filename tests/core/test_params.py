"""StorageClass parameter validation."""

from __future__ import annotations

import pytest

from csi_driver.core.errors import InvalidArgument
from csi_driver.core.model import FsType
from csi_driver.core.params import Provisioning, StorageParameters, parse_parameters


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


def test_provisioning_defaults_to_thick() -> None:
    assert parse_parameters({}).provisioning is Provisioning.THICK
    assert parse_parameters({"provisioning": "thick"}) == parse_parameters({})


@pytest.mark.parametrize("value", ["thin", "Thin", " thin "])
def test_thin_is_an_explicit_choice_and_recorded(value: str) -> None:
    params = parse_parameters({"provisioning": value})
    assert params.provisioning is Provisioning.THIN
    assert params.as_dict()["provisioning"] == "thin"
    assert parse_parameters(params.as_dict()) == params


@pytest.mark.parametrize("value", ["sparse", "", "thick,thin", "THICKER"])
def test_bad_provisioning(value: str) -> None:
    with pytest.raises(InvalidArgument, match=r"provisioning=.*thick or thin"):
        parse_parameters({"provisioning": value})
