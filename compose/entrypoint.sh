#!/bin/bash
# Entry point of the CCAT image: the first argument names the role, the rest are its options.
#
#   api                          ccat-api serve (CCAT_API_HOST/PORT/WORKERS)
#   worker SITE [LOCATION...]    ccat-transfer worker --site SITE --location LOCATION ...
#                                (arguments starting with - go to the worker unchanged)
#   manager NAME|all             ccat-transfer manager NAME (one stage, or every stage)
#   migrate [TOPOLOGY]           ccat-ops-db migrate, then seed TOPOLOGY (or $CCAT_TOPOLOGY)
#                                when one is given, then ccat-ops-db check
#   create-buckets               create the bucket of every S3 location in the database
#   demo-instrument [OPTIONS]    the simulated instrument (compose/devtools.py instrument --help)
#   health api|worker|manager N  the container healthcheck of that role
#   help                         this text
#   anything else                run as a command (ccat-ops-db ..., ccat-transfer status, bash)
#
# Configuration comes only from the environment (CCAT_OPS_DB_URL, CCAT_TRANSFER_BROKER_URL,
# <prefix>_ACCESS_KEY_ID ...); nothing secret is read from or written to the image.
set -euo pipefail

devtools=/opt/ccat/share/devtools.py
role="${1:-help}"
[ "$#" -gt 0 ] && shift

case "$role" in
    api)
        exec ccat-api serve "$@"
        ;;
    worker)
        if [ "$#" -lt 1 ] || [[ "$1" == -* ]]; then
            echo "usage: worker SITE [LOCATION...] [worker options]" >&2
            exit 2
        fi
        site="$1"
        shift
        args=(--site "$site")
        for a in "$@"; do
            if [[ "$a" == -* ]] || [ "${passthrough:-0}" = 1 ]; then
                passthrough=1
                args+=("$a")
            else
                args+=(--location "$a")
            fi
        done
        exec ccat-transfer worker "${args[@]}"
        ;;
    manager)
        exec ccat-transfer manager "${1:-all}" "${@:2}"
        ;;
    migrate)
        topology="${1:-${CCAT_TOPOLOGY:-}}"
        ccat-ops-db migrate
        if [ -n "$topology" ]; then
            ccat-ops-db seed "$topology"
        fi
        exec ccat-ops-db check
        ;;
    create-buckets)
        exec python3 "$devtools" create-buckets "$@"
        ;;
    demo-instrument)
        exec python3 "$devtools" instrument "$@"
        ;;
    health)
        exec python3 "$devtools" health "$@"
        ;;
    help | --help | -h)
        sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
        ;;
    *)
        exec "$role" "$@"
        ;;
esac
