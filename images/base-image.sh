#!/bin/bash
# Builds a Python 3.11 base image from the Debian mirror, for machines that
# cannot pull from Docker Hub:
#   images/base-image.sh TAG && make -C images DOCKER=podman BASE_IMAGE=TAG
# Debian bookworm ships Python 3.11, the version the project supports. The
# Dockerfiles install into whatever `pip` is first on PATH: here a venv, since
# Debian's own Python refuses pip installs into the system (PEP 668).
set -euo pipefail

tag=${1:?usage: $0 TAG}
docker=${DOCKER:-podman}
# The mirror apt already uses, unless given.
mirror=${MIRROR:-$(sed -n 's/^URIs: *\(\S*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)}
mirror=${mirror:-http://deb.debian.org/debian}

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$rootfs" "$mirror"
chroot "$rootfs" python3 -m venv /opt/venv
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | "$docker" import \
  --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$tag"
