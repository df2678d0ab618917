#!/usr/bin/env python3
"""Client-side helpers for the mailfront interop suite (tests/interop/run.sh).

Each subcommand does one thing and reports through its exit status: 0 means the check held,
anything else means it did not, with the reason on stderr (one line, so run.sh can put it into its
`FAIL name: reason` line). Only the standard library is used, so a bare Debian machine runs it.
"""

import argparse
import base64
import email.utils
import imaplib
import json
import os
import poplib
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import time

# OpenSSL spells TLS 1.2 suites its own way (ECDHE-RSA-AES128-GCM-SHA256); the Received `tls`
# clause (RFC 8314 §4.3) and the IMAP ID `tls` field use the IANA registry names. `openssl
# ciphers -stdname` gives the full mapping; this table covers the suites rustls offers in case
# that command is unavailable.
FALLBACK_IANA = {
    "ECDHE-ECDSA-AES256-GCM-SHA384": "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256": "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "ECDHE-ECDSA-CHACHA20-POLY1305": "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384": "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "ECDHE-RSA-AES128-GCM-SHA256": "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "ECDHE-RSA-CHACHA20-POLY1305": "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
}


class Fail(Exception):
    """A check did not hold; the message becomes the FAIL reason."""


def iana_name(openssl_name):
    """Map an OpenSSL cipher name to its IANA name (TLS 1.3 names are already IANA)."""
    if openssl_name.startswith("TLS_"):
        return openssl_name
    try:
        out = subprocess.run(
            ["openssl", "ciphers", "-stdname", "-V", "ALL:COMPLEMENTOFALL"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout
        for line in out.splitlines():
            # "0xC0,0x2F - TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 - ECDHE-RSA-AES128-GCM-SHA256 TLSv1.2 ..."
            parts = [p.strip() for p in line.split(" - ")]
            if len(parts) >= 3 and parts[2].split()[0] == openssl_name:
                return parts[1]
    except (OSError, subprocess.SubprocessError):
        pass
    return FALLBACK_IANA.get(openssl_name, openssl_name)


def client_context(args):
    """A verifying client context for the test CA, optionally pinned to one version/suite/group."""
    ctx = ssl.create_default_context(cafile=args.cafile)
    if getattr(args, "tls12", False):
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if getattr(args, "cipher", None):
        ctx.set_ciphers(args.cipher)
    if getattr(args, "curve", None):
        ctx.set_ecdh_curve(args.curve)
    return ctx


class SourcedSMTP_SSL(smtplib.SMTP_SSL):
    """SMTP_SSL that sends `sni` (not the connect host) and connects from `source_address`."""

    def __init__(self, *a, sni=None, **kw):
        self._sni = sni
        super().__init__(*a, **kw)

    def _get_socket(self, host, port, timeout):
        sock = socket.create_connection((host, port), timeout, self.source_address)
        return self.context.wrap_socket(sock, server_hostname=self._sni or host)


class _Sourced:
    """Connects from `source` (a local address) and sends `sni`: the IMAP and POP3 clients."""

    def __init__(self, *a, source=None, sni=None, **kw):
        self._source, self._sni = source, sni
        super().__init__(*a, **kw)

    def _sourced_socket(self, timeout, context):
        src = (self._source, 0) if self._source else None
        sock = socket.create_connection((self.host, self.port), timeout, src)
        return context.wrap_socket(sock, server_hostname=self._sni or self.host)


class SourcedIMAP4_SSL(_Sourced, imaplib.IMAP4_SSL):
    def _create_socket(self, timeout):
        return self._sourced_socket(timeout, self.ssl_context)


class SourcedPOP3_SSL(_Sourced, poplib.POP3_SSL):
    def _create_socket(self, timeout):
        return self._sourced_socket(timeout, self.context)


def cipher_of(sock):
    name, version, _bits = sock.cipher()
    return iana_name(name), version


# ---------------------------------------------------------------------------------------------
# small utilities used by run.sh


def cmd_freeports(args):
    """Print N distinct free loopback TCP ports (all bound at once, so no duplicates)."""
    socks = []
    try:
        for _ in range(args.n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        print(" ".join(str(s.getsockname()[1]) for s in socks))
    finally:
        for s in socks:
            s.close()


def cmd_waitport(args):
    """Wait until every given port on host accepts a TCP connection."""
    deadline = time.monotonic() + args.timeout
    for port in args.ports:
        while True:
            try:
                with socket.create_connection((args.host, port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise Fail(f"{args.host}:{port} does not accept connections after {args.timeout}s")
                time.sleep(0.1)


def cmd_iana(args):
    print(iana_name(args.name))


# ---------------------------------------------------------------------------------------------
# SMTP


def make_message(args):
    msgid = email.utils.make_msgid(domain="interop.example.test")
    return (
        f"From: <{args.sender}>\r\n"
        f"To: <{args.rcpt}>\r\n"
        f"Subject: {args.subject}\r\n"
        f"Message-ID: {msgid}\r\n"
        f"Date: {email.utils.formatdate(localtime=True)}\r\n"
        "\r\n"
        f"interop test body for {args.subject}\r\n"
        ".leading dot line\r\n"
    ).encode()


def cmd_smtp_submit(args):
    """Submit one message with smtplib; print the IANA cipher it negotiated (if any)."""
    ctx = client_context(args) if args.mode != "plain" else None
    if args.mode == "implicit":
        src = (args.source, 0) if args.source else None
        s = SourcedSMTP_SSL(args.host, args.port, context=ctx, timeout=20,
                            local_hostname="client.interop.test", source_address=src,
                            sni=args.sni)
    else:
        s = smtplib.SMTP(args.host, args.port, timeout=20, local_hostname="client.interop.test")
    try:
        s.ehlo()
        if args.mode == "starttls":
            s.starttls(context=ctx)
            s.ehlo()
        if args.user:
            s.login(args.user, args.password)
        refused = s.sendmail(args.sender, [args.rcpt], make_message(args))
        if refused:
            raise Fail(f"recipients refused: {refused}")
        cipher = cipher_of(s.sock)[0] if args.mode != "plain" else "none"
    except smtplib.SMTPException as e:
        raise Fail(f"smtplib: {e!r}") from e
    finally:
        try:
            s.quit()
        except (smtplib.SMTPException, OSError):
            pass
    print(cipher)


def find_message(maildir, subject, timeout):
    """The bytes of the delivered message whose Subject is `subject` (Maildir new/ or cur/)."""
    deadline = time.monotonic() + timeout
    needle = f"\nSubject: {subject}\n".encode()
    while True:
        for sub in ("new", "cur"):
            d = os.path.join(maildir, sub)
            try:
                names = os.listdir(d)
            except FileNotFoundError:
                continue
            for name in names:
                try:
                    with open(os.path.join(d, name), "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    continue  # moved from new/ to cur/ under us
                if needle in data.replace(b"\r\n", b"\n"):
                    return data
        if time.monotonic() > deadline:
            raise Fail(f"no message with Subject {subject!r} delivered to {maildir} within {timeout}s")
        time.sleep(0.2)


def header_fields(data):
    """(name, unfolded value, raw field) for each header field, in order."""
    head = data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", "replace")
    fields = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and fields:
            name, value, raw = fields[-1]
            fields[-1] = (name, value + " " + line.strip(), raw + "\n" + line)
        elif ":" in line:
            name, value = line.split(":", 1)
            fields.append((name, value.strip(), line))
    return fields


def cmd_check_received(args):
    """Check the mailfront Received field in a delivered message (RFC 8314 §4.3, RFC 5321 §4.4).

    Postfix prepends its own Received when it accepts the message from mailfront, so ours must be
    the second Received field from the top and Postfix's the first.
    """
    data = find_message(args.maildir, args.subject, args.timeout)
    received = [(v, raw) for (n, v, raw) in header_fields(data) if n.lower() == "received"]
    if len(received) < 2:
        raise Fail(f"expected >= 2 Received fields, found {len(received)}")
    if "(Postfix)" not in received[0][0]:
        raise Fail(f"first Received is not Postfix's: {received[0][0]!r}")
    ours, raw = received[1]
    if f"by {args.hostname} (mailfront)" not in ours:
        raise Fail(f"second Received is not mailfront's (by {args.hostname} (mailfront)): {ours!r}")
    if sum("(mailfront)" in v for v, _ in received) != 1:
        raise Fail("more than one mailfront Received field")
    if ";" not in ours:
        raise Fail(f"Received has no ';' before the date: {ours!r}")
    clauses, date = ours.rsplit(";", 1)
    # RFC 5321 Opt-info order: with, id, for, then the registered clauses tls and group.
    tokens = clauses.split()
    low = [t.lower() for t in tokens]
    try:
        tls_value = tokens[low.index("tls") + 1]
    except (ValueError, IndexError):
        raise Fail(f"no tls clause in {ours!r}") from None
    if tls_value != args.expect_tls:
        raise Fail(f"tls clause is {tls_value!r}, client negotiated {args.expect_tls!r}")
    if tls_value.startswith("TLS13_"):
        raise Fail(f"tls clause uses rustls spelling {tls_value!r}")
    for earlier in ("with", "id", "for"):
        if earlier in low and low.index(earlier) > low.index("tls"):
            raise Fail(f"'{earlier}' comes after 'tls' (RFC 5321 order): {ours!r}")
    if "group" in low:
        group = tokens[low.index("group") + 1] if low.index("group") + 1 < len(tokens) else ""
        if low.index("group") < low.index("tls"):
            raise Fail(f"'group' before 'tls': {ours!r}")
        if args.expect_group and group != args.expect_group:
            raise Fail(f"group clause is {group!r}, expected {args.expect_group!r}")
        if not re.fullmatch(r"[A-Za-z0-9_]+", group) or "NamedGroup" in group:
            raise Fail(f"group clause is not an IANA name: {group!r}")
    elif args.expect_group:
        raise Fail(f"no group clause, expected group {args.expect_group}")
    if args.expect_with and f"with {args.expect_with}" not in ours:
        raise Fail(f"expected 'with {args.expect_with}' in {ours!r}")
    # RFC 5322 date with a 4-digit year and a numeric zone (RFC 5321 §4.4, R9).
    if not re.search(r"\b\d{4} \d\d:\d\d(:\d\d)? [+-]\d{4}\b", date):
        raise Fail(f"date {date.strip()!r} lacks a 4-digit year or numeric zone")
    try:
        email.utils.parsedate_to_datetime(date.strip())
    except (TypeError, ValueError):
        raise Fail(f"date {date.strip()!r} does not parse as RFC 5322") from None
    for line in raw.split("\n"):
        if len(line.encode()) > 998:
            raise Fail("a Received line is longer than 998 octets")
    print(f"{tls_value} {tokens[low.index('group') + 1] if 'group' in low else '-'}")


def cmd_smtp_cleartext_refused(args):
    """On a STARTTLS listener before TLS: no AUTH offered; AUTH, MAIL are refused with 530."""
    s = smtplib.SMTP(args.host, args.port, timeout=20, local_hostname="client.interop.test")
    problems = []
    try:
        code, _ = s.ehlo()
        if code != 250:
            raise Fail(f"EHLO got {code}")
        if s.has_extn("auth"):
            problems.append("AUTH advertised before STARTTLS")
        if not s.has_extn("starttls"):
            problems.append("STARTTLS not advertised")
        blob = base64.b64encode(f"\0{args.user}\0{args.password}".encode()).decode()
        for cmd in (f"AUTH PLAIN {blob}", "AUTH LOGIN", "AUTH PLAIN",
                    f"MAIL FROM:<{args.user}>"):
            code, msg = s.docmd(cmd)
            if code == 334:
                problems.append(f"{cmd.split()[0]} {cmd.split()[1]}: got 334 continuation")
                s.docmd("*")
            elif code != 530:
                problems.append(f"{cmd[:10]}... got {code} {msg.decode(errors='replace')}, want 530")
    finally:
        try:
            s.quit()
        except (smtplib.SMTPException, OSError):
            pass
    if problems:
        raise Fail("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# IMAP


def cmd_imap_fetch(args):
    """Log in over TLS, send an ID, select INBOX and fetch one message; print the cipher."""
    ctx = client_context(args)
    try:
        if args.mode == "implicit":
            m = SourcedIMAP4_SSL(args.host, args.port, ssl_context=ctx, timeout=20,
                                 source=args.source, sni=args.sni)
        else:
            m = imaplib.IMAP4(args.host, args.port, timeout=20)
            if args.mode == "starttls":
                m.starttls(ssl_context=ctx)
        if args.id_name:
            # Our "tls" value is a forgery: mailfront must drop it and send its own (I8).
            typ, data = m.xatom("ID", f'("name" "{args.id_name}" "tls" "forged-by-client")')
            if typ != "OK":
                raise Fail(f"ID got {typ} {data}")
        m.login(args.user, args.password)
        typ, data = m.select("INBOX")
        if typ != "OK":
            raise Fail(f"SELECT INBOX got {typ} {data}")
        count = int(data[0])
        if count < args.min_messages:
            raise Fail(f"INBOX has {count} messages, expected >= {args.min_messages}")
        if count:
            typ, data = m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            if typ != "OK" or not data or not isinstance(data[0], tuple):
                raise Fail(f"FETCH 1 got {typ} {data}")
        cipher = cipher_of(m.sock)[0] if args.mode != "plain" else "none"
        m.logout()
    except imaplib.IMAP4.error as e:
        raise Fail(f"imaplib: {e}") from e
    print(cipher)


def read_until(sock, pred, timeout=10):
    buf = b""
    deadline = time.monotonic() + timeout
    while not pred(buf):
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            break
        if not chunk:
            break
        buf += chunk
        if time.monotonic() > deadline:
            break
    return buf


def tagged(tag):
    return lambda b: re.search(rb"(^|\r\n)" + tag.encode() + rb" (OK|NO|BAD)[^\r\n]*\r\n", b) is not None


def cmd_imap_cleartext_refused(args):
    """On 143 before STARTTLS: LOGINDISABLED, no AUTH=, and no LOGIN/AUTHENTICATE gets through."""
    problems = []
    with socket.create_connection((args.host, args.port), timeout=10) as s:
        greeting = read_until(s, lambda b: b"\r\n" in b)
        if not greeting.startswith(b"* OK"):
            raise Fail(f"greeting {greeting!r}")
        s.sendall(b"c1 CAPABILITY\r\n")
        caps = read_until(s, tagged("c1")).upper()
        if b"STARTTLS" not in caps or b"LOGINDISABLED" not in caps:
            problems.append("CAPABILITY lacks STARTTLS or LOGINDISABLED")
        if b"AUTH=" in caps:
            problems.append("AUTH= advertised before STARTTLS")
        blob = base64.b64encode(f"\0{args.user}\0{args.password}".encode())
        for tag, line in (
            ("a1", f'a1 LOGIN "{args.user}" "{args.password}"\r\n'.encode()),
            ("a2", b"a2 AUTHENTICATE PLAIN " + blob + b"\r\n"),
        ):
            s.sendall(line)
            reply = read_until(s, tagged(tag))
            if not re.search(rb"(^|\n)" + tag.encode() + rb" (NO|BAD)", reply):
                problems.append(f"{line.split()[1].decode()} got {reply[:80]!r}, want NO/BAD")
        # A literal password must never be asked for: no "+" continuation (I2).
        s.sendall(f'a3 LOGIN "{args.user}" {{{len(args.password)}}}\r\n'.encode())
        reply = read_until(s, lambda b: b"\r\n" in b)
        if reply.startswith(b"+"):
            problems.append("LOGIN literal got a '+' continuation before STARTTLS")
            s.sendall(args.password.encode() + b"\r\n")
            read_until(s, tagged("a3"))
        elif not re.match(rb"a3 (NO|BAD)", reply):
            problems.append(f"LOGIN literal got {reply[:80]!r}, want NO/BAD")
        s.sendall(b"a4 AUTHENTICATE PLAIN\r\n")
        reply = read_until(s, lambda b: b"\r\n" in b)
        if reply.startswith(b"+"):
            problems.append("AUTHENTICATE PLAIN got a '+' continuation before STARTTLS")
            s.sendall(b"*\r\n")
        try:
            s.sendall(b"z LOGOUT\r\n")
        except OSError:
            pass
    if problems:
        raise Fail("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# POP3


def cmd_pop3_fetch(args):
    ctx = client_context(args)
    try:
        if args.mode == "implicit":
            p = SourcedPOP3_SSL(args.host, args.port, context=ctx, timeout=20,
                                source=args.source, sni=args.sni)
        else:
            p = poplib.POP3(args.host, args.port, timeout=20)
            if args.mode == "starttls":
                p.stls(context=ctx)
        p.user(args.user)
        p.pass_(args.password)
        count, _size = p.stat()
        if count < args.min_messages:
            raise Fail(f"maildrop has {count} messages, expected >= {args.min_messages}")
        if count:
            _resp, lines, _octets = p.retr(1)
            if not any(line.lower().startswith(b"received:") for line in lines):
                raise Fail("RETR 1 returned a message without a Received field")
        cipher = cipher_of(p.sock)[0] if args.mode != "plain" else "none"
        p.quit()
    except poplib.error_proto as e:
        raise Fail(f"poplib: {e}") from e
    print(cipher)


def cmd_pop3_cleartext_refused(args):
    """On 110 before STLS: CAPA offers STLS but not USER/SASL; USER, PASS, AUTH get -ERR."""
    problems = []
    with socket.create_connection((args.host, args.port), timeout=10) as s:
        greeting = read_until(s, lambda b: b"\r\n" in b)
        if not greeting.startswith(b"+OK"):
            raise Fail(f"greeting {greeting!r}")
        s.sendall(b"CAPA\r\n")
        capa = read_until(s, lambda b: b.startswith(b"-ERR") and b"\r\n" in b or b"\r\n.\r\n" in b)
        lines = [line.strip().upper() for line in capa.split(b"\r\n")]
        if b"STLS" not in lines:
            problems.append("CAPA lacks STLS")
        if b"USER" in lines or any(line.startswith(b"SASL") for line in lines):
            problems.append("CAPA offers USER or SASL before STLS")
        blob = base64.b64encode(f"\0{args.user}\0{args.password}".encode())
        for line in (f"USER {args.user}".encode(), f"PASS {args.password}".encode(),
                     b"AUTH PLAIN " + blob, b"AUTH PLAIN"):
            s.sendall(line + b"\r\n")
            reply = read_until(s, lambda b: b"\r\n" in b)
            if not reply.startswith(b"-ERR"):
                problems.append(f"{line.split()[0].decode()} got {reply[:60]!r}, want -ERR")
                if reply.startswith(b"+ "):
                    s.sendall(b"*\r\n")
                    read_until(s, lambda b: b"\r\n" in b)
        try:
            s.sendall(b"QUIT\r\n")
        except OSError:
            pass
    if problems:
        raise Fail("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# log and report checks


def cmd_imap_id_logged(args):
    """Dovecot's imap_id_log line for our client shows mailfront's tls value, not the forgery."""
    deadline = time.monotonic() + args.timeout
    pattern = re.compile(r"ID sent: (.*)")
    while True:
        with open(args.log, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = pattern.search(line)
                if not m or f"name={args.id_name}" not in m.group(1):
                    continue
                fields = m.group(1)
                if "forged-by-client" in fields:
                    raise Fail(f"client's forged tls value reached Dovecot: {line.strip()}")
                if f"tls={args.expect_tls}" not in fields:
                    raise Fail(f"expected tls={args.expect_tls} in: {line.strip()}")
                return
        if time.monotonic() > deadline:
            raise Fail(f"no 'ID sent: ... name={args.id_name}' line in {args.log}")
        time.sleep(0.2)


def cmd_log_line(args):
    """Wait for one line of a log that contains every --contains string; print it."""
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            with open(args.log, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if all(c in line for c in args.contains):
                        # Dovecot's auth_debug lines end with the SASL response: never copy it.
                        print(line.split("resp=")[0].strip())
                        return
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise Fail(f"no line with {args.contains} in {args.log} within {args.timeout}s")
        time.sleep(0.2)


def cmd_received_from(args):
    """The backend's (topmost) Received field of a delivered message names `--addr` as the
    client: with PROXY protocol, Postfix records the client, not mailfront. Prints the field."""
    data = find_message(args.maildir, args.subject, args.timeout)
    received = [v for (n, v, _) in header_fields(data) if n.lower() == "received"]
    if len(received) <= args.index:
        raise Fail(f"no Received field #{args.index}")
    field = received[args.index]
    if f"[{args.addr}]" not in field:
        raise Fail(f"Received #{args.index} does not name [{args.addr}]: {field!r}")
    print(field)


def cmd_mf_session_id(args):
    """The x-session-id mailfront sent (debug log) for the latest session of `--listener` from
    `--client`: Dovecot takes it as its own session id, so its login line names it."""
    deadline = time.monotonic() + args.timeout
    pattern = re.compile(r"session_id=([A-Za-z0-9]+)")
    while True:
        found = None
        with open(args.log, encoding="utf-8", errors="replace") as f:
            for line in f:
                if ("x-session-id for the backend" in line and f"listener={args.listener} " in line
                        and f"client={args.client}:" in line):
                    m = pattern.search(line)
                    if m:
                        found = m.group(1)
        if found:
            print(found)
            return
        if time.monotonic() > deadline:
            raise Fail(f"no x-session-id line for {args.listener} from {args.client} in {args.log}")
        time.sleep(0.2)


def proxy_v2(src, dst):
    """A PROXY protocol v2 header (TCP over IPv4) claiming `src` (host, port)."""
    body = socket.inet_aton(src[0]) + socket.inet_aton(dst[0]) + src[1].to_bytes(2, "big") \
        + dst[1].to_bytes(2, "big")
    return b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + len(body).to_bytes(2, "big") + body


def cmd_forged_proxy_header(args):
    """A client sends its own PROXY header to a listener without proxy_protocol_from: on a
    STARTTLS SMTP listener it is a command line, refused with 5xx; on an implicit-TLS listener it
    is no ClientHello, and the handshake fails. Either way it gains nothing."""
    forged = (args.forged, 4444)
    if args.mode == "starttls-smtp":
        with socket.create_connection((args.host, args.port), 10) as sock:
            f = sock.makefile("rb")
            if not f.readline().startswith(b"220"):
                raise Fail("no 220 greeting")
            line = f"PROXY TCP4 {args.forged} 127.0.0.1 4444 {args.port}\r\n".encode()
            sock.sendall(line)
            reply = f.readline()
            if not reply.startswith(b"5"):
                raise Fail(f"the PROXY line got {reply!r}, not a 5xx refusal")
            sock.sendall(b"QUIT\r\n")
            print(reply.decode(errors="replace").strip())
        return
    ctx = client_context(args)
    sock = socket.create_connection((args.host, args.port), 10)
    try:
        sock.sendall(proxy_v2(forged, ("127.0.0.1", args.port)))
        try:
            tls = ctx.wrap_socket(sock, server_hostname=args.sni or args.host)
        except (ssl.SSLError, OSError) as e:
            print(f"handshake failed as it should: {type(e).__name__}")
            return
        tls.close()
        raise Fail("TLS came up after a forged PROXY header")
    finally:
        sock.close()


def cmd_testssl_summary(args):
    """Summarise testssl.sh flat JSON: no SSLv2/3 or TLS 1.0/1.1, no weak ciphers, FS everywhere."""
    with open(args.json, encoding="utf-8") as f:
        findings = json.load(f)
    if isinstance(findings, dict):  # --jsonfile-pretty layout
        findings = [x for scan in findings.get("scanResult", []) for v in scan.values()
                    if isinstance(v, list) for x in v]
    by_id = {}
    for item in findings:
        by_id.setdefault(item.get("id", ""), []).append(item)
    problems = []

    def finding(key):
        items = by_id.get(key)
        return items[0].get("finding", "") if items else None

    for key in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        value = finding(key)
        if value is None:
            problems.append(f"{key} not tested")
        elif not value.lower().startswith("not offered"):
            problems.append(f"{key}: {value}")
    for key in ("TLS1_2", "TLS1_3"):
        value = finding(key)
        if value is None or not value.lower().startswith("offered"):
            problems.append(f"{key} not offered: {value}")
    # -s: standard cipher categories. testssl 3.0 names them NULL aNULL EXPORT LOW 3DES_IDEA
    # AVERAGE STRONG; 3.1+ renames AVERAGE to OBSOLETED and splits STRONG into STRONG_NOFS and
    # STRONG_FS. Everything but the strong forward-secret group must be absent.
    weak = ("cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW",
            "cipherlist_3DES_IDEA")
    optional_weak = ("cipherlist_AVERAGE", "cipherlist_OBSOLETED", "cipherlist_STRONG_NOFS")
    for key in weak + optional_weak:
        value = finding(key)
        if value is None:
            if key in weak:
                problems.append(f"{key} not tested")
        elif not value.lower().startswith("not offered"):
            problems.append(f"{key}: {value}")
    if finding("cipherlist_AVERAGE") is None and finding("cipherlist_OBSOLETED") is None:
        problems.append("neither cipherlist_AVERAGE nor cipherlist_OBSOLETED tested")
    fs = finding("FS") or finding("PFS")
    if fs is None or not fs.lower().startswith("offered"):
        problems.append(f"forward secrecy: {fs}")
    # -E lists every suite per protocol ("cipher-tls1_2_xc02f"): each must be forward secret
    # (ECDHE/DHE key exchange, or any TLS 1.3 suite).
    listed = 0
    for key, items in by_id.items():
        if not re.match(r"cipher-(tls|ssl)", key):
            continue
        for item in items:
            text = item.get("finding", "")
            listed += 1
            if key.startswith("cipher-tls1_3"):
                continue
            if key.startswith("cipher-tls1_2"):
                if not re.search(r"\bECDHE-|\bDHE-|_ECDHE_|_DHE_", text):
                    problems.append(f"non-forward-secret suite offered: {' '.join(text.split())}")
            else:
                problems.append(f"suite offered on an old protocol: {' '.join(text.split())}")
    if args.require_cipher_list and listed == 0:
        problems.append("no per-protocol cipher list in the report (-E)")
    fatal = [i for i in findings if i.get("severity") in ("FATAL",) or i.get("id") == "scanProblem"]
    for item in fatal:
        problems.append(f"scan problem: {item.get('finding')}")
    if problems:
        raise Fail("; ".join(problems))


# ---------------------------------------------------------------------------------------------


def _login_lines(proto, user, password):
    if proto == "imap":
        return f"a LOGIN {user} {password}\r\n".encode()
    return f"USER {user}\r\nPASS {password}\r\n".encode()


def _throttled(proto, answer):
    marker = b"[UNAVAILABLE]" if proto == "imap" else b"[SYS/TEMP]"
    return marker in answer


def _tls_session(args, port=None):
    ctx = client_context(args)
    src = (args.source, 0) if args.source else None
    sock = socket.create_connection((args.host, port or args.port), 20, src)
    tls = ctx.wrap_socket(sock, server_hostname=args.sni or args.host)
    greeting = read_until(tls, lambda b: b"\r\n" in b)
    if not greeting:
        raise Fail("no greeting")
    return tls


def cmd_auth_attempts(args):
    """Wrong passwords `<prefix>-0` ... `<prefix>-(N-1)` for one user, as the two attacks on a
    throttle that counts failures only when they come back: `hangup` sends each on its own
    session and closes `--hangup-after` seconds later (before Dovecot's auth_failure_delay of
    2 s answers), `concurrent` sends them all at once on N greeted sessions. With `--also-port`,
    session i goes to the i-th port of `--port` and those, round robin (several replicas).
    Prints how many answers came back throttled."""
    ports = [args.port] + (args.also_port or [])
    throttled = 0
    if args.mode == "hangup":
        for i in range(args.attempts):
            tls = _tls_session(args, ports[i % len(ports)])
            tls.sendall(_login_lines(args.proto, args.user, f"{args.password_prefix}-{i}"))
            answer = read_until(tls, lambda b: False, timeout=args.hangup_after)
            throttled += _throttled(args.proto, answer)
            tls.close()
    else:
        sessions = [_tls_session(args, ports[i % len(ports)]) for i in range(args.attempts)]
        for i, tls in enumerate(sessions):
            tls.sendall(_login_lines(args.proto, args.user, f"{args.password_prefix}-{i}"))
        if args.proto == "imap":
            done = tagged("a")
        else:
            done = lambda b: b.count(b"\r\n") >= 2  # noqa: E731 (USER's +OK, then PASS's answer)
        for tls in sessions:
            throttled += _throttled(args.proto, read_until(tls, done, timeout=15))
            tls.close()
    print(f"throttled={throttled} of {args.attempts}")


def cmd_auth_checked(args):
    """How many of `auth-attempts`' passwords Dovecot's auth process saw (it logs each AUTH
    request's response with auth_debug_passwords); fails above `--max` or under `--min`."""
    time.sleep(1)
    with open(args.log, "rb") as f:
        log = f.read()
    checked = 0
    for i in range(args.attempts):
        blob = base64.b64encode(f"\0{args.user}\0{args.password_prefix}-{i}".encode())
        checked += blob in log
    print(f"checked={checked} of {args.attempts}")
    if checked > args.max:
        raise Fail(f"Dovecot checked {checked} of {args.attempts} wrong passwords, limit {args.max}")
    if checked < args.min:
        if checked == 0:
            raise Fail("Dovecot checked none: the count proves nothing (is auth_debug_passwords on?)")
        raise Fail(f"Dovecot checked {checked} of {args.attempts} wrong passwords, expected at least {args.min}")


def cmd_auth_refused(args):
    """One session per port (`--port` and every `--also-port`), each sending the wrong password
    `<prefix>-<i>`; each must come back with the throttled answer (IMAP `a NO [UNAVAILABLE]`,
    POP3 `-ERR [SYS/TEMP]`) within `--within` seconds, i.e. without waiting on the backend's
    auth_failure_delay. `auth-checked --max 0 --min 0` then shows the backend never saw them."""
    ports = [args.port] + (args.also_port or [])
    for i, port in enumerate(ports):
        started = time.monotonic()
        tls = _tls_session(args, port)
        tls.sendall(_login_lines(args.proto, args.user, f"{args.password_prefix}-{i}"))
        if args.proto == "imap":
            answer = read_until(tls, tagged("a"), timeout=15)
            ok = re.search(rb"(^|\r\n)a NO \[UNAVAILABLE\]", answer) is not None
        else:
            answer = read_until(tls, lambda b: b.count(b"\r\n") >= 2, timeout=15)
            ok = _throttled("pop3", answer)
        took = time.monotonic() - started
        tls.close()
        if not ok:
            raise Fail(f"port {port}: expected the throttled answer, got {answer!r}")
        if took > args.within:
            raise Fail(f"port {port}: throttled answer after {took:.1f}s (over {args.within}s)")
        print(f"port {port}: throttled in {took:.2f}s")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def conn(p, user=True):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--cafile")
        p.add_argument("--tls12", action="store_true", help="cap the client at TLS 1.2")
        p.add_argument("--cipher", help="OpenSSL cipher list for TLS 1.2")
        p.add_argument("--curve", help="the one key-exchange group to offer")
        p.add_argument("--source", help="local address to connect from (implicit TLS only)")
        p.add_argument("--sni", help="TLS server name to send (default: --host)")
        if user:
            p.add_argument("--user", required=True)
            p.add_argument("--password", required=True)

    p = sub.add_parser("freeports")
    p.add_argument("n", type=int)
    p.set_defaults(func=cmd_freeports)

    p = sub.add_parser("waitport")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--timeout", type=float, default=30)
    p.add_argument("ports", type=int, nargs="+")
    p.set_defaults(func=cmd_waitport)

    p = sub.add_parser("iana")
    p.add_argument("name")
    p.set_defaults(func=cmd_iana)

    p = sub.add_parser("smtp-submit")
    conn(p, user=False)
    p.add_argument("--mode", choices=["implicit", "starttls", "plain"], required=True)
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--sender", required=True)
    p.add_argument("--rcpt", required=True)
    p.add_argument("--subject", required=True)
    p.set_defaults(func=cmd_smtp_submit)

    p = sub.add_parser("check-received")
    p.add_argument("--maildir", required=True)
    p.add_argument("--subject", required=True)
    p.add_argument("--hostname", required=True)
    p.add_argument("--expect-tls", required=True)
    p.add_argument("--expect-group")
    p.add_argument("--expect-with")
    p.add_argument("--timeout", type=float, default=20)
    p.set_defaults(func=cmd_check_received)

    p = sub.add_parser("smtp-cleartext-refused")
    conn(p)
    p.set_defaults(func=cmd_smtp_cleartext_refused)

    p = sub.add_parser("imap-fetch")
    conn(p)
    p.add_argument("--mode", choices=["implicit", "starttls", "plain"], required=True)
    p.add_argument("--id-name")
    p.add_argument("--min-messages", type=int, default=0)
    p.set_defaults(func=cmd_imap_fetch)

    p = sub.add_parser("imap-cleartext-refused")
    conn(p)
    p.set_defaults(func=cmd_imap_cleartext_refused)

    p = sub.add_parser("pop3-fetch")
    conn(p)
    p.add_argument("--mode", choices=["implicit", "starttls", "plain"], required=True)
    p.add_argument("--min-messages", type=int, default=0)
    p.set_defaults(func=cmd_pop3_fetch)

    p = sub.add_parser("pop3-cleartext-refused")
    conn(p)
    p.set_defaults(func=cmd_pop3_cleartext_refused)

    p = sub.add_parser("imap-id-logged")
    p.add_argument("--log", required=True)
    p.add_argument("--id-name", required=True)
    p.add_argument("--expect-tls", required=True)
    p.add_argument("--timeout", type=float, default=10)
    p.set_defaults(func=cmd_imap_id_logged)

    p = sub.add_parser("log-line")
    p.add_argument("--log", required=True)
    p.add_argument("--contains", action="append", required=True)
    p.add_argument("--timeout", type=float, default=10)
    p.set_defaults(func=cmd_log_line)

    p = sub.add_parser("received-from")
    p.add_argument("--maildir", required=True)
    p.add_argument("--subject", required=True)
    p.add_argument("--addr", required=True)
    p.add_argument("--index", type=int, default=0,
                   help="which Received field, from the top (0: the backend's, 1: mailfront's)")
    p.add_argument("--timeout", type=float, default=20)
    p.set_defaults(func=cmd_received_from)

    p = sub.add_parser("mf-session-id")
    p.add_argument("--log", required=True)
    p.add_argument("--listener", required=True)
    p.add_argument("--client", required=True)
    p.add_argument("--timeout", type=float, default=10)
    p.set_defaults(func=cmd_mf_session_id)

    p = sub.add_parser("forged-proxy-header")
    conn(p, user=False)
    p.add_argument("--mode", choices=["starttls-smtp", "implicit"], required=True)
    p.add_argument("--forged", default="10.6.6.6")
    p.set_defaults(func=cmd_forged_proxy_header)

    p = sub.add_parser("testssl-summary")
    p.add_argument("json")
    p.add_argument("--require-cipher-list", action="store_true")
    p.set_defaults(func=cmd_testssl_summary)

    p = sub.add_parser("auth-attempts")
    conn(p, user=False)
    p.add_argument("--proto", choices=["imap", "pop3"], required=True)
    p.add_argument("--mode", choices=["hangup", "concurrent"], required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password-prefix", required=True)
    p.add_argument("--attempts", type=int, default=10)
    p.add_argument("--hangup-after", type=float, default=1.5)
    p.add_argument("--also-port", type=int, action="append",
                   help="more ports (replicas) to spread the sessions over, round robin")
    p.set_defaults(func=cmd_auth_attempts)

    p = sub.add_parser("auth-refused")
    conn(p, user=False)
    p.add_argument("--proto", choices=["imap", "pop3"], required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password-prefix", required=True)
    p.add_argument("--also-port", type=int, action="append")
    p.add_argument("--within", type=float, default=1.5)
    p.set_defaults(func=cmd_auth_refused)

    p = sub.add_parser("auth-checked")
    p.add_argument("--log", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password-prefix", required=True)
    p.add_argument("--attempts", type=int, default=10)
    p.add_argument("--max", type=int, required=True)
    p.add_argument("--min", type=int, default=1)
    p.set_defaults(func=cmd_auth_checked)

    args = ap.parse_args()
    try:
        args.func(args)
    except Fail as e:
        print(str(e).replace("\n", " "), file=sys.stderr)
        return 1
    except (OSError, ssl.SSLError) as e:
        print(f"{type(e).__name__}: {e}".replace("\n", " "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
