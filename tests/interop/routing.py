#!/usr/bin/env python3
"""The routing-by-user section of the interop suite (tests/interop/run.sh, 6c; issue 22).

Two Dovecot instances, route-a and route-b, serve the same Maildir tree and passwd file; two
Postfix smtpd services, route-a and route-b, log under their own syslog names. A mailfront in
front of them chooses the backend by the login name (`user_affinity`, `user_map`). Every check is
made on what the backends logged: Dovecot's `<proto>-login: Info: Login: user=<…>` (one line per
login, in the log of the instance that took it) and one terminal `…-login:` line per connection
(`Login`, or `Disconnected … (no auth attempts …)`), Postfix's `connect from` and
`client=…, sasl_username=…` lines under `postfix-interop/route-[ab]/smtpd`.

`run` prints one `PASS name` / `FAIL name: reason` line per case (run.sh counts them) and writes
what each case saw to `<outdir>/<case>.txt`. Only the standard library and mfi.py are used.
"""

import argparse
import base64
import imaplib
import os
import poplib
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import types
import urllib.request

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mfi  # noqa: E402
from mfi import Fail  # noqa: E402

HOST = "127.0.0.1"
# Mechanisms whose first client response names the user (issue 22): a routed listener may keep
# them. Every other one (CRAM-MD5, DIGEST-MD5: the name comes after the backend's challenge;
# EXTERNAL, GSSAPI, NTLM, ANONYMOUS: no name a proxy can read) must be hidden.
ROUTABLE = ("PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2")


def routable(mech):
    mech = mech.upper()
    return mech in ROUTABLE or mech.startswith("SCRAM-")


# ---------------------------------------------------------------------------------------------
# logs


