#!/usr/bin/env bash
# Renders the Kustomize base in k8s/ and validates every object against the Kubernetes
# JSON schemas in strict mode, offline. An unknown or misspelt field, a missing required
# field, a wrong type, or a kind without a schema fails the run. Nothing is applied and no
# cluster is contacted.
#
# Needs Python 3 with the packages of k8s/requirements.txt:
#     python3 -m pip install -r k8s/requirements.txt
#
# k8s/render.py renders the base without kustomize. When `kustomize` or `kubectl` is on
# PATH, the script renders with it too, fails unless both outputs hold the same objects,
# and validates the real kustomize output.
#
# K8S_VERSIONS, a comma-separated list, sets the Kubernetes versions to validate against:
# by default 1.27, the oldest version these manifests support (native gRPC probes are GA
# since 1.27), and 1.37, the newest whose schemas kubernetes-validate 1.37.0 ships.
set -euo pipefail

cd "$(dirname "$0")/.."
versions=${K8S_VERSIONS:-1.27,1.37}

if ! python3 -c 'import kubernetes_validate, yaml' 2>/dev/null; then
    echo "validate.sh: the Python packages kubernetes-validate and PyYAML are missing;" \
        "install them with: python3 -m pip install -r k8s/requirements.txt" >&2
    exit 1
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "== render k8s/ with k8s/render.py"
python3 k8s/render.py k8s >"$out/render.yaml"
rendered=$out/render.yaml

if command -v kustomize >/dev/null; then
    echo "== render k8s/ with $(kustomize version 2>/dev/null | head -n 1)"
    kustomize build k8s >"$out/kustomize.yaml"
elif command -v kubectl >/dev/null; then
    echo "== render k8s/ with kubectl kustomize ($(kubectl version --client 2>/dev/null | tr '\n' ' '))"
    kubectl kustomize k8s >"$out/kustomize.yaml"
else
    echo "== neither kustomize nor kubectl is installed; validating the output of k8s/render.py only"
fi
if [[ -f $out/kustomize.yaml ]]; then
    echo "== compare the two renderings"
    python3 k8s/check_manifests.py compare "$out/kustomize.yaml" "$out/render.yaml"
    rendered=$out/kustomize.yaml
fi

echo "== validate against the Kubernetes $versions schemas, strict"
python3 k8s/check_manifests.py validate "$versions" "$rendered"
