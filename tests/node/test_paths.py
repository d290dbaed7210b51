from __future__ import annotations

from pathlib import Path

import pytest

from csi_driver.core.errors import InvalidArgument
from csi_driver.node.paths import PathPolicy


@pytest.fixture
def kubelet(tmp_path: Path) -> Path:
    root = tmp_path / "kubelet"
    (root / "pods").mkdir(parents=True)
    return root


def test_paths_inside_the_root_are_accepted(kubelet: Path) -> None:
    policy = PathPolicy([kubelet])
    wanted = kubelet / "pods" / "uid" / "volumes" / "mount"
    assert policy.check(str(wanted), "target_path") == wanted
    assert policy.check(str(wanted) + "/", "target_path") == wanted


@pytest.mark.parametrize(
    "suffix",
    ["/pods/../../etc", "/pods/./x", "//pods", "/pods//x"],
)
def test_unnormalised_paths_are_refused(kubelet: Path, suffix: str) -> None:
    with pytest.raises(InvalidArgument, match="normalised"):
        PathPolicy([kubelet]).check(str(kubelet) + suffix, "target_path")


@pytest.mark.parametrize("raw", ["/etc", "/", "relative/path", "", "/x\x00y"])
def test_paths_outside_or_malformed_are_refused(kubelet: Path, raw: str) -> None:
    with pytest.raises(InvalidArgument):
        PathPolicy([kubelet]).check(raw, "target_path")


def test_the_root_itself_is_refused(kubelet: Path) -> None:
    with pytest.raises(InvalidArgument, match="outside"):
        PathPolicy([kubelet]).check(str(kubelet), "staging_target_path")


def test_sibling_prefix_is_not_inside(kubelet: Path) -> None:
    with pytest.raises(InvalidArgument, match="outside"):
        PathPolicy([kubelet]).check(str(kubelet) + "-evil/x", "target_path")


def test_symlink_components_are_refused(kubelet: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (kubelet / "pods" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InvalidArgument, match="symlink"):
        PathPolicy([kubelet]).check(str(kubelet / "pods" / "link" / "mount"), "target_path")


def test_a_symlinked_root_is_served_by_both_names(tmp_path: Path, kubelet: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(kubelet)
    policy = PathPolicy([alias])
    assert policy.check(str(kubelet / "pods" / "x"), "target_path") == kubelet / "pods" / "x"
    assert policy.check(str(alias / "pods" / "x"), "target_path") == alias / "pods" / "x"
