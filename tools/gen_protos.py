"""Generate Ferry's gRPC code from ``proto/`` into the ``csi_driver.gen`` package.

``python tools/gen_protos.py`` (or ``make protos``) regenerates everything;
``pip install`` runs it too, through setup.py. The output is a build product:
it is never edited by hand and never committed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

PACKAGE = Path("csi_driver") / "gen"
GENERATED_NOTICE = '"""Generated from proto/ by tools/gen_protos.py. Do not edit."""\n'


def proto_files(root: Path) -> list[Path]:
    return sorted((root / "proto").rglob("*.proto"))


def generate(root: Path, out: Path | None = None) -> list[Path]:
    """Compile every .proto under ``root/proto`` into ``out`` (default: the repo's
    ``csi_driver/gen``); return the files written."""
    from grpc_tools import protoc

    root = root.resolve()
    out = (out or root).resolve()
    target = out / PACKAGE
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    include = Path(protoc.__file__).parent / "_proto"
    # Mapping proto/ onto csi_driver/gen makes generated imports package-qualified.
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE.as_posix()}={(root / 'proto').as_posix()}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(
            f"{PACKAGE.as_posix()}/{p.relative_to(root / 'proto').as_posix()}"
            for p in proto_files(root)
        ),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; its errors are printed above")
    for directory in [target, *(d for d in target.rglob("*") if d.is_dir())]:
        (directory / "__init__.py").write_text(GENERATED_NOTICE)
    return sorted(p for p in target.rglob("*") if p.is_file())


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    try:
        written = generate(root)
    except RuntimeError as exc:
        print(f"gen_protos: {exc}", file=sys.stderr)
        return 1
    print(f"gen_protos: wrote {len(written)} files under {root / PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
