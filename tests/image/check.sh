#!/usr/bin/env bash
# Builds the container image from the Dockerfile and runs it the way the README tells operators
# to (read-only root file system, published ports), then checks what an operator relies on:
#
#   - the image's own config passes `mailfront check` and binds metrics on 0.0.0.0:9090;
#   - the process runs as uid 65532 (distroless "nonroot") on a read-only root file system;
#   - TLS is served on 10993 (openssl s_client, through a published port);
#   - /metrics and /readyz answer on 9090 through a published port (so not on loopback only);
#   - `mailfront health` (the image's HEALTHCHECK) exits 0 inside the container;
#   - SIGTERM (`stop`) ends it cleanly: exit status 0, well within the stop timeout.
#
#   tests/image/check.sh                 # builds FROM the Dockerfile's pinned base images
#   tests/image/check.sh --standin       # builds FROM stand-in bases made here, no registry
#
# The container engine is podman, or docker where podman is missing ($MAILFRONT_IMAGE_ENGINE
# chooses). Base images: the Dockerfile's pinned digests, or stand-ins: $MAILFRONT_BUILD_IMAGE
# and $MAILFRONT_RUNTIME_IMAGE (any image in the engine's store, e.g. one `podman load`ed) take
# the place of the `FROM … AS build` and `FROM … AS runtime` images, in a copy of the Dockerfile.
# Not build arguments: a `FROM ${ARG}` hides the base images from Dependabot, which then stops
# updating their digests (dependabot-core#2057), and the stage-name workaround for that
# (`ARG B=pinned` … `FROM ${B}`) does not build with podman 4.3 (Debian 12's).
#
# --standin makes both bases locally, for machines that cannot reach a registry (needs root,
# debootstrap and the Debian mirror; made once, then reused until --rebuild-standins):
#   localhost/mailfront-standin/rust:bookworm       debootstrap bookworm (minbase, gcc, libc6-dev)
#                                                   with this machine's Rust toolchain
#                                                   (`rustc --print sysroot`) as /usr/local/cargo
#                                                   and this machine's CA bundle
#   localhost/mailfront-standin/cc-debian12:nonroot distroless cc-debian12's Debian package set
#                                                   (base-files netbase tzdata media-types libc6
#                                                   libssl3 libgomp1 libstdc++6 libgcc-s1
#                                                   gcc-12-base), its passwd/group (nonroot 65532),
#                                                   /tmp, /home/nonroot and CA bundle; no shell
# They stand in for rust:1.95-slim-bookworm and gcr.io/distroless/cc-debian12:nonroot: same
# Debian release, same glibc, same user, so what passes here passes on the real bases, but
# the image built from them is for this check only.
#
# The build itself needs crates.io (cargo fetches inside the build, with the host's network).
# docker: BuildKit honours the Dockerfile's `# syntax=` line by pulling that frontend image, so
# docker without a registry cannot build it; podman (buildah) ignores the line.
#
# Prints one line per check and a summary; exits 1 if any check failed. Takes about as long as
# one release build (several minutes on two cores), so .ci/run does not run it.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
IMAGE=${MAILFRONT_IMAGE_TAG:-localhost/mailfront:check}
STANDIN_BUILD=localhost/mailfront-standin/rust:bookworm
STANDIN_RUNTIME=localhost/mailfront-standin/cc-debian12:nonroot
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The image's config, as the Dockerfile installs it and CMD names it.
IMAGE_CONFIG=/etc/mailfront/config/config.yaml

standin=0
rebuild=0
for arg in "$@"; do
  case $arg in
    --standin) standin=1 ;;
    --rebuild-standins) standin=1; rebuild=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

ENGINE=${MAILFRONT_IMAGE_ENGINE:-}
if [ -z "$ENGINE" ]; then
  if command -v podman >/dev/null; then ENGINE=podman
  elif command -v docker >/dev/null; then ENGINE=docker
  else echo "FAIL  no container engine: install podman (apt-get install podman) or docker" >&2; exit 1
  fi
fi

