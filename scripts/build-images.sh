#!/usr/bin/env bash
# Build every image compose/docker-compose.yml needs, on a machine where no container registry
# is reachable (and where one is, too):
#
#   1. the base image ($BASE_IMAGE, default debian:bookworm-slim, the Dockerfile's FROM) from
#      Debian packages: debootstrap --variant=minbase + docker import;
#   2. stand-ins for the third-party images, tagged with the names the compose file uses by
#      default, so the same compose file comes up here and where those images are pulled:
#      PostgreSQL, Redis and Prometheus (profile "monitoring") from Debian's packages, the S3
#      server (moto) from PyPI wheels downloaded on the host (scripts/images/*.Dockerfile);
#   3. the CCAT image from ./Dockerfile, installing offline from wheels downloaded on the host
#      into compose/wheelhouse/ (pinned to the versions of the project's virtualenv).
#
# An image that already exists is kept (pulled from a registry, or built by an earlier run):
# FORCE=1 rebuilds 1 and 2. The CCAT image is always rebuilt (Docker's cache makes that quick).
# Needs docker, and for step 1 debootstrap and root (or sudo). Package mirrors: debootstrap's
# default, or DEBIAN_MIRROR=URL. Prints a table of what it did and how long it took.
#
# Environment: BASE_IMAGE CCAT_IMAGE POSTGRES_IMAGE REDIS_IMAGE S3_IMAGE PROMETHEUS_IMAGE
# (defaults: the compose file's), DEBIAN_SUITE (bookworm), DEBIAN_MIRROR, PYTHON (a Python whose
# installed versions pin the wheels; default .venv/bin/python, skipped when missing),
# HOST_CA_BUNDLE, PIP_CACHE, FORCE, ONLY (space-separated subset of: base postgres redis
# prometheus s3 ccat).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
COMPOSE_FILE=compose/docker-compose.yml

# The default of ${NAME:-default} in the compose file (one source of truth for image names).
compose_default() {
    sed -n "s/.*\${$1:-\([^}]*\)}.*/\1/p" "$COMPOSE_FILE" | head -n1
}

BASE_IMAGE=${BASE_IMAGE:-$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)}
CCAT_IMAGE=${CCAT_IMAGE:-$(compose_default CCAT_IMAGE)}
POSTGRES_IMAGE=${POSTGRES_IMAGE:-$(compose_default POSTGRES_IMAGE)}
REDIS_IMAGE=${REDIS_IMAGE:-$(compose_default REDIS_IMAGE)}
S3_IMAGE=${S3_IMAGE:-$(compose_default S3_IMAGE)}
PROMETHEUS_IMAGE=${PROMETHEUS_IMAGE:-$(compose_default PROMETHEUS_IMAGE)}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-}
FORCE=${FORCE:-0}
ONLY=${ONLY:-base postgres redis prometheus s3 ccat}
PYTHON=${PYTHON:-.venv/bin/python}
HOST_CA_BUNDLE=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PIP_CACHE=${PIP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ccat-build-images/pip}

for tool in docker; do
    command -v "$tool" >/dev/null || { echo "build-images: $tool is not installed" >&2; exit 2; }
