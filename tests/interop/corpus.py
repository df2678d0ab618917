#!/usr/bin/env python3
"""Adversarial login corpus for the mailfront interop suite (tests/interop/run.sh).

Each case sends one crafted byte sequence to mailfront over a raw socket and reads what comes back
for a bounded time. It holds if
  (a) neither backend logged a successful login for the case's own victim account: Dovecot's
      `Login: user=<victim>` (IMAP, POP3) or its auth process's `passdb out: OK ... user=victim`
      (every service, so also Postfix's SASL), or Postfix's `sasl_username=victim`;
  (b) the client got no success for the credential: no tagged OK to a smuggled LOGIN/AUTHENTICATE
      tag (IMAP), no `+OK Logged in` and no `+OK n m` answer to a smuggled STAT (POP3), no 235 and
      no `250 2.1.5` (SMTP);
  (c) for "before TLS" cases, none of the victim's name, password or SASL blobs reached a backend
      log at all: before TLS nothing may reach a backend (RFC 8314 §4.1; Dovecot logs every
      password with auth_debug_passwords, Postfix every loopback line with debug_peer_list);
  (d) for cases carrying a forged IMAP ID `x-originating-ip`/`tls` or a POP3 XCLIENT address, the
      forged values appear nowhere in the backend logs.

Every case has its own victim account (`mallory-victim-NNN@example.test`, password
`vpNNN-<secret>`), so the cases run in parallel and a late log line cannot be blamed on the wrong
case. run.sh puts the accounts into Dovecot's passwd-file (`accounts` subcommand).

"Before TLS" cases go to the STARTTLS listeners in cleartext: there no login is acceptable, in any
framing. "After TLS" cases go to the implicit-TLS listeners (or after a proper STARTTLS). After TLS
a legitimate LOGIN may be forwarded, so those byte sequences contain no LOGIN/AUTH/USER/PASS that a
strict RFC framer would accept: the credential-bearing command itself ends in a bare LF, or sits
behind a bare CR or a NUL, or the smuggled command is a forged ID behind a brace inside an atom or
a quoted string. A proxy may refuse a whole CRLF-terminated line that holds a bare LF, or refuse
each bare-LF segment and resynchronise after it (where Dovecot and Postfix 3.7, which take a bare
LF as a line end, would start their next command): either way no login. Forwarding the bytes raw,
or taking a bare LF for a valid line end, logs in. The assertions hold for any correct proxy
whatever it answers itself (its own greeting, BAD, -ERR, 5xx, or closing the connection): no reply
text is compared.

The `adv-control-*` cases prove the checks can fail: a legitimate TLS login through mailfront per
protocol must be seen by the same log and client checks, and the bare-LF smuggles and forged
ID/XCLIENT sent straight to the backends (no mailfront) must log in / be logged.

Standard library only. Output: one `PASS name` / `FAIL name: reason` line per case on stdout.
"""

import argparse
import base64
import concurrent.futures
import hashlib
import os
import re
import socket
import ssl
import sys
import time

HOST = "127.0.0.1"
GREETING_TIMEOUT = 3.0
EXPECT_TIMEOUT = 3.0
# The final read: until the peer closes, or nothing arrives for DRAIN_IDLE, at most DRAIN_TOTAL.
DRAIN_IDLE = 0.7
DRAIN_TOTAL = 3.0
# After every case ran: wait for late log lines, then judge all cases (controls up to LOG_WAIT).
LOG_SETTLE = 1.0
LOG_WAIT = 6.0


class Account:
    def __init__(self, idx, secret):
        self.idx = idx
        self.user = f"mallory-victim-{idx:03d}@example.test"
        self.password = f"vp{idx:03d}-{secret}"
        self.u = self.user.encode()
        self.p = self.password.encode()
        self.plain = base64.b64encode(b"\0" + self.u + b"\0" + self.p)
        self.b64_user = base64.b64encode(self.u)
        self.b64_pass = base64.b64encode(self.p)
        # Forged client identity for ID/XCLIENT cases (RFC 5737 documentation range).
        self.forged_ip = f"203.0.113.{idx}"
        self.forged_tls = f"forged-tls-{idx:03d}x"

    def login(self, tag):
        return f"{tag} LOGIN {self.user} {self.password}\r\n".encode()

    def lf_login(self, tag):
        """A LOGIN that ends in a bare LF, then an empty CRLF line: only a framer that takes a
        bare LF for a line end sees a LOGIN here. A strict framer sees one malformed line; one
        that refuses the bare-LF segments and resynchronises after each LF refuses them all."""
        return f"{tag} LOGIN {self.user} {self.password}\n\r\n".encode()

    def forged_id(self, tag):
        return (f'{tag} ID ("name" "adv-{self.idx:03d}" "x-originating-ip" "{self.forged_ip}" '
                f'"x-originating-port" "4242" "tls" "{self.forged_tls}")\r\n').encode()


