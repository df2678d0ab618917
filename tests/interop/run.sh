#!/usr/bin/env bash
# mailfront interop suite: real Dovecot and Postfix behind mailfront, real clients in front.
#
#   tests/interop/run.sh [--keep] [--backend-only] [--routing-only] [--no-install] [--no-testssl]
#
#   --keep          leave Dovecot, Postfix and mailfront running and print how to reach them
#   --backend-only  start Dovecot and Postfix and check them directly (no mailfront needed)
#   --routing-only  the backend checks and the routing-by-user section (route-*) only
#   --no-install    never call apt-get (fail if a tool is missing)
#   --no-testssl    skip the testssl.sh cases (they take most of the run time)
#
# Environment: MAILFRONT_BIN (default target/release/mailfront, then target/debug/mailfront,
# else `cargo build --release`), INTEROP_DIR (use this directory instead of a fresh mktemp one).
#
# Needs root (Postfix refuses to start otherwise) and a Debian-like system. Touches no system
# service: every daemon runs from its own configuration in the temp dir, on 127.0.0.1 high ports.
# Output: one `PASS name` / `FAIL name: reason` line per case, then `N passed, N failed`.

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
MFI="$HERE/mfi.py"

KEEP=0 BACKEND_ONLY=0 ROUTING_ONLY=0 INSTALL=1 TESTSSL=1
for arg in "$@"; do
    case "$arg" in
        --keep) KEEP=1 ;;
        --backend-only) BACKEND_ONLY=1 ;;
        --routing-only) ROUTING_ONLY=1 ;;
        --no-install) INSTALL=0 ;;
        --no-testssl) TESTSSL=0 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

log() { echo "[interop] $*" >&2; }
die() { echo "[interop] fatal: $*" >&2; exit 2; }

PASSED=0 FAILED=0
pass() { echo "PASS $1"; PASSED=$((PASSED + 1)); }
fail() { echo "FAIL $1: $2"; FAILED=$((FAILED + 1)); }

# run_case NAME CMD...: PASS if CMD exits 0, else FAIL with the last line CMD wrote to stderr.
run_case() {
    local name=$1; shift
    local err
    if err=$("$@" 2>&1 >"$T/case-$name.out"); then
        pass "$name"
    else
        err=$(printf '%s\n' "$err" | grep -v '^\s*$' | tail -n 1)
        fail "$name" "${err:-exit status $?}"
    fi
}

[ "$(id -u)" = 0 ] || die "run as root (Postfix's master refuses to start otherwise)"

# ---------------------------------------------------------------------------------------------
# 1. packages

# libnet-ssleay-perl: swaks's TLS support (only a Recommends of swaks, so not pulled in here).
PKGS=(dovecot-imapd dovecot-pop3d postfix swaks libnet-ssleay-perl curl openssl msmtp fetchmail
      testssl.sh python3 ca-certificates prometheus haproxy redis-server)
