"""Where the catalog lives: one ``--catalog`` string opens either backend.

Forms accepted by :func:`open_store`:

- ``/var/lib/ferry/catalog.db`` (any plain path) or ``sqlite:///abs/path.db``:
  the embedded SQLite store;
- ``etcd://host:port[,host:port...]``: an etcd v3 cluster spoken to in plain
  HTTP, for an etcd only this machine reaches (loopback, a closed bridge);
- ``etcds://host:port[,host:port...]``: the same over mutual TLS, as this
  process's identity from ``--tls-dir``; each member must present a
  ``catalog`` certificate of the cluster CA. Given a ``--catalog-tls-dir``
  bundle (an existing etcd with its own PKI), as that bundle's client
  instead, each member checked by the address dialled against that bundle's
  CA (see ``store/etcd_tls.py``). Without a TLS bundle it is refused: never
  a silent fallback to plaintext;
- ``ferry://host:port[,ip:port...]``: the controller's ``ferry.v1.Catalog``
  service, for nodes that must not open the catalog's files; several
  addresses (IP literals) name controller replicas serving one catalog, and
  the client moves to the next when the one it uses stops answering.

Anything else is refused with ``InvalidArgument`` naming the accepted forms,
and so is a ``--catalog-tls-dir`` bundle for a catalog that is not ``etcds://``
(it would be silently unused).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from csi_driver.catalog_api.client import RemoteStore
from csi_driver.core.errors import FailedPrecondition, InvalidArgument
from csi_driver.pki import ClientTlsBundle
from csi_driver.store.base import CatalogStore
from csi_driver.store.etcd import DEFAULT_LEASE_TTL_S, EtcdEndpoint, EtcdStore
from csi_driver.store.sqlite import SqliteStore
from csi_driver.transport import AgentSecurity

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")

FORMS = (
    "a file path, sqlite:///abs/path.db, etcd://host:port[,host:port...], "
    "etcds://host:port[,host:port...] (mutual TLS) or ferry://host:port[,ip:port...]"
)


@dataclass(frozen=True)
class CatalogUrl:
    """A parsed ``--catalog``: a SQLite file, etcd endpoints or a catalog service."""

    sqlite_path: Path | None = None
    etcd_endpoints: tuple[tuple[str, int], ...] = ()
    etcd_tls: bool = False  # etcds://: mutual TLS with the process's --tls-dir bundle
    service: str | None = None  # host:port of a ferry.v1.Catalog service
    #: more controllers serving the same catalog, tried in order when ``service`` is down
    service_fallbacks: tuple[str, ...] = ()


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
    if scheme in ("etcd", "etcds", "ferry"):
        endpoints = [_host_port(raw, part) for part in rest.rstrip("/").split(",")]
        if scheme != "ferry":
            return CatalogUrl(etcd_endpoints=tuple(endpoints), etcd_tls=scheme == "etcds")
        services = tuple(
            f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in endpoints
        )
        if len(services) > 1:
            for host, _ in endpoints:
                try:
                    ipaddress.ip_address(host)
                except ValueError:
                    raise InvalidArgument(
                        f"catalog {raw!r}: several ferry:// endpoints must be IP addresses "
                        f"({host!r} is not); a host name gives one endpoint"
                    ) from None
        return CatalogUrl(service=services[0], service_fallbacks=services[1:])
    raise InvalidArgument(f"catalog {raw!r}: unknown scheme {scheme!r}; give {FORMS}")


def open_store(
    url: str | os.PathLike[str],
    *,
    security: AgentSecurity | None = None,
    catalog_tls: ClientTlsBundle | None = None,
    lease_ttl_s: int = DEFAULT_LEASE_TTL_S,
) -> CatalogStore:
    """Open the catalog store that ``url`` names (see the module doc).

    ``security`` is this process's mTLS (``--tls-dir``): it secures
    ``ferry://`` and ``etcds://``, both as this process's identity.
    ``catalog_tls`` (``--catalog-tls-dir``) replaces it for ``etcds://``.
    ``lease_ttl_s`` is an etcd election's lease (``--leader-lease-ttl``); SQLite's
    election is a file lock the kernel drops with its process, with no TTL.
    """
    where = parse_catalog_url(url)
    if catalog_tls is not None and not where.etcd_tls:
        raise InvalidArgument(
            f"--catalog-tls-dir {catalog_tls.directory} is for an etcd spoken to over TLS, "
            f"but the catalog is {os.fspath(url)!r}: use etcds://host:port[,...] or drop "
            "--catalog-tls-dir"
        )
    if where.sqlite_path is not None:
        return SqliteStore(where.sqlite_path)
    if where.service is not None:
        return RemoteStore(where.service, security, fallbacks=where.service_fallbacks)
    endpoints = [EtcdEndpoint(host, port) for host, port in where.etcd_endpoints]
    if not where.etcd_tls:
        return EtcdStore(endpoints, lease_ttl_s=lease_ttl_s)
    if catalog_tls is not None:
        return EtcdStore(endpoints, tls=catalog_tls, lease_ttl_s=lease_ttl_s)
    tls = security.tls if security is not None else None
    if tls is None:
        raise FailedPrecondition(
            f"catalog {os.fspath(url)!r} asks for mutual TLS but this process has no "
            "certificate: give --tls-dir (ca.crt, tls.crt, tls.key from `ferry ca issue` or a "
            "TLS Secret), --catalog-tls-dir for an etcd with its own PKI, or etcd:// for an "
            "etcd only this machine reaches"
        )
    return EtcdStore(endpoints, tls=tls, lease_ttl_s=lease_ttl_s)
