"""The chart's backup settings: what a node pod gets for `ferry backup` to find."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.test_manifests import KUBERNETES_VERSION, render

S3_VALUES = (
    "--set", "backup.target=s3://backups/prod",
    "--set", "backup.keySecret=ferry-backup-key",
    "--set", "backup.s3Secret=ferry-backup-s3",
)  # fmt: skip


def node_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (daemonset,) = (d for d in docs if d["kind"] == "DaemonSet")
    pod: dict[str, Any] = daemonset["spec"]["template"]["spec"]
    return pod


def ferry_container(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == "ferry")


def test_s3_target_key_and_settings_reach_the_node_pods() -> None:
    docs = render(*S3_VALUES)
    pod = node_pod(docs)
    container = ferry_container(pod)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FERRY_BACKUP_TARGET"] == "s3://backups/prod"
    assert env["FERRY_BACKUP_KEY_FILE"] == "/backup/key/key"
    assert env["FERRY_BACKUP_S3_CONFIG"] == "/backup/s3"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["backup-key"]["readOnly"] and mounts["backup-s3"]["readOnly"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets["backup-key"] == "ferry-backup-key"
    assert secrets["backup-s3"] == "ferry-backup-s3"
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_a_directory_target_is_mounted_from_the_host() -> None:
    pod = node_pod(render("--set", "backup.target=/mnt/backups"))
    paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert paths["backup-target"] == "/mnt/backups"
    mounts = {m["name"]: m["mountPath"] for m in ferry_container(pod)["volumeMounts"]}
    assert mounts["backup-target"] == "/mnt/backups"


def test_nothing_is_mounted_without_a_target() -> None:
    pod = node_pod(render())
    assert not [v for v in pod["volumes"] if v["name"].startswith("backup")]
    assert not [e for e in ferry_container(pod)["env"] if e["name"].startswith("FERRY_BACKUP")]


def test_the_controller_reads_the_same_target_for_backup_handles() -> None:
    docs = render(*S3_VALUES)
    (deployment,) = (
        d for d in docs if d["kind"] == "Deployment" and "controller" in d["metadata"]["name"]
    )
    pod = deployment["spec"]["template"]["spec"]
    container = ferry_container(pod)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FERRY_BACKUP_TARGET"] == "s3://backups/prod"
    assert env["FERRY_BACKUP_KEY_FILE"] == "/backup/key/key"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["backup-key"]["readOnly"] and mounts["backup-s3"]["readOnly"]
    assert not [e for e in ferry_container(node_pod(render()))["env"] if "BACKUP" in e["name"]]


def test_the_backup_snapshot_class_asks_for_a_backup() -> None:
    docs = render(*S3_VALUES, "--set", "snapshots.backupSnapshotClass.create=true")
    classes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "VolumeSnapshotClass"}
    assert classes["ferry-backups"]["parameters"] == {"backup": "true"}
    assert classes["ferry-backups"]["deletionPolicy"] == "Retain"
