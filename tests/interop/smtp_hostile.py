#!/usr/bin/env python3
"""SMTP hostile section of the mailfront interop suite (tests/interop/run.sh).

A real Postfix smtpd service set up as the attack surface: mailfront's address (127.0.0.1) is in
its `mynetworks`, it trusts 127.0.0.1 for XCLIENT, relays for `permit_mynetworks,
permit_sasl_authenticated, reject_unauth_destination`, and logs every command of 127.0.0.1 and
127.0.0.2 (`debug_peer_list`). `victim@remote.example.net` is a remote address (not a local or
virtual domain); a transport_maps entry delivers it to a Maildir so what was relayed can be read.
`hostile@example.test` is a local mailbox. Three mailfront listeners sit in front of it:
`hx` (465, `backend_client_info`), `hx587` (587 STARTTLS, `backend_client_info`) and `hp` (465,
without). `hn` (465, `backend_client_info`) is in front of a second such smtpd that trusts
mailfront for relaying but not for XCLIENT (its EHLO offers none). The clients connect from 127.0.0.2, so Postfix's log tells them from mailfront.

What Postfix 3.7 does with a long command line: it keeps the first 2048 characters (a line of up to
2049 octets with its CRLF is read whole), logs `warning: …: request longer than 2048`, and skips
the rest of the line. So a line mailfront forwards byte-for-byte means something else to Postfix
once it is 2050 octets or more. The sharpest case is BDAT: with its size digits starting at
character 2048, mailfront reads `BDAT 104 LAST` and streams 104 octets as chunk data, Postfix reads
`BDAT 1`, takes one octet, and runs the other 103 as commands that mailfront's gate never saw.

Every case is one session with a unique tag (`hostile<run>nNNNx`) in its EHLO/HELO name, its
MAIL FROM and its message Subjects; the Postfix sessions that carry the tag are the case's. Each
case is judged on Postfix's own log and on what Postfix delivered:
  (a) Postfix never cut a line (`request longer than`): every line it read was read whole, so
      its framing was mailfront's;
  (b) Postfix never got an XCLIENT with LOGIN=, more than one XCLIENT per session (mailfront
      sends one, never with LOGIN=; a second one is the client's), or any XFORWARD;
  (c) an unauthenticated client never got 250 for a RCPT to the remote domain (in Postfix's log
      and, for the identity cases, in the client's view), on the listeners with
      `backend_client_info` (on hp, without it, Postfix relays for every client by design: there
      (b) and (d) are what count);
  (d) every message Postfix delivered from the case has exactly one Received field by mailfront
      (`by mx.example.test (mailfront)`) and it has a `tls` clause;
  (e) identity cases (`backend_client_info`): no MAIL/RCPT/DATA/BDAT/AUTH/VRFY/ETRN runs under
      mailfront's own address or reverse name; after XCLIENT the client is `<name>[127.0.0.2]`
      with a name other than the one Postfix gave mailfront. A session that ends with 421 before
      any such command also holds (XCLIENT refused: all-or-nothing).
No reply text is compared for the padded lines: mailfront may refuse them (`500 5.5.2`) or re-encode
them; both hold. The client transcripts are written to --outdir.

The `smtp-hostile-control-*` cases prove the checks can fail: the same bytes sent straight to
Postfix from 127.0.0.1 must be flagged by the same judge for the problem they carry, and a normal
submission through mailfront must be delivered with mailfront's Received field (so (d) has
something to see).

Standard library only. Output: one `PASS name` / `FAIL name: reason` line per case on stdout.
"""

import argparse
import base64
import concurrent.futures
import os
import re
import socket
import ssl
import sys
import time

