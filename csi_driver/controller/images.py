"""The controller's side of image records: write intent, then wait for the node.

Each change to a volume's image is one store transaction that writes the
volume, its :class:`ImageSpec` and its node's :class:`NodeAccounting`
together (compare-and-swap on each), followed by a wait, bounded by the
RPC's deadline, for the :class:`ImageStatus` the node reports for that
spec's generation. Invariants:

- The accounting of a node always equals the sizes of the image specs it
  counts: charges and releases ride in the same txn as the specs.
- A deadline that passes keeps the intent (UNAVAILABLE): the node goes on
  reconciling, and the CO's retry finds the intent and only waits.
- A volume is READY once its primary image's status says READY: the
  catalog derives it from that status (:meth:`Catalog.read_volume`), so a
  create costs one write txn of the controller's, and a crash anywhere
  leaves a CREATING volume whose retry waits for the same status.
- A node's final refusal undoes the intent in one txn (a create leaves
  nothing behind, an expansion returns to the old size, a delete of an
  image in use leaves the volume READY) and maps to the CSI code the
  refusal names; a host error keeps the intent for the node's retries.
- With a ``fence`` (the leader's garbage collector), every txn also
  compares the leader's key, so a deposed leader's writes fail with
  :class:`Deposed` instead of landing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from csi_driver.core import deadline
from csi_driver.core.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    FerryError,
    InternalError,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    StoreError,
)
from csi_driver.core.model import Volume, VolumeState
from csi_driver.core.records import (
    IMAGE_STATUSES,
    FailureReason,
    ImagePhase,
    ImageSpec,
    ImageStatus,
    NodeAccounting,
    answers,
    node_accounting_key,
    revise,
)
from csi_driver.reconcile.wait import Waiters
from csi_driver.store.base import ABSENT, Compare, Delete, Put, Record
from csi_driver.store.catalog import Catalog
from csi_driver.store.records import Versioned, put, unchanged_since

log = logging.getLogger(__name__)

#: How long an RPC without a deadline waits for a node's status.
DEFAULT_WAIT_S = 60.0
#: Stop waiting this long before the caller's deadline, so the answer still reaches it.
REPLY_MARGIN_S = 0.2
_CAS_ATTEMPTS = 16

_REFUSALS: dict[FailureReason, Callable[[str], FerryError]] = {
    FailureReason.NO_SPACE: ResourceExhausted,
    FailureReason.TOO_LARGE: OutOfRange,
    FailureReason.IN_USE: FailedPrecondition,
    FailureReason.MISMATCH: AlreadyExists,
    FailureReason.SOURCE_MISSING: NotFound,  # a clone's snapshot vanished meanwhile
}


#: A node's image reconciler in this process: the status it stored for a spec, or None.
LocalNode = Callable[[Versioned[ImageSpec]], ImageStatus | None]


class AheadNode(Protocol):
    """A node in this process that creates a new image ahead of its records, then
    lets the caller store them with its READY status in one txn (LocalImages)."""

    node_id: str

    def create_ahead(
        self, spec: ImageSpec, commit: Callable[[ImageStatus], int]
    ) -> ImageStatus: ...

    def settle(self, volume_id: str) -> None:
        """Put in place now the image created ahead for ``volume_id`` whose commit was
        undecided, if it awaits settling (its volume has just been found committed)."""


class Deposed(FailedPrecondition):
    """A fenced txn failed: this process no longer leads, so it must not act."""


def _refusal(status: ImageStatus) -> FerryError:
    kind = _REFUSALS.get(status.reason, InternalError)
    return kind(f"node {status.node_id}: {status.message}")


@dataclass(frozen=True)
class Staged:
    """A new volume's records for one provision txn, without its node's charge."""

    node_id: str
    size_bytes: int
    compares: tuple[Compare, ...]
    ops: tuple[Put | Delete, ...]

    @property
    def keys(self) -> frozenset[str]:
        """Every key it compares or writes."""
        return frozenset(c.key for c in self.compares) | {op.key for op in self.ops}


class ImageIntents:
    """Writes image intents with their volume and accounting; waits for nodes' statuses."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        wait_s: float = DEFAULT_WAIT_S,
        fence: Callable[[], Compare] | None = None,
        local: LocalNode | None = None,
    ) -> None:
        """``local``: the image reconciler of a node in this process (all-in-one);
        a spec for that node is reconciled at once in the caller's thread."""
        self._catalog = catalog
        self._wait_s = wait_s
        self._fence = fence
        self._local = local
        self._statuses = Waiters(catalog.store, IMAGE_STATUSES)

    def close(self) -> None:
        """Stop following the nodes' image statuses."""
        self._statuses.close()

    def txn(self, compares: Sequence[Compare], ops: Sequence[Put | Delete]) -> int:
        """``store.txn``, fenced when this writer acts as the leader."""
        if self._fence is None:
            return self._catalog.store.txn(compares, ops)
        fence = self._fence()  # raises FailedPrecondition once leadership is known lost
        try:
            return self._catalog.store.txn([*compares, fence], ops)
        except Conflict as exc:
            if exc.key == fence.key:
                raise Deposed(f"leadership lost ({fence.key} changed); not acting") from exc
            raise

    # -- create ----------------------------------------------------------------

    def staged(
        self,
        volume: Volume,
        image: ImageSpec,
        *,
        claim_name: bool,
        status: ImageStatus | None = None,
    ) -> Staged:
        """A new volume's records for :meth:`provision_all`: the volume, its name
        (``claim_name``), its image spec and ``status``, the node's READY for an
        image created ahead of them; each compared absent."""
        compares = [
            self._catalog.volume_absent(volume.volume_id),
            Compare(image.key, ABSENT),
        ]
        ops: list[Put | Delete] = [self._catalog.volume_op(volume), put(image)]
        if claim_name:
            compares.append(self._catalog.name_absent(volume.name))
            ops.append(self._catalog.name_op(volume.name, volume.volume_id))
        if status is not None:
            compares.append(Compare(image.status_key, ABSENT))
            ops.append(put(status))
        return Staged(image.node_id, image.size_bytes, tuple(compares), tuple(ops))

    def provision_all(
        self,
        volumes: Sequence[Staged],
        accounts: Mapping[str, Versioned[NodeAccounting] | None],
    ) -> tuple[int, dict[str, NodeAccounting]]:
        """One txn: every staged volume, and each node's charge for those it holds,
        on top of its accounting as read in ``accounts`` (compared unchanged).

        Returns the revision and each charged node's accounting as written.
        Raises Conflict (naming the key) when an accounting moved since it was
        read or a name or volume was taken meanwhile: then nothing is written.
        """
        charged: dict[str, NodeAccounting] = {}
        for staged in volumes:
            read = accounts.get(staged.node_id)
            before = charged.get(staged.node_id) or (
                read.value if read else NodeAccounting(staged.node_id)
            )
            charged[staged.node_id] = before.charge(staged.size_bytes)
        compares = [unchanged_since(a.key, accounts.get(node)) for node, a in charged.items()]
        ops: list[Put | Delete] = []
        for staged in volumes:
            compares.extend(staged.compares)
            ops.extend(staged.ops)
        ops.extend(put(account) for account in charged.values())
        return self.txn(compares, ops), charged

    def provision(
        self,
        volume: Volume,
        image: ImageSpec,
        account: Versioned[NodeAccounting] | None,
        *,
        claim_name: bool,
        status: ImageStatus | None = None,
    ) -> Versioned[NodeAccounting]:
        """:meth:`provision_all` of one volume; its node's accounting as written."""
        staged = self.staged(volume, image, claim_name=claim_name, status=status)
        revision, charged = self.provision_all([staged], {image.node_id: account})
        return Versioned(charged[image.node_id], revision)

    def finish_create(
        self, volume: Volume, thin: bool, written: Versioned[ImageSpec] | None = None
    ) -> Volume:
        """Wait for the node to create ``volume``'s image; return the volume READY.

        ``written`` is the spec just written with the volume (None: read it).
        Nothing more is written: READY is derived from the image's status.
        """
        image = written if written is not None else self._image_of(volume, thin)
        status = self._await(image, f"node {image.value.node_id} to create the image")
        if status.phase is ImagePhase.READY:
            return replace(volume, state=VolumeState.READY)
        if status.reason.final:
            self.forget(volume)  # a refused create leaves nothing behind
        raise _refusal(status)

    # -- delete ----------------------------------------------------------------

    def delete(self, volume_read: Versioned[Volume]) -> None:
        """Mark the volume DELETING and its image deleted; forget both once the node did."""
        volume = volume_read.value
        image = self._image_of(volume, thin=False)
        doomed = Versioned(revise(image.value, deleted=True), image.revision)
        deleting = replace(volume, state=VolumeState.DELETING)
        if doomed.value is not image.value or deleting != volume:
            revision = self.txn(
                [
                    self._catalog.volume_unchanged(volume_read),
                    unchanged_since(image.value.key, image),
                ],
                [self._catalog.volume_op(deleting), put(doomed.value)],
            )
            doomed = Versioned(doomed.value, revision)
        status = self._await(doomed, f"node {doomed.value.node_id} to delete the image")
        if status.phase is ImagePhase.DELETED:
            self.forget(volume)
            return
        if status.reason is FailureReason.IN_USE:
            # The node kept the image because it is in use: the volume stays usable.
            self.keep_after_refused_delete(volume.volume_id, doomed.value)
        raise _refusal(status)

    def keep_after_refused_delete(self, volume_id: str, doomed: ImageSpec) -> None:
        for _ in range(_CAS_ATTEMPTS):
            volume_read = self._catalog.read_volume(volume_id)
            image = self._catalog.read_image(doomed.node_id, volume_id)
            if volume_read is None or image is None:
                return
            kept = revise(image.value, deleted=False)
            try:
                self.txn(
                    [
                        self._catalog.volume_unchanged(volume_read),
                        unchanged_since(kept.key, image),
                    ],
                    [
                        self._catalog.volume_op(
                            replace(volume_read.value, state=VolumeState.READY)
                        ),
                        put(kept),
                    ],
                )
            except Conflict:
                continue
            return
        raise StoreError(f"volume {volume_id} kept changing while its delete was undone; retry")

    # -- expand ----------------------------------------------------------------

    def grow(
        self,
        volume: Volume,
        size: int,
        account: Versioned[NodeAccounting] | None,
        check_room: Callable[[int], None],
    ) -> Versioned[ImageSpec]:
        """One txn: the image spec's new size and the node's charge for the growth.

        ``check_room(growth)`` raises when the node cannot hold the growth.
        A spec already at least ``size`` (an earlier expansion still in
        flight) is returned unchanged.
        """
        image = self._image_of(volume, thin=False)
        if image.value.size_bytes >= size:
            return image
        growth = size - image.value.size_bytes
        check_room(growth)
        charged = (account.value if account else NodeAccounting(image.value.node_id)).charge(
            growth, 0
        )
        grown = revise(image.value, size_bytes=size)
        revision = self.txn(
            [unchanged_since(grown.key, image), unchanged_since(charged.key, account)],
            [put(grown), put(charged)],
        )
        return Versioned(grown, revision)

    def finish_grow(self, volume: Volume, written: Versioned[ImageSpec]) -> int:
        """Wait for the node to grow the image; record and return the volume's new size."""
        grown = written.value
        status = self._await(written, f"node {grown.node_id} to grow the image")
        if status.phase is ImagePhase.READY:
            size = max(status.size_bytes, grown.size_bytes)
            self._catalog.update_volume(
                volume.volume_id,
                lambda v: replace(v, capacity_bytes=max(v.capacity_bytes, size)),
            )
            return size
        if status.reason.final:
            self._shrink_intent(volume, grown)
        raise _refusal(status)

    def _shrink_intent(self, volume: Volume, grown: ImageSpec) -> None:
        """Undo a refused growth: the spec back to the volume's size, the charge released."""
        key = node_accounting_key(grown.node_id)
        for _ in range(_CAS_ATTEMPTS):
            image = self._catalog.read_image(grown.node_id, volume.volume_id)
            account = self._catalog.accounts().get(grown.node_id)
            if image is None or account is None or image.value.size_bytes <= volume.capacity_bytes:
                return
            excess = image.value.size_bytes - volume.capacity_bytes
            try:
                self.txn(
                    [unchanged_since(image.value.key, image), unchanged_since(key, account)],
                    [
                        put(revise(image.value, size_bytes=volume.capacity_bytes)),
                        put(account.value.charge(-excess, 0)),
                    ],
                )
            except Conflict:
                continue
            return

    # -- shared ----------------------------------------------------------------

    def _image_of(self, volume: Volume, thin: bool) -> Versioned[ImageSpec]:
        """The volume's image spec; written now for a volume older than image records."""
        image = self._catalog.read_image(volume.primary_node, volume.volume_id)
        if image is not None:
            return image
        spec = ImageSpec(
            volume.volume_id, volume.primary_node, volume.capacity_bytes, volume.epoch, thin=thin
        )
        try:
            revision = self.txn([Compare(spec.key, ABSENT)], [put(spec)])
        except Conflict:
            again = self._catalog.read_image(volume.primary_node, volume.volume_id)
            if again is None:
                raise
            return again
        return Versioned(spec, revision)

    def _await(self, written: Versioned[ImageSpec], what: str) -> ImageStatus:
        """The node's settled status for the spec ``written`` (at its revision)."""
        spec = written.value
        left = deadline.remaining()
        # No work is started for a call whose time is spent: its intent stays for the retry.
        if self._local is not None and (left is None or left > REPLY_MARGIN_S):
            local = self._local(written)
            if local is not None and answers(local, spec) and local.settled:
                return local

        def settled(record: Record | None) -> bool:
            if record is None:
                return False
            status = self._catalog.image_status(record.value)
            return answers(status, spec) and status.settled

        record = self._statuses.wait(
            spec.status_key,
            settled,
            time.monotonic() + max(0.0, deadline.clamp(self._wait_s) - REPLY_MARGIN_S),
            waiting_for=f"{what} of volume {spec.volume_id} (generation {spec.generation})",
        )
        assert record is not None  # the predicate only accepts a record
        return self._catalog.image_status(record.value)

    def forget(self, volume: Volume) -> None:
        """One txn: the volume, its name, its image records gone and its charge released."""
        key = node_accounting_key(volume.primary_node)
        for _ in range(_CAS_ATTEMPTS):
            current = self._catalog.read_volume(volume.volume_id)
            if current is None:
                return
            image = self._catalog.read_image(volume.primary_node, volume.volume_id)
            account = self._catalog.accounts().get(volume.primary_node)
            compares, ops = self._catalog.forget_ops(current.value)
            compares.append(self._catalog.volume_unchanged(current))
            if image is not None and account is not None:
                compares += [unchanged_since(image.value.key, image), unchanged_since(key, account)]
                ops.append(put(account.value.charge(-image.value.size_bytes, -1)))
            try:
                self.txn(compares, ops)
            except Conflict:
                continue
            log.info("volume forgotten", extra={"volume": volume.volume_id})
            return
        raise StoreError(f"volume {volume.volume_id} kept changing while it was removed; retry")
