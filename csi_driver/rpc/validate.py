"""Required request fields: declared per RPC, checked before the handler runs.

Each servicer method names the fields its request must carry in its
``@rpc(required=...)`` declaration (the CSI spec's REQUIRED fields, in the
order they are checked). The ``rpc`` wrapper checks them before the handler
body runs, so a missing field is INVALID_ARGUMENT "<field> is required"
whatever else the request holds: an id Ferry never issued, a path of another
volume, a volume in any state. Lookups (NOT_FOUND) and state checks
(FAILED_PRECONDITION, ...) can only happen after.

What "present" means follows the field's kind: a string or number must be
non-empty / non-zero, a message must be set (``HasField``), a repeated or
map field must have at least one entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from csi_driver.core.errors import InvalidArgument

#: The message of every missing-field error.
REQUIRED_MESSAGE = "{field} is required"


def present(request: Any, name: str) -> bool:
    """Whether ``request`` carries field ``name`` (see the module docstring)."""
    field = request.DESCRIPTOR.fields_by_name[name]
    if field.is_repeated:
        return len(getattr(request, name)) > 0
    if field.message_type is not None:
        return bool(request.HasField(name))
    return bool(getattr(request, name))


@dataclass(frozen=True)
class Required:
    """The fields one RPC's request must carry, in the order they are checked."""

    fields: tuple[str, ...] = ()

    def check(self, request: Any) -> None:
        """Raise InvalidArgument naming the first declared field that is missing."""
        for name in self.fields:
            if not present(request, name):
                raise InvalidArgument(REQUIRED_MESSAGE.format(field=name))

    def undeclared(self, descriptor: Any) -> list[str]:
        """Declared names that ``descriptor`` (a request message type) does not have."""
        return [name for name in self.fields if name not in descriptor.fields_by_name]