# Sandboxes such as this project's CI machines (a container in a VM) need two adjustments:
# crun refuses cgroups v1+v2 "hybrid" hosts, where runc works; and where even root may not raise
# a resource limit, podman's default ulimits (nofile 1048576) cannot be set, so the host's own
# hard limit is asked for instead. Elsewhere neither applies.
ENGINE_ARGS=()
LIMITS=()
if [ "$ENGINE" = podman ]; then
  if [ -d /sys/fs/cgroup/unified ] && [ ! -f /sys/fs/cgroup/cgroup.controllers ] && command -v runc >/dev/null; then
    ENGINE_ARGS+=(--runtime runc)
  fi
  hard=$(ulimit -Hn)
  if [ "$hard" != unlimited ] && ! prlimit --nofile=$((hard + 1)):$((hard + 1)) true 2>/dev/null; then
    LIMITS+=(--ulimit "nofile=$hard:$hard" --ulimit nproc=8192:8192)
  fi
fi
engine() { "$ENGINE" "${ENGINE_ARGS[@]}" "$@"; }

WORK=$(mktemp -d)
cid=
cleanup() {
  [ -n "$cid" ] && engine rm -f "$cid" >/dev/null 2>&1
  rm -rf "$WORK"
}
trap cleanup EXIT
passed=0
failed=0

ok() { passed=$((passed + 1)); printf 'ok    %s\n' "$1"; }
fail() {
  failed=$((failed + 1)); printf 'FAIL  %s\n' "$1"
  [ -n "${2:-}" ] && [ -s "$2" ] && sed 's/^/      | /' "$2" | tail -n 40
}
# check NAME CMD...: ok when CMD exits 0, otherwise fail with its output.
check() {
  local name=$1; shift
  local log=$WORK/log.$((passed + failed))
  if "$@" >"$log" 2>&1; then ok "$name"; else fail "$name" "$log"; fi
}
have_image() { engine image inspect "$1" >/dev/null 2>&1; }
# The end of the run: the summary, and the exit status.
finish() {
  echo
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ]
  exit
}

# ---------------------------------------------------------------------------------------------
# Stand-in bases

make_standin_build() {
  local root=$WORK/build-root sysroot
  sysroot=$(rustc --print sysroot) || return 1
  debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates bookworm "$root" "$MIRROR" || return 1
  rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
  # The toolchain as the rust image lays it out: cargo and rustc on PATH from /usr/local/cargo/bin,
  # the registry under /usr/local/cargo (the Dockerfile's cache mount), no rustup.
  mkdir -p "$root/usr/local/rust" "$root/usr/local/cargo/bin"
  cp -a "$sysroot/bin" "$sysroot/lib" "$root/usr/local/rust/" || return 1
  for tool in cargo rustc; do ln -s "/usr/local/rust/bin/$tool" "$root/usr/local/cargo/bin/$tool"; done
  # This machine's CA bundle, not only Debian's: where a proxy inspects TLS (as in this
  # project's CI), cargo inside the build must trust the same roots as cargo outside it.
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt" || return 1
  tar --numeric-owner -C "$root" -c . | engine import \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    - "$STANDIN_BUILD"
}

make_standin_runtime() {
  local root=$WORK/runtime-root debs=$WORK/debs
  mkdir -p "$root" "$debs"
  # distroless: static (base-files netbase tzdata media-types), base (libc6 libssl3) and cc
  # (libgomp1 libstdc++6 libgcc-s1 gcc-12-base) for debian12.
  (cd "$debs" && apt-get download base-files netbase tzdata media-types libc6 libssl3 \
    libgomp1 libstdc++6 libgcc-s1 gcc-12-base) || return 1
  for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$root" || return 1; done
  rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/lintian"
  # distroless's common/ files: users root, nobody and nonroot (65532), their groups, /tmp,
  # the home directory, nsswitch.conf and the CA bundle (Debian's, as distroless builds it).
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
tty:x:5:
staff:x:50:
nonroot:x:65532:
EOF
  printf 'hosts: files dns\nnetworks: files\npasswd: files\ngroup: files\nshadow: files\n' >"$root/etc/nsswitch.conf"
  mkdir -p "$root/tmp" "$root/home/nonroot" "$root/root" "$root/etc/ssl/certs"
  chmod 1777 "$root/tmp"
  chmod 0700 "$root/home/nonroot" "$root/root"
  chown 65532:65532 "$root/home/nonroot"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/" || return 1
  tar --numeric-owner -C "$root" -c . | engine import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'USER 65532' --change 'WORKDIR /home/nonroot' \
    - "$STANDIN_RUNTIME"
}