done
docker info >/dev/null 2>&1 || { echo "build-images: the docker daemon is not reachable" >&2; exit 2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ccat-images.XXXXXX")
SUDO=
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null && SUDO=sudo
fi
cleanup() {
    if [ -d "$WORK/rootfs" ]; then $SUDO rm -rf "$WORK/rootfs" || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

SUMMARY=()
T_ALL=$(date +%s)
note() { printf '\n== %s\n' "$*"; }
record() { SUMMARY+=("$(printf '%-8s %-36s %-8s %5s s' "$1" "$2" "$3" "$4")"); }
wanted() { [[ " $ONLY " == *" $1 "* ]]; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }
tag_of() { local t=${1##*:}; [ "$t" != "$1" ] && echo "$t" || echo latest; }

# download_wheels DEST REQUIREMENT... : the wheels of REQUIREMENT and its dependencies for the
# image's Python, fetched by pip running *in* the base image (so environment markers are those
# of the image's Python, not the host's), with the host's CA bundle mounted (a container does
# not trust a TLS-intercepting proxy's CA otherwise). Versions are pinned to the project's
# virtualenv when there is one (the combination the test suite ran with). "." is the project.
download_wheels() {
    local dest=$1
    shift
    mkdir -p "$dest" "$PIP_CACHE" "$WORK/project"
    if [ ! -f "$WORK/project/pyproject.toml" ]; then
        tar -c --exclude='*.egg-info' --exclude=__pycache__ pyproject.toml README.md src \
            | tar -x -C "$WORK/project"
    fi
    : >"$WORK/constraints.txt"
    if [ -x "$PYTHON" ]; then
        "$PYTHON" -m pip freeze --exclude-editable 2>/dev/null | grep -v ' @ ' \
            >"$WORK/constraints.txt" || true
    fi
    local opts=(--rm -e HOME=/tmp -e PIP_CACHE_DIR=/cache -e OWNER="$(id -u):$(id -g)"
        -e PIP_DISABLE_PIP_VERSION_CHECK=1 -e PIP_DEFAULT_TIMEOUT=120
        -v "$(cd "$dest" && pwd):/out" -v "$PIP_CACHE:/cache" -v "$WORK:/work:ro"
        -v "$WORK/project:/project")
    if [ -f "$HOST_CA_BUNDLE" ]; then
        opts+=(-v "$HOST_CA_BUNDLE:/etc/ssl/certs/host-ca-bundle.crt:ro"
            -e PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt)
    fi
    local reqs=()
    for r in "$@"; do reqs+=("${r/#./\/project}"); done
    # root in the container (a registry's slim base needs python3 from apt first); the files
    # it writes into the bind mounts are handed back to the calling user at the end
    docker run "${opts[@]}" -w /tmp "$BASE_IMAGE" sh -c '
        set -e
        if ! python3 -c "import venv, ensurepip" 2>/dev/null; then
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        fi
        python3 -m venv /tmp/venv
        rc=0
        /tmp/venv/bin/pip download --quiet --only-binary=:all: \
            --dest /out -c /work/constraints.txt "$@" || rc=$?
        chown -R "$OWNER" /out /cache /project
        exit $rc' sh "${reqs[@]}"
}

# --- 1. base image from Debian packages ---------------------------------------------------------
if wanted base; then
    t0=$(date +%s)
    if have_image "$BASE_IMAGE" && [ "$FORCE" != 1 ]; then
        record base "$BASE_IMAGE" kept 0
    else
        note "base image $BASE_IMAGE: debootstrap $DEBIAN_SUITE (minbase + python3)"
        command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || {
            echo "build-images: debootstrap is not installed (apt-get install debootstrap)" >&2
            exit 2
        }
        if [ "$(id -u)" != 0 ] && [ -z "$SUDO" ]; then
            echo "build-images: debootstrap needs root (or sudo)" >&2
            exit 2
        fi
        # shellcheck disable=SC2086 # an empty mirror means debootstrap's default
        $SUDO env PATH="/usr/sbin:/sbin:$PATH" debootstrap --variant=minbase \
            --include=python3,python3-venv,ca-certificates \
            "$DEBIAN_SUITE" "$WORK/rootfs" $DEBIAN_MIRROR >"$WORK/debootstrap.log" 2>&1 || {
            tail -n 30 "$WORK/debootstrap.log" >&2
            exit 1
        }
        # Like Debian's slim images: no docs, man pages or translations from later installs,
        # no package lists or .debs kept in the image.
        $SUDO sh -c "
            set -e
            cd '$WORK/rootfs'
            printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
                'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
                'path-exclude /usr/share/locale/*' 'path-include /usr/share/locale/locale.alias' \
                > etc/dpkg/dpkg.cfg.d/docker-slim
            printf '%s\n' 'APT::Install-Recommends \"false\";' 'APT::Install-Suggests \"false\";' \
                'Dir::Cache::pkgcache \"\";' 'Dir::Cache::srcpkgcache \"\";' \
                > etc/apt/apt.conf.d/docker-slim
            rm -rf var/cache/apt/archives/*.deb var/cache/apt/*.bin var/lib/apt/lists/* \
                var/log/*.log usr/share/man/* usr/share/info/* \
                usr/share/locale/[a-z]* usr/share/locale/[A-Z]*
            find usr/share/doc -mindepth 2 ! -name copyright -delete 2>/dev/null || true
            : > etc/machine-id
        "
        $SUDO tar -C "$WORK/rootfs" --numeric-owner -c . | docker import \
            --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' \
            --message "debootstrap --variant=minbase $DEBIAN_SUITE (scripts/build-images.sh)" \
            - "$BASE_IMAGE" >/dev/null
        $SUDO rm -rf "$WORK/rootfs"
        record base "$BASE_IMAGE" built $(($(date +%s) - t0))
    fi
fi

# --- 2. stand-ins for the third-party images ----------------------------------------------------
if wanted postgres; then
    t0=$(date +%s)
    if have_image "$POSTGRES_IMAGE" && [ "$FORCE" != 1 ]; then
        record postgres "$POSTGRES_IMAGE" kept 0
    else
        major=$(tag_of "$POSTGRES_IMAGE")
        major=${major%%[.-]*}
        note "stand-in $POSTGRES_IMAGE: Debian's postgresql-$major"
        docker build --quiet -t "$POSTGRES_IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" \
            --build-arg PG_MAJOR="$major" -f scripts/images/postgres.Dockerfile scripts/images \
            >/dev/null
        record postgres "$POSTGRES_IMAGE" built $(($(date +%s) - t0))
    fi
fi

if wanted redis; then
    t0=$(date +%s)
    if have_image "$REDIS_IMAGE" && [ "$FORCE" != 1 ]; then
        record redis "$REDIS_IMAGE" kept 0
    else
        major=$(tag_of "$REDIS_IMAGE")
        major=${major%%[.-]*}
        note "stand-in $REDIS_IMAGE: Debian's redis-server ($major)"
        docker build --quiet -t "$REDIS_IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" \
            --build-arg REDIS_MAJOR="$major" -f scripts/images/redis.Dockerfile scripts/images \
            >/dev/null
        record redis "$REDIS_IMAGE" built $(($(date +%s) - t0))
    fi
fi

if wanted prometheus; then
    t0=$(date +%s)
    if have_image "$PROMETHEUS_IMAGE" && [ "$FORCE" != 1 ]; then
        record prometheus "$PROMETHEUS_IMAGE" kept 0
    else
        note "stand-in $PROMETHEUS_IMAGE: Debian's prometheus"
        docker build --quiet -t "$PROMETHEUS_IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" \
            -f scripts/images/prometheus.Dockerfile scripts/images >/dev/null
        record prometheus "$PROMETHEUS_IMAGE" built $(($(date +%s) - t0))
    fi
fi

if wanted s3; then
    t0=$(date +%s)
    if have_image "$S3_IMAGE" && [ "$FORCE" != 1 ]; then
        record s3 "$S3_IMAGE" kept 0
    else
        version=$(tag_of "$S3_IMAGE")
        spec="moto[s3]"
        [ "$version" != latest ] && spec="moto[s3]==$version"
        note "stand-in $S3_IMAGE: $spec from wheels downloaded here"
        mkdir -p "$WORK/s3/wheels"
        cp scripts/images/moto.Dockerfile "$WORK/s3/Dockerfile"
        download_wheels "$WORK/s3/wheels" "$spec" flask flask-cors
        docker build --quiet -t "$S3_IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" "$WORK/s3" \
            >/dev/null
        record s3 "$S3_IMAGE" built $(($(date +%s) - t0))
    fi
fi

# --- 3. the CCAT image --------------------------------------------------------------------------
if wanted ccat; then
    t0=$(date +%s)
    note "CCAT image $CCAT_IMAGE: wheels into compose/wheelhouse, then docker build"
    find compose/wheelhouse -maxdepth 1 -name '*.whl' -delete
    download_wheels compose/wheelhouse ".[api,transfer]" "setuptools>=68" wheel
    docker build --quiet -t "$CCAT_IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" . >/dev/null
    record ccat "$CCAT_IMAGE" built $(($(date +%s) - t0))
fi

printf '\n%-8s %-36s %-8s %7s   %s\n' role image action time size
for line in "${SUMMARY[@]}"; do
    img=$(awk '{print $2}' <<<"$line")
    size=$(docker image inspect -f '{{.Size}}' "$img" 2>/dev/null | awk '{printf "%.0f MB", $1/1e6}')
    printf '%s   %s\n' "$line" "$size"
done
echo "build-images: done in $(($(date +%s) - T_ALL)) s (root: $ROOT)"
