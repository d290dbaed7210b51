"""Ferry's one error vocabulary.

Every failure that crosses a module boundary is a :class:`FerryError`. Each
subclass names *what kind* of failure it is; the CSI layer maps the kind to a
gRPC status code in exactly one place (``csi_driver.csi.errors``). Messages
are written for the operator: say what is wrong and what to do next.

Tree::

    FerryError
    ├── InvalidArgument        bad or missing input              -> INVALID_ARGUMENT
    ├── NotFound               volume, node or path is unknown   -> NOT_FOUND
    ├── AlreadyExists          same name/key, incompatible args  -> ALREADY_EXISTS
    ├── FailedPrecondition     valid request, wrong state        -> FAILED_PRECONDITION
    ├── OutOfRange             capacity outside what is possible -> OUT_OF_RANGE
    ├── ResourceExhausted      not enough space / volume slots   -> RESOURCE_EXHAUSTED
    ├── Aborted                conflicting operation in flight   -> ABORTED
    ├── Unavailable            retry later (node down, busy)     -> UNAVAILABLE
    ├── Unimplemented          feature not offered               -> UNIMPLEMENTED
    ├── Unauthenticated        caller is not a Ferry agent       -> UNAUTHENTICATED
    ├── PermissionDenied       a Ferry agent, not allowed here   -> PERMISSION_DENIED
    └── InternalError          a bug or a host failure           -> INTERNAL
        ├── CommandFailed      an external command failed
        └── StoreError         the catalog store failed
            └── Conflict       compare-and-swap lost a race (retry the read)
"""

from __future__ import annotations


class FerryError(Exception):
    """Base of all of Ferry's domain errors."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(FerryError):
    """The request is malformed: a field is missing, empty or not allowed."""


class NotFound(FerryError):
    """The named volume, node, image or path does not exist."""


class AlreadyExists(FerryError):
    """An object with this name exists with arguments incompatible with the request."""


class FailedPrecondition(FerryError):
    """The request is valid but the object is not in a state that allows it."""


class OutOfRange(FerryError):
    """A capacity request cannot be met by any volume Ferry can create."""


class ResourceExhausted(FerryError):
    """There is not enough capacity (bytes or volume slots) to satisfy the request."""


class Aborted(FerryError):
    """Another operation on the same object is in progress; retry later."""


class Unavailable(FerryError):
    """A dependency (node agent, catalog) cannot be reached right now; retry later."""


class Unimplemented(FerryError):
    """Ferry does not offer this operation."""


class Unauthenticated(FerryError):
    """The caller's certificate does not name a Ferry agent of this cluster."""


class PermissionDenied(FerryError):
    """The caller is a Ferry agent, but not one allowed to make this call."""


class InternalError(FerryError):
    """Something failed that the caller cannot fix by changing the request."""


class CommandFailed(InternalError):
    """An external command (mount, losetup, mkfs, ...) failed or timed out."""

    def __init__(self, argv: list[str], returncode: int | None, stderr: str) -> None:
        shown = " ".join(argv)
        if returncode is None:
            message = f"command timed out: {shown}"
        else:
            message = f"command failed (exit {returncode}): {shown}: {stderr.strip()}"
        super().__init__(message)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


class StoreError(InternalError):
    """The catalog store could not complete an operation."""


class Conflict(StoreError):
    """A compare-and-swap write lost a race: the key changed since it was read."""