HOST = "127.0.0.1"
CLIENT = "127.0.0.2"
REPLY_TIMEOUT = 4.0
DRAIN_IDLE = 0.5
DRAIN_TOTAL = 4.0
LOG_WAIT = 12.0
VICTIM_LOGIN = "victim@example.test"
REMOTE_RCPT = "victim@remote.example.net"
LOCAL_RCPT = "hostile@example.test"
# Postfix's line_length_limit default: the first 2048 characters of a line are kept.
POSTFIX_KEEP = 2048
LENGTHS = (511, 512, 513, 999, 1000, 1001, 2047, 2048, 2049, 2050, 2060, 4095, 4096)
# What a padded line carries, and where it is sent: (listener, the client authenticates).
# xclient: `RSET`, `XCLIENT LOGIN=victim@example.test` and a relay to the remote domain, from an
#   unauthenticated client. On hx Postfix answers the smuggled XCLIENT 550 (it checks
#   smtpd_authorized_xclient_hosts against the address mailfront's own XCLIENT set, 127.0.0.2);
#   on hp (no XCLIENT of mailfront's) it takes it and relays as the victim.
# second-message: `RSET` and a whole second message, from an authenticated client.
# rset-mail: `RSET`, MAIL, RCPT inside a BDAT transaction, then the client's own `BDAT … LAST`,
#   which mailfront takes for a later chunk and sends without its Received field.
# spaces (MAIL and RCPT only): nothing but the padding, so a proxy that re-encodes the line has
#   something to re-encode (the other payloads make the MAIL/RCPT parameters unusable).
PAYLOADS = {"xclient": ("hx", False), "xclient-plain": ("hp", False),
            "second-message": ("hp", True), "rset-mail": ("hx", True), "spaces": ("hx", False)}
TRANSACTION_VERBS = ("MAIL", "RCPT", "DATA", "BDAT", "AUTH", "VRFY", "EXPN", "ETRN")


# ---------------------------------------------------------------------------------------------
# client


class Closed(Exception):
    pass


class Client:
    """One SMTP client connection with a timed transcript."""

    def __init__(self, port, tls, ctx, sni, source):
        self.t0 = time.monotonic()
        self.transcript = []
        self.rx = b""
        self.closed = False
        self.ctx, self.sni = ctx, sni
        src = (source, 0) if source else None
        self.sock = socket.create_connection((HOST, port), timeout=5, source_address=src)
        if tls:
            self.starttls()

    def note(self, what, data):
        self.transcript.append((time.monotonic() - self.t0, what, bytes(data)))

    def starttls(self):
        self.sock = self.ctx.wrap_socket(self.sock, server_hostname=self.sni)
        self.note("!", f"TLS {self.sock.version()} {self.sock.cipher()[0]}".encode())

    def send(self, data):
        self.note("C", data)
        try:
            self.sock.sendall(data)
        except OSError as e:
            self.note("!", f"send: {e}".encode())
            self.closed = True
            raise Closed() from e

    def _fill(self, timeout):
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
        self.note("S", chunk)
        self.rx += chunk
        return chunk

    def reply(self, timeout=REPLY_TIMEOUT):
        """The next complete reply as (code, text), or (None, why)."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.match(rb"((?:\d{3}-[^\n]*\n)*)(\d{3})(?: [^\n]*)?\n", self.rx)
            if m:
                self.rx = self.rx[m.end():]
                return int(m.group(2)), m.group(0).decode("utf-8", "replace")
            if self.closed:
                return None, "closed"
            left = deadline - time.monotonic()
            if left <= 0:
                return None, "timeout"
            self._fill(left)

    def cmd(self, line):
        self.send(line)
        return self.reply()

    def drain(self):
        start = last = time.monotonic()
        while not self.closed:
            now = time.monotonic()
            if now - start >= DRAIN_TOTAL or now - last >= DRAIN_IDLE:
                break
            if self._fill(DRAIN_IDLE - (now - last)):
                last = time.monotonic()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# the bytes


def fake_received(env):
    """What mailfront would have put in front of the first chunk: the controls send it themselves
    so that their legitimate message passes (d) and only what they smuggle is flagged."""
    return (f"Received: from control.client.test ([{CLIENT}]) by {env.hostname} (mailfront) "
            f"with ESMTPSA tls TLS_AES_256_GCM_SHA384; "
            f"{time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n").encode()


def smuggled_commands(payload, tag):
    """The commands a hostile chunk carries, CRLF-separated, as Postfix would run them."""
    sender = f"MAIL FROM:<smuggled-{tag}@example.test>\r\n".encode()
    message = (f"Subject: {tag} smuggled message\r\n\r\nno mailfront Received here\r\n.\r\n"
               ).encode()
    if payload in ("xclient", "xclient-plain"):
        # RSET first: Postfix refuses XCLIENT inside a transaction (503). mailfront never sends
        # XFORWARD, so Postfix logging one (it refuses it here) is a smuggled command too.
        xforward = b"XFORWARD ADDR=203.0.113.9\r\n" if payload == "xclient-plain" else b""
        return (b"RSET\r\n" + xforward + f"XCLIENT LOGIN={VICTIM_LOGIN}\r\n".encode() + sender +
                f"RCPT TO:<{REMOTE_RCPT}>\r\nDATA\r\n".encode() + message)
    if payload == "second-message":
        return (b"RSET\r\n" + sender + f"RCPT TO:<{LOCAL_RCPT}>\r\nDATA\r\n".encode() + message)
    if payload == "rset-mail":
        return b"RSET\r\n" + sender + f"RCPT TO:<{LOCAL_RCPT}>\r\n".encode()
    raise ValueError(payload)


def hostile_chunk(payload, tag):
    """(size, chunk): one filler octet, the smuggled commands, a NOOP that pads the chunk to
    100..199 or 1000..1999 octets, so that a Postfix that keeps only the size's first digit reads
    `BDAT 1`, takes the filler, and runs the rest as commands."""
    cmds = smuggled_commands(payload, tag)
    base = 1 + len(cmds) + len(b"NOOP \r\n")
    for lo in (100, 1000):
        if base <= lo + 99:
            k = max(0, lo - base)
            chunk = b"x" + cmds + b"NOOP " + b"p" * k + b"\r\n"
            return len(chunk), chunk
    raise ValueError("payload too long")


def padded_bdat(length, size, last):
    """A BDAT line of exactly `length` octets (CRLF included) for a chunk of `size` octets. When it
    fits, the size's first digit is character 2048: Postfix keeps `BDAT<spaces>1`. Shorter lines
    pad between BDAT and the size."""
    digits = str(size).encode()
    tail = digits + (b" LAST" if last else b"")
    cut_min = POSTFIX_KEEP + len(tail) - 1 + 2
    if length >= cut_min:
        head = b"BDAT" + b" " * (POSTFIX_KEEP - 1 - 4)
        line = head + tail
        return line + b" " * (length - len(line) - 2) + b"\r\n"
    line = b"BDAT" + b" " * (length - 2 - 4 - len(tail)) + tail + b"\r\n"
    assert len(line) == length, (length, len(line))
    return line


def padded_line(head, tail, length):
    """`head` + spaces + `tail` + CRLF, exactly `length` octets: the tail sits at the end, past
    Postfix's cut for the long lengths."""
    line = head + b" " * (length - 2 - len(head) - len(tail)) + tail + b"\r\n"
    assert len(line) == length, (length, len(line))
    return line