install_packages() {
    local missing=() p
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$INSTALL" = 1 ] || die "missing packages: ${missing[*]} (and --no-install given)"
    log "installing: ${missing[*]}"
    # "No configuration": the postinst writes no /etc/postfix/main.cf and starts nothing.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    echo "postfix postfix/mailname string mx.example.test" | debconf-set-selections
    # Refuse every service start from maintainer scripts while we install (exit 101 =
    # "action forbidden"); an existing policy-rc.d is put back afterwards.
    local policy=/usr/sbin/policy-rc.d saved=""
    if [ -e "$policy" ]; then saved=$(mktemp); cp -p "$policy" "$saved"; fi
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"
    local rc=0
    apt-get update -qq || rc=$?
    if [ $rc = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "${missing[@]}" >/dev/null || rc=$?
    fi
    if [ -n "$saved" ]; then mv -f "$saved" "$policy"; else rm -f "$policy"; fi
    [ $rc = 0 ] || die "apt-get failed ($rc)"
}
install_packages
for tool in dovecot doveadm postfix postconf swaks curl openssl msmtp fetchmail python3 haproxy \
        redis-server; do
    command -v "$tool" >/dev/null || die "$tool not found after install"
done
TESTSSL_BIN=$(command -v testssl || command -v testssl.sh || true)

# ---------------------------------------------------------------------------------------------
# 2. temp dir, certificates, users

if [ -n "${INTEROP_DIR:-}" ]; then
    T=$INTEROP_DIR; mkdir -p "$T"
else
    T=$(mktemp -d /tmp/mailfront-interop.XXXXXX)
fi
# Daemons drop to dovecot/dovenull/postfix/nobody and must traverse into it.
chmod 755 "$T"
log "working directory: $T"

PIDS_TO_KILL=()
cleanup() {
    local rc=$?
    if [ "$KEEP" = 1 ]; then return; fi
    [ -n "${MF_PID:-}" ] && kill "$MF_PID" 2>/dev/null && wait "$MF_PID" 2>/dev/null
    [ -f "$T/postfix/etc/main.cf" ] && postfix -c "$T/postfix/etc" stop >/dev/null 2>&1
    [ -f "$T/dovecot/dovecot.conf" ] && doveadm -c "$T/dovecot/dovecot.conf" stop >/dev/null 2>&1
    stop_route_dovecots
    local pid
    for pid in "${PIDS_TO_KILL[@]}"; do kill "$pid" 2>/dev/null; done
    # Give the masters a moment to take their children down, then remove the directory.
    sleep 0.5
    if [ -z "${INTEROP_DIR:-}" ] && [ "${INTEROP_KEEP_DIR:-0}" != 1 ]; then
        rm -rf "$T"
    fi
    return $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

USER_NAME=user@example.test
USER_PASS="interop-$(head -c 9 /dev/urandom | base64 | tr '+/' 'xy')"
# A second, equally valid account used only for cleartext attempts before STARTTLS: if its name
# or password ever shows up in a backend log, mailfront forwarded cleartext credentials.
LEAK_USER=cleartext@example.test
LEAK_PASS="leak-$(head -c 9 /dev/urandom | base64 | tr '+/' 'xy')"
# The adversarial corpus (corpus.py) gives every case its own victim account, all in the passdb
# below: mallory-victim-NNN@example.test with password vpNNN-$ADV_SECRET.
ADV_SECRET="$(head -c 6 /dev/urandom | base64 | tr '+/' 'xy')"
# The routing section (6c): route1..route12 are spread by user_affinity; mapa, mapb and the
# maps.example.test ones are placed by user_map files. One password for all of them.
ROUTE_USERS=()
for i in $(seq 1 12); do ROUTE_USERS+=("route$i@example.test"); done
ROUTE_USERS+=(mapa@example.test mapb@example.test dora@maps.example.test erin@maps.example.test)
ROUTE_PASS="route-$(head -c 9 /dev/urandom | base64 | tr '+/' 'xy')"
CORPUS="$HERE/corpus.py"
HOSTNAME_MF=mx.example.test
MAILDIR="$T/mail/example.test/user"
MAIL_UID=65534 MAIL_GID=65534   # nobody:nogroup owns the mailboxes (neither daemon allows root)

mkdir -p "$T/tls" "$T/mail" "$T/dovecot" "$T/postfix/etc" "$T/postfix/spool" "$T/postfix/data"
chown "$MAIL_UID:$MAIL_GID" "$T/mail"
chown postfix: "$T/postfix/data"

make_certs() {
    local d=$T/tls
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -sha256 -subj "/CN=mailfront interop CA" \
        -keyout "$d/ca.key" -out "$d/ca.crt" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        >/dev/null 2>&1 || return 1
    openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=$HOSTNAME_MF" \
        -keyout "$d/server.key" -out "$d/server.csr" >/dev/null 2>&1 || return 1
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth" \
        "subjectAltName=DNS:localhost,DNS:$HOSTNAME_MF,IP:127.0.0.1" >"$d/server.ext"
    openssl x509 -req -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
        -days 2 -sha256 -extfile "$d/server.ext" -out "$d/server-leaf.crt" >/dev/null 2>&1 || return 1
    # `cert` holds the full chain, leaf first (config.yaml.example).
    cat "$d/server-leaf.crt" "$d/ca.crt" >"$d/server.crt"
    chmod 644 "$d"/*.crt "$d/ca.key" "$d/server.key"
}
make_certs || die "openssl could not make the test certificates"
CA="$T/tls/ca.crt"

read -r P_DOVECOT_IMAP P_DOVECOT_POP3 P_POSTFIX \
        P_SMTPS P_SUBMISSION P_IMAPS P_POP3S P_IMAP P_POP3 P_METRICS \
        P_DOVECOT_IMAP_PP P_POSTFIX_PP P_IMAPS_PP P_SMTPS_PP \
        P_HAPROXY_SMTPS P_HAPROXY_IMAPS P_SMTPS_LB P_IMAPS_LB \
        P_POSTFIX_XC P_SMTPS_XC P_IMAPS_XC P_POP3S_XC \
        P_POSTFIX_HX P_SMTPS_HX P_SUBMISSION_HX P_SMTPS_HP P_POSTFIX_HN P_SMTPS_HN \
        P_IMAPS_TH P_POP3S_TH P_METRICS_TH \
        P_REDIS P_IMAPS_SA P_METRICS_SA P_IMAPS_SB P_METRICS_SB \
        P_IMAPS_SC P_METRICS_SC P_IMAPS_SD P_METRICS_SD \
        P_DOVECOT_RA_IMAP P_DOVECOT_RA_POP3 P_DOVECOT_RB_IMAP P_DOVECOT_RB_POP3 \
        P_POSTFIX_RA P_POSTFIX_RB \
        P_RT_IMAPS_AFF P_RT_IMAP_AFF P_RT_IMAPS_MAP P_RT_POP3S_MAP P_RT_SMTPS_MAP \
        P_RT_IMAPS_DIRECT P_RT_POP3S_DIRECT P_RT_SMTPS_DIRECT \
        P_RT_IMAPS_LAZY P_RT_POP3S_LAZY P_RT_SMTPS_LAZY P_RT_SUBMISSION_LAZY P_RT_IMAPS_UNROUTED \
        P_RT_METRICS P_RT_IMAPS_FAILOVER \
        < <(python3 "$MFI" freeports 61)
# *_PP: backend ports that require a PROXY protocol v2 header, and the mailfront listeners with
# backend_proxy_protocol: true in front of them. The client cases connect from 127.0.0.2 so the
# backends' records can tell the client's address from mailfront's (127.0.0.1).
PP_CLIENT=127.0.0.2
# *_LB: mailfront listeners with proxy_protocol_from, behind a real HAProxy (P_HAPROXY_*, TCP
# mode, send-proxy-v2) that connects from 127.0.0.1. *_XC: mailfront listeners with
# backend_client_info: Postfix P_POSTFIX_XC trusts XCLIENT from 127.0.0.0/8
# (smtpd_authorized_xclient_hosts), Dovecot trusts ID and XCLIENT through login_trusted_networks.
# *_HX / *_HP: the SMTP hostile section (smtp_hostile.py). P_POSTFIX_HX is a Postfix smtpd that
# trusts mailfront's 127.0.0.1 (mynetworks, XCLIENT) and relays for it; mailfront's
# submissions-hx (465) and submission-hx (587) listeners have backend_client_info in front of it,
# submissions-hp (465) has not. P_POSTFIX_HN trusts mailfront for relaying but not for XCLIENT
# (so its EHLO offers none), with submissions-hn (465, backend_client_info) in front.
# *_TH: a second mailfront with limits.auth_failures_per_ip: 3 (the throttle cases), so the main
# one keeps its defaults. P_REDIS: a redis-server for shared_state; *_SA, *_SB: two more mailfronts
# like *_TH (imaps only) sharing their counts through it, *_SC, *_SD: two that do not (each its
# own key_prefix), the shared-state cases' control.
# *_RA / *_RB and P_RT_*: the routing-by-user section (6c, routing.py): two more Dovecot instances
# (route-a, route-b) serving the same Maildir tree and passwd file, two more Postfix smtpd
# services (syslog names postfix-interop/route-a and /route-b), and a mailfront whose listeners
# choose among them by the login name (user_affinity, user_map).

# ---------------------------------------------------------------------------------------------
# 3. Dovecot

DOVECOT_LOG="$T/dovecot.log"
DOVECOT_CONF="$T/dovecot/dovecot.conf"
DOVECOT_AUTH_SOCKET="$T/dovecot/auth-postfix"   # Postfix smtpd's SASL socket

write_dovecot_conf() {
    local version major_minor
    version=$(dovecot --version | awk '{print $1}')
    major_minor=$(echo "$version" | cut -d. -f1,2)
    # passwd-file: user:{PLAIN}password — test credentials, readable by the auth process.
    printf '%s:{PLAIN}%s\n%s:{PLAIN}%s\n' "$USER_NAME" "$USER_PASS" "$LEAK_USER" "$LEAK_PASS" \
        >"$T/dovecot/passwd"
    python3 "$CORPUS" accounts --secret "$ADV_SECRET" >>"$T/dovecot/passwd" || return 1
    # The routing section's accounts (6c), in every Dovecot instance's passdb.
    local u
    for u in "${ROUTE_USERS[@]}"; do printf '%s:{PLAIN}%s\n' "$u" "$ROUTE_PASS"; done \
        >>"$T/dovecot/passwd"
    chmod 644 "$T/dovecot/passwd"
    mkdir -p "$T/dovecot/run" "$T/dovecot/state"
    if [ "$(printf '%s\n2.4\n' "$major_minor" | sort -V | head -n1)" = "2.4" ]; then
        # Dovecot 2.4 syntax. NOT exercised on Debian bookworm (2.3); written from the 2.4
        # upgrade notes. imap_id_log is gone in 2.4: the ID is an `imap_id_received` debug event.
        cat >"$DOVECOT_CONF" <<EOF
dovecot_config_version = 2.4.0
dovecot_storage_version = 2.4.0
base_dir = $T/dovecot/run
state_dir = $T/dovecot/state
instance_name = mailfront-interop
log_path = $DOVECOT_LOG
protocols = imap pop3
listen = 127.0.0.1
ssl = no
auth_allow_cleartext = yes
auth_mechanisms = plain login
auth_debug_passwords = yes
log_debug = event=imap_id_received OR category=auth
login_trusted_networks = 127.0.0.0/8
default_internal_user = dovecot
default_login_user = dovenull
mail_driver = maildir
mail_path = $T/mail/%{user|domain}/%{user|username}
first_valid_uid = 1
passdb passwd-file {
  passwd_file_path = $T/dovecot/passwd
}
userdb static {
  fields {
    uid = $MAIL_UID
    gid = $MAIL_GID
    home = $T/mail/%{user|domain}/%{user|username}
  }
}
EOF
    else
        # Dovecot 2.3 (Debian bookworm).
        cat >"$DOVECOT_CONF" <<EOF
base_dir = $T/dovecot/run
state_dir = $T/dovecot/state
instance_name = mailfront-interop
log_path = $DOVECOT_LOG
protocols = imap pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
# Log every password the auth process sees: the cleartext-leak check greps for LEAK_PASS.
auth_debug = yes
auth_debug_passwords = yes
imap_id_log = *
login_trusted_networks = 127.0.0.0/8
default_internal_user = dovecot
default_login_user = dovenull
mail_location = maildir:$T/mail/%d/%n
first_valid_uid = 1
passdb {
  driver = passwd-file
  args = $T/dovecot/passwd
}
userdb {
  driver = static
  args = uid=$MAIL_UID gid=$MAIL_GID home=$T/mail/%d/%n
}
EOF
    fi
    cat >>"$DOVECOT_CONF" <<EOF
# The PROXY protocol listener below accepts headers only from here (mailfront).
haproxy_trusted_networks = 127.0.0.0/8
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $P_DOVECOT_IMAP
  }
  inet_listener imap_haproxy {
    address = 127.0.0.1
    port = $P_DOVECOT_IMAP_PP
    haproxy = yes
  }
  inet_listener imaps {
    port = 0
  }
}
service pop3-login {
  inet_listener pop3 {
    address = 127.0.0.1
    port = $P_DOVECOT_POP3
  }
  inet_listener pop3s {
    port = 0
  }
}
service auth {
  unix_listener $DOVECOT_AUTH_SOCKET {
    mode = 0666
  }
}
EOF
}

start_dovecot() {
    write_dovecot_conf
    dovecot -c "$DOVECOT_CONF" 2>"$T/dovecot.start.err" || {
        cat "$T/dovecot.start.err" >&2; return 1; }
    python3 "$MFI" waitport --timeout 20 "$P_DOVECOT_IMAP" "$P_DOVECOT_POP3" "$P_DOVECOT_IMAP_PP" ||
        return 1
    local _
    for _ in $(seq 1 100); do [ -S "$DOVECOT_AUTH_SOCKET" ] && return 0; sleep 0.1; done
    echo "no auth socket at $DOVECOT_AUTH_SOCKET" >&2
    return 1
}

# ---------------------------------------------------------------------------------------------
# 4. Postfix: a private instance (own config, queue and data directories, log file)

POSTFIX_CONF="$T/postfix/etc"
POSTFIX_LOG="$T/postfix.log"

write_postfix_conf() {
    local daemon_dir meta_dir shlib_dir
    daemon_dir=$(postconf -dh daemon_directory)
    meta_dir=$(postconf -dh meta_directory)
    shlib_dir=$(postconf -dh shlib_directory)
    cat >"$POSTFIX_CONF/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $T/postfix/spool
data_directory = $T/postfix/data
command_directory = $(postconf -dh command_directory)
daemon_directory = $daemon_dir
meta_directory = $meta_dir
shlib_directory = $shlib_dir
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-interop
maillog_file = $POSTFIX_LOG
maillog_file_prefixes = $T
myhostname = backend.example.test
mydomain = example.test
myorigin = \$myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_transport = error:local delivery is disabled
relayhost =
default_transport = error:outbound mail is disabled in the interop suite
smtp_dns_support_level = disabled
biff = no
append_dot_mydomain = no
# Delivery: every example.test mailbox is a Maildir under $T/mail, which Dovecot reads too.
virtual_mailbox_domains = example.test
virtual_mailbox_base = $T/mail
virtual_mailbox_maps = texthash:$POSTFIX_CONF/vmailbox
virtual_uid_maps = static:$MAIL_UID
virtual_gid_maps = static:$MAIL_GID
virtual_minimum_uid = 1
# AUTH through the Dovecot instance; cleartext allowed (mailfront terminates TLS in front).
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = $DOVECOT_AUTH_SOCKET
smtpd_sasl_security_options = noanonymous
smtpd_tls_security_level = none
smtpd_tls_auth_only = no
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
# Log the whole SMTP dialogue of loopback clients: the cleartext-leak check greps this log for
# the AUTH line and the password.
debug_peer_list = 127.0.0.1
debug_peer_level = 2
# The hostile section's "remote" domain: not local, not virtual, so relaying to it takes
# permit_mynetworks or SASL; what is relayed lands in a Maildir (virtual(8) delivers any address
# in virtual_mailbox_maps, whatever its domain) where smtp_hostile.py reads it.
transport_maps = texthash:$POSTFIX_CONF/transport
EOF
    printf '%s example.test/user/\n%s example.test/cleartext/\n' "$USER_NAME" "$LEAK_USER" \
        >"$POSTFIX_CONF/vmailbox"
    printf '%s\n' "hostile@example.test example.test/hostile/" \
        "victim@remote.example.net remote/victim/" >>"$POSTFIX_CONF/vmailbox"
    printf 'remote.example.net virtual:\n' >"$POSTFIX_CONF/transport"
    cat >"$POSTFIX_CONF/master.cf" <<EOF
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:$P_POSTFIX inet n   -       n       -       -       smtpd
127.0.0.1:$P_POSTFIX_PP inet n -      n       -       -       smtpd
  -o smtpd_upstream_proxy_protocol=haproxy
127.0.0.1:$P_POSTFIX_XC inet n -      n       -       -       smtpd
  -o smtpd_authorized_xclient_hosts=127.0.0.0/8
# The hostile section's attack surface: mailfront (127.0.0.1) is trusted for relaying and
# XCLIENT, and every command of mailfront and of the test client (127.0.0.2) is logged.
127.0.0.1:$P_POSTFIX_HX inet n -      n       -       -       smtpd
  -o syslog_name=postfix-interop/hostile
  -o mynetworks=127.0.0.1/32
  -o smtpd_authorized_xclient_hosts=127.0.0.1
  -o debug_peer_list=127.0.0.1,127.0.0.2
  -o smtpd_relay_restrictions=permit_mynetworks,permit_sasl_authenticated,reject_unauth_destination
  -o smtpd_recipient_restrictions=
# The same, but mailfront is not allowed XCLIENT: its EHLO reply does not offer it.
127.0.0.1:$P_POSTFIX_HN inet n -      n       -       -       smtpd
  -o syslog_name=postfix-interop/hostile
  -o mynetworks=127.0.0.1/32
  -o smtpd_authorized_xclient_hosts=
  -o debug_peer_list=127.0.0.1,127.0.0.2
  -o smtpd_relay_restrictions=permit_mynetworks,permit_sasl_authenticated,reject_unauth_destination
  -o smtpd_recipient_restrictions=
# The routing section's two submission backends, told apart by their syslog names, each
# authenticating through its own routing Dovecot (6c), whose mechanisms its EHLO then offers.
127.0.0.1:$P_POSTFIX_RA inet n -      n       -       -       smtpd
  -o syslog_name=postfix-interop/route-a
  -o smtpd_sasl_path=$RT_DIR/dovecot-route-a/auth-postfix
127.0.0.1:$P_POSTFIX_RB inet n -      n       -       -       smtpd
  -o syslog_name=postfix-interop/route-b
  -o smtpd_sasl_path=$RT_DIR/dovecot-route-b/auth-postfix
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
}

start_postfix() {
    write_postfix_conf
    # `postfix start` runs post-install to create the queue directories with the right owners.
    postfix -c "$POSTFIX_CONF" start >"$T/postfix.start.out" 2>&1 || {
        cat "$T/postfix.start.out" >&2; return 1; }
    # Not P_POSTFIX_RA/RB: their smtpd exits without its routing Dovecot's auth socket (6c
    # starts it later), and master then throttles the service for a minute.
    python3 "$MFI" waitport --timeout 20 "$P_POSTFIX" "$P_POSTFIX_PP" "$P_POSTFIX_XC" \
        "$P_POSTFIX_HX" "$P_POSTFIX_HN"
}

# ---------------------------------------------------------------------------------------------
# 5. mailfront

MF_CONF="$T/mailfront.yaml"
MF_LOG="$T/mailfront.log"

find_mailfront() {
    if [ -n "${MAILFRONT_BIN:-}" ]; then
        [ -x "$MAILFRONT_BIN" ] || die "MAILFRONT_BIN=$MAILFRONT_BIN is not executable"
        echo "$MAILFRONT_BIN"; return
    fi
    local b
    for b in "$REPO/target/release/mailfront" "$REPO/target/debug/mailfront"; do
        [ -x "$b" ] && { echo "$b"; return; }
    done
    command -v cargo >/dev/null || die "no mailfront binary and no cargo to build one"
    log "building mailfront (cargo build --release)"
    (cd "$REPO" && cargo build --release --quiet) >&2 || die "cargo build --release failed"
    echo "$REPO/target/release/mailfront"
}

write_mailfront_conf() {
    cat >"$MF_CONF" <<EOF
# Written by tests/interop/run.sh; the format is config.yaml.example.
hostname: $HOSTNAME_MF

tls:
  certificates:
    - cert: $T/tls/server.crt
      key: $T/tls/server.key
  min_version: "1.2"
  handshake_timeout: 10s
  reload_interval: 5s

listeners:
  - name: submissions
    protocol: smtp
    listen: "127.0.0.1:$P_SMTPS"
    tls: implicit
    backend: "127.0.0.1:$P_POSTFIX"
  - name: submission
    protocol: smtp
    listen: "127.0.0.1:$P_SUBMISSION"
    tls: starttls
    backend: "127.0.0.1:$P_POSTFIX"
    require_tls_for_mail: true
  - name: imaps
    protocol: imap
    listen: "127.0.0.1:$P_IMAPS"
    tls: implicit
    backend: "127.0.0.1:$P_DOVECOT_IMAP"
  - name: imap
    protocol: imap
    listen: "127.0.0.1:$P_IMAP"
    tls: starttls
    backend: "127.0.0.1:$P_DOVECOT_IMAP"
  - name: pop3s
    protocol: pop3
    listen: "127.0.0.1:$P_POP3S"
    tls: implicit
    backend: "127.0.0.1:$P_DOVECOT_POP3"
  - name: pop3
    protocol: pop3
    listen: "127.0.0.1:$P_POP3"
    tls: starttls
    backend: "127.0.0.1:$P_DOVECOT_POP3"
  - name: imaps-pp
    protocol: imap
    listen: "127.0.0.1:$P_IMAPS_PP"
    tls: implicit
    backend: "127.0.0.1:$P_DOVECOT_IMAP_PP"
    backend_proxy_protocol: true
  - name: submissions-pp
    protocol: smtp
    listen: "127.0.0.1:$P_SMTPS_PP"
    tls: implicit
    backend: "127.0.0.1:$P_POSTFIX_PP"
    backend_proxy_protocol: true
  # Behind HAProxy (send-proxy-v2 from 127.0.0.1): the header's source is the client.
  - name: submissions-lb
    protocol: smtp
    listen: "127.0.0.1:$P_SMTPS_LB"
    tls: implicit
    backend: "127.0.0.1:$P_POSTFIX"
    proxy_protocol_from: ["127.0.0.1"]
  - name: imaps-lb
    protocol: imap
    listen: "127.0.0.1:$P_IMAPS_LB"
    tls: implicit
    backend: "127.0.0.1:$P_DOVECOT_IMAP"
    proxy_protocol_from: ["127.0.0.1"]
    backend_client_info: true
  # The client's address told in the backend's own protocol (XCLIENT, ID).
  - name: submissions-xc
    protocol: smtp
    listen: "127.0.0.1:$P_SMTPS_XC"
    tls: implicit
    backend: "127.0.0.1:$P_POSTFIX_XC"
    backend_client_info: true
  - name: imaps-xc
    protocol: imap
    listen: "127.0.0.1:$P_IMAPS_XC"
    tls: implicit
    backend: "127.0.0.1:$P_DOVECOT_IMAP"
    backend_client_info: true
  - name: pop3s-xc
    protocol: pop3
    listen: "127.0.0.1:$P_POP3S_XC"
    tls: implicit
    backend: "127.0.0.1:$P_DOVECOT_POP3"
    backend_client_info: true
  # The SMTP hostile section: a Postfix that trusts mailfront's address (smtp_hostile.py).
  - name: submissions-hx
    protocol: smtp
    listen: "127.0.0.1:$P_SMTPS_HX"
    tls: implicit
    backend: "127.0.0.1:$P_POSTFIX_HX"
    backend_client_info: true
  - name: submission-hx
    protocol: smtp
    listen: "127.0.0.1:$P_SUBMISSION_HX"
    tls: starttls
    backend: "127.0.0.1:$P_POSTFIX_HX"
    backend_client_info: true
  - name: submissions-hp
    protocol: smtp
    listen: "127.0.0.1:$P_SMTPS_HP"
    tls: implicit
    backend: "127.0.0.1:$P_POSTFIX_HX"
  - name: submissions-hn
    protocol: smtp
    listen: "127.0.0.1:$P_SMTPS_HN"
    tls: implicit
    backend: "127.0.0.1:$P_POSTFIX_HN"
    backend_client_info: true

metrics:
  listen: "127.0.0.1:$P_METRICS"

log:
  format: text
  level: debug

timeouts:
  backend_connect: 10s
  idle: 5m
  data_reply: 10m
  shutdown_grace: 2s
EOF
}

start_mailfront() {
    MF_BIN=$(find_mailfront)
    write_mailfront_conf
    log "mailfront: $MF_BIN --config $MF_CONF"
    "$MF_BIN" --config "$MF_CONF" >"$MF_LOG" 2>&1 &
    MF_PID=$!
    if ! python3 "$MFI" waitport --timeout 30 \
            "$P_SMTPS" "$P_SUBMISSION" "$P_IMAPS" "$P_IMAP" "$P_POP3S" "$P_POP3" \
            "$P_IMAPS_PP" "$P_SMTPS_PP" "$P_SMTPS_LB" "$P_IMAPS_LB" "$P_SMTPS_XC" "$P_IMAPS_XC" \
            "$P_POP3S_XC" "$P_SMTPS_HX" "$P_SUBMISSION_HX" "$P_SMTPS_HP" "$P_SMTPS_HN" 2>"$T/mf.wait.err"; then
        echo "$(cat "$T/mf.wait.err"); mailfront log tail: $(tail -n 5 "$MF_LOG" | tr '\n' ' ')" >&2
        return 1
    fi
    kill -0 "$MF_PID" 2>/dev/null || { echo "mailfront exited: $(tail -n 5 "$MF_LOG")" >&2; return 1; }
}

# A second mailfront for the auth throttle cases: limits.auth_failures_per_ip is per process and
# per client address, so the limit of 3 lives here, and each case connects from its own loopback
# address. backend_client_info tells Dovecot that address (ID, XCLIENT): its own auth penalty for
# the wrong passwords then falls on it, not on 127.0.0.1, which every other case shares.
MF_TH_CONF="$T/mailfront-throttle.yaml"
MF_TH_LOG="$T/mailfront-throttle.log"
# limited_conf METRICS_PORT: what every mailfront with the auth limit shares (the listeners and
# shared_state are appended by the caller).
limited_conf() {
    cat <<EOF
hostname: $HOSTNAME_MF
tls:
  certificates:
    - cert: $T/tls/server.crt
      key: $T/tls/server.key
metrics:
  listen: "127.0.0.1:$1"
log:
  format: text
  level: debug
limits:
  connections_per_ip: 0
  auth_failures_per_ip: 3
  auth_failure_window: 10m
EOF
}

start_throttle_mailfront() {
    { limited_conf "$P_METRICS_TH"; cat <<EOF
listeners:
  - name: imaps-throttle
    protocol: imap
    listen: "127.0.0.1:$P_IMAPS_TH"
    tls: implicit
    backend: "127.0.0.1:$P_DOVECOT_IMAP"
    backend_client_info: true
  - name: pop3s-throttle
    protocol: pop3
    listen: "127.0.0.1:$P_POP3S_TH"
    tls: implicit
    backend: "127.0.0.1:$P_DOVECOT_POP3"
    backend_client_info: true
EOF
    } >"$MF_TH_CONF"
    "$MF_BIN" --config "$MF_TH_CONF" >"$MF_TH_LOG" 2>&1 &
    MF_TH_PID=$!
    PIDS_TO_KILL+=("$MF_TH_PID")
    python3 "$MFI" waitport --timeout 30 "$P_IMAPS_TH" "$P_POP3S_TH"
}

# case_auth_throttle PROTO PORT MODE SOURCE: 10 wrong passwords for an unknown user (MODE
# hangup: each on its own session, closed 1.5 s later, before Dovecot's 2 s auth_failure_delay
# answers; concurrent: all at once on 10 greeted sessions), from SOURCE. With the limit at 3,
# Dovecot's auth process may see at most 3 of them: the charge is taken when a login is sent,
# and a client that hangs up before the verdict keeps it. The figures go to case-<name>.out.
case_auth_throttle() {
    local user="throttle-$1-$3-$$@example.test" prefix="wrong-$1-$3-$$"
    python3 "$MFI" auth-attempts --proto "$1" --port "$2" --cafile "$CA" --sni "$HOSTNAME_MF" \
        --source "$4" --mode "$3" --user "$user" --password-prefix "$prefix" --attempts 10 &&
    python3 "$MFI" auth-checked --log "$DOVECOT_LOG" --user "$user" --password-prefix "$prefix" \
        --attempts 10 --max 3
}

# Shared state (README "Running several replicas"): a redis-server, and mailfronts like the
# throttle one (imaps only) in front of the same Dovecot. shared-a and shared-b name the same
# server and key_prefix, so they count one budget of 3 per client address; shared-c and shared-d
# name the same server with a key_prefix each, so each counts its own (the control).
REDIS_LOG="$T/redis.log"
MF_SS_PIDS=()
start_redis() {
    redis-server --port "$P_REDIS" --bind 127.0.0.1 --save '' --appendonly no --dir "$T" \
        >"$REDIS_LOG" 2>&1 &
    REDIS_PID=$!
    PIDS_TO_KILL+=("$REDIS_PID")
    python3 "$MFI" waitport --timeout 10 "$P_REDIS" ||
        { echo "redis-server did not start: $(tail -n 3 "$REDIS_LOG" | tr '\n' ' ')" >&2; return 1; }
}

# start_shared_mailfront NAME IMAPS_PORT METRICS_PORT KEY_PREFIX
start_shared_mailfront() {
    { limited_conf "$3"; cat <<EOF
listeners:
  - name: imaps-$1
    protocol: imap
    listen: "127.0.0.1:$2"
    tls: implicit
    backend: "127.0.0.1:$P_DOVECOT_IMAP"
    backend_client_info: true
shared_state:
  redis: "redis://127.0.0.1:$P_REDIS/0"
  key_prefix: "$4"
EOF
    } >"$T/mailfront-$1.yaml"
    "$MF_BIN" --config "$T/mailfront-$1.yaml" >"$T/mailfront-$1.log" 2>&1 &
    MF_SS_PIDS+=("$!")
    PIDS_TO_KILL+=("$!")
}

# shared_state_up METRICS_PORT...: every one's mailfront_shared_state_up reads 1.
shared_state_up() {
    local port
    for port in "$@"; do
        curl -sS --max-time 5 "http://127.0.0.1:$port/metrics" >"$T/metrics-ss-$port.txt" ||
            { echo "metrics on $port did not answer" >&2; return 1; }
        grep -qx 'mailfront_shared_state_up 1' "$T/metrics-ss-$port.txt" || {
            echo "metrics on $port: $(grep '^mailfront_shared_state_up' "$T/metrics-ss-$port.txt" ||
                echo 'no mailfront_shared_state_up')" >&2
            return 1
        }
    done
}

# Every replica must have reached the store before the cases: until then each counts alone
# (fail-open), and the shared case would measure nothing.
start_shared_state_fixture() {
    start_redis || return 1
    start_shared_mailfront shared-a "$P_IMAPS_SA" "$P_METRICS_SA" interop
    start_shared_mailfront shared-b "$P_IMAPS_SB" "$P_METRICS_SB" interop
    start_shared_mailfront shared-c "$P_IMAPS_SC" "$P_METRICS_SC" interop-c
    start_shared_mailfront shared-d "$P_IMAPS_SD" "$P_METRICS_SD" interop-d
    python3 "$MFI" waitport --timeout 30 "$P_IMAPS_SA" "$P_IMAPS_SB" "$P_IMAPS_SC" "$P_IMAPS_SD" \
        "$P_METRICS_SA" "$P_METRICS_SB" "$P_METRICS_SC" "$P_METRICS_SD" || return 1
    local i
    for i in $(seq 50); do
        shared_state_up "$P_METRICS_SA" "$P_METRICS_SB" "$P_METRICS_SC" "$P_METRICS_SD" \
            2>/dev/null && return 0
        sleep 0.2
    done
    shared_state_up "$P_METRICS_SA" "$P_METRICS_SB" "$P_METRICS_SC" "$P_METRICS_SD"
}

# case_shared_failures PORT_A PORT_B SOURCE MIN MAX [refused]: 10 wrong passwords for an unknown
# user from SOURCE, sent at once on 10 greeted sessions, alternating between the two replicas
# (5 each); Dovecot must have checked between MIN and MAX of them. With `refused`, one more
# session on each replica must then get `a NO [UNAVAILABLE]` at once, and Dovecot never see it.
case_shared_failures() {
    local user="shared-$3-$$@example.test" prefix="wrong-shared-$3-$$"
    python3 "$MFI" auth-attempts --proto imap --port "$1" --also-port "$2" --cafile "$CA" \
        --sni "$HOSTNAME_MF" --source "$3" --mode concurrent --user "$user" \
        --password-prefix "$prefix" --attempts 10 &&
    python3 "$MFI" auth-checked --log "$DOVECOT_LOG" --user "$user" --password-prefix "$prefix" \
        --attempts 10 --min "$4" --max "$5" || return 1
    [ "${6:-}" = refused ] || return 0
    python3 "$MFI" auth-refused --proto imap --port "$1" --also-port "$2" --cafile "$CA" \
        --sni "$HOSTNAME_MF" --source "$3" --user "$user" --password-prefix "$prefix-after" &&
    python3 "$MFI" auth-checked --log "$DOVECOT_LOG" --user "$user" \
        --password-prefix "$prefix-after" --attempts 2 --min 0 --max 0
}

run_shared_state_cases() {
    if start_shared_state_fixture 2>"$T/shared-state.start.err"; then
        run_case shared-state-imap-failures-across-two-replicas \
            case_shared_failures "$P_IMAPS_SA" "$P_IMAPS_SB" 127.0.0.15 1 3 refused
        run_case shared-state-control-separate-prefixes-count-alone \
            case_shared_failures "$P_IMAPS_SC" "$P_IMAPS_SD" 127.0.0.16 4 6
        run_case shared-state-metric-up shared_state_up "$P_METRICS_SA" "$P_METRICS_SB"
    else
        fail shared-state-fixture "$(tail -n 1 "$T/shared-state.start.err")"
    fi
}

# HAProxy from Debian in TCP mode in front of the *_LB listeners, as a load balancer would be.
HAPROXY_CONF="$T/haproxy.cfg"
start_haproxy() {
    cat >"$HAPROXY_CONF" <<EOF
global
  maxconn 200
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend smtps
  bind 127.0.0.1:$P_HAPROXY_SMTPS
  default_backend mailfront_smtps
frontend imaps
  bind 127.0.0.1:$P_HAPROXY_IMAPS
  default_backend mailfront_imaps
backend mailfront_smtps
  server mf 127.0.0.1:$P_SMTPS_LB send-proxy-v2
backend mailfront_imaps
  server mf 127.0.0.1:$P_IMAPS_LB send-proxy-v2
EOF
    haproxy -c -f "$HAPROXY_CONF" >"$T/haproxy.check" 2>&1 || { cat "$T/haproxy.check" >&2; return 1; }
    haproxy -db -f "$HAPROXY_CONF" >"$T/haproxy.log" 2>&1 &
    HAPROXY_PID=$!
    PIDS_TO_KILL+=("$HAPROXY_PID")
    python3 "$MFI" waitport --timeout 20 "$P_HAPROXY_SMTPS" "$P_HAPROXY_IMAPS"
}

# ---------------------------------------------------------------------------------------------
# 6. cases

subject() { echo "interop-$1-$$-$(date +%s%N)"; }

# check_received SUBJECT EXPECT_TLS [EXPECT_GROUP]
check_received() {
    local args=(check-received --maildir "$MAILDIR" --subject "$1" --hostname "$HOSTNAME_MF"
                --expect-tls "$2" --expect-with ESMTPSA)
    [ -n "${3:-}" ] && args+=(--expect-group "$3")
    python3 "$MFI" "${args[@]}"
}

# --- backend fixtures, checked directly in cleartext ----------------------------------------

case_backend_smtp() {
    local s; s=$(subject backend-smtp)
    python3 "$MFI" smtp-submit --mode plain --port "$P_POSTFIX" --user "$USER_NAME" \
        --password "$USER_PASS" --sender "$USER_NAME" --rcpt "$USER_NAME" --subject "$s" >/dev/null &&
    python3 - "$MAILDIR" "$s" <<'PY'
import sys, time, os
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(os.environ["MFI"])))
import mfi
data = mfi.find_message(sys.argv[1], sys.argv[2], 20)
rec = [v for n, v, _ in mfi.header_fields(data) if n.lower() == "received"]
if not rec or "(Postfix)" not in rec[0] or "ESMTPA" not in rec[0]:
    sys.exit(f"unexpected Received fields: {rec}")
PY
}

case_backend_smtp_needs_auth() {
    # Without AUTH, Postfix must refuse the recipient (submission semantics for the fixture).
    if python3 "$MFI" smtp-submit --mode plain --port "$P_POSTFIX" --sender "$USER_NAME" \
            --rcpt "$USER_NAME" --subject "$(subject backend-noauth)" >/dev/null 2>&1; then
        echo "Postfix accepted mail without AUTH" >&2; return 1
    fi
}

case_backend_imap() {
    python3 "$MFI" imap-fetch --mode plain --port "$P_DOVECOT_IMAP" --user "$USER_NAME" \
        --password "$USER_PASS" --id-name backend-direct-$$ --min-messages 1 >/dev/null &&
    python3 - "$DOVECOT_LOG" "backend-direct-$$" <<'PY'
import sys, time
deadline = time.time() + 10
while time.time() < deadline:
    for line in open(sys.argv[1], errors="replace"):
        if "ID sent:" in line and f"name={sys.argv[2]}" in line and "tls=forged-by-client" in line:
            sys.exit(0)
    time.sleep(0.2)
sys.exit("Dovecot did not log the ID fields (imap_id_log)")
PY
}

case_backend_pop3() {
    python3 "$MFI" pop3-fetch --mode plain --port "$P_DOVECOT_POP3" --user "$USER_NAME" \
        --password "$USER_PASS" --min-messages 1 >/dev/null
}

case_backend_logs_record_credentials() {
    # The leak check below is only meaningful if the backends log what they are sent: the
    # direct cleartext logins above must be visible in both logs.
    local blob quiet=""
    blob=$(printf '\0%s\0%s' "$USER_NAME" "$USER_PASS" | base64 -w0)
    grep -qF -- "$blob" "$DOVECOT_LOG" || quiet+=" Dovecot has no AUTH blob;"
    grep -qF -- "$blob" "$POSTFIX_LOG" || quiet+=" Postfix has no AUTH blob;"
    [ -z "$quiet" ] || { echo "backend logging too quiet for the leak check:$quiet" >&2; return 1; }
}

# --- SMTP through mailfront ------------------------------------------------------------------

swaks_common() {
    swaks --server 127.0.0.1 --port "$1" --from "$USER_NAME" --to "$USER_NAME" \
        --helo client.interop.test --auth PLAIN --auth-user "$USER_NAME" \
        --auth-password "$USER_PASS" --tls-ca-path "$CA" --tls-verify --tls-sni "$HOSTNAME_MF" \
        --h-Subject "$2" --body "swaks body" --timeout 20 "${@:3}"
}

case_swaks_465_tls12() {
    local s; s=$(subject swaks-465)
    local out
    out=$(swaks_common "$P_SMTPS" "$s" --tls-on-connect --tls-protocol tlsv1_2 \
            --tls-cipher ECDHE-RSA-AES128-GCM-SHA256 2>&1) ||
        { echo "swaks failed: $(echo "$out" | grep -E '^(<~\*|\*\*\*)' | tail -n 1)" >&2; return 1; }
    check_received "$s" TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
}

case_swaks_587_starttls() {
    local s; s=$(subject swaks-587)
    local out cipher
    out=$(swaks_common "$P_SUBMISSION" "$s" --tls 2>&1) ||
        { echo "swaks failed: $(echo "$out" | grep -E '^(<~\*|<\*\*|\*\*\*)' | tail -n 1)" >&2; return 1; }
    # "=== TLS started with cipher TLSv1.3:TLS_AES_256_GCM_SHA384:256"
    cipher=$(echo "$out" | sed -n 's/.*TLS started with cipher [^:]*:\([^:]*\):.*/\1/p' | head -n1)
    [ -n "$cipher" ] || { echo "swaks printed no cipher" >&2; return 1; }
    check_received "$s" "$(python3 "$MFI" iana "$cipher")"
}

case_curl_587_tls12() {
    local s; s=$(subject curl-587)
    printf 'From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\n\r\ncurl body\r\n' \
        "$USER_NAME" "$USER_NAME" "$s" >"$T/$s.eml"
    curl -sS --max-time 20 --ssl-reqd --cacert "$CA" --tls-max 1.2 \
        --ciphers ECDHE-RSA-CHACHA20-POLY1305 --curves secp384r1 \
        --connect-to "$HOSTNAME_MF:$P_SUBMISSION:127.0.0.1:$P_SUBMISSION" \
        --url "smtp://$HOSTNAME_MF:$P_SUBMISSION/client.interop.test" --user "$USER_NAME:$USER_PASS" \
        --mail-from "$USER_NAME" --mail-rcpt "$USER_NAME" --upload-file "$T/$s.eml" || return 1
    check_received "$s" TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 secp384r1
}

case_curl_465_tls13() {
    local s; s=$(subject curl-465)
    printf 'From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\n\r\ncurl body\r\n' \
        "$USER_NAME" "$USER_NAME" "$s" >"$T/$s.eml"
    curl -sS --max-time 20 --cacert "$CA" --tlsv1.3 --tls13-ciphers TLS_CHACHA20_POLY1305_SHA256 \
        --curves X25519 \
        --connect-to "$HOSTNAME_MF:$P_SMTPS:127.0.0.1:$P_SMTPS" \
        --url "smtps://$HOSTNAME_MF:$P_SMTPS/client.interop.test" --user "$USER_NAME:$USER_PASS" \
        --mail-from "$USER_NAME" --mail-rcpt "$USER_NAME" --upload-file "$T/$s.eml" || return 1
    check_received "$s" TLS_CHACHA20_POLY1305_SHA256 x25519
}

# msmtp uses GnuTLS: versions and suites are pinned with a GnuTLS priority string.
msmtp_send() { # PORT STARTTLS(on|off) PRIORITY SUBJECT
    cat >"$T/msmtprc" <<EOF
account interop
host 127.0.0.1
port $1
tls on
tls_starttls $2
tls_trust_file $CA
tls_host_override $HOSTNAME_MF
tls_priorities $3
auth plain
user $USER_NAME
password $USER_PASS
from $USER_NAME
domain client.interop.test
timeout 20
EOF
    chmod 600 "$T/msmtprc"
    printf 'From: <%s>\nTo: <%s>\nSubject: %s\n\nmsmtp body\n' "$USER_NAME" "$USER_NAME" "$4" |
        msmtp -C "$T/msmtprc" -a interop "$USER_NAME"
}

case_msmtp_465_tls13() {
    local s; s=$(subject msmtp-465)
    msmtp_send "$P_SMTPS" off "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM" "$s" || return 1
    check_received "$s" TLS_AES_128_GCM_SHA256
}

case_msmtp_587_tls12() {
    local s; s=$(subject msmtp-587)
    msmtp_send "$P_SUBMISSION" on \
        "NORMAL:-VERS-ALL:+VERS-TLS1.2:-CIPHER-ALL:+AES-256-GCM:-KX-ALL:+ECDHE-RSA" "$s" || return 1
    check_received "$s" TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
}

case_python_smtp() { # MODE PORT [--tls12 --cipher X ...]
    local mode=$1 port=$2; shift 2
    local s; s=$(subject "python-$mode")
    local cipher
    cipher=$(python3 "$MFI" smtp-submit --mode "$mode" --port "$port" --cafile "$CA" \
        --user "$USER_NAME" --password "$USER_PASS" --sender "$USER_NAME" --rcpt "$USER_NAME" \
        --subject "$s" "$@") || return 1
    check_received "$s" "$cipher"
}

case_smtp_cleartext_refused() {
    python3 "$MFI" smtp-cleartext-refused --port "$P_SUBMISSION" --user "$LEAK_USER" \
        --password "$LEAK_PASS"
}

# --- IMAP / POP3 through mailfront -----------------------------------------------------------

case_python_imap() { # MODE PORT ID_NAME [client options]
    local mode=$1 port=$2 idname=$3; shift 3
    local cipher
    cipher=$(python3 "$MFI" imap-fetch --mode "$mode" --port "$port" --cafile "$CA" \
        --user "$USER_NAME" --password "$USER_PASS" --id-name "$idname" --min-messages 1 "$@") ||
        return 1
    python3 "$MFI" imap-id-logged --log "$DOVECOT_LOG" --id-name "$idname" --expect-tls "$cipher"
}

case_python_pop3() { # MODE PORT [client options]
    local mode=$1 port=$2; shift 2
    python3 "$MFI" pop3-fetch --mode "$mode" --port "$port" --cafile "$CA" --user "$USER_NAME" \
        --password "$USER_PASS" --min-messages 1 "$@" >/dev/null
}

curl_fetch() { # URL [curl options]: fetch and require a Received field in the output
    local url=$1; shift
    local out
    out=$(curl -sS --max-time 20 --cacert "$CA" --user "$USER_NAME:$USER_PASS" \
        --connect-to "$HOSTNAME_MF::127.0.0.1:" "$@" --url "$url") || return 1
    echo "$out" | grep -qi '^Received:' || { echo "fetched message has no Received field" >&2; return 1; }
}

case_fetchmail() { # PROTO PORT SSLMODE(ssl|sslproto-starttls)
    local proto=$1 port=$2 mode=$3
    local rc=$T/fetchmailrc-$proto-$port out=$T/fetchmail-$proto-$port.mbox
    local sslopt="ssl"
    [ "$mode" = starttls ] && sslopt="sslproto tls1.2+"
    cat >"$rc" <<EOF
set no syslog
set no bouncemail
poll 127.0.0.1 with proto $proto port $port timeout 20
    user "$USER_NAME" there with password "$USER_PASS" is root here
    keep fetchall $sslopt sslcertck sslcertfile "$CA" sslcommonname "$HOSTNAME_MF"
    mda "/bin/sh -c 'cat >> $out'"
EOF
    chmod 600 "$rc"
    rm -f "$out"
    local log
    log=$(FETCHMAILHOME="$T" fetchmail -f "$rc" -N -v --pidfile "$T/fetchmail.pid" 2>&1)
    local st=$?
    if [ $st != 0 ] && [ $st != 1 ]; then  # 1 = no mail, impossible here but not an auth error
        echo "fetchmail exit $st: $(echo "$log" | grep -iE 'error|fail|denied|refused' | tail -n1)" >&2
        return 1
    fi
    grep -qi '^Received:' "$out" 2>/dev/null || { echo "fetchmail delivered nothing" >&2; return 1; }
    if [ "$mode" = starttls ]; then
        echo "$log" | grep -qiE 'STARTTLS|STLS' || { echo "fetchmail did not use STARTTLS" >&2; return 1; }
    fi
}

case_imap_cleartext_refused() {
    python3 "$MFI" imap-cleartext-refused --port "$P_IMAP" --user "$LEAK_USER" --password "$LEAK_PASS"
}

# --- PROXY protocol v2 to the backend ---------------------------------------------------------

case_imap_proxy_protocol() {
    # imaplib over implicit TLS from $PP_CLIENT with SNI: Dovecot (haproxy = yes) must log the
    # login with rip=$PP_CLIENT, i.e. the header's source, not mailfront's 127.0.0.1. The SNI
    # travels as PP2_TYPE_AUTHORITY, which Dovecot rejects unless it is a valid DNS name.
    local idname="pp993-$$" cipher
    cipher=$(python3 "$MFI" imap-fetch --mode implicit --port "$P_IMAPS_PP" --cafile "$CA" \
        --user "$USER_NAME" --password "$USER_PASS" --id-name "$idname" --min-messages 1 \
        --source "$PP_CLIENT" --sni "$HOSTNAME_MF") || return 1
    python3 "$MFI" imap-id-logged --log "$DOVECOT_LOG" --id-name "$idname" --expect-tls "$cipher" ||
        return 1
    python3 "$MFI" log-line --log "$DOVECOT_LOG" --contains "Login: user=<$USER_NAME>" \
        --contains "rip=$PP_CLIENT," || return 1
    # The auth request (auth_debug): secured=tls comes from the header's PP2_TYPE_SSL (the plain
    # listener's logins say just "secured", from login_trusted_networks), local_name from
    # PP2_TYPE_AUTHORITY, real_rip is mailfront.
    python3 "$MFI" log-line --log "$DOVECOT_LOG" --contains "service=imap" \
        --contains "secured=tls" --contains "rip=$PP_CLIENT" --contains "real_rip=127.0.0.1" \
        --contains "local_name=$HOSTNAME_MF"
}

case_smtp_proxy_protocol() {
    # smtplib SMTP_SSL from $PP_CLIENT: Postfix (smtpd_upstream_proxy_protocol = haproxy) must
    # record $PP_CLIENT as the client, in its log and in the Received field it adds.
    local s; s=$(subject pp465)
    submit_from_client "$P_SMTPS_PP" "$s" || return 1
    python3 "$MFI" received-from --maildir "$MAILDIR" --subject "$s" --addr "$PP_CLIENT" || return 1
    python3 "$MFI" log-line --log "$POSTFIX_LOG" --contains "connect from" \
        --contains "[$PP_CLIENT]"
}

# --- the real client: PROXY from a load balancer, XCLIENT and ID to the backend ---------------

# submit_from_client PORT SUBJECT: smtplib SMTP_SSL from $PP_CLIENT with SNI, and mailfront's
# Received field checked as for every submission.
submit_from_client() {
    local cipher
    cipher=$(python3 "$MFI" smtp-submit --mode implicit --port "$1" --cafile "$CA" \
        --user "$USER_NAME" --password "$USER_PASS" --sender "$USER_NAME" --rcpt "$USER_NAME" \
        --subject "$2" --source "$PP_CLIENT" --sni "$HOSTNAME_MF") || return 1
    check_received "$2" "$cipher"
}

case_haproxy_smtp() {
    # smtplib from $PP_CLIENT through HAProxy (send-proxy-v2): mailfront's Received field (the
    # second, under Postfix's) names the client, not HAProxy's 127.0.0.1.
    local s; s=$(subject lb465)
    submit_from_client "$P_HAPROXY_SMTPS" "$s" || return 1
    python3 "$MFI" received-from --maildir "$MAILDIR" --subject "$s" --addr "$PP_CLIENT" --index 1
}

# A login through mailfront's listener $1 from $PP_CLIENT: Dovecot took mailfront's x-session-id
# as its session id, so the login line that names it is this session's, and it must say
# rip=$PP_CLIENT.
dovecot_login_from_client() {
    local listener=$1 service=$2 sid
    sid=$(python3 "$MFI" mf-session-id --log "$MF_LOG" --listener "$listener" --client "$PP_CLIENT") ||
        return 1
    python3 "$MFI" log-line --log "$DOVECOT_LOG" --contains "$service-login:" \
        --contains "Login: user=<$USER_NAME>" --contains "rip=$PP_CLIENT," --contains "session=<$sid>"
}

case_haproxy_imap() {
    # imaplib from $PP_CLIENT through HAProxy into imaps-lb (backend_client_info): Dovecot logs
    # the login with rip=$PP_CLIENT, the address HAProxy's header carried.
    python3 "$MFI" imap-fetch --mode implicit --port "$P_HAPROXY_IMAPS" --cafile "$CA" \
        --user "$USER_NAME" --password "$USER_PASS" --id-name "lb993-$$" --min-messages 1 \
        --source "$PP_CLIENT" --sni "$HOSTNAME_MF" >/dev/null || return 1
    dovecot_login_from_client imaps-lb imap
}

case_postfix_xclient() {
    # Postfix with smtpd_authorized_xclient_hosts: after mailfront's XCLIENT, Postfix's own
    # Received field (the first) names the client, and its log the client's address.
    local s; s=$(subject xc465)
    submit_from_client "$P_SMTPS_XC" "$s" || return 1
    python3 "$MFI" received-from --maildir "$MAILDIR" --subject "$s" --addr "$PP_CLIENT" --index 0 ||
        return 1
    python3 "$MFI" log-line --log "$POSTFIX_LOG" --contains "client=unknown[$PP_CLIENT]"
}

case_dovecot_id() {
    # Dovecot with login_trusted_networks: the x-originating-ip in mailfront's ID is the rip.
    local idname="xc993-$$"
    python3 "$MFI" imap-fetch --mode implicit --port "$P_IMAPS_XC" --cafile "$CA" \
        --user "$USER_NAME" --password "$USER_PASS" --id-name "$idname" --min-messages 1 \
        --source "$PP_CLIENT" --sni "$HOSTNAME_MF" >/dev/null || return 1
    python3 "$MFI" log-line --log "$DOVECOT_LOG" --contains "name=$idname" \
        --contains "x-originating-ip=$PP_CLIENT" || return 1
    dovecot_login_from_client imaps-xc imap
}

case_dovecot_pop3_xclient() {
    # Dovecot's pop3-login offers XCLIENT to login_trusted_networks (its greeting's [XCLIENT]
    # code); mailfront's XCLIENT ADDR PORT before the login makes it the rip.
    python3 "$MFI" pop3-fetch --mode implicit --port "$P_POP3S_XC" --cafile "$CA" \
        --user "$USER_NAME" --password "$USER_PASS" --min-messages 1 \
        --source "$PP_CLIENT" --sni "$HOSTNAME_MF" >/dev/null || return 1
    python3 "$MFI" log-line --log "$DOVECOT_LOG" --contains "pop3-login:" \
        --contains "Login: user=<$USER_NAME>" --contains "rip=$PP_CLIENT,"
}

case_forged_proxy_header() {
    # A client's own PROXY header, on listeners without proxy_protocol_from, gains nothing: a
    # refused command line on 587, a failed handshake on 465/993 (whose backends read PROXY v2
    # from mailfront), and the forged address appears in no log.
    local forged=10.6.6.6
    python3 "$MFI" forged-proxy-header --mode starttls-smtp --port "$P_SUBMISSION" \
        --forged "$forged" >/dev/null || return 1
    python3 "$MFI" forged-proxy-header --mode implicit --port "$P_SMTPS_PP" --cafile "$CA" \
        --sni "$HOSTNAME_MF" --forged "$forged" >/dev/null || return 1
    python3 "$MFI" forged-proxy-header --mode implicit --port "$P_IMAPS_PP" --cafile "$CA" \
        --sni "$HOSTNAME_MF" --forged "$forged" >/dev/null || return 1
    sleep 1
    local f
    for f in "$DOVECOT_LOG" "$POSTFIX_LOG" "$MF_LOG"; do
        if grep -qF -- "$forged" "$f"; then
            echo "the forged address $forged shows up in $(basename "$f")" >&2
            return 1
        fi
    done
}

case_pop3_cleartext_refused() {
    python3 "$MFI" pop3-cleartext-refused --port "$P_POP3" --user "$LEAK_USER" --password "$LEAK_PASS"
}

case_cleartext_not_in_logs() {
    # Anything the cleartext cases sent must not have reached a backend. Dovecot logs every
    # password it checks (auth_debug_passwords) and Postfix logs every loopback SMTP line
    # (debug_peer_list), so a forwarded attempt would show up here.
    local blob found=""
    blob=$(printf '\0%s\0%s' "$LEAK_USER" "$LEAK_PASS" | base64 -w0)
    local f
    for f in "$DOVECOT_LOG" "$POSTFIX_LOG"; do
        [ -f "$f" ] || continue
        grep -qF -- "$LEAK_PASS" "$f" && found+=" password in $(basename "$f");"
        grep -qF -- "$LEAK_USER" "$f" && found+=" user name in $(basename "$f");"
        grep -qF -- "$blob" "$f" && found+=" AUTH PLAIN blob in $(basename "$f");"
    done
    [ -z "$found" ] || { echo "cleartext credentials reached a backend:$found" >&2; return 1; }
}

case_metrics() {
    curl -sS --max-time 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$P_METRICS/healthz" |
        grep -qx 200 || { echo "/healthz not 200" >&2; return 1; }
    curl -sS --max-time 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$P_METRICS/readyz" |
        grep -qx 200 || { echo "/readyz not 200" >&2; return 1; }
    curl -sS --max-time 5 "http://127.0.0.1:$P_METRICS/metrics" >"$T/metrics.txt" ||
        { echo "/metrics did not answer" >&2; return 1; }
    grep -q '^mailfront_tls_handshakes_total{.*version="TLSv1.3"' "$T/metrics.txt" ||
        { echo "no TLSv1.3 handshakes counted" >&2; return 1; }
    grep -q '^mailfront_tls_handshakes_total{.*version="TLSv1.2"' "$T/metrics.txt" ||
        { echo "no TLSv1.2 handshakes counted" >&2; return 1; }
}

# promtool's linter over a scrape of the proxy after every client above has used it.
case_metrics_promtool() {
    local out
    out=$(promtool check metrics <"$T/metrics.txt" 2>&1) || { echo "$out" >&2; return 1; }
    [ -z "$out" ] || { echo "$out" >&2; return 1; }
}

case_config_check() {
    "$MF_BIN" check --config "$MF_CONF"
}

# --- adversarial login corpus -----------------------------------------------------------------

# corpus.py runs every case (in parallel, each bounded to a few seconds) and prints one
# `PASS name` / `FAIL name: reason` line per case; they go through pass/fail like every other case.
# Transcripts of each exchange: $T/adv/<case>.txt.
run_corpus() {
    local out st line name n=0
    out=$(python3 "$CORPUS" run --secret "$ADV_SECRET" --cafile "$CA" --sni "$HOSTNAME_MF" \
        --imap "$P_IMAP" --imaps "$P_IMAPS" --pop3 "$P_POP3" --pop3s "$P_POP3S" \
        --submission "$P_SUBMISSION" --submissions "$P_SMTPS" \
        --dovecot-imap "$P_DOVECOT_IMAP" --dovecot-pop3 "$P_DOVECOT_POP3" --postfix "$P_POSTFIX" \
        --dovecot-log "$DOVECOT_LOG" --postfix-log "$POSTFIX_LOG" --outdir "$T/adv" \
        2>"$T/adv.err")
    st=$?
    while IFS= read -r line; do
        case "$line" in
            "PASS "*) pass "${line#PASS }"; n=$((n + 1)) ;;
            "FAIL "*) name=${line#FAIL }; fail "${name%%: *}" "${name#*: }"; n=$((n + 1)) ;;
        esac
    done <<<"$out"
    if [ "$st" != 0 ] || [ "$n" = 0 ]; then
        fail adv-corpus "corpus.py exit $st after $n cases: $(tail -n 1 "$T/adv.err")"
    fi
}

# --- SMTP hostile section: a Postfix that trusts mailfront's address --------------------------

HOSTILE="$HERE/smtp_hostile.py"

# smtp_hostile.py runs every case (in parallel) against the submissions-hx/-hp/submission-hx
# listeners and straight against P_POSTFIX_HX (the controls), judges each on Postfix's log and on
# what it delivered, and prints one `PASS name` / `FAIL name: reason` line per case.
# Transcripts (client bytes and the case's Postfix sessions): $T/hostile/<case>.txt.
run_smtp_hostile() {
    local out st line name n=0 t0=$SECONDS
    out=$(python3 "$HOSTILE" run --cafile "$CA" --sni "$HOSTNAME_MF" --hostname "$HOSTNAME_MF" \
        --hx "$P_SMTPS_HX" --hx587 "$P_SUBMISSION_HX" --hp "$P_SMTPS_HP" --hn "$P_SMTPS_HN" \
        --postfix "$P_POSTFIX_HX" \
        --user "$USER_NAME" --password "$USER_PASS" --postfix-log "$POSTFIX_LOG" \
        --mail-base "$T/mail" --outdir "$T/hostile" 2>"$T/hostile.err")
    st=$?
    while IFS= read -r line; do
        case "$line" in
            "PASS "*) pass "${line#PASS }"; n=$((n + 1)) ;;
            "FAIL "*) name=${line#FAIL }; fail "${name%%: *}" "${name#*: }"; n=$((n + 1)) ;;
        esac
    done <<<"$out"
    if [ "$st" != 0 ] || [ "$n" = 0 ]; then
        fail smtp-hostile "smtp_hostile.py exit $st after $n cases: $(tail -n 1 "$T/hostile.err")"
    fi
    log "smtp hostile section: $n cases in $((SECONDS - t0)) s"
}

