#!/bin/bash
# Prepares a Debian bookworm CI machine (root, no Docker Hub) to build and run
# the component images with podman, then:
#   make images-check DOCKER=podman BASE_IMAGE=localhost/defectkit/base:bookworm \
#     BUILD_FLAGS='-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro'
# The CA bundle is mounted because pip inside a build reaches PyPI only through
# the certificates the host trusts.
set -eu

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q podman runc netavark aardvark-dns iptables debootstrap

# crun can neither set rlimits nor drive the cgroups of a hybrid cgroup
# hierarchy on these machines; runc can. runc must be able to set a container's
# rlimits, and podman's defaults (1048576) exceed what an unprivileged or
# nested host allows; values at or just below the shell's hard limits were
# refused too, so the limits are set well inside them, and ample for a
# pipeline step.
limit() { # limit HARD CAP: half of HARD, at most CAP
  if [ "$1" = unlimited ] || [ "$(( $1 / 2 ))" -gt "$2" ]; then echo "$2"; else echo "$(( $1 / 2 ))"; fi
}
nofile=$(limit "$(ulimit -Hn)" 8192)
nproc=$(limit "$(ulimit -Hu)" 16384)
mkdir -p /etc/containers
cat > /etc/containers/containers.conf <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"

[network]
# Without this, podman 4 picks CNI, whose plugins Debian does not install with it.
network_backend = "netavark"
CONF

cat > /etc/containers/storage.conf <<CONF
[storage]
driver = "overlay"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
CONF

podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}'

# Docker Hub cannot be reached from CI: the Dockerfiles' python base is built
# from the Debian mirror instead, once per machine.
base=${BASE_IMAGE:-localhost/defectkit/base:bookworm}
podman image exists "$base" || DOCKER=podman "$(dirname "$0")/base-image.sh" "$base"
