#!/usr/bin/env bash
# Make sure the Dockerfile's base image, python:3.11-slim, exists in the local Docker engine.
#
# Why this exists: the Dockerfile starts FROM python:3.11-slim. Where a registry is reachable,
# `docker pull` gets the real image and this script does nothing more. On machines with no
# registry (this project's CI machines reach only the apt and PyPI mirrors), it makes a stand-in
# with the same shape from Debian's packages:
#   - `debootstrap --variant=minbase bookworm` from the apt mirror this machine already uses
#     (/etc/apt/sources.list.d/ or /etc/apt/sources.list), with Debian's Python 3.11;
#   - a venv at /opt/python whose `python` and `pip` are first on PATH (as /usr/local/bin is in
#     the official image);
#   - pip's package-index settings and CA bundle copied from this machine's pip (`pip config
#     list`, read in a clean environment so no PIP_* variable of the caller leaks in; local
#     paths and file:// indexes are left out, they do not exist inside the image);
#   - the same apt sources, so `apt-get install` works in images built on it (deploy/compose's
#     nginx);
#   - imported with `docker import` and tagged python:3.11-slim.
#
# Usage: scripts/docker_base.sh [IMAGE]      (IMAGE defaults to python:3.11-slim)
# Needs root (debootstrap, chroot) only when it has to make the stand-in.
set -euo pipefail

IMAGE="${1:-python:3.11-slim}"
SUITE=bookworm

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "docker_base: $IMAGE is present"
    exit 0
fi
if timeout 120 docker pull "$IMAGE" >/dev/null 2>&1; then
    echo "docker_base: pulled $IMAGE"
    exit 0
fi
echo "docker_base: $IMAGE cannot be pulled; making a stand-in from Debian $SUITE packages"

# The apt mirrors this machine uses: the first URI serving $SUITE, and the security one.
apt_uris() {
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
        2>/dev/null | grep -v '^\s*#' |
        sed -n -e 's/^URIs:\s*//p' -e 's/^deb\s\+\(\[[^]]*\]\s\+\)\?\(\S\+\).*/\2/p'
}
MIRROR="$(apt_uris | grep -v -- '-security' | grep -m1 '/debian/\?$' || true)"
SECURITY="$(apt_uris | grep -m1 -- '-security/\?$' || true)"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SECURITY="${SECURITY:-http://deb.debian.org/debian-security}"

WORK="$(mktemp -d /var/tmp/docker-base.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
ROOT="$WORK/rootfs"

debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -n 30 "$WORK/debootstrap.log"; exit 1; }

cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY $SUITE-security main
EOF
# Slim as Debian's own -slim images: no documentation, manual pages or translations, now or in
# packages installed later.
cat >"$ROOT/etc/dpkg/dpkg.cfg.d/docker-slim" <<EOF
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
find "$ROOT/usr/share/doc" -type f ! -name copyright -delete
rm -rf "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/usr/share/locale/* \
    "$ROOT"/usr/share/lintian/*
# Python with apt's own dependency resolution (debootstrap's --include resolves too little).
in_root() {
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive chroot "$ROOT" "$@"
}
in_root apt-get update -qq
in_root apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv \
    ca-certificates >"$WORK/apt.log" 2>&1 || { tail -n 30 "$WORK/apt.log"; exit 1; }

# pip settings from files only (env -i: no PIP_* of the caller), keeping what works in a
# container: network indexes, timeouts, and the CA bundle (copied in).
PIP_CONF="$ROOT/etc/pip.conf"
echo "[global]" >"$PIP_CONF"
env -i PATH="$PATH" HOME="${HOME:-/root}" python3 -m pip config list 2>/dev/null |
while IFS='=' read -r key value; do
    value="${value#\'}"; value="${value%\'}"
    name="${key#*.}"
    case "$key" in :env:*) continue ;; esac
    case "$name" in
        index-url|extra-index-url|trusted-host)
            urls=""
            for url in $value; do
                case "$url" in http://*|https://*) urls="$urls $url" ;; *) [ "$name" = trusted-host ] && urls="$urls $url" ;; esac
            done
            [ -n "$urls" ] && echo "$name =$urls" >>"$PIP_CONF" ;;
        timeout|default-timeout|retries)
            echo "$name = $value" >>"$PIP_CONF" ;;
        cert)
            if [ -f "$value" ]; then
                cp "$value" "$ROOT/etc/pip-ca-bundle.crt"
                echo "cert = /etc/pip-ca-bundle.crt" >>"$PIP_CONF"
            fi ;;
    esac
done
echo "docker_base: pip settings in the image:"; sed 's/^/    /' "$PIP_CONF"

# Python 3.11 in a venv first on PATH, as the official image has python and pip on PATH.
in_root python3.11 -m venv /opt/python
in_root apt-get clean
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/log/*.log

tar -C "$ROOT" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "stand-in for $IMAGE: debootstrap $SUITE from $MIRROR (scripts/docker_base.sh)" \
    - "$IMAGE" >/dev/null
docker run --rm "$IMAGE" python -c 'import sys; print("docker_base: made", sys.argv[1], "with Python", sys.version.split()[0])' "$IMAGE"