# ---------------------------------------------------------------------------------------------
# steps: ("send", bytes) ("pause", s) ("expect", regex) ("tls_if", regex) ("apop",)
# Builders take the Account and return the step list.


def send(b):
    return ("send", b)


def pause(s=0.25):
    return ("pause", s)


def expect(rx):
    return ("expect", rx)


def tls_if(rx):
    """Expect rx; if it came, start TLS on the connection (a STARTTLS/STLS answer)."""
    return ("tls_if", rx)


def tagged(tag):
    return rb"(?:^|\n)" + tag.encode() + rb" (?:OK|NO|BAD)[^\n]*\n"


def tagged_ok(tag):
    return rb"(?:^|\n)" + tag.encode() + rb" OK[^\n]*\n"


IMAP_CONT = rb"(?:^|\n)\+[^\n]*\n"
POP3_OK = rb"(?:^|\n)\+OK[^\n]*\n"
POP3_CONT = rb"(?:^|\n)\+ ?[^O\n][^\n]*\n|(?:^|\n)\+ ?\r?\n"
SMTP_250_END = rb"(?:^|\n)250 [^\n]*\n"
SMTP_220 = rb"(?:^|\n)220 [^\n]*\n"
SMTP_334 = rb"(?:^|\n)334[^\n]*\n"


def literal_smuggle(head, payload, sync=False, tail=b"\r\n"):
    """`head{N+}` CRLF payload tail, N = len(payload): sized so a proxy that takes the braces for a
    literal passes exactly `payload` on as literal data. In `a2 NOOP x{24+}` the brace closes an
    atom (`{` is an atom-special, RFC 9051 §9), so a backend such as Dovecot runs the
    next line as a command while such a proxy never looked at it."""
    n = str(len(payload)).encode()
    return head + b"{" + n + (b"" if sync else b"+") + b"}\r\n" + payload + tail


class Case:
    def __init__(self, name, proto, phase, listener, build, tags=(), forged=False,
                 control=False, direct=False, need_login=True, need_forged=False,
                 pregreet=False):
        self.name = name
        self.proto = proto            # imap | pop3 | smtp
        self.phase = phase            # before | after
        self.listener = listener      # starttls | implicit
        self.build = build
        self.tags = tags              # IMAP tags whose OK is a login
        self.forged = forged          # check (d)
        self.control = control
        self.direct = direct          # control sent to the backend itself, in cleartext
        self.need_login = need_login  # control: must see a login
        self.need_forged = need_forged  # control: must see the forged values
        self.pregreet = pregreet      # send before the greeting arrives


