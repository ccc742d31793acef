# podnat-controller image, for users with a container engine:
#
#   docker build -t podnat-controller:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) \
#     --build-arg SOURCE_DATE_EPOCH=$(git log -1 --format=%ct) .
#
# The same image as `make image` (image/build, no engine needed): the runtime
# root is made by the same script (image/rootfs) from the same Debian
# packages pinned in image/packages.lock, and the config below declares what
# image/build writes (tests/image.rs compares them). Stage 1 builds the
# release binary (rustables' build script runs bindgen, which needs libclang
# and the kernel's netfilter headers) and assembles the root: the binary,
# exactly the libraries it links, the CA bundle, passwd/group/nsswitch.conf,
# /tmp — no shell, no package manager, no iptables or nft binaries (the
# agent talks netlink itself).

FROM rust:1-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev clang linux-libc-dev binutils \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what the build reads (see .dockerignore). benches/ is there because
# Cargo.toml declares the bench targets.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin podnat-controller
COPY LICENSE ./
COPY image ./image
ARG SOURCE_DATE_EPOCH=0
RUN apt-get update \
 && image/rootfs target/release/podnat-controller /rootfs \
 && rm -rf /var/lib/apt/lists/*

FROM scratch
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=1970-01-01T00:00:00Z
COPY --from=build /rootfs/ /
LABEL org.opencontainers.image.title="podnat-controller" \
      org.opencontainers.image.description="Direct DNAT/SNAT for annotated pods on their node's public address, through nf_tables netlink" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/gutmensch/podnat-controller" \
      org.opencontainers.image.licenses="GPL-3.0-or-later" \
      org.opencontainers.image.created="${CREATED}"
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Root, because a capability granted by the pod spec (NET_ADMIN, and only
# that one in the chart) is effective for uid 0 only; the chart drops all
# others and forbids privilege escalation.
USER 0:0
EXPOSE 8484/tcp
ENTRYPOINT ["/usr/local/bin/podnat-controller"]
