#!/usr/bin/env bash
# Install checkov into its own virtualenv under .tools/ (its pinned dependencies would clash
# with the project's .venv). Idempotent; prints the path of the checkov executable.
#
#   charts/get-checkov.sh         # -> .tools/checkov-venv/bin/checkov
#
# CHECKOV_VERSION pins the release (default below); TOOLS_DIR overrides the cache folder.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
tools="${TOOLS_DIR:-$repo/.tools}"
version="${CHECKOV_VERSION:-3.3.30}"
venv="$tools/checkov-venv"
checkov="$venv/bin/checkov"
python="${PYTHON:-python3}"

if [ -x "$checkov" ] && [ "$("$checkov" --version 2>/dev/null)" = "$version" ]; then
    echo "$checkov"
    exit 0
fi
echo "installing checkov $version into $venv ..." >&2
"$python" -m venv "$venv" || { echo "error: cannot create a virtualenv (Debian: apt-get install python3-venv)" >&2; exit 2; }
"$venv/bin/pip" install --quiet --disable-pip-version-check "checkov==$version" >&2
"$checkov" --version >&2
echo "$checkov"
