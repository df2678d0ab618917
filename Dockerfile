# syntax=docker/dockerfile:1.7
#
# mailfront container image: a static-ish Rust binary on distroless (glibc, no shell, no package
# manager), running as the unprivileged "nonroot" user (65532) with a read-only root file system.
#
#   docker build -t mailfront:dev .
#   docker run --rm --read-only -p 10465:10465 -p 10993:10993 mailfront:dev
#
# The image listens on unprivileged ports only (10465/10587/10993/10995, metrics 9090); the
# Kubernetes Service maps 465/587/993/995 onto them, so no NET_BIND_SERVICE capability is needed.

# Pin the toolchain: the same Cargo.lock with the same compiler gives the same binary.
ARG RUST_VERSION=1.95
# The builder's Debian must match the runtime's (distroless cc-debian12 = bookworm): the binary
# links against glibc and must not need a newer one than the runtime ships.
ARG DEBIAN_CODENAME=bookworm

FROM docker.io/library/rust:${RUST_VERSION}-slim-${DEBIAN_CODENAME} AS build
WORKDIR /src
# Cargo's registry and the target directory live in BuildKit cache mounts, so a source change
# rebuilds only mailfront, never the dependency graph. --locked: Cargo.lock is the truth; a build
# that would change it fails instead of resolving new versions.
# Only what the mailfront binary is built from (.dockerignore keeps out the rest). Should
# Cargo.toml ever name targets outside src/ ([[bench]], [[test]], build.rs), copy them here too:
# cargo checks every declared target path. tests/k8s/check.sh guards this.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The built-in default configuration is compiled in (include_str! in src/config.rs).
COPY config.yaml.example ./
# rustls uses aws-lc-rs, whose C part needs cc (gcc and libc6-dev are in the slim image already).
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin mailfront \
 && install -D -m 0755 target/release/mailfront /out/mailfront

# A default configuration, so `docker run IMAGE` works without mounts. Kubernetes mounts its own
# at /etc/mailfront/config/ (a directory, so ConfigMap updates are visible; see the Helm chart).
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="mailfront" \
      org.opencontainers.image.description="TLS front proxy for email submission and access (RFC 8314)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build --chown=0:0 /out/mailfront /usr/local/bin/mailfront
COPY --chown=0:0 config.yaml.example /etc/mailfront/config/config.yaml
# The distroless "nonroot" user; numeric so Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 10465 10587 10993 10995 9090
# STOPSIGNAL is SIGTERM (the default): mailfront flips /readyz, stops accepting and drains.
ENTRYPOINT ["/usr/local/bin/mailfront"]
CMD ["--config", "/etc/mailfront/config/config.yaml"]
