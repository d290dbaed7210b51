"""Which host paths the node service may mount onto or remove.

kubelet names staging and target paths under its own directory. Ferry acts
only on paths that are strictly inside one of the configured roots, are
already normalised (no ``..``, no ``//``), and have no symlink in any
component below the root, so a crafted path cannot redirect a mount or a
removal anywhere else on the host.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from csi_driver.core.errors import FailedPrecondition, InvalidArgument
from csi_driver.node.mounts import MOUNTINFO, parse_mountinfo

MAX_PATH = 4096


class PathPolicy:
    def __init__(self, roots: Iterable[Path]) -> None:
        accepted: list[Path] = []
        for root in roots:
            root = Path(root)
            if not root.is_absolute():
                raise InvalidArgument(f"allowed root {root} must be absolute")
            accepted.append(root)
            real = Path(os.path.realpath(root))
            if real != root:
                accepted.append(real)
        if not accepted:
            raise InvalidArgument("at least one allowed root directory is needed")
        self.roots = tuple(accepted)

    def check(self, raw: str, what: str) -> Path:
        """``raw`` as a Path if Ferry may act on it, else InvalidArgument naming ``what``."""
        if not raw:
            raise InvalidArgument(f"{what} is required")
        if len(raw) > MAX_PATH or "\x00" in raw:
            raise InvalidArgument(f"{what} is not a valid path")
        if not raw.startswith("/"):
            raise InvalidArgument(f"{what} {raw!r} must be an absolute path")
        trimmed = raw.rstrip("/") or "/"
        if os.path.normpath(trimmed) != trimmed or "/../" in f"{trimmed}/":
            raise InvalidArgument(f"{what} {raw!r} must be normalised (no '..', '.' or '//')")
        path = Path(trimmed)
        root = next((r for r in self.roots if path.is_relative_to(r) and path != r), None)
        if root is None:
            shown = ", ".join(str(r) for r in self.roots)
            raise InvalidArgument(
                f"{what} {raw!r} is outside the directories Ferry serves ({shown})"
            )
        current = root
        for part in path.relative_to(root).parts:
            current = current / part
            try:
                mode = os.lstat(current).st_mode
            except FileNotFoundError:
                break  # the rest does not exist yet, so it cannot be a link
            except OSError as exc:
                if _is_mountpoint(current):
                    # A mounted filesystem that fails to answer (a shut-down xfs
                    # says EIO): a mount point is a resolved directory, never a
                    # link, and Ferry must still report on it and unmount it.
                    break
                raise FailedPrecondition(
                    f"{what} {raw!r} cannot be inspected at {current}: {exc}"
                ) from exc
            if stat.S_ISLNK(mode):
                raise InvalidArgument(f"{what} {raw!r} goes through a symlink at {current}")
        return path


def _is_mountpoint(path: Path) -> bool:
    wanted = str(path)
    table = parse_mountinfo(MOUNTINFO.read_text(encoding="utf-8"))
    return any(entry.mountpoint == wanted for entry in table)
