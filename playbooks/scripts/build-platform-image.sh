#!/usr/bin/env bash
# The image molecule boots its test hosts from: Debian bookworm made with debootstrap (no
# container registry is needed), systemd as PID 1, Python 3 for Ansible, sudo, and the Debian
# packages the roles install (PostgreSQL, Redis, logrotate, rsync, ssh, cron), so that a
# converge needs no package mirror: the roles' apt tasks find them installed. The services
# baked in are disabled: the roles enable and start what a host needs.
#
#   playbooks/scripts/build-platform-image.sh          # keeps an existing image; FORCE=1 rebuilds
#
# Environment: MOLECULE_IMAGE (default ccat-molecule-bookworm:latest), DEBIAN_MIRROR (default:
# debootstrap's), FORCE. Needs docker, debootstrap and root (or sudo).
set -euo pipefail
IMAGE=${MOLECULE_IMAGE:-ccat-molecule-bookworm:latest}
SUITE=bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-}
PACKAGES=(systemd systemd-sysv dbus python3 python3-venv python3-apt python3-psycopg2 sudo
    ca-certificates postgresql redis-server logrotate openssh-client openssh-server rsync procps
    iproute2 curl acl cron locales)

if docker image inspect "$IMAGE" >/dev/null 2>&1 && [ "${FORCE:-0}" != 1 ]; then
    echo "platform image: $IMAGE kept"
    exit 0
fi
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || {
    echo "platform image: debootstrap is not installed (apt-get install debootstrap)" >&2
    exit 2
}
SUDO=
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "platform image: needs root or sudo" >&2; exit 2; }
    SUDO=sudo
fi
t0=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/molecule-image.XXXXXX")
trap '$SUDO rm -rf "$work"' EXIT
echo "platform image: debootstrap $SUITE with ${#PACKAGES[@]} packages (a few minutes)"
includes=$(IFS=,; echo "${PACKAGES[*]}")
# shellcheck disable=SC2086 # an empty mirror means debootstrap's default
$SUDO env PATH="/usr/sbin:/sbin:$PATH" debootstrap --variant=minbase --include="$includes" \
    "$SUITE" "$work/rootfs" $DEBIAN_MIRROR >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    exit 1
}
$SUDO chroot "$work/rootfs" sh -s <<'SH'
set -e
# services the roles enable themselves; no consoles, no hardware units in a container
systemctl disable postgresql.service redis-server.service ssh.service cron.service >/dev/null 2>&1 || true
systemctl mask getty.target console-getty.service systemd-remount-fs.service \
    dev-hugepages.mount sys-fs-fuse-connections.mount systemd-udevd.service \
    systemd-udev-trigger.service systemd-modules-load.service >/dev/null 2>&1 || true
# the cluster that Debian's postgresql package made is stopped; the role configures it
echo 'en_US.UTF-8 UTF-8' >/etc/locale.gen
locale-gen >/dev/null
: >/etc/machine-id
rm -f /etc/ssh/ssh_host_*
rm -rf /var/cache/apt/archives/*.deb /var/log/*.log
SH
$SUDO tar -C "$work/rootfs" --numeric-owner -c . | docker import \
    --change 'ENV container=docker' --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/lib/systemd/systemd"]' \
    --message "debootstrap $SUITE + systemd for molecule (playbooks/scripts/build-platform-image.sh)" \
    - "$IMAGE" >/dev/null
size=$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')
echo "platform image: $IMAGE built in $(($(date +%s) - t0)) s ($size)"
