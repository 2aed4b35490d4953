#!/usr/bin/env bash
# Print the immutable reference of the base image the Dockerfile builds on, making sure that
# image exists in the local Docker engine. `make docker` passes it as --build-arg BASE_IMAGE.
#
# The Dockerfile names its base by digest (`ARG BASE_IMAGE=python:3.11-slim@sha256:...`), so a
# tag that moves upstream never changes what is built. This script:
#   - where the Dockerfile has a digest and a registry is reachable: pulls exactly that digest
#     (or finds it already here) and prints it;
#   - with --pin, where a registry is reachable: pulls the tag, reads the digest it has now,
#     writes it into the Dockerfile's default (commit that change) and prints it: the way to
#     update the base image (docs/DEPLOY.md);
#   - where no registry is reachable (this project's CI machines reach only the apt and PyPI
#     mirrors): makes a stand-in with the same shape from Debian's packages, once, tagged as the
#     tag of the Dockerfile's default, and prints its image id (sha256:...), which pins the build
#     to that exact local image.
# The stand-in:
#   - `debootstrap --variant=minbase bookworm` from the apt mirror this machine already uses
#     (/etc/apt/sources.list.d/ or /etc/apt/sources.list), with Debian's Python 3.11;
#   - a venv at /opt/python whose `python` and `pip` are first on PATH (as /usr/local/bin is in
#     the official image);
#   - pip's package-index settings and CA bundle copied from this machine's pip (`pip config
#     list`, read in a clean environment so no PIP_* variable of the caller leaks in; local
#     paths and file:// indexes are left out, they do not exist inside the image);
#   - the same apt sources, so `apt-get install` works in images built on it (deploy/compose's
#     nginx);
#   - imported with `docker import` and tagged with the Dockerfile default's tag.
#
# Usage: scripts/docker_base.sh [--pin]     (messages on stderr, the reference alone on stdout)
# Needs root (debootstrap, chroot) only when it has to make the stand-in.
set -euo pipefail

cd "$(dirname "$0")/.."
PIN=0
[ "${1:-}" = "--pin" ] && PIN=1
SUITE=bookworm

say() { echo "docker_base: $*" >&2; }

# The Dockerfile's default, e.g. python:3.11-slim@sha256:<64 hex> (or @sha256:UNPINNED).
DEFAULT="$(sed -n 's/^ARG BASE_IMAGE=\(\S\+\).*/\1/p' Dockerfile)"
TAG="${DEFAULT%@*}"
DIGEST="${DEFAULT#"$TAG"}"; DIGEST="${DIGEST#@}"
[ -n "$TAG" ] || { say "no 'ARG BASE_IMAGE=' line in the Dockerfile"; exit 1; }

# The registry digest the local image $1 was pulled with, for the repository of $TAG.
repo_digest() {
    # (none: empty, not a failure; under pipefail a missing image would end the script here)
    { docker image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$1" 2>/dev/null ||
        true; } |
        sed -n "s|^\(docker.io/\)\?\(library/\)\?${TAG%:*}@\(sha256:[0-9a-f]\{64\}\)$|\3|p" |
        head -n 1
}

if [ "$PIN" = 1 ]; then
    timeout 300 docker pull "$TAG" >&2 || { say "cannot pull $TAG: --pin needs a registry"; exit 1; }
    DIGEST="$(repo_digest "$TAG")"
    [ -n "$DIGEST" ] || { say "$TAG has no registry digest"; exit 1; }
    sed -i "s|^ARG BASE_IMAGE=.*|ARG BASE_IMAGE=$TAG@$DIGEST|" Dockerfile
    say "pinned the Dockerfile to $TAG@$DIGEST (commit the Dockerfile)"
    echo "$TAG@$DIGEST"
    exit 0
fi

PINNED=0
[[ "$DIGEST" =~ ^sha256:[0-9a-f]{64}$ ]] && PINNED=1
if [ "$PINNED" = 1 ]; then
    if docker image inspect "$TAG@$DIGEST" >/dev/null 2>&1 \
            || timeout 300 docker pull "$TAG@$DIGEST" >/dev/null 2>&1; then
        say "building on $TAG@$DIGEST"
        echo "$TAG@$DIGEST"
        exit 0
    fi
    say "$TAG@$DIGEST cannot be pulled (no registry reachable?)"
else
    say "the Dockerfile records no digest for $TAG yet: run scripts/docker_base.sh --pin where a registry is reachable, and commit the Dockerfile"
fi

LOCAL_ID="$(docker image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)"
LOCAL_DIGEST="$(repo_digest "$TAG")"
# A local image of that tag with no registry digest is the stand-in made here before.
if [ -n "$LOCAL_ID" ] && [ -z "$LOCAL_DIGEST" ]; then
    say "building on the local stand-in for $TAG, image $LOCAL_ID"
    echo "$LOCAL_ID"
    exit 0
fi
if [ "$PINNED" = 0 ] && { [ -n "$LOCAL_DIGEST" ] || timeout 120 docker pull "$TAG" >/dev/null 2>&1; }; then
    LOCAL_DIGEST="$(repo_digest "$TAG")"
    say "building on $TAG@$LOCAL_DIGEST (what the tag gives today; not recorded in the Dockerfile)"
    echo "$TAG@$LOCAL_DIGEST"
    exit 0
fi
if [ -n "$LOCAL_ID" ]; then
    say "the local $TAG came from a registry as $LOCAL_DIGEST, not the pinned $DIGEST: pull the pinned one, or remove the local $TAG to have a stand-in made"
    exit 1
fi
say "making a stand-in for $TAG from Debian $SUITE packages"

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
    { tail -n 30 "$WORK/debootstrap.log" >&2; exit 1; }

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
in_root apt-get update -qq >&2
in_root apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv \
    ca-certificates >"$WORK/apt.log" 2>&1 || { tail -n 30 "$WORK/apt.log" >&2; exit 1; }

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
say "pip settings in the image:"; sed 's/^/    /' "$PIP_CONF" >&2

# Python 3.11 in a venv first on PATH, as the official image has python and pip on PATH.
in_root python3.11 -m venv /opt/python
in_root apt-get clean
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/log/*.log

tar -C "$ROOT" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "stand-in for $TAG: debootstrap $SUITE from $MIRROR (scripts/docker_base.sh)" \
    - "$TAG" >/dev/null
docker run --rm "$TAG" python -c 'import sys; print("docker_base: made", sys.argv[1], "with Python", sys.version.split()[0], file=sys.stderr)' "$TAG"
docker image inspect --format '{{.Id}}' "$TAG"