# A normal submission with swaks from 127.0.0.2 through submissions-hx: delivered with mailfront's
# Received field as usual, and Postfix (which trusts mailfront) saw the client's address.
case_swaks_hostile_465() {
    local s out
    s=$(subject swaks-hx465)
    out=$(swaks_common "$P_SMTPS_HX" "$s" --tls-on-connect --local-interface "$PP_CLIENT" \
            --to hostile@example.test 2>&1) ||
        { echo "swaks failed: $(echo "$out" | grep -E '^(<~\*|\*\*\*)' | tail -n 1)" >&2; return 1; }
    local cipher
    cipher=$(echo "$out" | sed -n 's/.*TLS started with cipher [^:]*:\([^:]*\):.*/\1/p' | head -n1)
    [ -n "$cipher" ] || { echo "swaks printed no cipher" >&2; return 1; }
    python3 "$MFI" check-received --maildir "$T/mail/example.test/hostile" --subject "$s" \
        --hostname "$HOSTNAME_MF" --expect-tls "$(python3 "$MFI" iana "$cipher")" \
        --expect-with ESMTPSA >/dev/null || return 1
    python3 "$MFI" log-line --log "$POSTFIX_LOG" --contains "postfix-interop/hostile/smtpd" \
        --contains "client=" --contains "[$PP_CLIENT]" --contains "sasl_username=$USER_NAME" >/dev/null
}

