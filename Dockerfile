# syntax=docker/dockerfile:1
#
# Image of Docket: docket-broker, docket-scheduler and the docket command line in
# /usr/local/bin, running as the non-root user 65532 with data under /var/lib/docket.
#
#     docker build -t docket:latest .
#     docker run --rm -p 7070:7070 -e DOCKET_LISTEN=0.0.0.0:7070 -v docket-broker:/var/lib/docket docket:latest
#
# The entrypoint is docket-broker. The scheduler runs with
# `--entrypoint /usr/local/bin/docket-scheduler`, and k8s/ sets the command of each
# container. The binaries listen on 127.0.0.1 unless DOCKET_LISTEN or
# DOCKET_SCHEDULER_LISTEN says otherwise, so a container that should be reached from
# outside sets them.

# Builder: the workspace's rust-version, on the same Debian release as the runtime stage,
# so that the binaries link against the glibc that the runtime has.
FROM rust:1.90-slim-bookworm AS builder
WORKDIR /src
COPY . .
# The cache mounts keep downloaded crates and compiled dependencies between builds, so a
# change to Docket's own code recompiles only its crates. The binaries are copied out of
# the target cache, because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p docket-broker -p docket-scheduler -p docket-cli \
    && mkdir -p /out/bin /out/data \
    && cp target/release/docket-broker target/release/docket-scheduler target/release/docket /out/bin/

# Runtime: the same Debian release with its glibc and libgcc, and an unprivileged user
# 65532:65532 that owns nothing but the data folder.
FROM debian:bookworm-slim
# The root certificates let https:// URLs without a --ca-cert file verify public CAs.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 docket \
    && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin docket
COPY --from=builder /out/bin/ /usr/local/bin/
# An empty data folder owned by the runtime user. Docker copies its owner into a new named
# volume mounted there, and a container without a volume writes into it directly.
COPY --from=builder --chown=65532:65532 /out/data /var/lib/docket
ENV DOCKET_DATA_DIR=/var/lib/docket \
    DOCKET_SCHEDULER_DATA_DIR=/var/lib/docket
USER 65532:65532
# The broker serves gRPC on 7070 and the scheduler on 7071; k8s/ serves metrics on 9090.
EXPOSE 7070 7071 9090
ENTRYPOINT ["/usr/local/bin/docket-broker"]