def tail_text(payload, tag):
    """The smuggled commands on one line (no CR/LF can be in a command line)."""
    if payload == "spaces":
        return b""
    return b" ".join(x for x in smuggled_commands(payload, tag).split(b"\r\n") if x)[:300]


# ---------------------------------------------------------------------------------------------
# cases


class Case:
    def __init__(self, name, listener, script, auth=False, identity=False, control=False,
                 expect=(), allow_421=False):
        self.name = name
        self.listener = listener      # hx | hx587 | hp | hn | direct
        self.script = script          # fn(client, case, env)
        self.auth = auth              # the client authenticates (relaying is then allowed)
        self.identity = identity      # check (e)
        self.control = control
        self.expect = expect          # control: substrings that the problems must contain
        self.allow_421 = allow_421
        self.tag = ""
        self.client_rcpt_remote = []  # the client's replies to RCPT TO:<remote>
        self.client_421 = False


def ehlo_and_auth(c, case, env, name=None):
    c.cmd(f"EHLO {name or case.tag + '.client.test'}\r\n".encode())
    if case.auth:
        blob = base64.b64encode(f"\0{env.user}\0{env.password}".encode())
        code, text = c.cmd(b"AUTH PLAIN " + blob + b"\r\n")
        if code != 235:
            raise RuntimeError(f"AUTH got {code} {text.strip()}")


def first_chunk(case, env):
    body = f"Subject: {case.tag} legitimate first chunk\r\n\r\nfirst chunk\r\n".encode()
    if case.listener == "direct":
        body = fake_received(env) + body
    return b"BDAT %d\r\n" % len(body) + body