# --- testssl.sh ------------------------------------------------------------------------------

run_testssl() { # NAME PORT [--starttls smtp|imap|pop3]
    local name=$1 port=$2; shift 2
    # -p protocols, -s standard cipher categories, -f forward secrecy, -E every suite per
    # protocol (to prove each one is forward secret). About 30-60 s per port; they run in parallel.
    timeout 300 "$TESTSSL_BIN" --quiet --color 0 --warnings off --sneaky \
        --connect-timeout 5 --openssl-timeout 10 -p -s -f -E \
        --jsonfile "$T/testssl-$name.json" "$@" "127.0.0.1:$port" >"$T/testssl-$name.txt" 2>&1
}

# ---------------------------------------------------------------------------------------------
# 6b. TLS to the backend (listeners[].backend_tls, issue 14): a second Dovecot that serves only
# implicit TLS (ssl = required, imaps on its own port) and a second mailfront in front of it, so
# these cases neither change nor depend on the instances above.

BT_DIR="$T/backend-tls"
BT_DOVECOT_CONF="$BT_DIR/dovecot.conf"
BT_DOVECOT_LOG="$T/dovecot-tls.log"
BT_MF_LOG="$T/mailfront-backend-tls.log"

start_backend_tls_fixture() {
    read -r P_BT_DOVECOT P_BT_GOOD P_BT_WRONG P_BT_METRICS < <(python3 "$MFI" freeports 4)
    mkdir -p "$BT_DIR/run" "$BT_DIR/state"
    # A CA that signed nothing here: verifying Dovecot's certificate against it must fail.
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -sha256 -subj "/CN=wrong interop CA" \
        -keyout "$BT_DIR/wrong-ca.key" -out "$BT_DIR/wrong-ca.crt" \
        -addext "basicConstraints=critical,CA:TRUE" >/dev/null 2>&1 || return 1
    local version dh=""
    version=$(dovecot --version | awk '{print $1}')
    if [ "$(printf '%s\n2.4\n' "$(echo "$version" | cut -d. -f1,2)" | sort -V | head -n1)" = "2.4" ]; then
        echo "Dovecot $version: this fixture is written for 2.3" >&2; return 1
    fi
    [ -f /usr/share/dovecot/dh.pem ] && dh="ssl_dh = </usr/share/dovecot/dh.pem"
    cat >"$BT_DOVECOT_CONF" <<BTCONF
base_dir = $BT_DIR/run
state_dir = $BT_DIR/state
instance_name = mailfront-interop-tls
log_path = $BT_DOVECOT_LOG
protocols = imap
listen = 127.0.0.1
ssl = required
ssl_cert = <$T/tls/server.crt
ssl_key = <$T/tls/server.key
$dh
disable_plaintext_auth = yes
auth_mechanisms = plain login
default_internal_user = dovecot
default_login_user = dovenull
mail_location = maildir:$T/mail/%d/%n
first_valid_uid = 1
passdb {
  driver = passwd-file
  args = $T/dovecot/passwd
}
userdb {
  driver = static
  args = uid=$MAIL_UID gid=$MAIL_GID home=$T/mail/%d/%n
}
service imap-login {
  inet_listener imap {
    port = 0
  }
  inet_listener imaps {
    address = 127.0.0.1
    port = $P_BT_DOVECOT
    ssl = yes
  }
}
BTCONF
    dovecot -c "$BT_DOVECOT_CONF" 2>"$BT_DIR/dovecot.start.err" || {
        cat "$BT_DIR/dovecot.start.err" >&2; return 1; }
    [ -f "$BT_DIR/run/master.pid" ] && PIDS_TO_KILL+=("$(cat "$BT_DIR/run/master.pid")")
    python3 "$MFI" waitport --timeout 20 "$P_BT_DOVECOT" || return 1
    # "good": verified against the interop CA; the name checked is the backend's host as
    # written, 127.0.0.1, against the certificate's IP SAN. "wrong": another CA.
    cat >"$BT_DIR/mailfront.yaml" <<BTCONF
hostname: $HOSTNAME_MF
tls:
  certificates:
    - cert: $T/tls/server.crt
      key: $T/tls/server.key
listeners:
  - name: imaps-tls-backend
    protocol: imap
    listen: "127.0.0.1:$P_BT_GOOD"
    tls: implicit
    backend: ["127.0.0.1:$P_BT_DOVECOT"]
    backend_tls:
      mode: implicit
      ca: $CA
  - name: imaps-wrong-ca
    protocol: imap
    listen: "127.0.0.1:$P_BT_WRONG"
    tls: implicit
    backend: "127.0.0.1:$P_BT_DOVECOT"
    backend_tls:
      mode: implicit
      ca: $BT_DIR/wrong-ca.crt
      server_name: localhost
metrics:
  listen: "127.0.0.1:$P_BT_METRICS"
log:
  level: debug
timeouts:
  shutdown_grace: 1s
BTCONF
    "$MF_BIN" --config "$BT_DIR/mailfront.yaml" >"$BT_MF_LOG" 2>&1 &
    BT_MF_PID=$!
    PIDS_TO_KILL+=("$BT_MF_PID")
    python3 "$MFI" waitport --timeout 30 "$P_BT_GOOD" "$P_BT_WRONG"
}