def imap_cases():
    c = []

    def add(name, phase, build, tags=("a3",), listener=None, **kw):
        lst = listener or ("starttls" if phase == "before" else "implicit")
        c.append(Case(f"adv-imap-{phase}-{name}", "imap", phase, lst, build, tags=tags, **kw))

    # -- before TLS, on the STARTTLS listener: no LOGIN may succeed in any framing.
    add("nonsync-literal-in-atom",  # the example, sized for this account
        "before", lambda a: [send(literal_smuggle(b"a2 NOOP x", a.login("a3")))])
    add("sync-literal-in-atom-sent-without-continuation",
        "before", lambda a: [send(literal_smuggle(b"a2 NOOP x", a.login("a3"), sync=True))])
    add("literal8-nonsync",
        "before", lambda a: [send(literal_smuggle(b"a2 NOOP ~", a.login("a3")))])
    add("literal8-sync-in-atom",
        "before", lambda a: [send(literal_smuggle(b"a2 NOOP x~", a.login("a3"), sync=True))])
    add("literal-inside-unterminated-quoted",
        "before", lambda a: [send(literal_smuggle(b'a2 NOOP "x', a.login("a3")))])
    add("literal-after-escaped-quote",
        "before", lambda a: [send(literal_smuggle(b'a2 ID ("name" "\\"', a.login("a3"),
                                                  tail=b'")\r\n'))])
    add("empty-braces", "before", lambda a: [send(b"a2 NOOP {}\r\n" + a.login("a3"))])
    add("plus-braces", "before", lambda a: [send(b"a2 NOOP {+}\r\n" + a.login("a3"))])
    add("zero-literal", "before", lambda a: [send(b"a2 NOOP {0}\r\n" + a.login("a3"))])
    add("login-sync-literals-sent-without-continuation", "before", lambda a: [send(
        b"a3 LOGIN {%d}\r\n%s {%d}\r\n%s\r\n" % (len(a.u), a.u, len(a.p), a.p))])
    add("login-nonsync-literals", "before", lambda a: [send(
        b"a3 LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n" % (len(a.u), a.u, len(a.p), a.p))])
    add("bare-lf-after-noop", "before", lambda a: [send(b"a1 NOOP\n" + a.login("a3"))])
    add("bare-cr-after-noop", "before", lambda a: [send(b"a1 NOOP\r" + a.login("a3"))])
    add("nul-in-login-line", "before",
        lambda a: [send(a.login("a3").replace(b"\r\n", b"\0\r\n"))])
    add("crlf-split-across-reads", "before",
        lambda a: [send(b"a1 NOOP\r"), pause(), send(b"\n" + a.login("a3"))])
    add("mixed-case-login", "before",
        lambda a: [send(a.login("a3").replace(b"LOGIN", b"LoGiN"))])
    add("login-before-greeting", "before", lambda a: [send(a.login("a3"))], pregreet=True)
    add("authenticate-plain-sasl-ir", "before",
        lambda a: [send(b"a3 AUTHENTICATE PLAIN " + a.plain + b"\r\n")])
    add("authenticate-then-pipelined-login", "before", lambda a: [send(
        b"a3 AUTHENTICATE PLAIN\r\n" + a.plain + b"\r\n" + a.login("a4"))], tags=("a3", "a4"))
    add("authenticate-cancel-then-login", "before", lambda a: [send(
        b"a3 AUTHENTICATE PLAIN\r\n*\r\n" + a.login("a4"))], tags=("a3", "a4"))
    add("starttls-pipelined-login", "before", lambda a: [
        send(b"a1 STARTTLS\r\n" + a.login("a3")), tls_if(tagged_ok("a1"))])
    add("starttls-bare-lf-login", "before", lambda a: [
        send(b"a1 STARTTLS\n" + a.login("a3")), tls_if(tagged_ok("a1"))])
    add("forged-id-then-starttls", "before", lambda a: [
        send(a.forged_id("a1")), expect(tagged("a1")),
        send(b"s1 STARTTLS\r\n"), tls_if(tagged_ok("s1"))], tags=(), forged=True)
    # The line limit is mailfront's default limits.imap_line (8192): the LOGIN starts exactly
    # where a proxy that cuts an over-long line would start a new one.
    add("login-at-line-limit-boundary", "before",
        lambda a: [send(pad_line(b"a1 NOOP ", 8192) + a.login("a3"))])
    add("cr-at-line-limit-boundary", "before",
        lambda a: [send(pad_line(b"a1 NOOP ", 8191) + b"\r" + a.login("a3"))])
    add("line-of-exactly-the-limit-then-login", "before",
        lambda a: [send(pad_line(b"a1 NOOP ", 8190) + b"\r\n" + a.login("a3"))])

    # -- after TLS (implicit 993): the bytes hold no LOGIN that a strict framer would see.
    def id_smuggle(head, sync=False):
        return lambda a: [send(literal_smuggle(head, a.forged_id("a2"), sync=sync))]

    add("id-smuggled-nonsync-literal-in-atom", "after", id_smuggle(b"a1 NOOP x"), tags=(),
        forged=True)
    add("id-smuggled-sync-literal-sent-without-continuation", "after",
        id_smuggle(b"a1 NOOP x", sync=True), tags=(), forged=True)
    add("id-smuggled-literal8", "after", id_smuggle(b"a1 NOOP ~"), tags=(), forged=True)
    add("id-smuggled-literal-inside-quoted", "after", id_smuggle(b'a1 NOOP "x'), tags=(),
        forged=True)
    add("id-smuggled-after-empty-braces", "after",
        lambda a: [send(b"a1 NOOP x{}\r\n" + a.forged_id("a2"))], tags=(), forged=True)
    add("id-smuggled-after-plus-braces", "after",
        lambda a: [send(b"a1 NOOP x{+}\r\n" + a.forged_id("a2"))], tags=(), forged=True)
    add("first-client-id-forged-fields", "after",
        lambda a: [send(a.forged_id("a1")), expect(tagged("a1"))], tags=(), forged=True)
    add("second-id-forged-fields", "after", lambda a: [
        send(b'a1 ID ("name" "adv-first")\r\n'), expect(tagged("a1")),
        send(a.forged_id("a2")), expect(tagged("a2"))], tags=(), forged=True)
    add("bare-lf-after-noop", "after", lambda a: [send(b"a1 NOOP\n" + a.lf_login("a3"))])
    add("bare-cr-after-noop", "after", lambda a: [send(b"a1 NOOP\r" + a.login("a3"))])
    add("bare-cr-at-read-boundary", "after",
        lambda a: [send(b"a1 NOOP\r"), pause(), send(a.login("a3"))])
    add("nul-in-login-line", "after",
        lambda a: [send(a.login("a3").replace(b"\r\n", b"\0\r\n"))])
    add("login-literal8-password", "after", lambda a: [send(
        b"a3 LOGIN %s ~{%d+}\r\n%s\r\n" % (a.u, len(a.p), a.p))])
    add("login-inside-id-literal", "after", lambda a: [send(
        literal_smuggle(b'a1 ID ("name" ', a.login("a3"), tail=b")\r\n"))])
    add("authenticate-cancel-bare-lf-login", "after", lambda a: [
        send(b"a2 AUTHENTICATE PLAIN\r\n"), expect(IMAP_CONT), send(b"*\n" + a.lf_login("a3"))],
        tags=("a2", "a3"))
    add("authenticate-response-bare-lf-login", "after", lambda a: [
        send(b"a2 AUTHENTICATE PLAIN\r\n"), expect(IMAP_CONT),
        send(b"=\n" + a.lf_login("a3"))], tags=("a2", "a3"))
    add("login-at-line-limit-boundary", "after",
        lambda a: [send(pad_line(b"a1 NOOP ", 8192) + a.login("a3"))])

    # -- after a proper STARTTLS on the cleartext listener.
    def after_starttls(rest):
        return lambda a: [send(b"s1 STARTTLS\r\n"), tls_if(tagged_ok("s1"))] + rest(a)

    add("starttls-then-bare-lf-after-noop", "after",
        after_starttls(lambda a: [send(b"a1 NOOP\n" + a.lf_login("a3"))]), listener="starttls")
    add("starttls-then-id-smuggled-literal", "after",
        after_starttls(lambda a: [send(literal_smuggle(b"a1 NOOP x", a.forged_id("a2")))]),
        listener="starttls", tags=(), forged=True)
    return c


