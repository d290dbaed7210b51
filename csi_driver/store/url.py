"""Where the catalog lives: one ``--catalog`` string opens either backend.

Forms accepted by :func:`open_store`:

- ``/var/lib/ferry/catalog.db`` (any plain path) or ``sqlite:///abs/path.db``:
  the embedded SQLite store;
- ``etcd://host:port[,host:port...]``: an etcd v3 cluster (client URLs; TLS
  files are passed as keyword arguments and switch the client to https);
- ``ferry://host:port``: the controller's ``ferry.v1.Catalog`` service, for
  nodes that must not open the catalog's files.

Anything else is refused with ``InvalidArgument`` naming the accepted forms.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from csi_driver.catalog_api.client import RemoteStore
from csi_driver.core.errors import InvalidArgument
from csi_driver.store.base import CatalogStore
from csi_driver.store.etcd import EtcdEndpoint, EtcdStore
from csi_driver.store.sqlite import SqliteStore
from csi_driver.transport import AgentSecurity

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")

FORMS = "a file path, sqlite:///abs/path.db, etcd://host:port[,host:port...] or ferry://host:port"


@dataclass(frozen=True)
class CatalogUrl:
    """A parsed ``--catalog``: a SQLite file, etcd endpoints or a catalog service."""

    sqlite_path: Path | None = None
    etcd_endpoints: tuple[tuple[str, int], ...] = ()
    service: str | None = None  # host:port of a ferry.v1.Catalog service


def _host_port(raw: str, part: str) -> tuple[str, int]:
    found = _HOST_PORT.match(part.strip())
    port = int(found.group(2)) if found else 0
    if found is None or not 0 < port < 65536:
        raise InvalidArgument(f"catalog {raw!r}: {part.strip()!r} is not host:port; give {FORMS}")
    return found.group(1).strip("[]"), port


def parse_catalog_url(text: str | os.PathLike[str]) -> CatalogUrl:
    raw = os.fspath(text)
    if not raw.strip():
        raise InvalidArgument(f"the catalog location is empty; give {FORMS}")
    match = _SCHEME.match(raw)
    if match is None:
        return CatalogUrl(sqlite_path=Path(raw))
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "sqlite":
        if not rest.startswith("/"):
            raise InvalidArgument(
                f"catalog {raw!r}: a sqlite URL needs an absolute path (sqlite:///abs/path.db)"
            )
        return CatalogUrl(sqlite_path=Path(rest))
    if scheme in ("etcd", "ferry"):
        endpoints = [_host_port(raw, part) for part in rest.rstrip("/").split(",")]
        if scheme == "etcd":
            return CatalogUrl(etcd_endpoints=tuple(endpoints))
        if len(endpoints) != 1:
            raise InvalidArgument(f"catalog {raw!r}: a ferry URL names one host:port")
        host, port = endpoints[0]
        return CatalogUrl(service=f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    raise InvalidArgument(f"catalog {raw!r}: unknown scheme {scheme!r}; give {FORMS}")


def open_store(
    url: str | os.PathLike[str],
    *,
    security: AgentSecurity | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> CatalogStore:
    """Open the catalog store that ``url`` names (see the module doc).

    ``security`` secures ``ferry://`` (mTLS as this process's identity);
    ``ca``/``cert``/``key`` are file paths for etcd's client TLS.
    """
    where = parse_catalog_url(url)
    if where.sqlite_path is not None:
        return SqliteStore(where.sqlite_path)
    if where.service is not None:
        return RemoteStore(where.service, security)
    endpoints = [EtcdEndpoint(host, port) for host, port in where.etcd_endpoints]
    return EtcdStore(endpoints, ca=ca, cert=cert, key=key)