stop_backend_tls_fixture() {
    [ -n "${BT_MF_PID:-}" ] && kill "$BT_MF_PID" 2>/dev/null
    doveadm -c "$BT_DOVECOT_CONF" stop >/dev/null 2>&1
}

# imaplib logs in and fetches through mailfront; Dovecot records a TLS login, which with
# ssl = required and no login_trusted_networks it accepts only over TLS.
case_backend_tls_imap_login() {
    python3 "$MFI" imap-fetch --mode implicit --port "$P_BT_GOOD" --sni "$HOSTNAME_MF" \
        --cafile "$CA" --user "$USER_NAME" --password "$USER_PASS" --min-messages 0 >/dev/null &&
    python3 "$MFI" log-line --log "$BT_DOVECOT_LOG" --contains "Login: user=<$USER_NAME>" \
        --contains "TLS" >/dev/null
}

# A wrong ca: the client gets IMAP's temporary failure, mailfront logs the backend's failure.
case_backend_tls_wrong_ca() {
    python3 - "$P_BT_WRONG" "$CA" "$HOSTNAME_MF" <<'PY' || return 1
import socket, ssl, sys
port, ca, name = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
    with ctx.wrap_socket(raw, server_hostname=name) as s:
        data = b""
        while b"\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
if not data.startswith(b"* BYE [UNAVAILABLE]"):
    sys.exit(f"expected * BYE [UNAVAILABLE], got {data!r}")
PY
    python3 "$MFI" log-line --log "$BT_MF_LOG" --contains "backend failed" \
        --contains "imaps-wrong-ca" --contains "invalid peer certificate" >/dev/null
}

