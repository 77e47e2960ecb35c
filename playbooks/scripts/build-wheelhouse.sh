#!/usr/bin/env bash
# Wheels of this repository and its runtime dependencies ([api,transfer]) in one folder, for an
# offline install on the managed hosts (`pip install --no-index --find-links DIR`).
#
#   playbooks/scripts/build-wheelhouse.sh [DIR]      # default: playbooks/.wheelhouse
#
# The wheels are built on this machine for CPython 3.11.2 on x86_64 Linux (the Python of Debian
# bookworm, the hosts' distribution), pinned to the versions installed in the project's
# virtualenv when there is one (the combination the test suite ran with).
# Production sites run the same script on a build host and hand the folder to the roles
# (ccat_common_wheelhouse_src), or point the roles at a package index instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-playbooks/.wheelhouse}
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
t0=$(date +%s)
mkdir -p "$DEST"
# The project's wheel is always rebuilt (the sources change without a version bump); the
# dependencies already in the folder are kept, pip only fetches what is missing.
rm -f "$DEST"/ccat_data_center-*.whl
work=$(mktemp -d "${TMPDIR:-/tmp}/wheelhouse.XXXXXX")
trap 'rm -rf "$work"' EXIT
# a clean copy of the sources (no egg-info, caches or build folders of the developers' tree)
tar -c --exclude='*.egg-info' --exclude=__pycache__ pyproject.toml README.md src | tar -x -C "$work"
"$PYTHON" -m pip freeze --exclude-editable 2>/dev/null | grep -v ' @ ' >"$work/constraints.txt" || true
# (a pip configuration may name find-links folders that do not exist here: that noise is dropped)
quiet() { "$@" 2> >(grep -v 'is neither a file nor a directory' >&2 || true); }
quiet "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$DEST" "$work"
wheel=$(ls "$DEST"/ccat_data_center-*.whl)
# pip evaluates environment markers with the running Python, not the target one: bookworm's 3.11.2
# needs async-timeout (redis requires it below 3.11.3), so it is asked for by name.
quiet "$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform linux_x86_64 \
    --python-version 3.11.2 --implementation cp --abi cp311 --abi abi3 --abi none \
    -c "$work/constraints.txt" -d "$DEST" "${wheel}[api,transfer]" \
    setuptools wheel pip "async-timeout>=4.0.3"
echo "wheelhouse: $DEST: $(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1), $(($(date +%s) - t0)) s"
