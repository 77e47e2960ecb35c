#!/usr/bin/env bash
# Audit the pinned dependencies (requirements.lock) for known vulnerabilities with pip-audit.
#
#   scripts/audit.sh                      # the repository's requirements.lock
#   LOCK=path/to/other.lock scripts/audit.sh
#
# pip-audit asks a vulnerability service about every pinned package (default: the package
# index's own JSON API; AUDIT_SERVICE=osv for OSV). Where that service cannot be reached (an
# offline machine, a closed network), the audit is NOT a failure: the script says so plainly
# and exits 0, as the issue asks ("where its data is reachable"). It fails (exit 1) when
# vulnerabilities are found and (exit 2) when it cannot run at all (no lock file, no pip-audit).
#
# pip-audit comes from the dev tools (`pip install pip-audit`); PIP_AUDIT=/path/to/pip-audit
# picks a specific one. Nothing is installed: the lock is hashed and fully pinned, so pip-audit
# runs with --no-deps --disable-pip and never creates a virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."

LOCK=${LOCK:-requirements.lock}
SERVICE=${AUDIT_SERVICE:-pypi}
TIMEOUT=${AUDIT_TIMEOUT:-20}

if [ ! -f "$LOCK" ]; then
    echo "audit: no lock file $LOCK (see the header of requirements.lock to make one)" >&2
    exit 2
fi
AUDIT=${PIP_AUDIT:-}
if [ -z "$AUDIT" ]; then
    if [ -x .venv/bin/pip-audit ]; then AUDIT=.venv/bin/pip-audit
    elif command -v pip-audit >/dev/null; then AUDIT=$(command -v pip-audit)
    else
        echo "audit: pip-audit is not installed: pip install pip-audit (or set PIP_AUDIT)" >&2
        exit 2
    fi
fi

# Is the vulnerability data reachable? One small request, bounded in time.
case "$SERVICE" in
    pypi) probe_url=${AUDIT_PROBE_URL:-https://pypi.org/pypi/pip/json} ;;
    osv) probe_url=${AUDIT_PROBE_URL:-https://api.osv.dev/v1/vulns/OSV-2020-111} ;;
    *) echo "audit: AUDIT_SERVICE must be pypi or osv, not '$SERVICE'" >&2; exit 2 ;;
esac
probe() {
    python3 - "$1" "$TIMEOUT" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
    print(f"audit: {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(1)
PY
}
if ! probe "$probe_url"; then
    echo "audit: SKIPPED - the vulnerability data ($SERVICE: $probe_url) is not reachable" \
         "from this machine; nothing was checked. Run scripts/audit.sh where it is."
    exit 0
fi

pins=$(grep -cE '^[A-Za-z0-9_.-]+==' "$LOCK" || true)
echo "audit: $pins pinned packages in $LOCK, vulnerability service: $SERVICE"
report=$(mktemp "${TMPDIR:-/tmp}/audit.XXXXXX.json")
trap 'rm -f "$report"' EXIT
set +e
"$AUDIT" --requirement "$LOCK" --no-deps --disable-pip --vulnerability-service "$SERVICE" \
    --progress-spinner off --desc on --format json --output "$report" 2>/dev/null
rc=$?
set -e
if [ ! -s "$report" ]; then
    echo "audit: pip-audit could not finish (exit $rc); run it by hand to see why:" >&2
    echo "  $AUDIT -r $LOCK --no-deps --disable-pip" >&2
    exit 2
fi
# Summarise: vulnerable packages fail the audit; packages the service does not know are listed
# (their data is not reachable: nothing was checked for them), and if it knew none at all the
# audit counts as skipped, like an unreachable service.
python3 - "$report" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
deps = doc.get("dependencies", [])
skipped = [d for d in deps if d.get("skip_reason")]
audited = [d for d in deps if not d.get("skip_reason")]
vulnerable = [d for d in audited if d.get("vulns")]
for d in vulnerable:
    for v in d["vulns"]:
        fix = ", ".join(v.get("fix_versions") or []) or "no fix yet"
        print(f"audit: VULNERABLE {d['name']}=={d['version']}: {v['id']} (fixed in: {fix})")
for d in skipped:
    print(f"audit: not checked: {d['name']}: {d['skip_reason']}")
if not audited:
    print(f"audit: SKIPPED - the vulnerability data knows none of the {len(deps)} packages "
          "(not reachable for them from here); nothing was checked")
    sys.exit(0)
print(f"audit: {len(audited)} packages checked, {len(skipped)} not checked, "
      f"{len(vulnerable)} vulnerable")
if vulnerable:
    print("audit: FAILED - known vulnerabilities (upgrade, re-lock, re-run)", file=sys.stderr)
    sys.exit(1)
print("audit: no known vulnerabilities in the packages checked")
PY
