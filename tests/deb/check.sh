#!/usr/bin/env bash
# Builds the Debian package (`cargo deb`: the release binary, packaging/mailfront.service and
# config.yaml.example as the conffile /etc/mailfront/config.yaml), installs it with dpkg, checks
# the installed unit with `systemd-analyze verify`, and runs the service once:
#
#   - where systemd is PID 1: `systemctl start mailfront` with a drop-in that points ExecStart at
#     a test config, then `systemctl stop`, which must end with Result=success;
#   - elsewhere (a container, as this project's CI): the unit's own ExecStartPre and ExecStart
#     command lines, run as the unit would run them: a user that exists nowhere (DynamicUser=yes;
#     uid 61184, the first of systemd's dynamic range), no supplementary groups, NoNewPrivileges,
#     CAP_NET_BIND_SERVICE as the only (ambient and bounding) capability, UMask=0077, the unit's
#     LimitNOFILE; then SIGTERM (KillSignal), which must end it with status 0 within
#     TimeoutStopSec.
#
# Either way it must serve TLS (openssl s_client, TLS 1.3) and answer /readyz. The test config is
# config.yaml.example on 127.0.0.1 with free ports (the packaged one binds 0.0.0.0:10465 and
# friends, which a shared machine may not have free); the packaged conffile itself must pass
# `mailfront check`, as the unit's ExecStartPre runs it.
#
#   tests/deb/check.sh            # as root (dpkg); prints one line per check and a summary
#   tests/deb/check.sh --keep     # leave the package installed (default: dpkg --purge at the end)
#
# Installs what it lacks: cargo-deb (`cargo install --locked cargo-deb`), systemd-analyze (the
# systemd package). A release build plus cargo-deb's own compile take several minutes, so
# .ci/run does not run this.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
UNIT=/lib/systemd/system/mailfront.service
# The first uid of systemd's dynamic user range (DynamicUser=yes picks one from 61184-65519).
DYNAMIC_UID=61184
keep=0
for arg in "$@"; do
  case $arg in
    --keep) keep=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$(id -u)" != 0 ]; then echo "FAIL  needs root (dpkg -i)" >&2; exit 1; fi