def pad_line(prefix, total):
    return prefix + b"x" * (total - len(prefix))


def pop3_cases():
    c = []

    def add(name, phase, build, listener=None, **kw):
        lst = listener or ("starttls" if phase == "before" else "implicit")
        c.append(Case(f"adv-pop3-{phase}-{name}", "pop3", phase, lst, build, **kw))

    def up(a, sep=b"\r\n"):
        return b"USER " + a.u + sep + b"PASS " + a.p + sep + b"STAT\r\n"

    add("user-pass", "before", lambda a: [send(up(a))])
    add("lowercase-user-pass", "before",
        lambda a: [send(b"user " + a.u + b"\r\npass " + a.p + b"\r\nstat\r\n")])
    add("bare-lf-after-noop", "before", lambda a: [send(b"NOOP\n" + up(a, b"\n"))])
    add("bare-cr-in-user", "before", lambda a: [send(b"USER " + a.u + b"\r" + b"PASS " + a.p +
                                                     b"\r\nSTAT\r\n")])
    add("nul-in-user", "before", lambda a: [send(up(a).replace(b"\r\n", b"\0\r\n", 1))])
    add("crlf-split-across-reads", "before",
        lambda a: [send(b"NOOP\r"), pause(), send(b"\n" + up(a))])
    add("auth-plain-initial-response", "before",
        lambda a: [send(b"AUTH PLAIN " + a.plain + b"\r\nSTAT\r\n")])
    add("auth-plain-pipelined-response", "before",
        lambda a: [send(b"AUTH PLAIN\r\n" + a.plain + b"\r\nSTAT\r\n")])
    add("apop", "before", lambda a: [("apop",)])
    add("stls-pipelined-user-pass", "before",
        lambda a: [send(b"STLS\r\n" + up(a)), tls_if(POP3_OK)])
    add("xclient-forged-addr", "before", lambda a: [
        send(f"XCLIENT ADDR={a.forged_ip} PORT=4242\r\n".encode()), expect(rb"\n"),
        send(b"QUIT\r\n")], forged=True)

    add("bare-lf-after-noop", "after", lambda a: [send(b"NOOP\n" + up(a, b"\n"))])
    add("bare-cr-after-noop", "after", lambda a: [send(b"NOOP\r" + up(a, b"\r"))])
    add("bare-cr-at-read-boundary", "after",
        lambda a: [send(b"NOOP\r"), pause(), send(up(a))])
    add("nul-in-user", "after", lambda a: [send(up(a).replace(b"\r\n", b"\0\r\n", 1))])
    add("auth-cancel-bare-lf-user-pass", "after", lambda a: [
        send(b"AUTH PLAIN\r\n"), expect(POP3_CONT), send(b"*\n" + up(a, b"\n"))])
    add("xclient-forged-addr", "after", lambda a: [
        send(f"XCLIENT ADDR={a.forged_ip} PORT=4242\r\n".encode()), expect(rb"\n"),
        send(b"QUIT\r\n")], forged=True)
    add("stls-then-bare-lf-after-noop", "after", lambda a: [
        send(b"STLS\r\n"), tls_if(POP3_OK), send(b"NOOP\n" + up(a, b"\n"))],
        listener="starttls")
    return c