def bdat_script(length, payload):
    def run(c, case, env):
        ehlo_and_auth(c, case, env)
        c.cmd(f"MAIL FROM:<{case.tag}@example.test>\r\n".encode())
        c.cmd(f"RCPT TO:<{LOCAL_RCPT}>\r\n".encode())
        c.cmd(first_chunk(case, env))
        last = payload != "rset-mail"
        size, chunk = hostile_chunk(payload, case.tag)
        c.send(padded_bdat(length, size, last) + chunk)
        c.reply()
        if not last:
            # mailfront thinks the transaction goes on: this chunk would carry no Received.
            body = f"Subject: {case.tag} after the smuggled RSET\r\n\r\nlast chunk\r\n".encode()
            c.send(b"BDAT %d LAST\r\n" % len(body) + body)
            c.reply()
        c.send(b"QUIT\r\n")
    return run


def message(case, what):
    return (f"Subject: {case.tag} {what}\r\n\r\nbody\r\n.\r\n").encode()


def mail_script(length, payload):
    def run(c, case, env):
        ehlo_and_auth(c, case, env)
        head = f"MAIL FROM:<{case.tag}@example.test>".encode()
        c.send(padded_line(head, tail_text(payload, case.tag), length))
        c.reply()
        c.cmd(f"RCPT TO:<{LOCAL_RCPT}>\r\n".encode())
        if c.cmd(b"DATA\r\n")[0] == 354:
            c.cmd(message(case, "after a padded MAIL"))
        c.send(b"QUIT\r\n")
    return run


def rcpt_script(length, payload):
    def run(c, case, env):
        ehlo_and_auth(c, case, env)
        c.cmd(f"MAIL FROM:<{case.tag}@example.test>\r\n".encode())
        head = f"RCPT TO:<{LOCAL_RCPT}>".encode()
        c.send(padded_line(head, tail_text(payload, case.tag), length))
        c.reply()
        if c.cmd(b"DATA\r\n")[0] == 354:
            c.cmd(message(case, "after a padded RCPT"))
        c.send(b"QUIT\r\n")
    return run


def relay_attempt(c, case):
    """MAIL and a RCPT to the remote domain, unauthenticated; the RCPT reply is recorded."""
    code, _ = c.cmd(f"MAIL FROM:<{case.tag}@example.test>\r\n".encode())
    if code == 421:
        case.client_421 = True
    code, text = c.cmd(f"RCPT TO:<{REMOTE_RCPT}>\r\n".encode())
    case.client_rcpt_remote.append(text.strip())
    if code == 421:
        case.client_421 = True
    c.send(b"QUIT\r\n")


def helo_script(c, case, env):
    c.cmd(f"HELO {case.tag}.client.test\r\n".encode())
    relay_attempt(c, case)


def no_ehlo_script(c, case, env):
    relay_attempt(c, case)


def ehlo_script(c, case, env):
    c.cmd(f"EHLO {case.tag}.client.test\r\n".encode())
    relay_attempt(c, case)


def helo_starttls_script(c, case, env):
    c.cmd(b"EHLO before-tls.client.test\r\n")
    code, _ = c.cmd(b"STARTTLS\r\n")
    if code != 220:
        raise RuntimeError(f"STARTTLS got {code}")
    c.starttls()
    c.cmd(f"HELO {case.tag}.client.test\r\n".encode())
    relay_attempt(c, case)


def long_ehlo_name(tag):
    """A 300-octet EHLO name of valid DNS labels, the tag first."""
    name = tag + ".client.test"
    while len(name) < 300:
        name = "a" * min(63, 300 - len(name) - 1 or 1) + "." + name
    return name[-300:].lstrip(".")