class Log:
    """A log file read from the offset it had when the cursor was made."""

    def __init__(self, path):
        self.path = path
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0

    def text(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""


LOGIN_RE = re.compile(r"\b(imap|pop3)-login: Info: Login: user=<([^>]*)>")
# Every connection to a login process ends in one line with its session id: a Login, or a
# Disconnected/Aborted line (the reason says whether any auth was attempted).
DOVECOT_CONN_RE = re.compile(r"\b(imap|pop3)-login: [^\n]*session=<")
POSTFIX_CONN_RE = re.compile(r"postfix-interop/route-([ab])/smtpd\[\d+\]: connect from ")
POSTFIX_LOGIN_RE = re.compile(
    r"postfix-interop/route-([ab])/smtpd\[\d+\]: [0-9A-Za-z]+: client=[^\n]*sasl_username=([^,\s]+)")


class Backends:
    """Cursors on both instances' logs: who logged in where, and how many connections."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.a, self.b = Log(ctx.args.dovecot_a_log), Log(ctx.args.dovecot_b_log)
        self.postfix = Log(ctx.args.postfix_log)

    def dovecot_logins(self, proto):
        """{(user, "a"|"b"): count} of Login lines of `proto` since the cursors were made."""
        out = {}
        for name, log in (("a", self.a), ("b", self.b)):
            for m in LOGIN_RE.finditer(log.text()):
                if m.group(1) == proto:
                    key = (m.group(2).lower(), name)
                    out[key] = out.get(key, 0) + 1
        return out

    def dovecot_connections(self, proto):
        """The terminal login-process lines of `proto`, both instances, as (instance, line)."""
        lines = []
        for name, log in (("a", self.a), ("b", self.b)):
            for line in log.text().splitlines():
                m = DOVECOT_CONN_RE.search(line)
                if m and m.group(1) == proto:
                    lines.append((name, line))
        return lines

    def postfix_logins(self):
        out = {}
        for m in POSTFIX_LOGIN_RE.finditer(self.postfix.text()):
            key = (m.group(2).lower(), m.group(1))
            out[key] = out.get(key, 0) + 1
        return out

    def postfix_connections(self):
        return [(m.group(1), m.group(0)) for m in POSTFIX_CONN_RE.finditer(self.postfix.text())]


def wait_until(fn, timeout=10.0, step=0.2):
    """Calls fn until it returns something true or the time is up; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


# ---------------------------------------------------------------------------------------------
# clients


def tls_context(ctx):
    return ssl.create_default_context(cafile=ctx.args.cafile)


def recv_line(sock, timeout=15):
    return mfi.read_until(sock, lambda b: b"\r\n" in b, timeout)


def imap_open(ctx, port, starttls=False):
    """An imaplib session over implicit TLS (with SNI) or after STARTTLS."""
    if starttls:
        m = imaplib.IMAP4(HOST, port, timeout=20)
        m.starttls(ssl_context=tls_context(ctx))
        return m
    return mfi.SourcedIMAP4_SSL(HOST, port, ssl_context=tls_context(ctx), timeout=20,
                                sni=ctx.args.sni)


def imap_login(m, how, user, password):
    """Logs in with LOGIN, AUTHENTICATE PLAIN (imaplib: no initial response), AUTHENTICATE
    PLAIN with SASL-IR (RFC 4959) or AUTHENTICATE LOGIN; then SELECT INBOX."""
    plain = f"\0{user}\0{password}".encode()
    if how == "login":
        m.login(user, password)
    elif how == "plain":
        m.authenticate("PLAIN", lambda _challenge: plain)
    elif how == "plain-ir":
        typ, data = m._simple_command("AUTHENTICATE", "PLAIN", base64.b64encode(plain).decode())
        if typ != "OK":
            raise Fail(f"AUTHENTICATE PLAIN (SASL-IR) got {typ} {data}")
        m.state = "AUTH"
    elif how == "login-mech":
        m.authenticate("LOGIN", lambda ch: (password if b"pass" in (ch or b"").lower() else user).encode())
    else:
        raise ValueError(how)
    typ, data = m.select("INBOX")
    if typ != "OK":
        raise Fail(f"SELECT INBOX got {typ} {data}")


def imap_session(ctx, port, how, user, starttls=False):
    """Opens, logs in and returns the session (left open), or raises with the reason."""
    m = imap_open(ctx, port, starttls)
    try:
        imap_login(m, how, user, ctx.args.password)
    except BaseException:
        try:
            m.shutdown()
        except OSError:
            pass
        raise
    return m


def close_all(sessions):
    for s in sessions:
        try:
            if hasattr(s, "logout"):
                s.logout()
            elif hasattr(s, "quit"):
                s.quit()
            else:
                s.close()
        except (OSError, EOFError, imaplib.IMAP4.error, smtplib.SMTPException,
                poplib.error_proto):
            pass


def pop3_session(ctx, port, how, user):
    """POP3 over implicit TLS: USER/PASS with poplib, or AUTH PLAIN with an initial response
    (RFC 5034) on a raw socket; then STAT and QUIT."""
    if how == "user-pass":
        p = mfi.SourcedPOP3_SSL(HOST, port, context=tls_context(ctx), timeout=20, sni=ctx.args.sni)
        try:
            p.user(user)
            p.pass_(ctx.args.password)
            p.stat()
        finally:
            close_all([p])
        return
    raw = socket.create_connection((HOST, port), 20)
    with tls_context(ctx).wrap_socket(raw, server_hostname=ctx.args.sni) as s:
        greeting = recv_line(s)
        if not greeting.startswith(b"+OK"):
            raise Fail(f"POP3 greeting {greeting!r}")
        blob = base64.b64encode(f"\0{user}\0{ctx.args.password}".encode())
        s.sendall(b"AUTH PLAIN " + blob + b"\r\n")
        answer = recv_line(s, 20)
        if not answer.startswith(b"+OK"):
            raise Fail(f"AUTH PLAIN got {answer[:80]!r}")
        s.sendall(b"STAT\r\n")
        recv_line(s)
        s.sendall(b"QUIT\r\n")
        recv_line(s, 5)


def smtp_submit(ctx, port, user, subject):
    s = mfi.SourcedSMTP_SSL(HOST, port, context=tls_context(ctx), timeout=20,
                            local_hostname="client.interop.test", sni=ctx.args.sni)
    try:
        s.ehlo()
        s.login(user, ctx.args.password)
        msg = types.SimpleNamespace(sender=user, rcpt=ctx.args.rcpt, subject=subject)
        refused = s.sendmail(user, [ctx.args.rcpt], mfi.make_message(msg))
        if refused:
            raise Fail(f"recipients refused: {refused}")
    finally:
        close_all([s])


# ---------------------------------------------------------------------------------------------
# the case runner


class Context:
    def __init__(self, args):
        self.args = args
        self.results = []
        self.notes = []

    def note(self, *parts):
        self.notes.append(" ".join(str(p) for p in parts))

    def run(self, name, fn, *a):
        """Runs one case; fn may also return {sub-name: reason or None} for several results."""
        self.notes = []
        try:
            sub = fn(self, *a)
            outcomes = sub.items() if isinstance(sub, dict) else [(name, None)]
        except Fail as e:
            outcomes = [(name, str(e))]
        except (OSError, EOFError, ssl.SSLError, smtplib.SMTPException, subprocess.SubprocessError,
                imaplib.IMAP4.error, poplib.error_proto) as e:
            outcomes = [(name, f"{type(e).__name__}: {e}")]
        with open(os.path.join(self.args.outdir, f"{name}.txt"), "w") as f:
            f.write("\n".join(self.notes) + "\n")
        for case, reason in outcomes:
            if reason is None:
                print(f"PASS {case}", flush=True)
            else:
                print(f"FAIL {case}: {' '.join(str(reason).split())}", flush=True)


def place(counts, user):
    """Where `user` logged in: {"a": n, "b": n} from a logins dict."""
    return {side: counts.get((user.lower(), side), 0) for side in ("a", "b")}


def expect_on(counts, user, side, n):
    """None when `user` logged in n times, all on `side`; else the reason."""
    where = place(counts, user)
    other = "b" if side == "a" else "a"
    if where[side] == n and where[other] == 0:
        return None
    return f"{user}: {n} login(s) expected on route-{side}, the logs show route-a {where['a']}, route-b {where['b']}"


# ---------------------------------------------------------------------------------------------
# cases: lazy connect


def backend_counter(ctx, proto):
    """A function that counts backend connections of `proto` since `mark` was called."""
    if proto == "smtp":
        return lambda b: b.postfix_connections()
    return lambda b: b.dovecot_connections(proto)


def direct_control(ctx, proto):
    """One connection straight to route-a that never authenticates must be counted: the
    counting sees what it is meant to see."""
    port = {"imap": ctx.args.dovecot_a[0], "pop3": ctx.args.dovecot_a[1], "smtp": ctx.args.postfix_a}[proto]
    b = Backends(ctx)
    with socket.create_connection((HOST, port), 10) as s:
        recv_line(s)
        s.sendall({"imap": b"c LOGOUT\r\n", "pop3": b"QUIT\r\n", "smtp": b"QUIT\r\n"}[proto])
        recv_line(s, 5)
    count = backend_counter(ctx, proto)
    seen = wait_until(lambda: count(b), 10)
    if len(seen) != 1:
        raise Fail(f"control: one direct {proto} connection to route-a, the log shows {len(seen)}")


PRELOGIN = {
    # (capability, noop, goodbye) commands of each protocol, none of which needs a backend.
    "imap": (b"c CAPABILITY\r\n", b"n NOOP\r\n", b"z LOGOUT\r\n"),
    "pop3": (b"CAPA\r\n", b"NOOP\r\n", b"QUIT\r\n"),
    "smtp": (b"EHLO client.interop.test\r\n", b"NOOP\r\n", b"QUIT\r\n"),
}


def open_prelogin(ctx, proto, port, starttls):
    """A TLS session to mailfront, past its greeting (and STARTTLS), not logged in."""
    raw = socket.create_connection((HOST, port), 20)
    if starttls:
        greeting = recv_line(raw)
        if proto == "smtp":
            raw.sendall(b"EHLO client.interop.test\r\n")
            mfi.read_until(raw, lambda b: re.search(rb"(^|\r\n)250 [^\r\n]*\r\n", b) is not None, 15)
            raw.sendall(b"STARTTLS\r\n")
        else:
            raw.sendall(b"s STARTTLS\r\n")
        answer = recv_line(raw)
        if not (answer.startswith(b"220") or answer.startswith(b"s OK")):
            raise Fail(f"STARTTLS on {port}: greeting {greeting!r}, answer {answer!r}")
        return tls_context(ctx).wrap_socket(raw, server_hostname=HOST), greeting
    tls = tls_context(ctx).wrap_socket(raw, server_hostname=ctx.args.sni)
    return tls, recv_line(tls)


def reply_done(proto, cmd):
    """When the reply to a pre-login command is complete."""
    if proto == "imap":
        return mfi.tagged(cmd.split(b" ")[0].decode())
    if proto == "pop3" and cmd.startswith(b"CAPA"):
        return lambda r: r.endswith(b"\r\n.\r\n") or (r.startswith(b"-ERR") and r.endswith(b"\r\n"))
    if proto == "pop3":
        return lambda r: r.endswith(b"\r\n")
    return lambda r: re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", r) is not None


def established_to(ports):
    """Established TCP connections to any of `ports` on the loopback (ss)."""
    out = subprocess.run(["ss", "-Htn", "state", "established"], capture_output=True, text=True,
                         timeout=10, check=False).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and any(fields[3].endswith(f":{p}") for p in ports):
            found.append(line.strip())
    return found


def case_lazy(ctx, proto, port, starttls, backend_ports, sessions=12):
    """`sessions` TLS sessions that never log in: silent, a capability command, NOOP, or the
    protocol's goodbye. While they are all held, no connection to a backend may be open; once
    they are gone the backends may have logged at most one connection of `proto`, and it may
    not be a login: the capability probe a routed listener makes once."""
    direct_control(ctx, proto)
    b = Backends(ctx)
    held, greetings = [], []
    try:
        for i in range(sessions):
            s, greeting = open_prelogin(ctx, proto, port, starttls)
            held.append(s)
            greetings.append(greeting)
            capability, noop, bye = PRELOGIN[proto]
            for cmd in {0: [], 1: [capability], 2: [noop, noop], 3: [capability, bye]}[i % 4]:
                s.sendall(cmd)
                reply = mfi.read_until(s, reply_done(proto, cmd), 10)
                ctx.note(f"session {i}: {cmd.strip().decode()} -> {reply[:60]!r}")
        shown = sorted(set(g.strip().decode("ascii", "replace") for g in greetings))
        ctx.note("greetings:", shown)
        time.sleep(1.0)
        open_now = established_to(backend_ports)
        ctx.note(f"established to backends {backend_ports} while {sessions} sessions are held:", open_now)
    finally:
        for s in held:
            try:
                s.close()
            except OSError:
                pass
    time.sleep(1.5)
    count = backend_counter(ctx, proto)
    seen = count(b)
    for side, line in seen:
        ctx.note(f"route-{side}: {line}")
    problems = []
    # The backends' own greetings say "Dovecot route-a ready." and "… ESMTP Postfix".
    theirs = [g for g in shown if "route-" in g or "Postfix" in g]
    if theirs:
        problems.append(f"a client got the backend's greeting, not mailfront's: {theirs[0]!r}")
    if open_now:
        problems.append(f"{len(open_now)} backend connection(s) open while {sessions} sessions that never logged in were held")
    if len(seen) > 1:
        problems.append(f"{len(seen)} backend connections logged for {sessions} sessions that never logged in (at most 1: the capability probe)")
    logins = [line for _, line in seen if "Login:" in line or "sasl_username" in line]
    if logins:
        problems.append(f"a backend logged a login: {logins[0]}")
    if problems:
        raise Fail("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# cases: capabilities before login


def imap_caps_raw(sock, tag="c"):
    sock.sendall(f"{tag} CAPABILITY\r\n".encode())
    reply = mfi.read_until(sock, mfi.tagged(tag), 15)
    m = re.search(rb"(?:^|\r\n)\* CAPABILITY ([^\r\n]*)\r\n", reply)
    if not m:
        raise Fail(f"no * CAPABILITY in {reply[:120]!r}")
    return m.group(1).decode().split()


def greeting_caps(greeting):
    m = re.search(rb"\[CAPABILITY ([^\]]*)\]", greeting)
    return m.group(1).decode().split() if m else None


def norm(tokens):
    return {t.upper() for t in tokens}


def imap_hidden(token):
    t = token.upper()
    if t in ("STARTTLS", "LOGINDISABLED"):
        return True
    return t.startswith("AUTH=") and not routable(t[5:])


def imap_prelogin_caps(ctx, port, starttls):
    s, greeting = open_prelogin(ctx, "imap", port, starttls)
    with s:
        return greeting, imap_caps_raw(s)


def case_caps_imap(ctx, port, starttls):
    """Before login, the routed listener's CAPABILITY (and its greeting's, if any) is route-a's
    own pre-login list less what must be hidden: STARTTLS and LOGINDISABLED (TLS is on), and
    every AUTH= mechanism that cannot be routed (CRAM-MD5, DIGEST-MD5, EXTERNAL, …). It also
    equals what the unrouted imaps-direct listener shows of route-a, less those mechanisms."""
    with socket.create_connection((HOST, ctx.args.dovecot_a[0]), 10) as s:
        dgreeting = recv_line(s)
        dovecot = imap_caps_raw(s)
        s.sendall(b"z LOGOUT\r\n")
    greeting, routed = imap_prelogin_caps(ctx, port, starttls)
    _dg, direct = imap_prelogin_caps(ctx, ctx.args.imaps_direct, False)
    expected = {t for t in norm(dovecot) if not imap_hidden(t)}
    ctx.note("dovecot route-a greeting:", dgreeting.strip())
    ctx.note("dovecot route-a CAPABILITY:", " ".join(dovecot))
    ctx.note("expected:", " ".join(sorted(expected)))
    ctx.note(f"mailfront {port} greeting:", greeting.strip())
    ctx.note(f"mailfront {port} CAPABILITY:", " ".join(routed))
    ctx.note("mailfront imaps-direct CAPABILITY:", " ".join(direct))
    if "AUTH=CRAM-MD5" not in norm(dovecot) or "AUTH=PLAIN" not in norm(dovecot):
        raise Fail(f"fixture: route-a offers no AUTH=CRAM-MD5 or no AUTH=PLAIN: {dovecot}")
    problems = []
    got = norm(routed)
    if got != expected:
        problems.append(f"CAPABILITY differs from Dovecot's less the hidden: missing {sorted(expected - got)}, extra {sorted(got - expected)}")
    in_greeting = None if starttls else greeting_caps(greeting)
    if in_greeting is not None and norm(in_greeting) != got:
        problems.append(f"greeting's [CAPABILITY] {in_greeting} is not the CAPABILITY answer {routed}")
    direct_view = {t for t in norm(direct) if not imap_hidden(t)}
    if got != direct_view:
        problems.append(f"differs from the unrouted listener's view less unroutable mechanisms: missing {sorted(direct_view - got)}, extra {sorted(got - direct_view)}")
    if problems:
        raise Fail("; ".join(problems))


def pop3_capa(sock):
    sock.sendall(b"CAPA\r\n")
    reply = mfi.read_until(sock, lambda r: r.startswith(b"-ERR") and r.endswith(b"\r\n") or r.endswith(b"\r\n.\r\n"), 15)
    if not reply.startswith(b"+OK"):
        raise Fail(f"CAPA got {reply[:80]!r}")
    lines = reply.decode().split("\r\n")[1:]
    return [line for line in lines if line and line != "."]


def pop3_view(lines, hide):
    """CAPA lines as a set, the SASL line as its set of mechanisms; `hide` drops STLS, XCLIENT
    and every mechanism that cannot be routed."""
    out = set()
    for line in lines:
        words = line.upper().split()
        if not words:
            continue
        if hide and words[0] in ("STLS", "XCLIENT"):
            continue
        if words[0] == "SASL":
            mechs = [w for w in words[1:] if not hide or routable(w)]
            if mechs:
                out.add("SASL " + " ".join(sorted(mechs)))
            continue
        out.add(" ".join(words))
    return out


def case_caps_pop3(ctx, port):
    """Before login, the routed POP3 listener's CAPA is route-a's less STLS, XCLIENT and the
    SASL mechanisms that cannot be routed, and as the unrouted pop3s-direct listener shows it
    less those; its greeting carries no APOP timestamp (issue 22: APOP goes away on 995)."""
    with socket.create_connection((HOST, ctx.args.dovecot_a[1]), 10) as s:
        recv_line(s)
        dovecot = pop3_capa(s)
        s.sendall(b"QUIT\r\n")
    s, greeting = open_prelogin(ctx, "pop3", port, False)
    with s:
        routed = pop3_capa(s)
    s, _ = open_prelogin(ctx, "pop3", ctx.args.pop3s_direct, False)
    with s:
        direct = pop3_capa(s)
    expected = pop3_view(dovecot, True)
    got = pop3_view(routed, False)
    ctx.note("dovecot route-a CAPA:", dovecot)
    ctx.note(f"mailfront {port} greeting:", greeting.strip(), "CAPA:", routed)
    ctx.note("mailfront pop3s-direct CAPA:", direct)
    if not any(line.upper().startswith("SASL") and "CRAM-MD5" in line.upper() for line in dovecot):
        raise Fail(f"fixture: route-a's CAPA has no SASL CRAM-MD5: {dovecot}")
    problems = []
    if got != expected:
        problems.append(f"CAPA differs from Dovecot's less the hidden: missing {sorted(expected - got)}, extra {sorted(got - expected)}")
    direct_view = pop3_view(direct, True)
    if got != direct_view:
        problems.append(f"differs from the unrouted listener's view less unroutable mechanisms: missing {sorted(direct_view - got)}, extra {sorted(got - direct_view)}")
    if re.search(rb"<[^>]*@[^>]*>", greeting):
        problems.append(f"greeting carries an APOP timestamp: {greeting.strip()!r}")
    if problems:
        raise Fail("; ".join(problems))


def ehlo_keywords(reply):
    """The keyword lines of an EHLO reply (not the first, the greeting line), uppercased."""
    lines = [line[4:] for line in reply.decode().split("\r\n") if len(line) >= 4]
    return {" ".join(line.upper().split()) for line in lines[1:]}


def auth_mechs(keywords):
    for k in keywords:
        words = k.split()
        if words and words[0] == "AUTH":
            return set(words[1:])
    return set()


def case_caps_smtp(ctx, port):
    """Before AUTH, the routed submissions listener's EHLO keywords are the ones the unrouted
    submissions-direct listener shows of the same Postfix (mailfront's own rewriting of a
    backend's EHLO: SIZE, CHUNKING, …), less AUTH mechanisms that cannot be routed; its AUTH
    mechanisms are exactly Postfix's routable ones (Postfix route-a offers its Dovecot's
    CRAM-MD5 and DIGEST-MD5 too); no STARTTLS on implicit TLS."""
    views = {}
    for name, p in (("routed", port), ("direct", ctx.args.submissions_direct)):
        s, greeting = open_prelogin(ctx, "smtp", p, False)
        with s:
            s.sendall(b"EHLO client.interop.test\r\n")
            reply = mfi.read_until(s, lambda r: re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", r) is not None, 15)
            s.sendall(b"QUIT\r\n")
        ctx.note(f"{name} ({p}) greeting {greeting.strip()!r} EHLO:", reply.decode("ascii", "replace").replace("\r\n", " | "))
        views[name] = ehlo_keywords(reply)
    with socket.create_connection((HOST, ctx.args.postfix_a), 10) as s:
        recv_line(s)
        s.sendall(b"EHLO client.interop.test\r\n")
        reply = mfi.read_until(s, lambda r: re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", r) is not None, 15)
        s.sendall(b"QUIT\r\n")
    ctx.note("postfix route-a EHLO:", reply.decode("ascii", "replace").replace("\r\n", " | "))

    def without_unroutable(keywords):
        out = set()
        for k in keywords:
            words = k.split()
            if words and words[0] == "AUTH":
                mechs = [w for w in words[1:] if routable(w)]
                if mechs:
                    out.add(" ".join(["AUTH"] + mechs))
            else:
                out.add(k)
        return out

    got, direct = views["routed"], without_unroutable(views["direct"])
    postfix = ehlo_keywords(reply)
    if "CRAM-MD5" not in auth_mechs(postfix):
        raise Fail(f"fixture: Postfix route-a offers no AUTH CRAM-MD5: {sorted(postfix)}")
    problems = []
    want = {m for m in auth_mechs(postfix) if routable(m)}
    if auth_mechs(got) != want:
        problems.append(f"AUTH offers {sorted(auth_mechs(got))}, Postfix's routable mechanisms are {sorted(want)}")
    if got != direct:
        problems.append(f"EHLO differs from the unrouted listener's: missing {sorted(direct - got)}, extra {sorted(got - direct)}")
    if "STARTTLS" in got:
        problems.append("STARTTLS offered on implicit TLS")
    if problems:
        raise Fail("; ".join(problems))


def case_unroutable_refused(ctx, port):
    """AUTHENTICATE CRAM-MD5 (hidden: the user is named only after the challenge) on a routed
    listener is refused by mailfront itself: a tagged NO or BAD, no `+` challenge, and no
    connection to either instance (the listener's probe has already run)."""
    s, _greeting = open_prelogin(ctx, "imap", port, False)
    b = Backends(ctx)
    with s:
        s.sendall(b"x AUTHENTICATE CRAM-MD5\r\n")
        reply = recv_line(s, 15)
        if reply.startswith(b"+"):
            s.sendall(b"*\r\n")
            reply += mfi.read_until(s, mfi.tagged("x"), 10)
        s.sendall(b"z LOGOUT\r\n")
        mfi.read_until(s, mfi.tagged("z"), 5)
    ctx.note("AUTHENTICATE CRAM-MD5 ->", reply)
    time.sleep(1)
    seen = b.dovecot_connections("imap")
    for side, line in seen:
        ctx.note(f"route-{side}: {line}")
    problems = []
    if not re.match(rb"x (NO|BAD)", reply):
        problems.append(f"AUTHENTICATE CRAM-MD5 got {reply[:80]!r}, want a tagged NO/BAD")
    if seen:
        problems.append(f"{len(seen)} backend connection(s) for it")
    if problems:
        raise Fail("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# cases: affinity


AFFINITY_PLAN = [
    # (user number, listener, login) for the 3 sessions of each of 5 users; route3's first
    # session spells the name in capitals (Dovecot's %Lu makes it the same user).
    [(1, "implicit", "login"), (1, "implicit", "login"), (1, "implicit", "plain")],
    [(2, "implicit", "login"), (2, "implicit", "plain-ir"), (2, "starttls", "login")],
    [(3, "implicit", "login-upper"), (3, "implicit", "login"), (3, "implicit", "login-mech")],
    [(4, "starttls", "login"), (4, "implicit", "login"), (4, "implicit", "plain")],
    [(5, "implicit", "login"), (5, "implicit", "login"), (5, "implicit", "login")],
]
MORE_USERS = range(6, 13)  # one session each: with 12 users, one instance for all is 2 in 4096


def case_affinity(ctx):
    """imaplib holds 3 sessions for each of 5 users at once, opened round-robin over the users
    (so least connections would split every user), through imaps-affinity and imap-affinity
    (STARTTLS, same backend list), with LOGIN, AUTHENTICATE PLAIN with and without SASL-IR and
    AUTHENTICATE LOGIN; then 7 more users, one session each. Dovecot's logs must show each
    user's logins all on one instance, and both instances used."""
    b = Backends(ctx)
    held, errors = [], []
    order = [AFFINITY_PLAN[u][r] for r in range(3) for u in range(5)]
    order += [(n, "implicit", "login") for n in MORE_USERS]
    for n, listener, how in order:
        user = f"route{n}@example.test"
        name = user
        if how == "login-upper":
            name, how = "Route3@EXAMPLE.TEST", "login"
        port = ctx.args.imaps_affinity if listener == "implicit" else ctx.args.imap_affinity
        try:
            held.append(imap_session(ctx, port, how, name, starttls=(listener == "starttls")))
            ctx.note(f"{name} {listener} {how}: logged in, INBOX selected")
        except (Fail, OSError, EOFError, ssl.SSLError, imaplib.IMAP4.error) as e:
            errors.append(f"{name} {listener} {how}: {e}")
            ctx.note(f"{name} {listener} {how}: FAILED {e}")
    ctx.note(f"{len(held)} sessions held at once")
    close_all(held)
    users = [f"route{n}@example.test" for n in list(range(1, 6)) + list(MORE_USERS)]
    want = 15 + len(MORE_USERS)

    def counts():
        c = b.dovecot_logins("imap")
        return c if sum(v for (u, _), v in c.items() if u in users) >= want else None
    c = wait_until(counts, 10) or b.dovecot_logins("imap")
    for u in users:
        ctx.note(f"{u}: {place(c, u)}")
    results = {}
    split = []
    for n in range(1, 6):
        u = f"route{n}@example.test"
        where = place(c, u)
        if where["a"] and where["b"]:
            split.append(f"route{n} a={where['a']} b={where['b']}")
        elif where["a"] + where["b"] != 3:
            split.append(f"route{n}: {where['a'] + where['b']} of 3 logins logged")
    reason = None
    if split or errors:
        reason = "; ".join(
            ([f"users split over both instances or logins missing: {', '.join(split)}"] if split else [])
            + ([f"{len(errors)} session(s) failed, first: {errors[0]}"] if errors else []))
    results["route-affinity-imap-5-users-3-sessions-each-on-one-instance"] = reason
    sides = {side for u in users for side in ("a", "b") if place(c, u)[side]}
    more_split = [u for u in users if all(place(c, u).values())]
    reason = None
    if more_split:
        reason = f"split users: {more_split}"
    elif sides != {"a", "b"}:
        reason = f"all {len(users)} users' logins went to {sorted(sides) or 'no instance'}"
    results["route-affinity-imap-12-users-both-instances-used"] = reason
    return results


def port_closed(port):
    try:
        with socket.create_connection((HOST, port), 1):
            return False
    except OSError:
        return True


def mapped_down(ctx, user, x):
    """While route-x is down, `user` (mapped to it) gets IMAP's temporary failure on imaps-map,
    `NO [UNAVAILABLE]`, and logs in nowhere: a wrong backend is worse than none."""
    b = Backends(ctx)
    try:
        m = imap_open(ctx, ctx.args.imaps_map)
    except (OSError, ssl.SSLError, imaplib.IMAP4.error) as e:
        return f"connect: {e}"
    try:
        typ, data = m._simple_command("LOGIN", user, ctx.args.password)
        answer = f"{typ} {data}"
    except imaplib.IMAP4.error as e:
        answer = f"NO {e}"
    finally:
        close_all([m])
    ctx.note(f"{user} mapped to route-{x}, which is down: {answer}")
    time.sleep(1)
    logged = place(b.dovecot_logins("imap"), user)
    if logged["a"] or logged["b"]:
        return f"{user} logged in on another instance while its mapped route-{x} was down: {logged}"
    if "UNAVAILABLE" not in answer.upper() or answer.startswith("OK"):
        return f"{user}: expected NO [UNAVAILABLE] while route-{x} is down, got {answer}"
    return None


def case_failover(ctx):
    """imaps-failover (affinity over both instances, passive health): route1..route6
    log in once each, each on one instance. route1's instance X is stopped: route1 logs in on
    the other one, and a user whose instance is the other stays there (only the users of the
    backend that is down move). X is started again: within 15 s route1 logs in on X again."""
    args = ctx.args
    port = args.imaps_failover
    users = [f"route{n}@example.test" for n in range(1, 7)]

    def login_where(user):
        b = Backends(ctx)
        close_all([imap_session(ctx, port, "login", user)])
        c = wait_until(lambda: b.dovecot_logins("imap").get((user, "a")) or
                       b.dovecot_logins("imap").get((user, "b")), 10)
        where = place(b.dovecot_logins("imap"), user)
        if not c or where["a"] + where["b"] != 1:
            raise Fail(f"{user}: expected one login in the logs, got {where}")
        return "a" if where["a"] else "b"

    home = {u: login_where(u) for u in users}
    ctx.note("before:", home)
    x = home[users[0]]
    y = "b" if x == "a" else "a"
    stay = next((u for u in users[1:] if home[u] == y), None)
    conf = {"a": args.dovecot_a_conf, "b": args.dovecot_b_conf}[x]
    x_port = (args.dovecot_a if x == "a" else args.dovecot_b)[0]
    results = {}
    subprocess.run(["doveadm", "-c", conf, "stop"], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20, check=False)
    try:
        if not wait_until(lambda: port_closed(x_port), 15):
            raise Fail(f"fixture: route-{x} still accepts connections after doveadm stop")
        ctx.note(f"route-{x} stopped")
        problems = []
        try:
            where = login_where(users[0])
            if where != y:
                problems.append(f"{users[0]} logged in on route-{where} while route-{x} was down")
        except (Fail, OSError, EOFError, ssl.SSLError, imaplib.IMAP4.error) as e:
            problems.append(f"{users[0]} could not log in while its route-{x} was down: {e}")
        if stay:
            try:
                where = login_where(stay)
                if where != y:
                    problems.append(f"{stay} moved from route-{y} to route-{where}")
            except (Fail, OSError, EOFError, ssl.SSLError, imaplib.IMAP4.error) as e:
                problems.append(f"{stay} (on route-{y}) could not log in: {e}")
        else:
            ctx.note(f"no user of the six on route-{y}: the stay check is skipped")
        results["route-affinity-imap-failover-moves-only-the-down-backends-users"] = \
            "; ".join(problems) or None
        results["route-map-imap-mapped-backend-down-is-unavailable-not-another"] = \
            mapped_down(ctx, "mapa@example.test" if x == "a" else "mapb@example.test", x)
    finally:
        # Dovecot's daemon keeps inherited pipes open: nothing captured.
        started = subprocess.run(["dovecot", "-c", conf], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 timeout=20, check=False)
        ctx.note(f"route-{x} started again: rc {started.returncode}")
    reason = f"{users[0]} did not return to route-{x} within 15 s"
    if wait_until(lambda: not port_closed(x_port), 15):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                where = login_where(users[0])
                ctx.note(f"after restart: {users[0]} on route-{where}")
                if where == x:
                    reason = None
                    break
            except (Fail, OSError, EOFError, ssl.SSLError, imaplib.IMAP4.error) as e:
                ctx.note(f"after restart: {e}")
            time.sleep(1)
    else:
        reason = f"fixture: route-{x} did not start again"
    results["route-affinity-imap-user-returns-when-backend-is-back"] = reason
    return results


# ---------------------------------------------------------------------------------------------
# cases: user_map


def case_map_imap(ctx):
    """imaps-map (own backend route-a; map: mapa and erin@maps.example.test to route-a, mapb and
    @maps.example.test to route-b): each login lands where the map says, an exact name before
    its domain, names compared without case; an unmapped user gets the listener's backend."""
    b = Backends(ctx)
    plan = [  # (case, login name, how, the user Dovecot logs, where)
        ("route-map-imap-name-to-a", "mapa@example.test", "login", "mapa@example.test", "a"),
        ("route-map-imap-name-to-b-case-insensitive", "MapB@Example.TEST", "login",
         "mapb@example.test", "b"),
        ("route-map-imap-authenticate-plain-to-b", "mapb@example.test", "plain",
         "mapb@example.test", "b"),
        ("route-map-imap-domain-to-b", "dora@maps.example.test", "login",
         "dora@maps.example.test", "b"),
        ("route-map-imap-exact-name-beats-domain-sasl-ir", "ERIN@maps.example.test", "plain-ir",
         "erin@maps.example.test", "a"),
        ("route-map-imap-unmapped-to-listener-backend", "route7@example.test", "login",
         "route7@example.test", "a"),
    ]
    return run_map_plan(ctx, b, plan, lambda name, how: close_all(
        [imap_session(ctx, ctx.args.imaps_map, how, name)]), lambda: b.dovecot_logins("imap"))


def run_map_plan(ctx, b, plan, session, logins):
    """Runs one session per plan entry, then judges each entry on the logins logged for its
    user: all of that user's sessions in this plan on the expected side, none on the other."""
    errors = {}
    for case, name, how, _user, _side in plan:
        try:
            session(name, how)
            ctx.note(f"{case}: {name} {how}: logged in")
        except (Fail, OSError, EOFError, ssl.SSLError, smtplib.SMTPException,
                imaplib.IMAP4.error, poplib.error_proto) as e:
            errors[case] = f"{name} {how}: {e!r}"
            ctx.note(f"{case}: {name} {how}: FAILED {e!r}")
    c = wait_until(lambda: (lambda c: c if sum(c.values()) >= len(plan) else None)(logins()), 10) \
        or logins()
    results = {}
    for case, _name, _how, user, side in plan:
        n = sum(1 for entry in plan if entry[3] == user)
        ctx.note(f"{case}: {user}: {place(c, user)}")
        results[case] = errors.get(case) or expect_on(c, user, side, n)
    return results


def case_map_pop3(ctx):
    """pop3s-map (own backend route-a; map: mapb to route-b): USER/PASS and AUTH PLAIN with an
    initial response reach route-b for mapb; an unmapped user reaches route-a."""
    b = Backends(ctx)
    plan = [
        ("route-map-pop3-user-pass-to-b", "mapb@example.test", "user-pass", "mapb@example.test", "b"),
        ("route-map-pop3-auth-plain-to-b", "MAPB@example.test", "auth-plain", "mapb@example.test", "b"),
        ("route-map-pop3-unmapped-to-listener-backend", "route8@example.test", "user-pass",
         "route8@example.test", "a"),
    ]
    return run_map_plan(ctx, b, plan, lambda name, how: pop3_session(
        ctx, ctx.args.pop3s_map, how, name), lambda: b.dovecot_logins("pop3"))


def case_map_smtp(ctx):
    """submissions-map (own backend Postfix route-a; map: mapb to route-b): smtplib submits
    as mapb and Postfix route-b logs sasl_username=mapb; an unmapped user's goes to route-a."""
    b = Backends(ctx)
    plan = [
        ("route-map-smtp-name-to-b", "mapb@example.test", "auth", "mapb@example.test", "b"),
        ("route-map-smtp-unmapped-to-listener-backend", "route9@example.test", "auth",
         "route9@example.test", "a"),
    ]
    return run_map_plan(ctx, b, plan, lambda name, _how: smtp_submit(
        ctx, ctx.args.submissions_map, name, f"interop-route-{name}-{os.getpid()}"),
        b.postfix_logins)


def case_map_reload(ctx):
    """The IMAP map file changes (mapa now to route-b, away from the listener's own route-a):
    after mailfront logs the reload, mapa logs in on route-b. Then the file is made invalid:
    mailfront logs the failure and keeps the map in service, so mapa still reaches route-b."""
    args = ctx.args
    with open(args.map_imap) as f:
        original = f.read()
    a = f"127.0.0.1:{args.dovecot_a[0]}"
    b_addr = f"127.0.0.1:{args.dovecot_b[0]}"
    moved = original.replace(f'"mapa@example.test": "{a}"', f'"mapa@example.test": "{b_addr}"')
    if moved == original:
        raise Fail(f"fixture: no mapa entry for {a} in {args.map_imap}")
    results = {}
    mf = Log(args.mailfront_log)
    with open(args.map_imap + ".tmp", "w") as f:
        f.write(moved)
    os.replace(args.map_imap + ".tmp", args.map_imap)

    def reloaded(text):
        return [ln for ln in text.splitlines() if "user_map reloaded" in ln and "imaps-map" in ln]
    line = wait_until(lambda: reloaded(mf.text()), 15)
    ctx.note("reload log:", line)
    b = Backends(ctx)
    reason = None
    try:
        close_all([imap_session(ctx, args.imaps_map, "login", "mapa@example.test")])
        c = wait_until(lambda: b.dovecot_logins("imap"), 10)
        reason = expect_on(c, "mapa@example.test", "b", 1)
        if reason and not line:
            reason += " (and mailfront logged no 'user_map reloaded' for imaps-map within 15 s)"
    except (Fail, OSError, EOFError, ssl.SSLError, imaplib.IMAP4.error) as e:
        reason = f"mapa login: {e}"
    results["route-map-imap-file-change-moves-user"] = reason

    mf = Log(args.mailfront_log)
    with open(args.map_imap + ".tmp", "w") as f:
        f.write(moved + '"broken@example.test": "not an address"\n')
    os.replace(args.map_imap + ".tmp", args.map_imap)
    line = wait_until(lambda: [ln for ln in mf.text().splitlines() if "user_map reload failed" in ln], 15)
    ctx.note("bad file log:", line)
    b = Backends(ctx)
    reason = None if line else "mailfront logged no 'user_map reload failed' within 15 s"
    try:
        close_all([imap_session(ctx, args.imaps_map, "login", "mapa@example.test")])
        c = wait_until(lambda: b.dovecot_logins("imap"), 10)
        reason = expect_on(c, "mapa@example.test", "b", 1) or reason
    except (Fail, OSError, EOFError, ssl.SSLError, imaplib.IMAP4.error) as e:
        reason = f"mapa login after the bad file: {e}"
    results["route-map-imap-bad-file-keeps-old-map"] = reason
    mf = Log(args.mailfront_log)
    with open(args.map_imap + ".tmp", "w") as f:
        f.write(original)
    os.replace(args.map_imap + ".tmp", args.map_imap)
    if not wait_until(lambda: reloaded(mf.text()), 15):
        ctx.note("the original map was not reloaded within 15 s")
    return results


# ---------------------------------------------------------------------------------------------
# cases: observability


def case_observability(ctx):
    """After the cases above: mailfront_user_routes_total counts routes of imaps-affinity under
    source="affinity" and of imaps-map under source="map", and mailfront's authentication log
    line names the route and the backend of a mapped login (mapb on route-b)."""
    with urllib.request.urlopen(f"http://{HOST}:{ctx.args.metrics}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    routes = [ln for ln in metrics.splitlines() if ln.startswith("mailfront_user_routes_total{")]
    ctx.note("metrics:", "\n".join(routes))
    problems = []
    for listener, source in (("imaps-affinity", "affinity"), ("imaps-map", "map")):
        if not any(f'listener="{listener}"' in ln and f'source="{source}"' in ln for ln in routes):
            problems.append(f'no mailfront_user_routes_total{{listener="{listener}",source="{source}"}}')
    backend = re.compile(r'backend="?127\.0\.0\.1:%d\b' % ctx.args.dovecot_b[0])
    with open(ctx.args.mailfront_log, errors="replace") as f:
        lines = [ln for ln in f if "authentication" in ln and re.search(r'\broute="?map\b', ln)
                 and backend.search(ln)]
    ctx.note("auth log:", lines[:1])
    if not lines:
        problems.append(f"no authentication log line with route=map and backend=127.0.0.1:{ctx.args.dovecot_b[0]}")
    if problems:
        raise Fail("; ".join(problems))


# ---------------------------------------------------------------------------------------------


def cmd_run(args):
    os.makedirs(args.outdir, exist_ok=True)
    ctx = Context(args)
    a_imap, a_pop3 = args.dovecot_a
    b_imap, b_pop3 = args.dovecot_b
    # Lazy connect first, before anything else of this mailfront runs (the listeners are theirs
    # alone anyway), each on its own: the counts are per protocol over both instances.
    lazy = [
        ("route-lazy-imaps-affinity-no-backend-before-login", "imap", args.imaps_lazy, False, [a_imap, b_imap]),
        ("route-lazy-pop3s-affinity-no-backend-before-login", "pop3", args.pop3s_lazy, False, [a_pop3, b_pop3]),
        ("route-lazy-submissions-affinity-no-backend-before-auth", "smtp", args.submissions_lazy, False,
         [args.postfix_a, args.postfix_b]),
        ("route-lazy-submission-starttls-affinity-no-backend-before-auth", "smtp", args.submission_lazy, True,
         [args.postfix_a, args.postfix_b]),
        ("route-lazy-imaps-unrouted-no-backend-before-login", "imap", args.imaps_unrouted_lazy, False, [b_imap]),
    ]
    for name, proto, port, starttls, ports in lazy:
        ctx.run(name, case_lazy, proto, port, starttls, ports)
    ctx.run("route-caps-imaps-affinity-prelogin-is-dovecots-less-hidden", case_caps_imap,
            args.imaps_affinity, False)
    ctx.run("route-caps-imap-affinity-after-starttls-is-dovecots-less-hidden", case_caps_imap,
            args.imap_affinity, True)
    ctx.run("route-caps-pop3s-map-prelogin-is-dovecots-less-hidden", case_caps_pop3, args.pop3s_map)
    ctx.run("route-caps-submissions-map-ehlo-is-postfixs-less-hidden", case_caps_smtp,
            args.submissions_map)
    ctx.run("route-imaps-affinity-cram-md5-refused-without-backend", case_unroutable_refused,
            args.imaps_affinity)
    ctx.run("route-affinity-imap", case_affinity)
    ctx.run("route-map-imap", case_map_imap)
    ctx.run("route-map-pop3", case_map_pop3)
    ctx.run("route-map-smtp", case_map_smtp)
    ctx.run("route-observability-metrics-and-auth-log", case_observability)
    ctx.run("route-map-imap-reload", case_map_reload)
    # Last: it stops and restarts one instance.
    ctx.run("route-affinity-imap-failover", case_failover)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--cafile", required=True)
    p.add_argument("--sni", required=True)
    p.add_argument("--password", required=True, help="every routing account's password")
    p.add_argument("--rcpt", required=True, help="a local mailbox for the SMTP cases")
    p.add_argument("--dovecot-a-log", required=True)
    p.add_argument("--dovecot-b-log", required=True)
    p.add_argument("--postfix-log", required=True)
    p.add_argument("--mailfront-log", required=True)
    p.add_argument("--mailfront-pid", type=int)
    p.add_argument("--metrics", type=int, required=True)
    p.add_argument("--map-imap", required=True)
    p.add_argument("--dovecot-a", type=int, nargs=2, required=True, metavar=("IMAP", "POP3"))
    p.add_argument("--dovecot-b", type=int, nargs=2, required=True, metavar=("IMAP", "POP3"))
    for name in ("postfix-a", "postfix-b", "imaps-affinity", "imap-affinity", "imaps-map",
                 "pop3s-map", "submissions-map", "imaps-direct", "pop3s-direct",
                 "submissions-direct", "imaps-lazy", "pop3s-lazy", "submissions-lazy",
                 "submission-lazy", "imaps-unrouted-lazy", "imaps-failover"):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--dovecot-a-conf", required=True)
    p.add_argument("--dovecot-b-conf", required=True)
    p.add_argument("--outdir", required=True)
    p.set_defaults(func=cmd_run)
    args = ap.parse_args()
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