if [ "$standin" = 1 ]; then
  if [ "$(id -u)" != 0 ]; then echo "FAIL  --standin needs root (debootstrap, file ownership)" >&2; exit 1; fi
  for tool in debootstrap apt-get dpkg-deb rustc; do
    command -v "$tool" >/dev/null || { echo "FAIL  --standin needs $tool" >&2; exit 1; }
  done
  for which in build runtime; do
    tag=$STANDIN_BUILD; [ "$which" = runtime ] && tag=$STANDIN_RUNTIME
    if have_image "$tag" && [ "$rebuild" = 0 ]; then
      ok "stand-in $which base $tag present"
    else
      start=$(date +%s)
      check "stand-in $which base $tag made" "make_standin_$which"
      echo "      ($(( $(date +%s) - start ))s)"
    fi
  done
  MAILFRONT_BUILD_IMAGE=$STANDIN_BUILD
  MAILFRONT_RUNTIME_IMAGE=$STANDIN_RUNTIME
fi
[ "$failed" -eq 0 ] || finish

# The Dockerfile, with the stand-in bases (if any) in its two FROM lines: the rest unchanged.
dockerfile=$ROOT/Dockerfile
bases="pinned bases"
if [ -n "${MAILFRONT_BUILD_IMAGE:-}${MAILFRONT_RUNTIME_IMAGE:-}" ]; then
  dockerfile=$WORK/Dockerfile
  cp "$ROOT/Dockerfile" "$dockerfile"
  substitute() { # STAGE IMAGE
    [ -n "$2" ] || return 0
    sed -i -E "s#^FROM [^ ]+ AS $1\$#FROM $2 AS $1#" "$dockerfile"
    grep -qx "FROM $2 AS $1" "$dockerfile" || { echo "no 'FROM … AS $1' line in the Dockerfile"; return 1; }
  }
  substitute_bases() {
    substitute build "${MAILFRONT_BUILD_IMAGE:-}" && substitute runtime "${MAILFRONT_RUNTIME_IMAGE:-}" &&
      grep '^FROM' "$dockerfile"
  }
  check "the Dockerfile's FROM lines take the stand-in bases" substitute_bases
  bases="FROM ${MAILFRONT_BUILD_IMAGE:-(pinned)} / ${MAILFRONT_RUNTIME_IMAGE:-(pinned)}"
  [ "$failed" -eq 0 ] || finish
fi

# ---------------------------------------------------------------------------------------------
# Build

# podman writes OCI images by default, which have no HEALTHCHECK: --format docker keeps it.
format=()
[ "$ENGINE" = podman ] && format=(--format docker)
start=$(date +%s)
check "$ENGINE build ($bases)" \
  engine build "${format[@]}" "${LIMITS[@]}" --network host -t "$IMAGE" -f "$dockerfile" "$ROOT"
echo "      ($(( $(date +%s) - start ))s)"
[ "$failed" -eq 0 ] || finish
size=$(engine image inspect --format '{{.Size}}' "$IMAGE")
echo "      image $IMAGE: $(( size / 1024 / 1024 )) MiB ($size bytes)"

