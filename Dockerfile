# syntax=docker/dockerfile:1.7
#
# mailfront container image: a static-ish Rust binary on distroless (glibc, no shell, no package
# manager), running as the unprivileged "nonroot" user (65532) with a read-only root file system.
#
#   docker build -t mailfront:dev .
#   docker run --rm --read-only --stop-timeout 45 -p 10465:10465 -p 10993:10993 \
#     -p 127.0.0.1:9090:9090 mailfront:dev
#
# tests/image/check.sh builds and runs it and checks all of this (with stand-in bases, in a copy
# of this file, where no registry is reachable).
#
# The image listens on unprivileged ports only (10465/10587/10993/10995, metrics 9090); the
# Kubernetes Service maps 465/587/993/995 onto them, so no NET_BIND_SERVICE capability is needed.

# Base images pinned by digest: the tag says what it is, the digest is what is built from, so a
# rebuild of a release uses the same bytes. The builder's Debian must match the runtime's
# (distroless cc-debian12 = bookworm): the binary links against glibc and must not need a newer
# one than the runtime ships; the same Cargo.lock with the same compiler gives the same binary.
# This project's machines cannot reach a registry, so the digests were taken from public
# material: each is the one several independent public Dockerfiles pin for the same tag (six for
# the rust tag, four for distroless). They are meant to be multi-platform indexes (the release
# builds amd64 and arm64, and fails loudly on a single-platform digest). Check and bump them where
# a registry is reachable: `docker buildx imagetools inspect <tag>` (or Dependabot/Renovate).

# rust:1.95-slim-bookworm
FROM docker.io/library/rust:1.95-slim-bookworm@sha256:d7482085ff5b415f84dba5647ae71606650bdef00db7aeb69f4b3d170c3e4082 AS build
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
# The image's config: config.yaml.example with metrics on all addresses, so `docker run -p
# 9090:9090` and Prometheus reach /metrics (the built-in default and the quick start keep
# 127.0.0.1). Fails the build if the example no longer has the line to change.
RUN sed 's/^  listen: "127\.0\.0\.1:9090"/  listen: "0.0.0.0:9090"/' config.yaml.example >/out/config.yaml \
 && grep -q '^  listen: "0.0.0.0:9090"' /out/config.yaml

# A default configuration, so `docker run IMAGE` works without mounts. Kubernetes mounts its own
# at /etc/mailfront/config/ (a directory, so ConfigMap updates are visible; see the Helm chart).
# gcr.io/distroless/cc-debian12:nonroot
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f AS runtime
# Set by the release workflow (.github/workflows/release.yml): the version, the repository the
# image was built from and the commit.
ARG VERSION=0.1.0
ARG SOURCE=https://github.com/example/mailfront
ARG REVISION=unknown
LABEL org.opencontainers.image.title="mailfront" \
      org.opencontainers.image.description="TLS front proxy for email submission and access (RFC 8314)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=build --chown=0:0 /out/mailfront /usr/local/bin/mailfront
COPY --from=build --chown=0:0 /out/config.yaml /etc/mailfront/config/config.yaml
# The distroless "nonroot" user; numeric so Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 10465 10587 10993 10995 9090
# STOPSIGNAL is SIGTERM (the default): mailfront flips /readyz, stops accepting and drains for
# timeouts.shutdown_grace (30s). Docker kills after 10s unless told otherwise: run with
# `docker run --stop-timeout 45` (compose: stop_grace_period: 45s, as deploy/compose.yaml does).
# Docker's health status from /readyz on the configured metrics address (there is no shell or
# curl in the image: `mailfront health` makes the request). It reads the same config file as
# the CMD; a config without metrics.listen makes the container unhealthy. Kubernetes ignores
# HEALTHCHECK and probes /healthz and /readyz itself.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/mailfront", "health", "--config", "/etc/mailfront/config/config.yaml"]
ENTRYPOINT ["/usr/local/bin/mailfront"]
CMD ["--config", "/etc/mailfront/config/config.yaml"]
