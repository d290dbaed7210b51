#!/usr/bin/env bash
# Kubernetes' external storage e2e suite against the Ferry installed in the
# cluster KUBECONFIG points at (see e2e/README.md).
#
#   KUBECONFIG=~/.kube/config e2e/run-external-storage.sh [extra e2e.test flags]
#
# Environment: K8S_VERSION (default: the API server's), E2E_FOCUS, E2E_SKIP,
# E2E_PROCS (parallel ginkgo processes, default 4), WORKDIR (where the suite's
# binaries and the report go, default .cache/e2e/<version>).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
: "${KUBECONFIG:?set KUBECONFIG to a cluster where Ferry is installed (helm install ferry charts/ferry -n ferry-system --create-namespace)}"
export KUBECONFIG

if ! kubectl get csidriver ferry.csi.dev >/dev/null; then
    echo "Ferry is not installed in this cluster (no CSIDriver ferry.csi.dev)" >&2
    exit 2
fi

version=${K8S_VERSION:-$(kubectl version -o json | python3 -c \
    'import json, sys; v = json.load(sys.stdin)["serverVersion"]["gitVersion"]; print(v.split("+")[0])')}
case $(uname -m) in
    x86_64) arch=amd64 ;;
    aarch64 | arm64) arch=arm64 ;;
    *) echo "no Kubernetes test binaries for $(uname -m)" >&2; exit 2 ;;
esac
workdir=${WORKDIR:-$root/.cache/e2e/$version}
bin=$workdir/kubernetes/test/bin
if [ ! -x "$bin/e2e.test" ] || [ ! -x "$bin/ginkgo" ]; then
    mkdir -p "$workdir"
    # The suite must match the API server's minor version: its cases assume that
    # release's APIs (VolumeAttributesClass is storage.k8s.io/v1 from 1.34).
    curl -fsSL "https://dl.k8s.io/$version/kubernetes-test-linux-$arch.tar.gz" \
        | tar -xz -C "$workdir" kubernetes/test/bin/e2e.test kubernetes/test/bin/ginkgo
fi

# Disruptive cases restart kubelet or nodes and Serial ones need the cluster to
# themselves: run them on a dedicated cluster with E2E_SKIP=''.
exec "$bin/ginkgo" -p -procs="${E2E_PROCS:-4}" \
    -focus="${E2E_FOCUS:-External.Storage.*ferry\.csi\.dev}" \
    -skip="${E2E_SKIP:-\[Disruptive\]|\[Serial\]}" \
    "$bin/e2e.test" -- \
    -repo-root="$root" \
    -storage.testdriver="$root/e2e/testdriver.yaml" \
    -kubeconfig="$KUBECONFIG" \
    -report-dir="$workdir/report" \
    "$@"