def smtp_cases():
    c = []
    ehlo = b"EHLO client.adv.test\r\n"

    def add(name, phase, build, listener=None, **kw):
        lst = listener or ("starttls" if phase == "before" else "implicit")
        c.append(Case(f"adv-smtp-{phase}-{name}", "smtp", phase, lst, build, **kw))

    def after_ehlo(rest):
        return lambda a: [send(ehlo), expect(SMTP_250_END)] + rest(a)

    def auth(a):
        return b"AUTH PLAIN " + a.plain + b"\r\n"

    def lf_auth(a):
        # Ends in a bare LF (then an empty CRLF line): see Account.lf_login.
        return b"AUTH PLAIN " + a.plain + b"\n\r\n"

    def xclient(a):
        return [send(b"XCLIENT LOGIN=" + a.u + b" ADDR=" + a.forged_ip.encode() + b"\r\n"),
                expect(rb"\n"),
                send(ehlo + b"MAIL FROM:<" + a.u + b">\r\nRCPT TO:<user@example.test>\r\n")]

    add("auth-plain-initial-response", "before", after_ehlo(lambda a: [send(auth(a))]))
    add("lowercase-auth", "before",
        after_ehlo(lambda a: [send(b"auth plain " + a.plain + b"\r\n")]))
    add("bare-lf-after-noop", "before", after_ehlo(lambda a: [send(b"NOOP\n" + auth(a))]))
    add("bare-lf-after-ehlo", "before", lambda a: [send(b"EHLO client.adv.test\n" + auth(a))])
    add("bare-cr-before-auth", "before", after_ehlo(lambda a: [send(b"NOOP\r" + auth(a))]))
    add("nul-in-auth-line", "before",
        after_ehlo(lambda a: [send(auth(a).replace(b"\r\n", b"\0\r\n"))]))
    add("crlf-split-across-reads", "before",
        after_ehlo(lambda a: [send(b"NOOP\r"), pause(), send(b"\n" + auth(a))]))
    # mailfront's default limits.smtp_line is 4096 octets, CRLF included.
    add("line-of-exactly-the-limit-then-auth", "before",
        after_ehlo(lambda a: [send(pad_line(b"NOOP ", 4094) + b"\r\n" + auth(a))]))
    add("auth-login-pipelined-cancel-bare-lf", "before",
        after_ehlo(lambda a: [send(b"AUTH LOGIN\r\n*\n" + auth(a))]))
    add("auth-login-pipelined-credentials", "before", after_ehlo(lambda a: [
        send(b"AUTH LOGIN\r\n" + a.b64_user + b"\r\n" + a.b64_pass + b"\r\n")]))
    add("starttls-pipelined-auth", "before", after_ehlo(lambda a: [
        send(b"STARTTLS\r\n" + auth(a)), tls_if(SMTP_220)]))
    add("xclient-login", "before", after_ehlo(xclient), forged=True)

    add("bare-lf-after-noop", "after", after_ehlo(lambda a: [send(b"NOOP\n" + lf_auth(a))]))
    add("bare-lf-after-ehlo", "after",
        lambda a: [send(b"EHLO client.adv.test\n" + lf_auth(a))])
    add("bare-cr-after-noop", "after", after_ehlo(lambda a: [send(b"NOOP\r" + auth(a))]))
    add("bare-cr-at-read-boundary", "after",
        after_ehlo(lambda a: [send(b"NOOP\r"), pause(), send(auth(a))]))
    add("nul-in-auth-line", "after",
        after_ehlo(lambda a: [send(auth(a).replace(b"\r\n", b"\0\r\n"))]))
    add("auth-login-cancel-bare-lf", "after", after_ehlo(lambda a: [
        send(b"AUTH LOGIN\r\n"), expect(SMTP_334), send(b"*\n" + lf_auth(a))]))
    add("auth-login-username-then-bare-lf", "after", after_ehlo(lambda a: [
        send(b"AUTH LOGIN\r\n"), expect(SMTP_334),
        send(a.b64_user + b"\n*\n" + lf_auth(a))]))
    add("xclient-login", "after", after_ehlo(xclient), forged=True)
    add("starttls-then-bare-lf-after-noop", "after", after_ehlo(lambda a: [
        send(b"STARTTLS\r\n"), tls_if(SMTP_220), send(ehlo), expect(SMTP_250_END),
        send(b"NOOP\n" + lf_auth(a))]), listener="starttls")
    return c