run_backend_tls_cases() {
    if start_backend_tls_fixture 2>"$T/backend-tls.start.err"; then
        run_case backend-tls-dovecot-ssl-required-imaplib-login case_backend_tls_imap_login
        run_case backend-tls-wrong-ca-temporary-failure-and-log case_backend_tls_wrong_ca
    else
        fail backend-tls-fixture "$(tail -n 1 "$T/backend-tls.start.err")"
    fi
    stop_backend_tls_fixture
}

# ---------------------------------------------------------------------------------------------
# 6c. The backend chosen by the user who logs in (listeners[].user_affinity, user_map; issue 22).
# Two more Dovecot instances, route-a and route-b, serve the same Maildir tree from the same
# passwd file, as Dovecot backends on shared storage do; each has its own base_dir, log file and
# greeting, so its log says who logged in where. They offer CRAM-MD5 and DIGEST-MD5 (which a
# routed listener must hide: the user is named only after the backend's challenge) and
# SCRAM-SHA-256 (which it may keep). A mailfront of its own (routing/mailfront-routing.yaml)
# fronts them and Postfix's route-a/route-b smtpd services; routing.py runs the cases.

RT_DIR="$T/routing"
RT_MF_CONF="$RT_DIR/mailfront-routing.yaml"
RT_MF_LOG="$T/mailfront-routing.log"
RT_DOVECOT_A_LOG="$T/dovecot-route-a.log"
RT_DOVECOT_B_LOG="$T/dovecot-route-b.log"
ROUTING="$HERE/routing.py"

