"""The sandbox's memory of itself: ``DIR/sandbox.json``.

The state is written (atomically: temporary file, fsync, rename) *before*
each step that creates something on the host and again after each process
starts, so whatever a crash interrupts, the next ``down`` knows the prefix
to sweep and the processes to stop. A process is remembered with its start
time as the kernel counts it, so a recycled pid is never mistaken for it.
Commands that change the sandbox hold ``DIR/sandbox.lock`` (``flock``).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from csi_driver.core.errors import Aborted, FailedPrecondition, NotFound
from csi_driver.sandbox.plan import CatalogKind, SandboxPlan

STATE_NAME = "sandbox.json"
LOCK_NAME = "sandbox.lock"


@dataclass(frozen=True)
class ProcessRecord:
    """A process the sandbox started."""

    name: str  # the member it runs
    pid: int
    start_ticks: int  # /proc/<pid>/stat field 22: tells a recycled pid apart
    argv: tuple[str, ...]


@dataclass(frozen=True)
class SandboxState:
    plan: SandboxPlan
    phase: str  # what the sandbox was last doing, for humans
    processes: tuple[ProcessRecord, ...] = ()

    def process(self, name: str) -> ProcessRecord | None:
        for record in self.processes:
            if record.name == name:
                return record
        return None

    def with_process(self, record: ProcessRecord) -> SandboxState:
        others = tuple(p for p in self.processes if p.name != record.name)
        return replace(self, processes=(*others, record))

    def at(self, phase: str) -> SandboxState:
        return replace(self, phase=phase)


def _to_json(state: SandboxState) -> dict[str, Any]:
    plan = state.plan
    return {
        "plan": {
            "directory": str(plan.directory),
            "prefix": plan.prefix,
            "node_count": plan.node_count,
            "subnet": plan.subnet,
            "catalog": plan.catalog.value,
            "pool_capacity_bytes": plan.pool_capacity_bytes,
        },
        "phase": state.phase,
        "processes": [
            {"name": p.name, "pid": p.pid, "start_ticks": p.start_ticks, "argv": list(p.argv)}
            for p in state.processes
        ],
    }


def _from_json(doc: dict[str, Any]) -> SandboxState:
    plan = doc["plan"]
    return SandboxState(
        plan=SandboxPlan(
            directory=Path(plan["directory"]),
            prefix=plan["prefix"],
            node_count=int(plan["node_count"]),
            subnet=plan["subnet"],
            catalog=CatalogKind(plan["catalog"]),
            pool_capacity_bytes=int(plan["pool_capacity_bytes"]),
        ),
        phase=doc["phase"],
        processes=tuple(
            ProcessRecord(p["name"], int(p["pid"]), int(p["start_ticks"]), tuple(p["argv"]))
            for p in doc["processes"]
        ),
    )


class StateFile:
    """Reads and writes one sandbox directory's state."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_NAME

    def load(self) -> SandboxState | None:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return _from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise FailedPrecondition(
                f"{self.path} is not a sandbox state file ({exc}); remove it, or run "
                "`ferry sandbox down --dir DIR --prefix PREFIX` to clean up by name"
            ) from exc

    def require(self) -> SandboxState:
        state = self.load()
        if state is None:
            raise NotFound(
                f"no sandbox in {self.directory}: start one with "
                f"`ferry sandbox up --dir {self.directory}`"
            )
        return state

    def save(self, state: SandboxState) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        with open(temporary, "w", encoding="utf-8") as out:
            json.dump(_to_json(state), out, indent=2, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock: one changing command at a time per sandbox."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / LOCK_NAME, "a", encoding="utf-8") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise Aborted(
                    f"another ferry sandbox command is working on {self.directory}; "
                    "wait for it to finish"
                ) from exc
            yield
