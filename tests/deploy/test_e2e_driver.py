"""The e2e suite's driver definition declares what Ferry serves, no more, no less.

Kubernetes' external storage suite decides which cases to run from the
capabilities in ``e2e/testdriver.yaml``. Each is checked here against what
Ferry itself advertises (CSI capabilities, access modes, filesystems,
topology keys, CSIDriver object) so the file cannot claim, or hide, a
capability on its own.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from csi_driver import DRIVER_NAME
from csi_driver.controller.volumes import MINIMUM_SIZE
from csi_driver.core.model import AccessMode, FsType
from csi_driver.core.params import StorageParameters, parse_parameters
from csi_driver.core.placement import NODE_KEY, ZONE_KEY
from csi_driver.csi import controller as csi_controller
from csi_driver.csi import node as csi_node
from csi_driver.gen import csi_pb2
from csi_driver.node.mounts import check_mount_flags

ROOT = Path(__file__).resolve().parents[2]
E2E = ROOT / "e2e"
CSIDRIVER = ROOT / "deploy" / "kubernetes" / "01-csidriver.yaml"
CONTROLLER_RPC = csi_pb2.ControllerServiceCapability.RPC
NODE_RPC = csi_pb2.NodeServiceCapability.RPC

#: Every capability the suite knows (test/e2e/storage/framework/testdriver.go).
KNOWN_CAPABILITIES = {
    "persistence", "block", "fsGroup", "volumeMountGroup", "exec", "snapshotDataSource",
    "pvcDataSource", "offlineSnapshotClone", "multipods", "RWX", "controllerExpansion",
    "nodeExpansion", "offlineExpansion", "onlineExpansion", "volumeLimits",
    "singleNodeVolume", "topology", "capacity", "FSResizeFromSourceNotSupported",
    "readWriteOncePod", "multiplePVsSameID", "capReadOnlyMany",
}  # fmt: skip


@pytest.fixture(scope="module")
def driver() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((E2E / "testdriver.yaml").read_text())
    return doc


@pytest.fixture(scope="module")
def caps(driver: dict[str, Any]) -> dict[str, bool]:
    capabilities: dict[str, bool] = driver["DriverInfo"]["Capabilities"]
    return capabilities


def _bytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert match, quantity
    return int(match[1]) * {"Mi": 1 << 20, "Gi": 1 << 30}[match[2]]


def test_only_known_capabilities_each_a_bool(caps: dict[str, bool]) -> None:
    assert set(caps) <= KNOWN_CAPABILITIES
    assert all(isinstance(v, bool) for v in caps.values())


def test_capabilities_match_what_ferry_advertises(caps: dict[str, bool]) -> None:
    controller = set(csi_controller.CAPABILITIES)
    node = set(csi_node.CAPABILITIES)
    modes = {m for m in AccessMode if m.single_node}
    assert caps["controllerExpansion"] == (CONTROLLER_RPC.EXPAND_VOLUME in controller)
    assert caps["nodeExpansion"] == (NODE_RPC.EXPAND_VOLUME in node)
    assert caps["snapshotDataSource"] == (CONTROLLER_RPC.CREATE_DELETE_SNAPSHOT in controller)
    assert caps["pvcDataSource"] == (CONTROLLER_RPC.CLONE_VOLUME in controller)
    assert caps["volumeMountGroup"] == (NODE_RPC.VOLUME_MOUNT_GROUP in node)
    assert caps["readWriteOncePod"] == (AccessMode.SINGLE_NODE_SINGLE_WRITER in modes)
    assert caps["multipods"] == (NODE_RPC.SINGLE_NODE_MULTI_WRITER in node)
    assert not caps["RWX"] and not caps["capReadOnlyMany"]  # Ferry volumes are single-node
    assert caps["topology"] and caps["capacity"]


def test_filesystems_sizes_and_mount_options(driver: dict[str, Any]) -> None:
    info = driver["DriverInfo"]
    assert info["Name"] == DRIVER_NAME
    assert set(info["SupportedFsType"]) == {""} | {f.value for f in FsType}
    size = info["SupportedSizeRange"]
    assert _bytes(size["Min"]) >= max(v for v in MINIMUM_SIZE.values())
    assert _bytes(size["Min"]) < _bytes(size["Max"])
    check_mount_flags(tuple(info["SupportedMountOption"]))  # raises on a refused flag
    assert set(info["TopologyKeys"]) <= {ZONE_KEY, NODE_KEY}
    assert NODE_KEY not in info["TopologyKeys"]  # a PV is never pinned to one node


def test_csidriver_object_backs_the_kubernetes_side_capabilities(caps: dict[str, bool]) -> None:
    csidriver = yaml.safe_load(CSIDRIVER.read_text())
    assert csidriver["metadata"]["name"] == DRIVER_NAME
    assert caps["fsGroup"] == (
        csidriver["spec"]["fsGroupPolicy"] in ("File", "ReadWriteOnceWithFSType")
    )
    assert caps["capacity"] == csidriver["spec"]["storageCapacity"]


def test_classes_it_names_carry_what_ferry_accepts(driver: dict[str, Any]) -> None:
    storage_class = yaml.safe_load((ROOT / driver["StorageClass"]["FromFile"]).read_text())
    assert storage_class["provisioner"] == DRIVER_NAME
    params = parse_parameters(storage_class["parameters"] | {"csi.storage.k8s.io/fstype": "xfs"})
    assert params.fs_type is None  # the suite picks each filesystem through the capability
    vac = yaml.safe_load((ROOT / driver["VolumeAttributesClass"]["FromFile"]).read_text())
    assert vac["driverName"] == DRIVER_NAME
    changed = params.with_mutable(vac["parameters"])
    assert changed != params  # the suite's modify cases really change something
    assert StorageParameters().with_mutable(vac["parameters"]) is not None


def test_the_run_script_is_valid_bash_and_runs_this_driver() -> None:
    script = E2E / "run-external-storage.sh"
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert '-storage.testdriver="$root/e2e/testdriver.yaml"' in text
    assert "ferry\\.csi\\.dev" in text
    assert "e2e/run-external-storage.sh" in (E2E / "README.md").read_text()