# start_route_dovecot NAME IMAP_PORT POP3_PORT LOG
start_route_dovecot() {
    local d="$RT_DIR/dovecot-$1"
    mkdir -p "$d/run" "$d/state"
    cat >"$d/dovecot.conf" <<RTCONF
base_dir = $d/run
state_dir = $d/state
instance_name = mailfront-interop-$1
log_path = $4
login_greeting = Dovecot $1 ready.
protocols = imap pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login cram-md5 digest-md5 scram-sha-256
default_internal_user = dovecot
default_login_user = dovenull
mail_location = maildir:$T/mail/%d/%n
first_valid_uid = 1
passdb {
  driver = passwd-file
  args = $T/dovecot/passwd
}
userdb {
  driver = static
  args = uid=$MAIL_UID gid=$MAIL_GID home=$T/mail/%d/%n
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $2
  }
  inet_listener imaps {
    port = 0
  }
}
service pop3-login {
  inet_listener pop3 {
    address = 127.0.0.1
    port = $3
  }
  inet_listener pop3s {
    port = 0
  }
}
service auth {
  unix_listener $d/auth-postfix {
    mode = 0666
  }
}
RTCONF
    dovecot -c "$d/dovecot.conf" 2>"$d/dovecot.start.err" || { cat "$d/dovecot.start.err" >&2; return 1; }
    python3 "$MFI" waitport --timeout 20 "$2" "$3"
}

stop_route_dovecots() {
    local n
    for n in route-a route-b; do
        [ -f "$RT_DIR/dovecot-$n/dovecot.conf" ] &&
            doveadm -c "$RT_DIR/dovecot-$n/dovecot.conf" stop >/dev/null 2>&1
    done
}

# write_route_map FILE NAME=ADDR...: a user_map file (src/routing/user_map.rs), one entry a line.
write_route_map() {
    local f=$1 kv; shift
    : >"$f"
    for kv in "$@"; do printf '"%s": "%s"\n' "${kv%%=*}" "${kv#*=}" >>"$f"; done
}

# The maps: mapa and erin@maps.example.test (an exact name, which wins over its domain) to
# route-a; mapb and the rest of maps.example.test to route-b; everyone else gets the listener's
# own backend, route-a. The reload case rewrites the IMAP map.
write_route_maps() {
    local a=127.0.0.1:$P_DOVECOT_RA_IMAP b=127.0.0.1:$P_DOVECOT_RB_IMAP
    write_route_map "$RT_DIR/map-imap.yaml" "mapa@example.test=$a" "mapb@example.test=$b" \
        "@maps.example.test=$b" "erin@maps.example.test=$a"
    write_route_map "$RT_DIR/map-pop3.yaml" "mapa@example.test=127.0.0.1:$P_DOVECOT_RA_POP3" \
        "mapb@example.test=127.0.0.1:$P_DOVECOT_RB_POP3"
    write_route_map "$RT_DIR/map-smtp.yaml" "mapa@example.test=127.0.0.1:$P_POSTFIX_RA" \
        "mapb@example.test=127.0.0.1:$P_POSTFIX_RB"
}

# rt_listener NAME PROTOCOL PORT TLS BACKEND [LINE...]: one listener of the routing mailfront.
rt_listener() {
    printf '  - name: %s\n    protocol: %s\n    listen: "127.0.0.1:%s"\n    tls: %s\n    backend: %s\n' \
        "$1" "$2" "$3" "$4" "$5"
    shift 5
    local line
    for line in "$@"; do printf '    %s\n' "$line"; done
}

write_route_mailfront_conf() {
    local ia="\"127.0.0.1:$P_DOVECOT_RA_IMAP\"" ib="\"127.0.0.1:$P_DOVECOT_RB_IMAP\""
    local pa="\"127.0.0.1:$P_DOVECOT_RA_POP3\"" pb="\"127.0.0.1:$P_DOVECOT_RB_POP3\""
    local sa="\"127.0.0.1:$P_POSTFIX_RA\"" sb="\"127.0.0.1:$P_POSTFIX_RB\""
    {
        cat <<RTCONF
# Written by tests/interop/run.sh (6c): listeners that choose the backend by the login name.
hostname: $HOSTNAME_MF
tls:
  certificates:
    - cert: $T/tls/server.crt
      key: $T/tls/server.key
  # user_map files are re-read on the certificates' schedule: the reload case waits for it.
  reload_interval: 1s
metrics:
  listen: "127.0.0.1:$P_RT_METRICS"
log:
  format: text
  level: debug
timeouts:
  shutdown_grace: 1s
listeners:
RTCONF
        # Affinity over both instances, implicit TLS and STARTTLS: the same backend list, so the
        # same order for a user on both.
        rt_listener imaps-affinity imap "$P_RT_IMAPS_AFF" implicit "[$ia, $ib]" "user_affinity: true"
        rt_listener imap-affinity imap "$P_RT_IMAP_AFF" starttls "[$ia, $ib]" "user_affinity: true"
        # Maps (relative to this file), route-a the listener's own backend: the unmapped users'.
        rt_listener imaps-map imap "$P_RT_IMAPS_MAP" implicit "$ia" "user_map: map-imap.yaml"
        rt_listener pop3s-map pop3 "$P_RT_POP3S_MAP" implicit "$pa" "user_map: map-pop3.yaml"
        rt_listener submissions-map smtp "$P_RT_SMTPS_MAP" implicit "$sa" "user_map: map-smtp.yaml"
        # The same backends without routing: what mailfront shows of them before login when it
        # does not route (the capability cases compare).
        rt_listener imaps-direct imap "$P_RT_IMAPS_DIRECT" implicit "$ia"
        rt_listener pop3s-direct pop3 "$P_RT_POP3S_DIRECT" implicit "$pa"
        rt_listener submissions-direct smtp "$P_RT_SMTPS_DIRECT" implicit "$sa"
        # Used only by the lazy-connect cases, so the backend connections they count are theirs.
        rt_listener imaps-lazy imap "$P_RT_IMAPS_LAZY" implicit "[$ia, $ib]" "user_affinity: true"
        rt_listener pop3s-lazy pop3 "$P_RT_POP3S_LAZY" implicit "[$pa, $pb]" "user_affinity: true"
        rt_listener submissions-lazy smtp "$P_RT_SMTPS_LAZY" implicit "[$sa, $sb]" \
            "user_affinity: true"
        rt_listener submission-lazy smtp "$P_RT_SUBMISSION_LAZY" starttls "[$sa, $sb]" \
            "user_affinity: true"
        rt_listener imaps-unrouted-lazy imap "$P_RT_IMAPS_UNROUTED" implicit "$ib"
        # The failover case stops and restarts an instance. Passive health only: active checks
        # would add connections the lazy cases count.
        rt_listener imaps-failover imap "$P_RT_IMAPS_FAILOVER" implicit "[$ia, $ib]" \
            "user_affinity: true"
    } >"$RT_MF_CONF"
}

start_routing_fixture() {
    mkdir -p "$RT_DIR"
    start_route_dovecot route-a "$P_DOVECOT_RA_IMAP" "$P_DOVECOT_RA_POP3" "$RT_DOVECOT_A_LOG" ||
        return 1
    start_route_dovecot route-b "$P_DOVECOT_RB_IMAP" "$P_DOVECOT_RB_POP3" "$RT_DOVECOT_B_LOG" ||
        return 1
    write_route_maps
    write_route_mailfront_conf
    "$MF_BIN" --config "$RT_MF_CONF" >"$RT_MF_LOG" 2>&1 &
    RT_MF_PID=$!
    PIDS_TO_KILL+=("$RT_MF_PID")
    # Metrics first: a TCP connect to a listener is a session, which the lazy cases would count.
    if ! python3 "$MFI" waitport --timeout 30 "$P_RT_METRICS" 2>"$RT_DIR/wait.err"; then
        echo "$(cat "$RT_DIR/wait.err"); mailfront-routing log tail: $(tail -n 3 "$RT_MF_LOG" | tr '\n' ' ')" >&2
        return 1
    fi
    kill -0 "$RT_MF_PID" 2>/dev/null ||
        { echo "mailfront-routing exited: $(tail -n 3 "$RT_MF_LOG" | tr '\n' ' ')" >&2; return 1; }
}

# routing.py runs every case and prints one `PASS name` / `FAIL name: reason` line per case;
# what each case saw (sessions, log lines, capability lists) goes to $T/routing/<case>.txt.
run_routing_cases() {
    if ! start_routing_fixture 2>"$T/routing.start.err"; then
        fail route-fixture "$(tail -n 1 "$T/routing.start.err")"
        stop_route_dovecots
        return
    fi
    run_case route-mailfront-config-check "$MF_BIN" check --config "$RT_MF_CONF"
    local out st line name n=0 t0=$SECONDS
    out=$(python3 "$ROUTING" run --cafile "$CA" --sni "$HOSTNAME_MF" --password "$ROUTE_PASS" \
        --dovecot-a-log "$RT_DOVECOT_A_LOG" --dovecot-b-log "$RT_DOVECOT_B_LOG" \
        --postfix-log "$POSTFIX_LOG" --mailfront-log "$RT_MF_LOG" --mailfront-pid "$RT_MF_PID" \
        --metrics "$P_RT_METRICS" --map-imap "$RT_DIR/map-imap.yaml" \
        --dovecot-a "$P_DOVECOT_RA_IMAP" "$P_DOVECOT_RA_POP3" \
        --dovecot-b "$P_DOVECOT_RB_IMAP" "$P_DOVECOT_RB_POP3" \
        --postfix-a "$P_POSTFIX_RA" --postfix-b "$P_POSTFIX_RB" \
        --imaps-affinity "$P_RT_IMAPS_AFF" --imap-affinity "$P_RT_IMAP_AFF" \
        --imaps-map "$P_RT_IMAPS_MAP" --pop3s-map "$P_RT_POP3S_MAP" \
        --submissions-map "$P_RT_SMTPS_MAP" --imaps-direct "$P_RT_IMAPS_DIRECT" \
        --pop3s-direct "$P_RT_POP3S_DIRECT" --submissions-direct "$P_RT_SMTPS_DIRECT" \
        --imaps-lazy "$P_RT_IMAPS_LAZY" --pop3s-lazy "$P_RT_POP3S_LAZY" \
        --submissions-lazy "$P_RT_SMTPS_LAZY" --submission-lazy "$P_RT_SUBMISSION_LAZY" \
        --imaps-unrouted-lazy "$P_RT_IMAPS_UNROUTED" --imaps-failover "$P_RT_IMAPS_FAILOVER" \
        --dovecot-a-conf "$RT_DIR/dovecot-route-a/dovecot.conf" \
        --dovecot-b-conf "$RT_DIR/dovecot-route-b/dovecot.conf" --rcpt "$USER_NAME" \
        --outdir "$RT_DIR" 2>"$T/routing.err")
    st=$?
    while IFS= read -r line; do
        case "$line" in
            "PASS "*) pass "${line#PASS }"; n=$((n + 1)) ;;
            "FAIL "*) name=${line#FAIL }; fail "${name%%: *}" "${name#*: }"; n=$((n + 1)) ;;
        esac
    done <<<"$out"
    if [ "$st" != 0 ] || [ "$n" = 0 ]; then
        fail route-cases "routing.py exit $st after $n cases: $(tail -n 1 "$T/routing.err")"
    fi
    if kill -0 "$RT_MF_PID" 2>/dev/null; then
        pass route-mailfront-still-running
    else
        fail route-mailfront-still-running "exited: $(tail -n 3 "$RT_MF_LOG" | tr '\n' ' ')"
    fi
    log "routing section: $n cases in $((SECONDS - t0)) s"
    if [ "$KEEP" != 1 ]; then
        kill "$RT_MF_PID" 2>/dev/null
        stop_route_dovecots
    fi
}

# ---------------------------------------------------------------------------------------------
# 7. run

export MFI

start_dovecot || die "Dovecot did not start (log: $(tail -n 5 "$DOVECOT_LOG" 2>/dev/null))"
start_postfix || die "Postfix did not start (log: $(tail -n 5 "$POSTFIX_LOG" 2>/dev/null))"
log "Dovecot imap 127.0.0.1:$P_DOVECOT_IMAP pop3 127.0.0.1:$P_DOVECOT_POP3; Postfix 127.0.0.1:$P_POSTFIX"

