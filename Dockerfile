# podnat-controller image: `docker build -t podnat-controller .`
#
# Stage 1 builds the release binary (rustables' build script runs bindgen,
# which needs libclang and the kernel's netfilter headers). Stage 2 is
# distroless/cc: glibc and libgcc, which is all the binary links against —
# no shell, no package manager, no iptables or nft binaries (the agent
# talks netlink itself).

FROM rust:1-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev clang linux-libc-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what the build reads (see .dockerignore). benches/ is there because
# Cargo.toml declares the bench targets.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin podnat-controller

FROM gcr.io/distroless/cc-debian12
LABEL org.opencontainers.image.title="podnat-controller" \
      org.opencontainers.image.description="Direct DNAT/SNAT for annotated pods on the node's public IPv4, through nf_tables netlink" \
      org.opencontainers.image.licenses="GPL-3.0-or-later"
COPY --from=build /src/target/release/podnat-controller /usr/local/bin/podnat-controller
# Root, because a capability granted by the pod spec (NET_ADMIN, and only
# that one in the chart) is effective for uid 0 only; the chart drops all
# others and forbids privilege escalation.
USER 0:0
EXPOSE 8484
ENTRYPOINT ["/usr/local/bin/podnat-controller"]
