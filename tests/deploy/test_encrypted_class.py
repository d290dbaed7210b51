"""The encrypted StorageClass and its example: what kubelet would hand Ferry at stage."""

from __future__ import annotations

from typing import Any

from csi_driver.core.encryption import KEY_BYTES, volume_key
from csi_driver.core.params import parse_parameters
from tests.deploy.test_manifests import EXAMPLES, PLAIN, load, render

SECRET_NAME = "csi.storage.k8s.io/node-stage-secret-name"
SECRET_NAMESPACE = "csi.storage.k8s.io/node-stage-secret-namespace"


def encrypted_classes(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        d
        for d in docs
        if d["kind"] == "StorageClass" and parse_parameters(d["parameters"]).encrypted
    ]


def test_the_chart_and_the_plain_manifests_ship_an_encrypted_class() -> None:
    for docs in (render(), load(PLAIN)):
        (sc,) = encrypted_classes(docs)
        assert sc["parameters"]["fsType"] == "ext4"
        # One Secret per PVC, beside it: the external-provisioner fills in the template.
        assert sc["parameters"][SECRET_NAME] == "${pvc.name}-encryption-key"
        assert sc["parameters"][SECRET_NAMESPACE] == "${pvc.namespace}"


def test_the_example_secret_is_the_one_the_class_names_and_holds_a_key_ferry_takes() -> None:
    docs = load([p for p in EXAMPLES if p.name == "encrypted-pvc.yaml"])
    (sc,) = encrypted_classes(load(PLAIN))
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert pvc["spec"]["storageClassName"] == sc["metadata"]["name"]
    wanted = sc["parameters"][SECRET_NAME].replace("${pvc.name}", pvc["metadata"]["name"])
    assert secret["metadata"]["name"] == wanted
    assert len(volume_key(secret["stringData"]).raw) == KEY_BYTES


def test_a_class_without_encryption_names_no_secret() -> None:
    for sc in render():
        if sc["kind"] == "StorageClass" and sc not in encrypted_classes([sc]):
            assert SECRET_NAME not in sc["parameters"]
