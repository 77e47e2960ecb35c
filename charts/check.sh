#!/usr/bin/env bash
# Offline checks of every Helm chart under charts/ (what `make charts` and CI run):
# helm lint --strict, helm template (defaults and ci/production-values.yaml), every rendered
# manifest against the Kubernetes schemas (kubernetes-validate, strict; PrometheusRule and
# PodMonitor against charts/crd-schemas/), the alerting rules through `promtool check rules`,
# and a checkov scan. Prints a summary table; exits non-zero when anything failed.
#
# Needs: node + npm (helm comes from an npm package, charts/get-helm.sh), python3-venv
# (checkov goes into its own venv, charts/get-checkov.sh), promtool (Debian: apt-get install
# prometheus), and the project venv with kubernetes-validate (make install).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${VENV_PYTHON:-$repo/.venv/bin/python}"

HELM="$(bash "$here/get-helm.sh")"
export HELM
bash "$here/get-checkov.sh" >/dev/null
exec "$python" "$here/checks.py"