def control_cases():
    c = []
    # Legitimate TLS logins through mailfront: the checks must see them.
    c.append(Case("adv-control-imap-login-is-logged", "imap", "after", "implicit",
                  lambda a: [send(a.login("a3")), expect(tagged("a3"))], tags=("a3",),
                  control=True))
    c.append(Case("adv-control-pop3-login-is-logged", "pop3", "after", "implicit",
                  lambda a: [send(b"USER " + a.u + b"\r\n"), expect(POP3_OK),
                             send(b"PASS " + a.p + b"\r\n"), expect(POP3_OK),
                             send(b"STAT\r\n"), expect(POP3_OK)], control=True))
    c.append(Case("adv-control-smtp-login-is-logged", "smtp", "after", "implicit",
                  lambda a: [send(b"EHLO client.adv.test\r\n"), expect(SMTP_250_END),
                             send(b"AUTH PLAIN " + a.plain + b"\r\n"), expect(rb"\n"),
                             send(b"MAIL FROM:<" + a.u + b">\r\n"), expect(rb"\n"),
                             send(b"RCPT TO:<user@example.test>\r\n"), expect(rb"\n")],
                  control=True))
    # The backends themselves, in cleartext, take the smuggles this corpus is about: so when a
    # case above holds, it is mailfront that stopped it.
    c.append(Case("adv-control-imap-direct-bare-lf-login-is-logged", "imap", "after", "direct",
                  lambda a: [send(b"a1 NOOP\n" + a.login("a3")), expect(tagged("a3"))],
                  tags=("a3",), control=True, direct=True))
    c.append(Case("adv-control-pop3-direct-bare-lf-login-is-logged", "pop3", "after", "direct",
                  lambda a: [send(b"NOOP\nUSER " + a.u + b"\nPASS " + a.p + b"\nSTAT\r\n"),
                             expect(rb"\+OK \d+ \d+\r?\n")],
                  control=True, direct=True))
    c.append(Case("adv-control-smtp-direct-bare-lf-auth-is-logged", "smtp", "after", "direct",
                  lambda a: [send(b"EHLO client.adv.test\r\n"), expect(SMTP_250_END),
                             send(b"NOOP\nAUTH PLAIN " + a.plain + b"\r\n"),
                             expect(rb"(?:^|\n)235[^\n]*\n"),
                             send(b"MAIL FROM:<" + a.u + b">\r\n"), expect(rb"\n"),
                             send(b"RCPT TO:<user@example.test>\r\n"), expect(rb"\n")],
                  control=True, direct=True))
    c.append(Case("adv-control-imap-direct-forged-id-is-logged", "imap", "after", "direct",
                  lambda a: [send(a.forged_id("a1")), expect(tagged("a1"))],
                  forged=True, control=True, direct=True, need_login=False, need_forged=True))
    c.append(Case("adv-control-pop3-direct-xclient-is-logged", "pop3", "after", "direct",
                  lambda a: [send(f"XCLIENT ADDR={a.forged_ip} PORT=4242\r\n".encode()),
                             expect(rb"\n"), send(b"QUIT\r\n")],
                  forged=True, control=True, direct=True, need_login=False, need_forged=True))
    return c


def all_cases():
    cases = imap_cases() + pop3_cases() + smtp_cases() + control_cases()
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    # Account.forged_ip uses the case number as the last octet.
    assert len(cases) <= 254, "too many cases for one forged-address octet each"
    return cases


# ---------------------------------------------------------------------------------------------
# running one case


class Conn:
    def __init__(self, sock, ctx, sni):
        self.sock, self.ctx, self.sni = sock, ctx, sni
        self.rx = bytearray()
        self.mark = 0
        self.closed = False
        self.transcript = []
        self.tls = False

    def note(self, what, data=b""):
        self.transcript.append((time.monotonic(), what, bytes(data)))

    def send(self, data):
        self.mark = len(self.rx)
        self.note("C", data)
        try:
            self.sock.sendall(data)
        except OSError as e:
            self.note("!", f"send: {e}".encode())
            self.closed = True

    def _recv(self, timeout):
        self.sock.settimeout(max(0.05, timeout))
        try:
            chunk = self.sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            return None
        except (OSError, ssl.SSLError) as e:
            self.note("!", f"recv: {e}".encode())
            self.closed = True
            return b""
        if not chunk:
            self.note("!", b"closed by peer")
            self.closed = True
            return b""
        self.rx += chunk
        self.note("S", chunk)
        return chunk

    def expect(self, rx, timeout=EXPECT_TIMEOUT, start=None):
        start = self.mark if start is None else start
        deadline = time.monotonic() + timeout
        while True:
            if re.search(rx, bytes(self.rx[start:])):
                return True
            left = deadline - time.monotonic()
            if self.closed or left <= 0:
                self.note("!", b"expect timed out or closed: " + rx[:60])
                return False
            self._recv(left)

    def drain(self):
        start = time.monotonic()
        last = start
        while not self.closed:
            now = time.monotonic()
            if now - start >= DRAIN_TOTAL or now - last >= DRAIN_IDLE:
                break
            got = self._recv(min(DRAIN_IDLE - (now - last), DRAIN_TOTAL - (now - start)))
            if got:
                last = time.monotonic()

    def starttls(self):
        # Whatever the server sent after its STARTTLS answer in cleartext would be read as TLS
        # here and fail the handshake; that is fine, it only ends the case early.
        try:
            self.sock = self.ctx.wrap_socket(self.sock, server_hostname=self.sni)
            self.tls = True
            self.note("!", f"TLS started: {self.sock.version()}".encode())
        except (OSError, ssl.SSLError) as e:
            self.note("!", f"TLS handshake failed: {e}".encode())
            self.closed = True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


