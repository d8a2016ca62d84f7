#!/usr/bin/env bash
# Local base images, for building and running the compose stack where no container registry is
# reachable (compose.local.yml points the Dockerfiles and the redis service at them):
#   $PYTHON_TAG  Debian bookworm (debootstrap, minbase) + python3 (3.11), python3-venv,
#                ca-certificates, `python` -> python3; CA_BUNDLE replaces its CA bundle, so a
#                TLS-inspecting proxy that this host trusts is trusted in the images too.
#   $REDIS_TAG   that image + Debian's redis-server (docker/redis.Dockerfile; Docker's layer
#                cache makes a rebuild of an unchanged file a no-op).
# Idempotent: an existing Python base is kept (FORCE=1 rebuilds it). Needs root (debootstrap) and Docker.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_TAG=${PYTHON_TAG:-nucseg-local/python:3.11-bookworm}
REDIS_TAG=${REDIS_TAG:-nucseg-local/redis:7-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

exists() { [ -z "${FORCE:-}" ] && docker image inspect "$1" >/dev/null 2>&1; }

python_base() {
  local rootfs
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' RETURN
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$MIRROR"
  [ -f "$CA_BUNDLE" ] && cp "$CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
  ln -sf python3 "$rootfs/usr/bin/python"
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
  tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "$PYTHON_TAG"
}

redis_image() {
  docker build --build-arg BASE_IMAGE="$PYTHON_TAG" -t "$REDIS_TAG" -f docker/redis.Dockerfile docker
}

if exists "$PYTHON_TAG"; then echo "$PYTHON_TAG: present"; else python_base; fi
redis_image