run_case backend-postfix-auth-and-delivery case_backend_smtp
run_case backend-postfix-requires-auth case_backend_smtp_needs_auth
run_case backend-dovecot-imap-login-and-id-log case_backend_imap
run_case backend-dovecot-pop3-login case_backend_pop3
run_case backend-logs-record-credentials case_backend_logs_record_credentials

if [ "$ROUTING_ONLY" = 1 ]; then
    MF_BIN=$(find_mailfront)
    run_routing_cases
elif [ "$BACKEND_ONLY" = 0 ]; then
    if start_mailfront 2>"$T/mf.start.err"; then
        pass mailfront-starts
        run_case mailfront-config-check case_config_check

        # testssl.sh runs in the background while the client cases go on (2 cores, mostly
        # waiting on handshakes).
        TESTSSL_PIDS=()
        if [ "$TESTSSL" = 1 ] && [ -n "$TESTSSL_BIN" ]; then
            run_testssl smtps "$P_SMTPS" & TESTSSL_PIDS+=("smtps:$!")
            run_testssl imaps "$P_IMAPS" & TESTSSL_PIDS+=("imaps:$!")
            run_testssl pop3s "$P_POP3S" & TESTSSL_PIDS+=("pop3s:$!")
            run_testssl submission "$P_SUBMISSION" --starttls smtp & TESTSSL_PIDS+=("submission:$!")
            for p in "${TESTSSL_PIDS[@]}"; do PIDS_TO_KILL+=("${p#*:}"); done
        fi

        # SMTP first: the IMAP/POP3 cases read these messages.
        run_case smtp-swaks-465-tls12 case_swaks_465_tls12
        run_case smtp-swaks-587-starttls case_swaks_587_starttls
        run_case smtp-curl-587-starttls-tls12 case_curl_587_tls12
        run_case smtp-curl-465-tls13 case_curl_465_tls13
        run_case smtp-msmtp-465-tls13 case_msmtp_465_tls13
        run_case smtp-msmtp-587-starttls-tls12 case_msmtp_587_tls12
        run_case smtp-python-465 case_python_smtp implicit "$P_SMTPS"
        run_case smtp-python-587-starttls case_python_smtp starttls "$P_SUBMISSION"
        run_case smtp-python-587-starttls-tls12 case_python_smtp starttls "$P_SUBMISSION" \
            --tls12 --cipher ECDHE-RSA-AES256-GCM-SHA384
        run_case smtp-587-cleartext-auth-refused case_smtp_cleartext_refused

        run_case imap-python-993 case_python_imap implicit "$P_IMAPS" "py993-$$"
        run_case imap-python-143-starttls case_python_imap starttls "$P_IMAP" "py143-$$"
        run_case imap-python-993-tls12 case_python_imap implicit "$P_IMAPS" "py993t12-$$" \
            --tls12 --cipher ECDHE-RSA-CHACHA20-POLY1305
        run_case pop3-python-995 case_python_pop3 implicit "$P_POP3S"
        run_case pop3-python-110-stls case_python_pop3 starttls "$P_POP3"
        run_case imap-curl-993 curl_fetch "imaps://$HOSTNAME_MF:$P_IMAPS/INBOX;MAILINDEX=1"
        run_case imap-curl-143-starttls curl_fetch "imap://$HOSTNAME_MF:$P_IMAP/INBOX;MAILINDEX=1" --ssl-reqd
        run_case pop3-curl-995 curl_fetch "pop3s://$HOSTNAME_MF:$P_POP3S/1"
        run_case pop3-curl-110-stls curl_fetch "pop3://$HOSTNAME_MF:$P_POP3/1" --ssl-reqd
        run_case imap-fetchmail-993 case_fetchmail imap "$P_IMAPS" ssl
        run_case pop3-fetchmail-110-stls case_fetchmail pop3 "$P_POP3" starttls
        run_case imap-proxy-protocol-993-dovecot-sees-client case_imap_proxy_protocol
        run_case smtp-proxy-protocol-465-postfix-sees-client case_smtp_proxy_protocol
        run_case client-own-proxy-header-gains-nothing case_forged_proxy_header
        run_case smtp-xclient-465-postfix-sees-client case_postfix_xclient
        run_case imap-id-993-dovecot-sees-client case_dovecot_id
        run_case pop3-xclient-995-dovecot-sees-client case_dovecot_pop3_xclient
        if start_haproxy 2>"$T/haproxy.start.err"; then
            run_case smtp-haproxy-send-proxy-v2-received-names-client case_haproxy_smtp
            run_case imap-haproxy-send-proxy-v2-dovecot-sees-client case_haproxy_imap
        else
            fail haproxy-starts "$(tail -n 1 "$T/haproxy.start.err")"
        fi
        run_case imap-143-cleartext-login-refused case_imap_cleartext_refused
        run_case pop3-110-cleartext-auth-refused case_pop3_cleartext_refused
        run_case cleartext-credentials-never-reach-backend-logs case_cleartext_not_in_logs
        run_case metrics-endpoints case_metrics
        run_case metrics-promtool-check case_metrics_promtool
        run_corpus
        run_case smtp-hostile-swaks-465-xclient-submission case_swaks_hostile_465
        run_smtp_hostile
        run_backend_tls_cases
        run_routing_cases
        # Last: the wrong passwords below count against Dovecot's own auth penalty too.
        if start_throttle_mailfront 2>"$T/mf-throttle.start.err"; then
            run_case auth-throttle-imap-hangup-before-verdict \
                case_auth_throttle imap "$P_IMAPS_TH" hangup 127.0.0.11
            run_case auth-throttle-imap-concurrent \
                case_auth_throttle imap "$P_IMAPS_TH" concurrent 127.0.0.12
            run_case auth-throttle-pop3-hangup-before-verdict \
                case_auth_throttle pop3 "$P_POP3S_TH" hangup 127.0.0.13
            run_case auth-throttle-pop3-concurrent \
                case_auth_throttle pop3 "$P_POP3S_TH" concurrent 127.0.0.14
        else
            fail auth-throttle-mailfront-starts "$(tail -n 1 "$T/mf-throttle.start.err")"
        fi
        # After the throttle cases, for the same reason: Dovecot's penalty on 127.0.0.15 and .16.
        run_shared_state_cases

        for p in "${TESTSSL_PIDS[@]}"; do
            name=${p%%:*} pid=${p#*:}
            if wait "$pid"; then :; else
                st=$?
                # testssl exits with the number of findings it considers problems; judge the JSON.
                [ "$st" -ge 124 ] && { fail "testssl-$name" "timed out or killed ($st)"; continue; }
            fi
            if [ -s "$T/testssl-$name.json" ]; then
                run_case "testssl-$name" python3 "$MFI" testssl-summary --require-cipher-list \
                    "$T/testssl-$name.json"
            else
                fail "testssl-$name" "no JSON report ($(tail -n 2 "$T/testssl-$name.txt" | tr '\n' ' '))"
            fi
        done
        [ "$TESTSSL" = 1 ] && [ -z "$TESTSSL_BIN" ] && fail testssl "testssl not installed"

        if kill -0 "$MF_PID" 2>/dev/null; then
            pass mailfront-still-running
        else
            fail mailfront-still-running "mailfront exited: $(tail -n 3 "$MF_LOG" | tr '\n' ' ')"
        fi
    else
        fail mailfront-starts "$(tail -n 1 "$T/mf.start.err")"
    fi
fi

echo "$PASSED passed, $FAILED failed"

if [ "$KEEP" = 1 ]; then
    cat <<EOF

Left running (working directory $T; stop with: kill ${MF_PID:-<none>} ${MF_TH_PID:-} ${MF_SS_PIDS[*]} ${REDIS_PID:-} ${HAPROXY_PID:-}; postfix -c $POSTFIX_CONF stop; doveadm -c $DOVECOT_CONF stop)
  user $USER_NAME  password $USER_PASS  CA $CA
  Dovecot log $DOVECOT_LOG   Postfix log $POSTFIX_LOG   mailfront log $MF_LOG
  Maildir $MAILDIR
  backends: Dovecot imap 127.0.0.1:$P_DOVECOT_IMAP pop3 127.0.0.1:$P_DOVECOT_POP3, Postfix smtp 127.0.0.1:$P_POSTFIX
EOF
    if [ "$BACKEND_ONLY" = 0 ]; then
        cat <<EOF
  mailfront: submissions $P_SMTPS, submission $P_SUBMISSION, imaps $P_IMAPS, imap $P_IMAP, pop3s $P_POP3S, pop3 $P_POP3, metrics $P_METRICS
  with PROXY v2 to the backend: imaps-pp $P_IMAPS_PP (Dovecot haproxy $P_DOVECOT_IMAP_PP), submissions-pp $P_SMTPS_PP (Postfix haproxy $P_POSTFIX_PP)

  swaks --server 127.0.0.1 --port $P_SMTPS --tls-on-connect --auth PLAIN --auth-user $USER_NAME --auth-password '$USER_PASS' --to $USER_NAME --tls-ca-path $CA --tls-verify --tls-sni $HOSTNAME_MF
  swaks --server 127.0.0.1 --port $P_SUBMISSION --tls --auth PLAIN --auth-user $USER_NAME --auth-password '$USER_PASS' --to $USER_NAME --tls-ca-path $CA
  curl --cacert $CA --connect-to $HOSTNAME_MF::127.0.0.1: --user '$USER_NAME:$USER_PASS' 'imaps://$HOSTNAME_MF:$P_IMAPS/INBOX;MAILINDEX=1'
  curl --cacert $CA --connect-to $HOSTNAME_MF::127.0.0.1: --user '$USER_NAME:$USER_PASS' pop3s://$HOSTNAME_MF:$P_POP3S/1
  openssl s_client -connect 127.0.0.1:$P_IMAPS -servername $HOSTNAME_MF -CAfile $CA -crlf
  openssl s_client -connect 127.0.0.1:$P_SUBMISSION -starttls smtp -servername $HOSTNAME_MF -CAfile $CA -crlf
  openssl s_client -connect 127.0.0.1:$P_IMAP -starttls imap -CAfile $CA -crlf
  openssl s_client -connect 127.0.0.1:$P_POP3 -starttls pop3 -CAfile $CA -crlf
EOF
    else
        cat <<EOF

  swaks --server 127.0.0.1 --port $P_POSTFIX --auth PLAIN --auth-user $USER_NAME --auth-password '$USER_PASS' --to $USER_NAME
  curl --user '$USER_NAME:$USER_PASS' 'imap://127.0.0.1:$P_DOVECOT_IMAP/INBOX;MAILINDEX=1'
  curl --user '$USER_NAME:$USER_PASS' pop3://127.0.0.1:$P_DOVECOT_POP3/1
EOF
    fi
    if [ -n "${RT_MF_PID:-}" ]; then
        cat <<EOF

Routing by user (6c; stop with: kill $RT_MF_PID; doveadm -c $RT_DIR/dovecot-route-a/dovecot.conf stop; doveadm -c $RT_DIR/dovecot-route-b/dovecot.conf stop)
  users ${ROUTE_USERS[*]}  password $ROUTE_PASS
  Dovecot route-a imap $P_DOVECOT_RA_IMAP pop3 $P_DOVECOT_RA_POP3 (log $RT_DOVECOT_A_LOG), route-b imap $P_DOVECOT_RB_IMAP pop3 $P_DOVECOT_RB_POP3 (log $RT_DOVECOT_B_LOG)
  Postfix route-a $P_POSTFIX_RA, route-b $P_POSTFIX_RB (syslog names postfix-interop/route-a, /route-b in $POSTFIX_LOG)
  mailfront ($RT_MF_CONF, log $RT_MF_LOG): imaps-affinity $P_RT_IMAPS_AFF, imap-affinity $P_RT_IMAP_AFF (starttls), imaps-map $P_RT_IMAPS_MAP, pop3s-map $P_RT_POP3S_MAP, submissions-map $P_RT_SMTPS_MAP, imaps-direct $P_RT_IMAPS_DIRECT, metrics $P_RT_METRICS
  openssl s_client -connect 127.0.0.1:$P_RT_IMAPS_AFF -servername $HOSTNAME_MF -CAfile $CA -crlf
EOF
    fi
fi

[ "$FAILED" = 0 ]