GREETING = {"imap": rb"\n", "pop3": rb"\n", "smtp": SMTP_220}


def run_case(case, acct, env):
    if case.direct:
        port = env.direct[case.proto]
    else:
        port = env.ports[(case.proto, case.listener)]
    sock = socket.create_connection((HOST, port), timeout=5)
    conn = Conn(sock, env.ctx, env.sni)
    try:
        if case.listener == "implicit":
            conn.starttls()
        steps = case.build(acct)
        if case.pregreet:
            # Sent before the greeting could arrive: the greeting is read by the drain.
            for step in steps:
                do_step(conn, step, acct)
            steps = []
        elif not conn.closed:
            conn.expect(GREETING[case.proto], GREETING_TIMEOUT, start=0)
        for step in steps:
            if conn.closed:
                break
            do_step(conn, step, acct)
        conn.drain()
    finally:
        conn.close()
    return conn


def do_step(conn, step, acct):
    kind = step[0]
    if kind == "send":
        conn.send(step[1])
    elif kind == "pause":
        time.sleep(step[1])
    elif kind == "expect":
        conn.expect(step[1])
    elif kind == "tls_if":
        if conn.expect(step[1]):
            conn.starttls()
    elif kind == "apop":
        # RFC 1939 §7: digest of the greeting's timestamp and the secret. Dovecot offers no APOP
        # here, so a timestamp is made up if the greeting has none.
        m = re.search(rb"<[^>\r\n]*>", bytes(conn.rx))
        stamp = m.group(0) if m else b"<1.1@adv.test>"
        digest = hashlib.md5(stamp + acct.p).hexdigest().encode()
        conn.send(b"APOP " + acct.u + b" " + digest + b"\r\nSTAT\r\n")
    else:
        raise ValueError(kind)


# ---------------------------------------------------------------------------------------------
# judging


def client_success(case, rx):
    """What in the client's view says the credential was accepted, or ''."""
    rx = bytes(rx)
    pats = []
    if case.proto == "imap":
        pats = [tagged_ok(t) for t in case.tags]
    elif case.proto == "pop3":
        pats = [rb"(?:^|\n)\+OK Logged in[^\n]*\n", rb"(?:^|\n)\+OK \d+ \d+\r?\n"]
    elif case.proto == "smtp":
        pats = [rb"(?:^|\n)235[ -][^\n]*\n", rb"(?:^|\n)250[ -]2\.1\.5[^\n]*\n"]
    for p in pats:
        m = re.search(p, rx)
        if m:
            return m.group(0).strip().decode("ascii", "replace")
    return ""


def login_lines(acct, dovecot, postfix):
    u = re.escape(acct.user)
    pats = [(dovecot, rf"Login: user=<{u}>"),
            (dovecot, rf"passdb out: OK\t\d+\tuser={u}(?:\t|$)"),
            (postfix, rf"sasl_username={u}(?![\w.@-])")]
    for text, p in pats:
        m = re.search(rf"^.*{p}.*$", text, re.M)
        if m:
            return m.group(0).split("resp=")[0].strip()[:200]
    return ""


def leaked(acct, dovecot, postfix):
    needles = {"user name": acct.user, "password": acct.password,
               "AUTH PLAIN blob": acct.plain.decode(), "base64 user": acct.b64_user.decode(),
               "base64 password": acct.b64_pass.decode()}
    found = []
    for what, needle in needles.items():
        for logname, text in (("dovecot.log", dovecot), ("postfix.log", postfix)):
            if needle in text:
                found.append(f"{what} in {logname}")
    return found


def forged_lines(acct, dovecot, postfix):
    ip = re.escape(acct.forged_ip) + r"(?!\d)"
    for text in (dovecot, postfix):
        m = re.search(rf"^.*(?:{ip}|{re.escape(acct.forged_tls)}).*$", text, re.M)
        if m:
            return m.group(0).strip()[:200]
    return ""


