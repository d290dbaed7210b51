"""StorageClass parameter validation."""

from __future__ import annotations

import pytest

from csi_driver.core.errors import InvalidArgument
from csi_driver.core.model import FsType
from csi_driver.core.params import (
    FailoverPolicy,
    Provisioning,
    StorageParameters,
    parse_parameters,
)


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


def test_policy_defaults_are_no_schedule_and_wait() -> None:
    params = parse_parameters({})
    assert params.rpo_seconds == 0
    assert params.failover_policy is FailoverPolicy.WAIT
    # Defaults are not recorded: volumes made before these parameters existed
    # still compare equal to a request that omits them.
    assert params.as_dict() == {"replicas": "0"}
    assert parse_parameters({"rpoSeconds": "0", "failoverPolicy": "wait"}) == params


@pytest.mark.parametrize(
    ("given", "rpo", "policy"),
    [
        ({"rpoSeconds": "30"}, 30, FailoverPolicy.WAIT),
        ({"rpoSeconds": " 604800 "}, 604800, FailoverPolicy.WAIT),
        ({"failoverPolicy": "promote"}, 0, FailoverPolicy.PROMOTE),
        ({"failoverPolicy": "Promote", "rpoSeconds": "5"}, 5, FailoverPolicy.PROMOTE),
    ],
)
def test_policy_values_parse_and_round_trip(
    given: dict[str, str], rpo: int, policy: FailoverPolicy
) -> None:
    params = parse_parameters(given)
    assert (params.rpo_seconds, params.failover_policy) == (rpo, policy)
    assert parse_parameters(params.as_dict()) == params


@pytest.mark.parametrize("value", ["-1", "1.5", "", "ten", "604801", "1e3", "٣"])
def test_bad_rpo_seconds_names_parameter_and_range(value: str) -> None:
    with pytest.raises(InvalidArgument, match=r"rpoSeconds=.*whole number from 0 to 604800"):
        parse_parameters({"rpoSeconds": value})


@pytest.mark.parametrize("value", ["", "always", "promote,wait", "failover"])
def test_bad_failover_policy_names_parameter_and_choices(value: str) -> None:
    with pytest.raises(InvalidArgument, match=r"failoverPolicy=.*wait or promote"):
        parse_parameters({"failoverPolicy": value})


def test_mutable_parameters_change_only_the_policy() -> None:
    base = parse_parameters({"fsType": "xfs", "replicas": "1", "provisioning": "thin"})
    changed = base.with_mutable({"replicas": "2", "rpoSeconds": "60", "failoverPolicy": "promote"})
    assert changed == StorageParameters(
        FsType.XFS, 2, Provisioning.THIN, 60, FailoverPolicy.PROMOTE
    )
    assert base.with_mutable({}) == base
    assert changed.with_mutable({"rpoSeconds": "60"}) == changed


@pytest.mark.parametrize("key", ["fsType", "provisioning", "csi.storage.k8s.io/pvc/name", "x"])
def test_immutable_or_unknown_mutable_parameter_is_named(key: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"{key!r} cannot be changed.*replicas, rpoSeconds"):
        StorageParameters().with_mutable({key: "v", "replicas": "1"})


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("replicas", "4", "replicas='4'.*0 to 3"),
        ("rpoSeconds", "-5", "rpoSeconds='-5'.*0 to 604800"),
        ("failoverPolicy", "never", "failoverPolicy='never'.*wait or promote"),
    ],
)
def test_bad_mutable_values_are_refused(key: str, value: str, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        StorageParameters().with_mutable({key: value})
