"""A PVC on Ferry's StorageClass: bound, written by one pod, read by the next."""

from __future__ import annotations

import time
from typing import Any

STORAGE_CLASS = "ferry-ext4"
TIMEOUT_S = 300


def _pvc(kube: Any, name: str, size: str = "256Mi") -> Any:
    return kube.V1PersistentVolumeClaim(
        metadata=kube.V1ObjectMeta(name=name),
        spec=kube.V1PersistentVolumeClaimSpec(
            access_modes=["ReadWriteOnce"],
            storage_class_name=STORAGE_CLASS,
            resources=kube.V1VolumeResourceRequirements(requests={"storage": size}),
        ),
    )


def _pod(kube: Any, name: str, claim: str, script: str) -> Any:
    return kube.V1Pod(
        metadata=kube.V1ObjectMeta(name=name),
        spec=kube.V1PodSpec(
            restart_policy="Never",
            containers=[
                kube.V1Container(
                    name="c",
                    image="busybox:1.36",
                    command=["sh", "-c", script],
                    volume_mounts=[kube.V1VolumeMount(name="data", mount_path="/data")],
                )
            ],
            volumes=[
                kube.V1Volume(
                    name="data",
                    persistent_volume_claim=kube.V1PersistentVolumeClaimVolumeSource(
                        claim_name=claim
                    ),
                )
            ],
        ),
    )


def _wait_for_pod(core: Any, namespace: str, name: str) -> str:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        phase = core.read_namespaced_pod(name, namespace).status.phase
        if phase in ("Succeeded", "Failed"):
            return str(phase)
        time.sleep(2)
    raise AssertionError(f"pod {namespace}/{name} did not finish in {TIMEOUT_S}s")


def test_data_written_by_one_pod_is_read_by_the_next(kube: Any, namespace: str) -> None:
    core = kube.CoreV1Api()
    core.create_namespaced_persistent_volume_claim(namespace, _pvc(kube, "data"))
    write = "echo ferry > /data/hello && sync"
    core.create_namespaced_pod(namespace, _pod(kube, "writer", "data", write))
    assert _wait_for_pod(core, namespace, "writer") == "Succeeded"
    core.delete_namespaced_pod("writer", namespace)
    core.create_namespaced_pod(namespace, _pod(kube, "reader", "data", "grep -q ferry /data/hello"))
    assert _wait_for_pod(core, namespace, "reader") == "Succeeded"
    claim = core.read_namespaced_persistent_volume_claim("data", namespace)
    assert claim.status.phase == "Bound"
