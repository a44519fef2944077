# The teemesh image: one image for every role (coordinator, sidecar, KMS, gateway, agent
# simulator), each started as `teemesh <command>`.
#
# Reproducible build (BuildKit, Docker >= 23; no `# syntax=` line, so no frontend image is pulled
# by tag: the RUN --mount flags below are in the built-in Dockerfile frontend):
#
#   docker buildx build \
#     --build-arg SOURCE_DATE_EPOCH="$(git log -1 --format=%ct)" \
#     --build-arg VCS_REF="$(git rev-parse HEAD)" --build-arg IMAGE_SOURCE=<repository URL> \
#     --output type=image,name=<registry>/teemesh:<version>,rewrite-timestamp=true .
#
# BuildKit clamps every file's mtime and the image's creation time to SOURCE_DATE_EPOCH
# (rewrite-timestamp=true); the steps below leave no other timestamp, cache or log behind.
#
# Base image, pinned by digest. The digest is the one of python:3.11-slim-bookworm seen in public
# Dockerfiles (it was not read from a registry): before a release, re-check it with
#   docker buildx imagetools inspect python:3.11-slim-bookworm
# and update it here (and the org.opencontainers.image.base.* labels follow). BASE_IMAGE lets a
# builder use another base, but only as a whole reference, name together with its digest: the
# first RUN refuses a BASE_IMAGE that is not pinned by @sha256.
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

FROM ${BASE_IMAGE}

ARG BASE_IMAGE
# Set by the build (see above); declared here so that the RUN steps see it too.
ARG SOURCE_DATE_EPOCH
ARG VCS_REF=unknown
ARG IMAGE_SOURCE=unknown

# Debian packages: etcd-server, pinned to the exact bookworm version. Coordinators with
# `store: etcd` (and coordinators.dcs, the workloads' DCS) run etcd in the coordinator CVM under
# `teemesh store-member ... -- etcd ...`, which execs etcd in this very process, so etcd must be
# in this image for the image to serve every role. This is Debian's etcd-server, the same build
# the store and Patroni tests run in CI (scripts/test installs it with apt), so the image runs the
# etcd that was tested; it adds one static binary (about 20 MB). If Debian ever rebuilds it
# (3.4.23-4+b5...), the pin makes the build fail instead of drifting: update the pin, or to rebuild
# an old release, point the apt sources at snapshot.debian.org for that release's date.
# Not in this image: PostgreSQL/Patroni (the `patroni` extra, teemesh.examples.patroni_member and
# webdemo), which are demo workloads and need their own image. No apt-get upgrade: the base
# image's digest fixes every other package.
ARG ETCD_SERVER_VERSION=3.4.23-4+b4

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Users first, written directly (fixed ids, no dates in /etc/shadow, no lastlog/faillog entries as
# useradd would add): teemesh runs the process; etcd exists so that etcd-server's postinst does not
# create one with a date and a free id (etcd itself runs as teemesh, under store-member).
# A policy-rc.d (unless the base has one) keeps the package's init script from starting etcd
# during the build.
RUN set -eux; \
    echo "$BASE_IMAGE" | grep -Eq '@sha256:[0-9a-f]{64}$' \
        || { echo "BASE_IMAGE must be pinned by digest (name@sha256:...): $BASE_IMAGE" >&2; exit 1; }; \
    echo 'teemesh:x:10001:10001:teemesh:/var/lib/teemesh:/usr/sbin/nologin' >> /etc/passwd; \
    echo 'teemesh:x:10001:' >> /etc/group; \
    echo 'teemesh:*:::::::' >> /etc/shadow; \
    echo 'teemesh:*::' >> /etc/gshadow; \
    echo 'etcd:x:10002:10002:etcd:/var/lib/etcd:/usr/sbin/nologin' >> /etc/passwd; \
    echo 'etcd:x:10002:' >> /etc/group; \
    echo 'etcd:*:::::::' >> /etc/shadow; \
    echo 'etcd:*::' >> /etc/gshadow; \
    install -d -o 10001 -g 10001 -m 0750 /var/lib/teemesh; \
    own_policy=; \
    if [ ! -e /usr/sbin/policy-rc.d ]; then \
        own_policy=1; printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; \
        chmod 0755 /usr/sbin/policy-rc.d; \
    fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends "etcd-server=${ETCD_SERVER_VERSION}"; \
    if [ -n "$own_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt/* /var/log/dpkg.log \
        /var/log/alternatives.log /var/cache/debconf/*-old /var/lib/dpkg/*-old \
        /var/cache/ldconfig/aux-cache; \
    etcd --version

# Python dependencies: exactly the hashed lock (requirements/image.lock, see requirements/README.md),
# wheels only, no resolver (--no-deps), no bytecode compiled at install (.pyc files are not
# byte-stable across builds), no pip cache. The lock also pins the build backend
# (pyproject's [build-system]: setuptools), so the project builds below without build isolation,
# that is without fetching an unpinned setuptools.
RUN --mount=type=bind,source=requirements/image.lock,target=/tmp/image.lock \
    pip install --no-cache-dir --no-compile --require-hashes --only-binary=:all: --no-deps \
        -r /tmp/image.lock \
    && pip check

# The project itself, from a read-write bind mount of the context (filtered by .dockerignore): the
# build's scratch files (build/, *.egg-info) are discarded with the mount, never in a layer.
RUN --mount=type=bind,target=/src,rw \
    pip install --no-cache-dir --no-compile --no-deps --no-build-isolation \
        --check-build-dependencies /src \
    && pip check \
    && teemesh --version

LABEL org.opencontainers.image.title="teemesh" \
      org.opencontainers.image.description="An attested service mesh for confidential VMs (Intel TDX, dstack): coordinator, sidecar, KMS, gateway and agent simulator" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${IMAGE_SOURCE}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# Non-root. Under host networking (dstack's compose), a role that listens below port 1024 (a
# gateway on 443) needs the host's net.ipv4.ip_unprivileged_port_start, or a port >= 1024.
USER 10001:10001
WORKDIR /var/lib/teemesh
ENTRYPOINT ["teemesh"]
CMD ["--help"]