def xtext_heavy_ehlo_name(tag):
    """A 250-octet EHLO name (within RFC 1035's 255) whose xtext form is over 255 octets: every
    `=` becomes `+3D` in XCLIENT HELO=, past Postfix's limit on an attribute value."""
    name = tag + ".client.test"
    return ("a=" * ((250 - len(name)) // 2) + name).rjust(250, "a")


def ehlo_name_script(make_name):
    def run(c, case, env):
        code, _ = c.cmd(f"EHLO {make_name(case.tag)}\r\n".encode())
        if code == 421:
            case.client_421 = True
            return
        relay_attempt(c, case)
    return run


# Controls straight to Postfix (what mailfront would have sent without the fix).


def direct_xclient_no_name_script(c, case, env):
    c.cmd(b"EHLO mailfront.control\r\n")
    c.cmd(f"XCLIENT ADDR={CLIENT} PORT=4242\r\n".encode())
    c.cmd(f"HELO {case.tag}.client.test\r\n".encode())
    relay_attempt(c, case)


def direct_xclient_long_helo_script(c, case, env):
    # HELO= first: Postfix 3.7 applies the attributes before the one it refuses (while its log
    # goes on naming the old client), so after `ADDR=… HELO=<too long>` the address is already
    # the client's. With HELO= first nothing is applied and the session stays mailfront's.
    c.cmd(f"EHLO {case.tag}.mailfront.control\r\n".encode())
    name = long_ehlo_name(case.tag)
    code, text = c.cmd(f"XCLIENT HELO={name} NAME=[UNAVAILABLE] ADDR={CLIENT} PORT=4242\r\n"
                       .encode())
    if code != 501:
        raise RuntimeError(f"Postfix took a 300-octet XCLIENT HELO: {code} {text.strip()}")
    relay_attempt(c, case)


def legit_bdat_script(c, case, env):
    ehlo_and_auth(c, case, env)
    c.cmd(f"MAIL FROM:<{case.tag}@example.test>\r\n".encode())
    c.cmd(f"RCPT TO:<{LOCAL_RCPT}>\r\n".encode())
    c.cmd(first_chunk(case, env))
    body = b"last chunk\r\n"
    code, text = c.cmd(b"BDAT %d LAST\r\n" % len(body) + body)
    if code != 250:
        raise RuntimeError(f"BDAT LAST got {code} {text.strip()}")
    c.send(b"QUIT\r\n")


def all_cases():
    cases = []
    for carrier, script in (("bdat", bdat_script), ("mail", mail_script), ("rcpt", rcpt_script)):
        for length in LENGTHS:
            for payload in PAYLOADS:
                if payload == "spaces" and carrier == "bdat":
                    continue  # every BDAT case is padded with spaces already
                listener, auth = PAYLOADS[payload]
                cases.append(Case(f"smtp-hostile-{carrier}-{length}-{payload}", listener,
                                  script(length, payload), auth=auth))
    cases += [
        Case("smtp-hostile-helo-465-relay-denied", "hx", helo_script, identity=True),
        Case("smtp-hostile-no-ehlo-465-relay-denied", "hx", no_ehlo_script, identity=True),
        Case("smtp-hostile-ehlo-465-relay-denied", "hx", ehlo_script, identity=True),
        Case("smtp-hostile-helo-587-starttls-relay-denied", "hx587", helo_starttls_script,
             identity=True),
        Case("smtp-hostile-ehlo-300-octets-465", "hx", ehlo_name_script(long_ehlo_name),
             identity=True, allow_421=True),
        Case("smtp-hostile-ehlo-xtext-over-255-465", "hx", ehlo_name_script(xtext_heavy_ehlo_name),
             identity=True, allow_421=True),
        # backend_client_info in front of a Postfix that trusts mailfront but offers it no
        # XCLIENT: all or nothing means 421, never a session under mailfront's identity.
        # The documented exception to all-or-nothing: a backend that does not offer XCLIENT at
        # all gets one warning per listener and sessions go on as mailfront's. Against a Postfix
        # that lists mailfront in mynetworks that relays, which is why README says never to
        # trust mailfront's address for relaying; this case pins the behaviour, it does not
        # bless the setup.
        Case("smtp-hostile-xclient-not-offered-465-goes-on-as-documented", "hn", ehlo_script,
             identity=True, control=True, expect=("relay", "mailfront's own address")),
        Case("smtp-hostile-control-legit-bdat-through-mailfront", "hx", legit_bdat_script,
             auth=True, control=True, expect=("delivered",)),
    ]
    # The same bytes straight to Postfix from 127.0.0.1: the judge must flag each.
    for payload in ("xclient", "second-message", "rset-mail"):
        expect = {"xclient": ("request longer", "XCLIENT LOGIN", "relay", "Received"),
                  "second-message": ("request longer", "Received"),
                  "rset-mail": ("request longer", "Received")}[payload]
        _, auth = PAYLOADS[payload]
        cases.append(Case(f"smtp-hostile-control-bdat-2060-{payload}-direct", "direct",
                          bdat_script(2060, payload), auth=auth, control=True, expect=expect))
    for carrier, script in (("mail", mail_script), ("rcpt", rcpt_script)):
        cases.append(Case(f"smtp-hostile-control-{carrier}-2060-xclient-direct", "direct",
                          script(2060, "xclient"), control=True, expect=("request longer",)))
    cases += [
        Case("smtp-hostile-control-helo-from-mynetworks-relays-direct", "direct", helo_script,
             identity=True, control=True, expect=("relay", "mailfront's own address")),
        Case("smtp-hostile-control-xclient-without-name-keeps-mailfront-name-direct", "direct",
             direct_xclient_no_name_script, identity=True, control=True,
             expect=("reverse name",)),
        Case("smtp-hostile-control-xclient-helo-300-refused-then-relays-direct", "direct",
             direct_xclient_long_helo_script, identity=True, control=True,
             expect=("relay", "mailfront's own address")),
    ]
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    # A per-run nonce: a kept directory (INTEROP_DIR, --keep) still holds earlier runs' mail.
    run = os.urandom(3).hex()
    for i, c in enumerate(cases, start=1):
        c.tag = f"hostile{run}n{i:03d}x"
    return cases


# ---------------------------------------------------------------------------------------------
# running


def run_one(case, env):
    port, tls, source = {
        "hx": (env.hx, True, CLIENT), "hx587": (env.hx587, False, CLIENT),
        "hp": (env.hp, True, CLIENT), "hn": (env.hn, True, CLIENT),
        "direct": (env.postfix, False, None),
    }[case.listener]
    c = Client(port, tls, env.ctx, env.sni, source)
    error = ""
    try:
        code, text = c.reply()
        if code != 220:
            raise RuntimeError(f"greeting {code} {text.strip()}")
        case.script(c, case, env)
    except Closed:
        pass
    except (OSError, ssl.SSLError, RuntimeError) as e:
        error = f"{type(e).__name__}: {e}"
    try:
        c.drain()
    finally:
        c.close()
    if re.search(rb"(?:^|\n)421[ -]", b"".join(d for _, w, d in c.transcript if w == "S")):
        case.client_421 = True
    return c, error


# ---------------------------------------------------------------------------------------------
# judging on Postfix's log

LINE = re.compile(r"postfix-interop/hostile/smtpd\[(\d+)\]: (.*)$")
PEER_CMD = re.compile(r"^< (\S+?)\[([^\]]*)\]: (.*)$")
PEER_REPLY = re.compile(r"^> (\S+?)\[([^\]]*)\]: (.*)$")


def sessions(text):
    """Postfix smtpd sessions of the hostile service: lists of message texts, connect to
    disconnect, in log order."""
    open_by_pid, done = {}, []
    for raw in text.splitlines():
        m = LINE.search(raw)
        if not m:
            continue
        pid, msg = m.group(1), m.group(2)
        if msg.startswith("connect from "):
            if pid in open_by_pid:
                done.append(open_by_pid.pop(pid))
            open_by_pid[pid] = [msg]
        elif pid in open_by_pid:
            open_by_pid[pid].append(msg)
            if msg.startswith("disconnect from "):
                done.append(open_by_pid.pop(pid))
    return done + list(open_by_pid.values())


TAG = re.compile(r"hostile[0-9a-f]{6}n\d{3}x")


class LogIndex:
    """The hostile service's sessions, indexed by the case tags they carry."""

    def __init__(self, text):
        self.by_tag = {}
        for s in sessions(text):
            for tag in set(TAG.findall("\n".join(s))):
                self.by_tag.setdefault(tag, []).append(s)

    def get(self, tag):
        return self.by_tag.get(tag, [])


def short(s, n=120):
    s = re.sub(r" {4,}", lambda m: f"<{len(m.group(0))} spaces>", s)
    return s if len(s) <= n else s[:n] + "..."


def judge_session(case, lines):
    problems = []
    m = re.match(r"connect from (\S+?)\[([^\]]*)\]", lines[0])
    mf_name = m.group(1) if m else "?"
    xclients = 0
    pending_remote_rcpt = None
    pending_xclient = None
    for msg in lines:
        if "request longer than" in msg:
            problems.append(f"Postfix cut an over-long line ({short(msg.split(': ', 1)[-1], 60)})")
        cm = PEER_CMD.match(msg)
        if cm:
            name, addr, cmd = cm.groups()
            verb = cmd.split(" ", 1)[0].upper()
            if pending_xclient:
                problems.append(pending_xclient + " (no reply logged)")
                pending_xclient = None
            if verb == "XFORWARD":
                problems.append(f"Postfix got the client's {short(cmd, 60)}")
            if verb == "XCLIENT":
                xclients += 1
                if "LOGIN=" in cmd.upper():
                    pending_xclient = f"Postfix got the client's {short(cmd, 60)}"
                elif xclients > 1:
                    pending_xclient = f"Postfix got a second XCLIENT, {short(cmd, 60)}"
            if case.identity and verb in TRANSACTION_VERBS:
                if addr != CLIENT:
                    problems.append(f"Postfix ran {verb} as {name}[{addr}], mailfront's own "
                                    f"address, not the client's {CLIENT}")
                elif name == mf_name:
                    problems.append(f"Postfix ran {verb} as {name}[{addr}]: mailfront's reverse "
                                    f"name {name!r} kept for the client")
            pending_remote_rcpt = (verb == "RCPT" and "@remote.example.net" in cmd.lower())
            continue
        rm = PEER_REPLY.match(msg)
        if rm and pending_xclient:
            problems.append(f"{pending_xclient}, answered {rm.group(3)[:3]}")
            pending_xclient = None
        if rm and pending_remote_rcpt:
            pending_remote_rcpt = False
            if rm.group(3).startswith("250") and not case.auth and case.listener != "hp":
                problems.append(f"Postfix accepted a relay to the remote domain for an "
                                f"unauthenticated client ({rm.group(1)}[{rm.group(2)}])")
        if "sasl_username=" + VICTIM_LOGIN in msg:
            problems.append(f"Postfix logged sasl_username={VICTIM_LOGIN}")
    return problems


def queue_ids(lines):
    """The queue ids of the messages a session queued (its `250 … queued as` replies; a queue
    file opened at RCPT and dropped at QUIT never reaches the queue manager)."""
    return [m.group(1) for msg in lines for m in [re.search(r"queued as ([0-9A-F]{6,})", msg)]
            if m and msg.startswith(">")]


def delivered(env, tag):
    """(path, bytes) of every delivered message that carries the tag."""
    found = []
    for box in env.mailboxes:
        for sub in ("new", "cur"):
            d = os.path.join(box, sub)
            try:
                names = os.listdir(d)
            except FileNotFoundError:
                continue
            for name in names:
                try:
                    with open(os.path.join(d, name), "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    continue
                if tag.encode() in data:
                    found.append((os.path.join(box, sub, name), data))
    return found


def received_fields(data):
    head = data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", "replace")
    fields = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] += " " + line.strip()
        elif ":" in line:
            fields.append(line)
    return [f.split(":", 1)[1].strip() for f in fields if f.split(":", 1)[0].lower() == "received"]


def judge_messages(env, tag):
    problems, count = [], 0
    for path, data in delivered(env, tag):
        count += 1
        ours = [r for r in received_fields(data) if f"by {env.hostname} (mailfront)" in r]
        subject = re.search(rb"\nSubject: ([^\r\n]*)", data.replace(b"\r\n", b"\n"))
        what = subject.group(1).decode("utf-8", "replace") if subject else os.path.basename(path)
        box = os.path.relpath(path, env.mailbase).split(os.sep)
        if len(ours) != 1:
            problems.append(f"delivered to {'/'.join(box[:-2])} with {len(ours)} mailfront "
                            f"Received fields: {what!r}")
        elif not re.search(r"\btls\s+\S+", ours[0]):
            problems.append(f"mailfront's Received has no tls clause: {what!r}")
    return problems, count


def judge(case, conn, error, log_sessions, env):
    problems = []
    mine = log_sessions.get(case.tag)
    for s in mine:
        problems += judge_session(case, s)
    msg_problems, count = judge_messages(env, case.tag)
    problems += msg_problems
    if case.identity:
        bad = [r for r in case.client_rcpt_remote if r.startswith("250")]
        if bad and not case.auth:
            problems.append(f"the client got {bad[0][:60]!r} for RCPT TO:<{REMOTE_RCPT}>")
        ran = any(PEER_CMD.match(m) and PEER_CMD.match(m).group(3).split(" ")[0].upper() in
                  TRANSACTION_VERBS for s in mine for m in s)
        if not ran and not (case.allow_421 and case.client_421):
            problems.append("Postfix ran no MAIL/RCPT for this session (nothing to judge)")
    problems = list(dict.fromkeys(problems))
    if case.control:
        if case.expect == ("delivered",):
            if error:
                return error
            if count == 0:
                return "nothing delivered: the Received check had nothing to see"
            return "; ".join(problems)
        missing = [e for e in case.expect if not any(e in p for p in problems)]
        if missing:
            return (f"the judge did not flag {missing} (it found: {problems or 'nothing'}"
                    f"{'; ' + error if error else ''})")
        return ""
    if error and not problems:
        # A script that stopped early still must not have let anything through; the judge above
        # decides. Only report the error when the judge had nothing to go on.
        if not mine and not case.client_421:
            return f"no Postfix session for the case and the client stopped: {error}"
    return "; ".join(problems)


def write_transcript(outdir, case, conn, error, verdict, log_sessions):
    if not outdir:
        return
    with open(os.path.join(outdir, f"{case.name}.txt"), "w", encoding="utf-8") as f:
        f.write(f"{case.name} ({case.listener}, tag {case.tag}, auth={case.auth})\n")
        f.write(f"verdict: {verdict or 'holds'}\n")
        if error:
            f.write(f"client error: {error}\n")
        if conn:
            for t, what, data in conn.transcript:
                f.write(f"{t:7.3f} {what} {short(repr(data), 400)}\n")
        for s in log_sessions.get(case.tag):
            f.write("--- Postfix session\n")
            for msg in s:
                if msg.startswith(("<", ">", "connect", "disconnect", "warning", "NOQUEUE")) or \
                        re.match(r"[0-9A-F]{8,}: ", msg):
                    f.write(short(msg, 300) + "\n")


class Env:
    pass


def cmd_run(args):
    env = Env()
    env.ctx = ssl.create_default_context(cafile=args.cafile)
    env.sni, env.hostname = args.sni, args.hostname
    env.hx, env.hx587, env.hp, env.hn = args.hx, args.hx587, args.hp, args.hn
    env.postfix = args.postfix
    env.user, env.password = args.user, args.password
    env.mailbase = args.mail_base
    env.mailboxes = [os.path.join(args.mail_base, "example.test", "hostile"),
                     os.path.join(args.mail_base, "remote", "victim")]
    cases = all_cases()
    if args.only:
        cases = [c for c in cases if any(re.search(o, c.name) for o in args.only)]
    try:
        offset = os.path.getsize(args.postfix_log)
    except FileNotFoundError:
        offset = 0
    if args.outdir:
        os.makedirs(args.outdir, exist_ok=True)

    results = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futs = {pool.submit(run_one, c, env): c for c in cases}
        for fut in concurrent.futures.as_completed(futs):
            c = futs[fut]
            try:
                results[c.name] = fut.result()
            except Exception as e:  # noqa: BLE001 -- one broken case must not hide the others
                results[c.name] = (None, f"case did not run: {type(e).__name__}: {e}")

    # Wait until every tagged session is over and whatever it queued has left the queue.
    deadline = time.monotonic() + LOG_WAIT
    while True:
        with open(args.postfix_log, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
        log_sessions = LogIndex(text)
        busy = False
        for c in cases:
            for s in log_sessions.get(c.tag):
                if not s[-1].startswith("disconnect from "):
                    busy = True
                for qid in queue_ids(s):
                    if f"{qid}: removed" not in text:
                        busy = True
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.3)

    for c in cases:
        conn, error = results[c.name]
        verdict = judge(c, conn, error, log_sessions, env)
        write_transcript(args.outdir, c, conn, error, verdict, log_sessions)
        print(f"FAIL {c.name}: {verdict}" if verdict else f"PASS {c.name}", flush=True)
    return 0


def cmd_list(_args):
    for c in all_cases():
        print(c.name)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("run")
    p.add_argument("--cafile", required=True)
    p.add_argument("--sni", default="mx.example.test")
    p.add_argument("--hostname", default="mx.example.test", help="mailfront's hostname")
    for name in ("hx", "hx587", "hp", "hn", "postfix"):  # mailfront's listeners, Postfix
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--postfix-log", required=True)
    p.add_argument("--mail-base", required=True, help="the virtual mailbox base ($T/mail)")
    p.add_argument("--outdir", help="write one transcript per case here")
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--only", action="append", help="regex on case names (repeatable)")
    p.set_defaults(func=cmd_run)
    args = ap.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