WORK=$(mktemp -d)
chmod 0755 "$WORK"
pid=
installed=0
cleanup() {
  [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
  if [ -d /run/systemd/system ] && [ -f /etc/systemd/system/mailfront.service.d/check.conf ]; then
    systemctl stop mailfront >/dev/null 2>&1
    rm -rf /etc/systemd/system/mailfront.service.d/check.conf
    systemctl daemon-reload
  fi
  rm -f "/etc/mailfront/check-$$.yaml"
  [ "$installed" = 1 ] && [ "$keep" = 0 ] && dpkg --purge mailfront >/dev/null 2>&1
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
check() {
  local name=$1; shift
  local log=$WORK/log.$((passed + failed))
  if "$@" >"$log" 2>&1; then ok "$name"; else fail "$name" "$log"; fi
}
finish() {
  echo
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ]
  exit
}
timed() { # NAME CMD...: check, with the seconds it took
  local start=$SECONDS
  check "$@"
  echo "      ($((SECONDS - start))s)"
}

# ---------------------------------------------------------------------------------------------
# Tools

if ! command -v cargo-deb >/dev/null; then
  timed "install cargo-deb (cargo install --locked cargo-deb)" cargo install --locked --quiet cargo-deb
fi
if ! command -v systemd-analyze >/dev/null; then
  check "install systemd (for systemd-analyze)" bash -c \
    'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd'
fi
for tool in dpkg dpkg-deb openssl curl setpriv; do
  command -v "$tool" >/dev/null || fail "$tool is missing"
done
[ "$failed" -eq 0 ] || finish

# ---------------------------------------------------------------------------------------------
# Package

cd "$ROOT" || exit 1
timed "cargo deb --locked (a release build and the package)" cargo deb --locked
deb=$(ls -t "${CARGO_TARGET_DIR:-$ROOT/target}"/debian/mailfront_*.deb 2>/dev/null | head -n 1)
[ -n "$deb" ] || { fail "no target/debian/mailfront_*.deb"; finish; }
echo "      $deb: $(( $(stat -c %s "$deb") / 1024 )) KiB"
package_contents() {
  local list
  list=$(dpkg-deb -c "$deb")
  for path in ./usr/bin/mailfront ./lib/systemd/system/mailfront.service ./etc/mailfront/config.yaml \
    ./usr/share/doc/mailfront/README.md ./usr/share/doc/mailfront/config.yaml.example; do
    grep -q " $path\$" <<<"$list" || { echo "missing $path in:"; echo "$list"; return 1; }
  done
  dpkg-deb -f "$deb" Package Version Architecture Depends
  dpkg-deb -f "$deb" Depends | grep -q libc6 &&
    dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx /etc/mailfront/config.yaml
}
check "package: binary, unit, conffile /etc/mailfront/config.yaml, docs; Depends on libc6" package_contents
check "dpkg -i" dpkg -i "$deb" && installed=1
[ "$failed" -eq 0 ] || finish

check "systemd-analyze verify $UNIT (no warnings)" bash -c \
  'out=$(systemd-analyze verify "$0" 2>&1); rc=$?; printf "%s" "$out"; [ $rc -eq 0 ] && [ -z "$out" ]' "$UNIT"
# The unit's ExecStartPre as it stands: the packaged conffile is valid.
check "the packaged /etc/mailfront/config.yaml passes mailfront check (ExecStartPre)" \
  /usr/bin/mailfront check --config /etc/mailfront/config.yaml

# ---------------------------------------------------------------------------------------------
# Run

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
imaps=$(free_port)
metrics=$(free_port)
submissions=$(free_port)
submission=$(free_port)
pop3s=$(free_port)
# Beside the packaged one, not under /tmp: the unit's PrivateTmp would hide it from the service.
config=/etc/mailfront/check-$$.yaml
sed -e "s/\"0\.0\.0\.0:10465\"/\"127.0.0.1:$submissions\"/" -e "s/\"0\.0\.0\.0:10587\"/\"127.0.0.1:$submission\"/" \
  -e "s/\"0\.0\.0\.0:10993\"/\"127.0.0.1:$imaps\"/" -e "s/\"0\.0\.0\.0:10995\"/\"127.0.0.1:$pop3s\"/" \
  -e "s/\"127\.0\.0\.1:9090\"/\"127.0.0.1:$metrics\"/" /etc/mailfront/config.yaml >"$config"
chmod 0644 "$config"
test_config() {
  grep -n 'listen: ' "$config"
  ! grep -q '"0\.0\.0\.0:' "$config" && grep -q "127.0.0.1:$imaps" "$config" && grep -q "127.0.0.1:$metrics" "$config"
}
check "test config: the packaged one on 127.0.0.1 with free ports" test_config

# A unit directive's value (the last one wins, as in systemd).
directive() { sed -n "s/^$1=//p" "$UNIT" | tail -n 1; }
exec_start=$(directive ExecStart)
exec_start_pre=$(directive ExecStartPre)
kill_signal=$(directive KillSignal)
stop_timeout=$(directive TimeoutStopSec); stop_timeout=${stop_timeout%s}
nofile=$(directive LimitNOFILE)
umask_value=$(directive UMask)
# The unit's command lines, with the test config in place of the packaged one.
as_tested() { sed "s#--config /etc/mailfront/config.yaml#--config $config#" <<<"$1"; }

serving() {
  local out
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$metrics/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fsS "http://127.0.0.1:$metrics/readyz" || return 1
  out=$(openssl s_client -connect "127.0.0.1:$imaps" -brief </dev/null 2>&1)
  printf '%s\n' "$out"
  grep -q 'Protocol version: TLSv1.3' <<<"$out"
}

if [ -d /run/systemd/system ]; then
  mkdir -p /etc/systemd/system/mailfront.service.d
  cat >/etc/systemd/system/mailfront.service.d/check.conf <<EOF
# tests/deb/check.sh: the test config; removed at the end.
[Service]
ExecStartPre=
ExecStartPre=$(as_tested "$exec_start_pre")
ExecStart=
ExecStart=$(as_tested "$exec_start")
EOF
  systemctl daemon-reload
  check "systemctl start mailfront" systemctl start mailfront
  check "systemctl is-active mailfront" systemctl is-active mailfront
  check "serves TLS 1.3 on 127.0.0.1:$imaps and /readyz on $metrics" serving
  start=$SECONDS
  check "systemctl stop mailfront" systemctl stop mailfront
  check "stopped cleanly: Result=success, ExecMainStatus=0, in $((SECONDS - start))s" bash -c '
    [ "$(systemctl show -p Result --value mailfront)" = success ] && [ "$(systemctl show -p ExecMainStatus --value mailfront)" = 0 ]'
  finish
fi

echo "note  systemd is not PID 1 here ($(ps -p 1 -o comm= 2>/dev/null)): running the unit's command lines as the unit would"
# The unit's sandbox, as far as setpriv gives it: the user, no groups, no new privileges, and
# CAP_NET_BIND_SERVICE only. (ProtectSystem, PrivateTmp, the syscall filter and the rest need
# systemd itself; systemd-analyze verify checked that they parse.)
as_unit=(setpriv --reuid="$DYNAMIC_UID" --regid="$DYNAMIC_UID" --clear-groups --no-new-privs
  --inh-caps=-all,+net_bind_service --ambient-caps=+net_bind_service --bounding-set=-all,+net_bind_service)
check "unit user and capabilities can be taken (setpriv)" "${as_unit[@]}" true
[ "$failed" -eq 0 ] || finish
read -r -a pre <<<"$(as_tested "$exec_start_pre")"
read -r -a main <<<"$(as_tested "$exec_start")"
check "ExecStartPre as the unit's user: ${pre[*]}" "${as_unit[@]}" "${pre[@]}"
(
  umask "$umask_value"
  ulimit -n "$nofile" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
  exec "${as_unit[@]}" "${main[@]}"
) >"$WORK/service.log" 2>&1 &
pid=$!
check "ExecStart as the unit's user serves TLS 1.3 on 127.0.0.1:$imaps and /readyz on $metrics" serving
runs_as_dynamic_user() {
  grep -E '^(Uid|Gid|Groups|NoNewPrivs|CapEff|CapAmb|CapBnd):' "/proc/$pid/status"
  grep -Eq "^Uid:\s+$DYNAMIC_UID\s" "/proc/$pid/status" && grep -Eq '^Groups:\s*$' "/proc/$pid/status" &&
    grep -Eq '^NoNewPrivs:\s+1' "/proc/$pid/status" && grep -Eq '^CapEff:\s+0000000000000400' "/proc/$pid/status"
}
check "the process: uid $DYNAMIC_UID, no groups, NoNewPrivs, CAP_NET_BIND_SERVICE only" runs_as_dynamic_user
start=$SECONDS
kill -s "${kill_signal#SIG}" "$pid"
wait "$pid"
status=$?
pid=
took=$((SECONDS - start))
check "$kill_signal: exit status 0 within TimeoutStopSec (${stop_timeout}s; took ${took}s)" \
  bash -c '[ "$0" = 0 ] && [ "$1" -lt "$2" ]' "$status" "$took" "$stop_timeout"
check "the log says it stopped" grep -q "stopped" "$WORK/service.log"
[ "$failed" -eq 0 ] || { echo "      service log:"; sed 's/^/      | /' "$WORK/service.log" | tail -n 20; }
finish
