#!/usr/bin/env bash
# Every Ansible check of this repository (`make molecule` runs it):
#   1. yamllint and ansible-lint (production profile, offline) over playbooks/;
#   2. `molecule test` of every role's scenario with the docker driver (create, prepare,
#      converge, idempotence, verify, destroy) on the locally built platform image;
# then a summary table (check, result, duration). Exits non-zero when anything failed.
#
# Builds what is missing first: the Python tools in the project's virtualenv (pinned below), the
# platform image (scripts/build-platform-image.sh: debootstrap, no registry) and the wheelhouse of
# this repository (scripts/build-wheelhouse.sh).
#
#   bash playbooks/molecule.sh                  # everything
#   ROLES="redis postgresql" bash playbooks/molecule.sh
#   LINT=0 bash playbooks/molecule.sh           # skip the linters
#   MOLECULE_JOBS=1 bash playbooks/molecule.sh  # one role at a time (default: 2 at a time)
# Logs: $MOLECULE_LOG_DIR (default /tmp/ccat-molecule-logs), one file per check.
set -uo pipefail
cd "$(dirname "$0")"
HERE=$PWD
VENV=${VENV:-$HERE/../.venv}
LOGS=${MOLECULE_LOG_DIR:-${TMPDIR:-/tmp}/ccat-molecule-logs}
# The order converges the roles the later ones build on first (a failure shows up early).
ROLES=${ROLES:-ccat_common redis postgresql ops_db_api transfer_agent}
LINT=${LINT:-1}
JOBS=${MOLECULE_JOBS:-2}
# Versions this was tested with; the `ansible` package brings the collections (no Galaxy).
TOOLS=(ansible==12.3.0 ansible-core==2.19.14 ansible-lint==26.10.1 molecule==26.10.0
    molecule-plugins[docker]==26.10.12 yamllint==1.38.0 docker==7.2.0)
export PATH="$VENV/bin:$PATH" NO_COLOR=1 ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 PY_COLORS=0
mkdir -p "$LOGS"

die() { echo "molecule.sh: $*" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || die "no virtualenv at $VENV (make install)"
command -v docker >/dev/null || die "docker is not installed (apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "the docker daemon is not reachable"
if ! "$VENV/bin/python" -c 'import molecule, ansiblelint, yamllint, molecule_plugins.docker' 2>/dev/null; then
    echo "molecule.sh: installing ${TOOLS[*]} into $VENV"
    "$VENV/bin/pip" install --quiet "${TOOLS[@]}" || die "pip install of the Ansible tools failed"
fi
bash scripts/build-platform-image.sh || die "the platform image could not be built"
bash scripts/build-wheelhouse.sh || die "the wheelhouse could not be built"

names=() results=() times=()
run() { # name, command...
    local name=$1 t0 rc log
    shift
    log="$LOGS/${name//:/-}.log"
    printf 'molecule.sh: %-28s ... ' "$name"
    t0=$(date +%s)
    "$@" >"$log" 2>&1
    rc=$?
    names+=("$name")
    times+=($(($(date +%s) - t0)))
    if [ "$rc" -eq 0 ]; then results+=(passed); else results+=(FAILED); fi
    echo "${results[-1]} (${times[-1]} s, log: $log)"
    if [ "$rc" -ne 0 ]; then tail -n 40 "$log" | sed 's/^/    /'; fi
}

if [ "$LINT" = 1 ]; then
    run yamllint yamllint --strict .
    run ansible-lint ansible-lint --offline --profile production
fi
# The role scenarios run $JOBS at a time (each in its own container, with its own log); their
# results are reported in the order above once all have ended.
for role in $ROLES; do
    [ -d "roles/$role/molecule/default" ] || die "roles/$role has no molecule scenario"
done
for role in $ROLES; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    log="$LOGS/molecule-$role.log"
    rm -f "$log.result"
    echo "molecule.sh: molecule:$role started (log: $log)"
    (
        t0=$(date +%s)
        (cd "roles/$role" && molecule test) >"$log" 2>&1
        echo "$? $(($(date +%s) - t0))" >"$log.result"
    ) &
done
wait
for role in $ROLES; do
    log="$LOGS/molecule-$role.log"
    read -r rc secs <"$log.result" 2>/dev/null || { rc=1 secs=0; }
    names+=("molecule:$role")
    times+=("$secs")
    if [ "$rc" -eq 0 ]; then results+=(passed); else results+=(FAILED); fi
    printf 'molecule.sh: %-28s ... %s (%s s, log: %s)\n' "molecule:$role" "${results[-1]}" \
        "$secs" "$log"
    if [ "$rc" -ne 0 ]; then tail -n 40 "$log" | sed 's/^/    /'; fi
done

printf '\n%-28s %-8s %8s\n' check result duration
failed=0 passed=0
for i in "${!names[@]}"; do
    printf '%-28s %-8s %6s s\n' "${names[$i]}" "${results[$i]}" "${times[$i]}"
    if [ "${results[$i]}" = passed ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
done
echo "molecule: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