image_user() { [ "$(engine image inspect --format '{{.Config.User}}' "$IMAGE")" = 65532:65532 ]; }
image_ports() {
  local ports p
  ports=$(engine image inspect --format '{{range $p, $_ := .Config.ExposedPorts}}{{$p}} {{end}}' "$IMAGE")
  for p in 10465 10587 10993 10995 9090; do
    case " $ports" in *" $p/tcp "*) ;; *) echo "missing $p in: $ports"; return 1 ;; esac
  done
}
# The config file in the image, read from a created (never started) container.
image_metrics_on_all_addresses() {
  local name=mailfront-image-config-$$ rc
  engine create --name "$name" "$IMAGE" >/dev/null || return 1
  engine cp "$name:$IMAGE_CONFIG" - | tar -xO >"$WORK/image-config.yaml"
  engine rm "$name" >/dev/null
  grep -A3 '^metrics:' "$WORK/image-config.yaml"
  grep -qx '  listen: "0.0.0.0:9090"' "$WORK/image-config.yaml"
}
check "image user is 65532:65532" image_user
check "image exposes 10465 10587 10993 10995 9090" image_ports
# The image's own config: valid, and metrics on all addresses (the quick start keeps loopback).
check "the image's config passes mailfront check" \
  engine run --rm --read-only "${LIMITS[@]}" "$IMAGE" check --config "$IMAGE_CONFIG"
check "the image's config binds metrics on 0.0.0.0:9090" image_metrics_on_all_addresses

# ---------------------------------------------------------------------------------------------
# Run

cid=$(engine run -d --read-only --stop-timeout 45 "${LIMITS[@]}" \
  -p 127.0.0.1::10993 -p 127.0.0.1::9090 "$IMAGE" 2>"$WORK/run.log") || {
  fail "$ENGINE run -d --read-only" "$WORK/run.log"; cid=; finish; }
ok "$ENGINE run -d --read-only -p 127.0.0.1::10993 -p 127.0.0.1::9090"
host_port() { engine port "$cid" "$1/tcp" | head -n 1 | sed 's/.*://'; }
tls_port=$(host_port 10993)
metrics_port=$(host_port 9090)
# Ready once /readyz says so (the listeners are bound before it turns 200).
for _ in $(seq 1 50); do
  curl -fsS "http://127.0.0.1:$metrics_port/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done

read_only() { [ "$(engine inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$cid")" = true ]; }
runs_as_nonroot() {
  local pid
  pid=$(engine inspect --format '{{.State.Pid}}' "$cid")
  grep -E '^(Uid|Gid):' "/proc/$pid/status"
  grep -Eq '^Uid:\s+65532\s+65532\s' "/proc/$pid/status" && grep -Eq '^Gid:\s+65532\s+65532\s' "/proc/$pid/status"
}
tls_served() {
  local out
  out=$(openssl s_client -connect "127.0.0.1:$tls_port" -servername mail.example.test -brief </dev/null 2>&1)
  printf '%s\n' "$out"
  printf '%s' "$out" | grep -q 'Protocol version: TLSv1.3'
}
metrics_served() {
  curl -fsS "http://127.0.0.1:$metrics_port/readyz" &&
    curl -fsS "http://127.0.0.1:$metrics_port/metrics" | grep '^mailfront_tls_handshakes_total'
}
check "read-only root file system" read_only
check "the process runs as uid 65532, gid 65532" runs_as_nonroot
check "TLS on 10993: openssl s_client completes a TLS 1.3 handshake" tls_served
check "metrics on 9090 from outside the container: /readyz 200, /metrics has mailfront_ series" metrics_served
check "mailfront health exits 0 inside the container" \
  engine exec "$cid" /usr/local/bin/mailfront health --config "$IMAGE_CONFIG"
if [ "$ENGINE" = podman ]; then
  check "podman healthcheck run (the image's HEALTHCHECK) is healthy" engine healthcheck run "$cid"
fi

start=$(date +%s)
engine stop -t 45 "$cid" >"$WORK/stop.log" 2>&1
took=$(( $(date +%s) - start ))
stopped_cleanly() {
  local code
  code=$(engine inspect --format '{{.State.ExitCode}}' "$cid")
  echo "exit status $code after ${took}s"
  [ "$code" = 0 ] && [ "$took" -lt 10 ]
}
check "SIGTERM: exit status 0 within 10 s (took ${took}s)" stopped_cleanly
engine logs "$cid" >"$WORK/container.log" 2>&1
check "the log says SIGTERM was received" grep -q "SIGTERM received" "$WORK/container.log"
[ "$failed" -eq 0 ] || { echo "      container log:"; sed 's/^/      | /' "$WORK/container.log" | tail -n 30; }

finish
