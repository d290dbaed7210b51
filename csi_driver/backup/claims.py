"""Claims and sweeps: why garbage collection never deletes a chunk a backup relies on.

A chunk is garbage when no manifest names it. But a backup in progress has no
manifest yet, and it skips uploading every chunk the target already holds,
however unreferenced: a collector deleting such a chunk would leave the new
manifest naming a chunk that is gone. Two kinds of small objects prevent it::

    claims/<op-id>/live        an operation's heartbeat (rewritten every interval)
    claims/<op-id>/<seq>       names it will rely on, written *before* it does: pack ids
                               (format 2) or chunk names (format 1), 32 bytes each
    sweeps/<sweep-id>          a collection's heartbeat: live, then done

The protocol (each side writes, then reads what the other wrote):

- An operation (backup or restore) writes a claim naming a batch of chunks,
  then reads the sweeps. While a sweep is live it waits; if a sweep started
  since it last listed the target's chunks, it lists them again. Only then
  does it trust "this chunk exists".
- A collection writes its live sweep, then reads the claims, then the
  manifests, then the chunks, and deletes chunks that neither a manifest nor
  a live claim names; it marks its sweep done at the end.

Either the collection read the claim (the chunk is kept), or the claim was
written after the sweep began, so the operation saw the live sweep and waited
until its deletions were over before looking at the chunks. Stores must give
read-after-write consistency (directories and S3 do).

A claim or sweep whose heartbeat is older than ``grace_s`` is stale: its
process died. A stale claim is ignored and removed by the next collection,
and a stale sweep no longer holds operations back. So that staleness never
lies, a process stops before its own heartbeat could look stale to others:
an operation whose heartbeat lapsed fails before writing its manifest
(Aborted: a retry completes it), and a sweep stops deleting. Clocks of the
machines sharing a target must agree to well within ``grace_s``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType

from csi_driver.backup.targets import Target
from csi_driver.core.errors import Aborted, DeadlineExceeded, NotFound

log = logging.getLogger(__name__)

CLAIMS = "claims/"
SWEEPS = "sweeps/"
DEFAULT_GRACE_S = 900.0
NAME_BYTES = 32


class Heartbeat:
    """Rewrites one object every ``grace_s / 6`` until closed; knows when it last succeeded."""

    def __init__(self, target: Target, key: str, body: Callable[[], bytes], grace_s: float) -> None:
        self._target = target
        self._key = key
        self._body = body
        self._grace = grace_s
        self._stop = threading.Event()
        self.beat()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat {key}", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        started = time.time()
        self._target.put(self._key, self._body())
        self.last_ok = started

    def _run(self) -> None:
        while not self._stop.wait(self._grace / 6):
            try:
                self.beat()
            except Exception as exc:  # the owner checks fresh() before acting on it
                log.warning("heartbeat failed", extra={"key": self._key, "error": str(exc)})

    def fresh(self, margin: float = 0.5) -> bool:
        """True while others cannot yet think this heartbeat stale (``margin`` of the grace)."""
        return time.time() - self.last_ok < self._grace * margin

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class SweepState:
    sweep_id: str
    live: bool
    at: float


def read_sweeps(target: Target, grace_s: float) -> dict[str, SweepState]:
    found: dict[str, SweepState] = {}
    for stored in target.list(SWEEPS):
        sweep_id = stored.key.removeprefix(SWEEPS)
        try:
            doc = json.loads(target.get(stored.key))
            state, at = str(doc["state"]), float(doc["at"])
        except NotFound:
            continue
        except (ValueError, KeyError, TypeError):
            state, at = "done", stored.modified  # damaged: it holds nothing back
        live = state == "live" and time.time() - at < grace_s
        found[sweep_id] = SweepState(sweep_id, live, at)
    return found


class Claim:
    """An operation's claim on the chunks it relies on; a context manager."""

    def __init__(
        self,
        target: Target,
        op_id: str,
        *,
        grace_s: float = DEFAULT_GRACE_S,
        wait_s: float | None = None,
        poll_s: float = 0.2,
    ) -> None:
        self.target = target
        self.op_id = op_id
        self.grace_s = grace_s
        self._wait_s = grace_s if wait_s is None else wait_s
        self._poll_s = poll_s
        self._seq = 0
        self._sweeps_seen: frozenset[str] | None = None
        self._heartbeat = Heartbeat(
            target,
            f"{CLAIMS}{op_id}/live",
            lambda: json.dumps({"at": time.time()}).encode(),
            grace_s,
        )

    def __enter__(self) -> Claim:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def add(self, names: Iterable[str]) -> None:
        """Claim ``names`` (write-ahead: before anything relies on them); Aborted when
        the heartbeat lapsed (a collector may already ignore this claim)."""
        self.check_alive()
        body = b"".join(bytes.fromhex(name) for name in names)
        if body:
            self._seq += 1
            self.target.put(f"{CLAIMS}{self.op_id}/{self._seq:08d}", body)

    def quiet(self) -> bool:
        """Wait until no sweep is live; True when one began since the last call
        (chunks listed before it may be gone: list them again)."""
        deadline = time.monotonic() + self._wait_s
        while True:
            sweeps = read_sweeps(self.target, self.grace_s)
            live = [s for s in sweeps.values() if s.live]
            if not live:
                break
            if time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"garbage collection {live[0].sweep_id} in {self.target.description} is "
                    f"still running after {self._wait_s:.0f} s; retry once it is over"
                )
            time.sleep(self._poll_s)
        seen = frozenset(sweeps)
        changed = self._sweeps_seen is not None and seen != self._sweeps_seen
        self._sweeps_seen = seen
        return changed

    def check_alive(self) -> None:
        """Aborted when a collector may already have found this claim stale."""
        if not self._heartbeat.fresh():
            raise Aborted(
                f"operation {self.op_id} could not renew its claim on {self.target.description} "
                "in time, so garbage collection may have ignored it; retry (what was "
                "uploaded is reused)"
            )

    def release(self) -> None:
        self._heartbeat.close()
        for stored in list(self.target.list(f"{CLAIMS}{self.op_id}/")):
            self.target.delete(stored.key)


