"""The typed catalog: Ferry's volumes and nodes over a :class:`CatalogStore`.

Keys:

- ``volumes/<volume_id>``  -> a :class:`Volume`
- ``names/<name>``         -> the volume id that a CreateVolume name maps to
- ``nodes/<node_id>``      -> a :class:`NodeRecord` (written by the node itself)
- image specs and statuses and per-node accounting: the records of
  :mod:`csi_driver.core.records` (see docs/records.md)

A volume stored CREATING whose primary image the node reported READY is
read as READY (:meth:`Catalog.observed`): the node's status is the fact,
so a create needs no third transaction to copy it into the volume, and the
next write of the volume (a publish) stores READY with it.

Updates are read-modify-write with compare-and-swap; :meth:`Catalog.update_volume`
retries a few times when another writer got there first. A change that spans
a volume, its image and its node's accounting is one :meth:`CatalogStore.txn`
built from the key, op and read helpers here, so the accounting always equals
the sum of the image specs it counts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from csi_driver.core.errors import Conflict, NotFound, StoreError
from csi_driver.core.model import (
    AccessMode,
    AccessType,
    FsType,
    NodeRecord,
    Publication,
    Topology,
    Volume,
    VolumeState,
)
from csi_driver.core.records import (
    NODE_ACCOUNTS,
    ImagePhase,
    ImageSpec,
    ImageStatus,
    NodeAccounting,
    decode,
    image_spec_key,
    image_status_key,
    node_accounting_key,
)
from csi_driver.store.base import ABSENT, CatalogStore, Compare, Delete, Put
from csi_driver.store.records import Versioned, from_stored, put, read

VOLUMES = "volumes/"
NAMES = "names/"
NODES = "nodes/"

_CAS_ATTEMPTS = 16


def _volume_to_json(volume: Volume) -> bytes:
    doc: dict[str, Any] = {
        "volume_id": volume.volume_id,
        "name": volume.name,
        "capacity_bytes": volume.capacity_bytes,
        "access_type": volume.access_type.value,
        "fs_type": volume.fs_type.value if volume.fs_type else None,
        "primary_node": volume.primary_node,
        "epoch": volume.epoch,
        "state": volume.state.value,
        "parameters": dict(volume.parameters),
        "publications": [
            {
                "node_id": p.node_id,
                "readonly": p.readonly,
                "access_type": p.access_type.value,
                "access_mode": p.access_mode.value,
            }
            for p in volume.publications
        ],
        "created_at": volume.created_at,
        "generation": volume.generation,
        "content_source": volume.content_source,
    }
    return json.dumps(doc, sort_keys=True).encode()


def volume_from_json(raw: bytes) -> Volume:
    doc = json.loads(raw)
    return Volume(
        volume_id=doc["volume_id"],
        name=doc["name"],
        capacity_bytes=int(doc["capacity_bytes"]),
        access_type=AccessType(doc["access_type"]),
        fs_type=FsType(doc["fs_type"]) if doc["fs_type"] else None,
        primary_node=doc["primary_node"],
        epoch=int(doc["epoch"]),
        state=VolumeState(doc["state"]),
        parameters=tuple(sorted(doc["parameters"].items())),
        publications=tuple(
            Publication(
                node_id=p["node_id"],
                readonly=bool(p["readonly"]),
                access_type=AccessType(p["access_type"]),
                access_mode=AccessMode(p["access_mode"]),
            )
            for p in doc["publications"]
        ),
        created_at=float(doc["created_at"]),
        generation=int(doc.get("generation", 1)),
        content_source=str(doc.get("content_source", "")),
    )


def _node_to_json(node: NodeRecord) -> bytes:
    doc = {
        "node_id": node.node_id,
        "agent_endpoint": node.agent_endpoint,
        "topology": node.topology.as_dict(),
        "capacity_bytes": node.capacity_bytes,
        "max_volumes": node.max_volumes,
        "heartbeat_at": node.heartbeat_at,
        "labels": dict(node.labels),
        "volume_conditions": dict(node.volume_conditions),
        "chunk_endpoint": node.chunk_endpoint,
    }
    return json.dumps(doc, sort_keys=True).encode()


def node_from_json(raw: bytes) -> NodeRecord:
    doc = json.loads(raw)
    return NodeRecord(
        node_id=doc["node_id"],
        agent_endpoint=doc["agent_endpoint"],
        topology=Topology.of(doc["topology"]),
        capacity_bytes=int(doc["capacity_bytes"]),
        max_volumes=int(doc["max_volumes"]),
        heartbeat_at=float(doc["heartbeat_at"]),
        labels=tuple(sorted(doc["labels"].items())),
        volume_conditions=tuple(sorted(doc.get("volume_conditions", {}).items())),
        chunk_endpoint=str(doc.get("chunk_endpoint", "")),
    )


class Catalog:
    """Typed access to Ferry's catalog."""

    def __init__(self, store: CatalogStore) -> None:
        self.store = store

    # -- volumes -------------------------------------------------------------

    def get_volume(self, volume_id: str) -> Volume | None:
        record = self.store.get(VOLUMES + volume_id)
        return self.observed(volume_from_json(record.value)) if record else None

    def observed(self, volume: Volume) -> Volume:
        """``volume`` READY if it is CREATING and its image's status says READY."""
        if volume.state is not VolumeState.CREATING:
            return volume
        stored = self.store.get(image_status_key(volume.primary_node, volume.volume_id))
        if stored is not None and self.image_status(stored.value).phase is ImagePhase.READY:
            return replace(volume, state=VolumeState.READY)
        return volume

    def require_volume(self, volume_id: str) -> Volume:
        volume = self.get_volume(volume_id)
        if volume is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return volume

    def put_volume(self, volume: Volume) -> None:
        self.store.put(VOLUMES + volume.volume_id, _volume_to_json(volume))

    def update_volume(self, volume_id: str, change: Callable[[Volume], Volume]) -> Volume:
        """Apply ``change`` to the stored volume atomically; retry on races.

        ``change`` may raise a FerryError to refuse the update; it is called
        again with fresh data after a lost race, so it must be pure.
        """
        for _ in range(_CAS_ATTEMPTS):
            record = self.store.get(VOLUMES + volume_id)
            if record is None:
                raise NotFound(f"volume {volume_id} does not exist")
            current = self.observed(volume_from_json(record.value))
            updated = change(current)
            if updated == current:
                return current
            try:
                self.store.put(VOLUMES + volume_id, _volume_to_json(updated), record.revision)
            except Conflict:
                continue
            return updated
        raise StoreError(f"volume {volume_id} kept changing under concurrent updates; retry")

    def delete_volume(self, volume: Volume) -> None:
        self.store.delete(VOLUMES + volume.volume_id)
        owner = self.store.get(NAMES + volume.name)
        if owner is not None and owner.value.decode() == volume.volume_id:
            self.store.delete(NAMES + volume.name, owner.revision)

    def read_volume(self, volume_id: str, *, stored: bool = False) -> Versioned[Volume] | None:
        """The volume with the revision it was read at (for a txn's compare)."""
        record = self.store.get(VOLUMES + volume_id)
        if record is None:
            return None
        volume = volume_from_json(record.value)
        return Versioned(volume if stored else self.observed(volume), record.revision)

    @staticmethod
    def volume_op(volume: Volume) -> Put:
        return Put(VOLUMES + volume.volume_id, _volume_to_json(volume))

    @staticmethod
    def volume_unchanged(read_as: Versioned[Volume]) -> Compare:
        return Compare(VOLUMES + read_as.value.volume_id, read_as.revision)

    @staticmethod
    def volume_absent(volume_id: str) -> Compare:
        return Compare(VOLUMES + volume_id, ABSENT)

    def forget_ops(self, volume: Volume) -> tuple[list[Compare], list[Put | Delete]]:
        """Compares and ops removing ``volume``, its name (if still its own) and its image."""
        compares: list[Compare] = []
        ops: list[Put | Delete] = [
            Delete(VOLUMES + volume.volume_id),
            Delete(image_spec_key(volume.primary_node, volume.volume_id)),
            Delete(image_status_key(volume.primary_node, volume.volume_id)),
        ]
        owner = self.store.get(NAMES + volume.name)
        if owner is not None and owner.value.decode() == volume.volume_id:
            compares.append(Compare(NAMES + volume.name, owner.revision))
            ops.append(Delete(NAMES + volume.name))
        return compares, ops

    def list_volumes(
        self, start_after: str = "", limit: int = 0, *, stored: bool = False
    ) -> list[Volume]:
        """Volumes in id order; ``stored``: as written, READY not derived (the collector)."""
        after = VOLUMES + start_after if start_after else ""
        records = self.store.list(VOLUMES, after, limit)
        volumes = [volume_from_json(r.value) for r in records]
        return volumes if stored else [self.observed(v) for v in volumes]

    # -- the name index ------------------------------------------------------

    def claim_name(self, name: str, volume_id: str) -> str:
        """Bind ``name`` to ``volume_id`` unless it is bound already; return the owner."""
        try:
            self.store.put(NAMES + name, volume_id.encode(), ABSENT)
        except Conflict:
            record = self.store.get(NAMES + name)
            if record is None:  # released between our write and read: try once more
                self.store.put(NAMES + name, volume_id.encode(), ABSENT)
                return volume_id
            return record.value.decode()
        return volume_id

    def volume_id_for_name(self, name: str) -> str | None:
        record = self.store.get(NAMES + name)
        return record.value.decode() if record else None

    @staticmethod
    def name_op(name: str, volume_id: str) -> Put:
        return Put(NAMES + name, volume_id.encode())

    @staticmethod
    def name_absent(name: str) -> Compare:
        return Compare(NAMES + name, ABSENT)

    # -- images and accounting -------------------------------------------------

    def read_image(self, node_id: str, volume_id: str) -> Versioned[ImageSpec] | None:
        return read(self.store, ImageSpec, image_spec_key(node_id, volume_id))

    def account(self, node_id: str) -> Versioned[NodeAccounting] | None:
        return read(self.store, NodeAccounting, node_accounting_key(node_id))

    def accounts(self) -> dict[str, Versioned[NodeAccounting]]:
        """Every node's accounting with its revision: one record per node, no volume read."""
        found = (from_stored(NodeAccounting, r) for r in self.store.list(NODE_ACCOUNTS))
        return {a.value.node_id: a for a in found if a is not None}

    def backfill_accounting(self) -> int:
        """Count volumes into per-node accounting once, for a catalog written before it.

        Runs only while no accounting exists; returns how many nodes it wrote.
        Creates made since then are counted by their own txns.
        """
        if self.store.list(NODE_ACCOUNTS, limit=1) or not self.store.list(VOLUMES, limit=1):
            return 0
        totals: dict[str, NodeAccounting] = {}
        for volume in self.list_volumes():
            node = volume.primary_node
            totals[node] = totals.get(node, NodeAccounting(node)).charge(volume.capacity_bytes)
            for publication in volume.publications:
                on = publication.node_id
                totals[on] = totals.get(on, NodeAccounting(on)).publications(1)
        try:
            self.store.txn(
                [Compare(a.key, ABSENT) for a in totals.values()],
                [put(a) for a in totals.values()],
            )
        except Conflict:
            return 0  # another controller backfilled first
        return len(totals)

    @staticmethod
    def image_status(raw: bytes) -> ImageStatus:
        return decode(ImageStatus, raw)

    # -- nodes ---------------------------------------------------------------

    def register_node(self, node: NodeRecord) -> None:
        self.store.put(NODES + node.node_id, _node_to_json(node))

    def get_node(self, node_id: str) -> NodeRecord | None:
        record = self.store.get(NODES + node_id)
        return node_from_json(record.value) if record else None

    def list_nodes(self) -> list[NodeRecord]:
        return [node_from_json(r.value) for r in self.store.list(NODES)]

    def node_ids(self) -> list[str]:
        """Every node registered or charged, sorted, from the keys alone (no record
        decoded): a node whose record was deleted keeps its accounting."""
        keys = [r.key[len(NODES) :] for r in self.store.list(NODES)]
        keys += [r.key[len(NODE_ACCOUNTS) :] for r in self.store.list(NODE_ACCOUNTS)]
        return sorted(set(keys))

    def heartbeat(
        self, node_id: str, at: float, volume_conditions: Mapping[str, str] | None = None
    ) -> None:
        """Record that the node is alive, and which of its volumes it finds abnormal."""
        record = self.store.get(NODES + node_id)
        if record is None:
            raise NotFound(f"node {node_id} is not registered")
        node = replace(
            node_from_json(record.value),
            heartbeat_at=at,
            volume_conditions=tuple(sorted((volume_conditions or {}).items())),
        )
        self.store.put(NODES + node_id, _node_to_json(node))