def judge(case, acct, conn, dovecot, postfix):
    """'' if the case holds, else the reason."""
    success = client_success(case, conn.rx)
    login = login_lines(acct, dovecot, postfix)
    forged = forged_lines(acct, dovecot, postfix) if case.forged else ""
    if case.control:
        problems = []
        if case.need_login and not login:
            problems.append(f"no login for {acct.user} in the backend logs")
        if case.need_login and not success:
            problems.append("the client saw no success")
        if case.need_forged and not forged:
            problems.append(f"forged {acct.forged_ip} not in the backend log")
        return "; ".join(problems)
    problems = []
    if login:
        problems.append(f"backend logged a login: {login}")
    if success:
        problems.append(f"client got success: {success}")
    if case.phase == "before":
        leak = leaked(acct, dovecot, postfix)
        if leak:
            problems.append("cleartext credentials reached a backend (" + ", ".join(leak) + ")")
    if forged:
        problems.append(f"forged identity reached a backend: {forged}")
    return "; ".join(problems)


def read_tail(path, offset):
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def size(path):
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def write_transcript(outdir, case, acct, conn, verdict):
    if not outdir:
        return
    t0 = conn.transcript[0][0] if conn.transcript else 0
    with open(os.path.join(outdir, f"{case.name}.txt"), "w", encoding="utf-8") as f:
        f.write(f"{case.name} ({case.proto}, {case.phase} TLS, {case.listener}) "
                f"account {acct.user}\nverdict: {verdict or 'holds'}\n")
        for t, what, data in conn.transcript:
            f.write(f"{t - t0:7.3f} {what} {data!r}\n")


class Env:
    pass


def cmd_run(args):
    env = Env()
    env.ctx = ssl.create_default_context(cafile=args.cafile)
    env.sni = args.sni
    env.ports = {
        ("imap", "starttls"): args.imap, ("imap", "implicit"): args.imaps,
        ("pop3", "starttls"): args.pop3, ("pop3", "implicit"): args.pop3s,
        ("smtp", "starttls"): args.submission, ("smtp", "implicit"): args.submissions,
    }
    env.direct = {"imap": args.dovecot_imap, "pop3": args.dovecot_pop3, "smtp": args.postfix}
    cases = all_cases()
    if args.only:
        cases = [c for c in cases if any(re.search(o, c.name) for o in args.only)]
    accts = {c.name: Account(i, args.secret) for i, c in enumerate(all_cases(), start=1)}
    offsets = (size(args.dovecot_log), size(args.postfix_log))
    if args.outdir:
        os.makedirs(args.outdir, exist_ok=True)

    conns, errors = {}, {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futs = {pool.submit(run_case, c, accts[c.name], env): c for c in cases}
        for fut in concurrent.futures.as_completed(futs):
            c = futs[fut]
            try:
                conns[c.name] = fut.result()
            except Exception as e:  # noqa: BLE001 -- one broken case must not hide the others
                errors[c.name] = f"case did not run: {type(e).__name__}: {e}"

    # Judge against the logs once everything is done; late lines still count (LOG_SETTLE), and
    # the controls may wait longer for theirs.
    time.sleep(LOG_SETTLE)
    deadline = time.monotonic() + LOG_WAIT
    while True:
        dovecot = read_tail(args.dovecot_log, offsets[0])
        postfix = read_tail(args.postfix_log, offsets[1])
        verdicts = {}
        for c in cases:
            if c.name in errors:
                verdicts[c.name] = errors[c.name]
            else:
                verdicts[c.name] = judge(c, accts[c.name], conns[c.name], dovecot, postfix)
        pending = [c for c in cases if c.control and verdicts[c.name]]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.3)

    for c in cases:
        v = verdicts[c.name]
        if c.name in conns:
            write_transcript(args.outdir, c, accts[c.name], conns[c.name], v)
        print(f"FAIL {c.name}: {v}" if v else f"PASS {c.name}", flush=True)
    return 0


def cmd_accounts(args):
    """passwd-file lines for every victim account (Dovecot `{PLAIN}` scheme)."""
    for i, _c in enumerate(all_cases(), start=1):
        a = Account(i, args.secret)
        print(f"{a.user}:{{PLAIN}}{a.password}")
    return 0


def cmd_list(_args):
    for c in all_cases():
        print(c.name)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("accounts")
    p.add_argument("--secret", required=True)
    p.set_defaults(func=cmd_accounts)
    p = sub.add_parser("list")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("run")
    p.add_argument("--secret", required=True)
    p.add_argument("--cafile", required=True)
    p.add_argument("--sni", default="mx.example.test")
    for name in ("imap", "imaps", "pop3", "pop3s", "submission", "submissions",
                 "dovecot-imap", "dovecot-pop3", "postfix"):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--dovecot-log", required=True)
    p.add_argument("--postfix-log", required=True)
    p.add_argument("--outdir", help="write one transcript per case here")
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--only", action="append", help="regex on case names (repeatable)")
    p.set_defaults(func=cmd_run)
    args = ap.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