@dataclass(frozen=True)
class Claims:
    """What live claims protect, and the operations whose claims are stale."""

    names: frozenset[str]
    stale_ops: tuple[str, ...]


def read_claims(target: Target, grace_s: float) -> Claims:
    by_op: dict[str, list[str]] = {}
    for stored in target.list(CLAIMS):
        op, _, part = stored.key.removeprefix(CLAIMS).partition("/")
        by_op.setdefault(op, []).append(part)
    names: set[str] = set()
    stale: list[str] = []
    for op, parts in sorted(by_op.items()):
        try:
            at = float(json.loads(target.get(f"{CLAIMS}{op}/live"))["at"])
        except (NotFound, ValueError, KeyError, TypeError):
            at = 0.0  # no heartbeat: written by an op that died before its first beat
        if time.time() - at >= grace_s:
            stale.append(op)
            continue
        for part in parts:
            if part == "live":
                continue
            try:
                body = target.get(f"{CLAIMS}{op}/{part}")
            except NotFound:
                continue  # released meanwhile: its manifest (if any) is visible now
            offsets = range(0, len(body), NAME_BYTES)
            names.update(body[offset : offset + NAME_BYTES].hex() for offset in offsets)
    return Claims(frozenset(names), tuple(stale))


class Sweep:
    """A collection's sweep record; a context manager that marks it done on exit."""

    def __init__(self, target: Target, grace_s: float = DEFAULT_GRACE_S) -> None:
        self.target = target
        self.sweep_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        self._key = f"{SWEEPS}{self.sweep_id}"
        self._state = "live"
        self._heartbeat = Heartbeat(target, self._key, self._body, grace_s)

    def _body(self) -> bytes:
        return json.dumps({"state": self._state, "at": time.time()}).encode()

    def fresh(self) -> bool:
        return self._heartbeat.fresh()

    def __enter__(self) -> Sweep:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._heartbeat.close()
        self._state = "done"
        self.target.put(self._key, self._body())

    def forget_old(self, keep_s: float) -> None:
        """Remove other sweeps' records finished more than ``keep_s`` ago."""
        for sweep in read_sweeps(self.target, keep_s).values():
            old = time.time() - sweep.at > keep_s
            if sweep.sweep_id != self.sweep_id and not sweep.live and old:
                self.target.delete(f"{SWEEPS}{sweep.sweep_id}")
