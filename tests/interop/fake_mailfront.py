#!/usr/bin/env python3
"""A stand-in for mailfront, used only to test the interop suite itself.

    MAILFRONT_BIN=tests/interop/fake_mailfront.py tests/interop/run.sh

It does just enough of what mailfront does for every client case in run.sh to run end to end:
implicit TLS and STARTTLS/STLS, refusing authentication before TLS, a Received field with the
`tls` clause, and the IMAP ID `tls` field. It is NOT mailfront and proves nothing about it: the
point is that a failure against the real binary is mailfront's, not the suite's. It reads only
the subset of the YAML that run.sh writes. Python's ssl module cannot report the key-exchange
group, so its Received has no `group` clause and the cases that pin one fail by design.
"""

import asyncio
import http.server
import os
import re
import ssl
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mfi import iana_name  # noqa: E402


def parse_config(path):
    """The few keys run.sh writes: hostname, the first certificate, listeners, metrics."""
    cfg = {"listeners": [], "hostname": "localhost"}
    cur = None
    section = None
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.split(" #", 1)[0].rstrip()
            if not line or line.lstrip().startswith("#"):
                continue
            if not line.startswith(" "):
                section = line.split(":", 1)[0]
                value = line.split(":", 1)[1].strip()
                if section == "hostname":
                    cfg["hostname"] = value
                continue
            key, _, value = line.strip().lstrip("- ").partition(":")
            value = value.strip().strip('"')
            if section == "listeners":
                if line.strip().startswith("- "):
                    cur = {}
                    cfg["listeners"].append(cur)
                cur[key] = value
            elif section == "tls" and key in ("cert", "key") and key not in cfg:
                cfg[key] = value
            elif section == "metrics" and key == "listen":
                cfg["metrics"] = value
    return cfg


def hostport(s):
    host, _, port = s.rpartition(":")
    return host, int(port)


class Conn:
    """Client side: an asyncio stream that can be upgraded to TLS in place."""

    def __init__(self, reader, writer):
        self.r, self.w = reader, writer

    def cipher(self):
        obj = self.w.get_extra_info("ssl_object")
        return iana_name(obj.cipher()[0]) if obj else None

    async def starttls(self, ctx):
        await self.w.start_tls(ctx)


async def pump(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except (ConnectionError, OSError):
            pass


async def read_smtp_reply(reader):
    lines = b""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("backend closed")
        lines += line
        if line[3:4] != b"-":
            return lines


# ---------------------------------------------------------------------------------------------


async def smtp_session(lst, cfg, ctx, c, br, bw):
    host = cfg["hostname"]
    await read_smtp_reply(br)  # backend greeting; ours carries our hostname
    c.w.write(f"220 {host} ESMTP fake-mailfront\r\n".encode())
    tls = lst["tls"] == "implicit"
    helo = None
    while True:
        line = await c.r.readline()
        if not line:
            return
        verb = line.split(b" ", 1)[0].strip().upper()
        if not tls:
            if verb in (b"EHLO", b"HELO"):
                c.w.write(f"250-{host}\r\n250-PIPELINING\r\n250 STARTTLS\r\n".encode())
            elif verb == b"STARTTLS":
                c.w.write(b"220 2.0.0 Ready to start TLS\r\n")
                await c.w.drain()
                await c.starttls(ctx)
                tls = True
            elif verb == b"QUIT":
                c.w.write(b"221 2.0.0 Bye\r\n")
                await c.w.drain()
                return
            elif verb == b"NOOP":
                c.w.write(b"250 2.0.0 Ok\r\n")
            else:
                c.w.write(b"530 5.7.0 Must issue a STARTTLS command first\r\n")
            await c.w.drain()
            continue
        if verb in (b"EHLO", b"HELO"):
            helo = line.split()[1].decode(errors="replace") if len(line.split()) > 1 else "unknown"
        bw.write(line)
        await bw.drain()
        reply = await read_smtp_reply(br)
        if verb == b"EHLO":
            reply = re.sub(rb"^250([ -])[^\r\n]*", b"250\\1" + host.encode(), reply)
        c.w.write(reply)
        await c.w.drain()
        if verb == b"DATA" and reply.startswith(b"354"):
            date = time.strftime("%a, %d %b %Y %H:%M:%S %z")
            bw.write((f"Received: from {helo} ([127.0.0.1])\r\n\tby {host} (mailfront) with "
                      f"ESMTPSA id fake{int(time.time() * 1000)}\r\n\ttls {c.cipher()};\r\n"
                      f"\t{date}\r\n").encode())
            while True:
                data = await c.r.readline()
                if not data:
                    return
                bw.write(data)
                if data == b".\r\n":
                    break
            await bw.drain()
            c.w.write(await read_smtp_reply(br))
            await c.w.drain()
        if verb == b"QUIT":
            return


# ---------------------------------------------------------------------------------------------


async def imap_session(lst, cfg, ctx, c, br, bw):
    greeting = await br.readline()
    tls = lst["tls"] == "implicit"
    if tls:
        c.w.write(greeting)
    else:
        c.w.write(b"* OK [CAPABILITY IMAP4rev1 ID STARTTLS LOGINDISABLED] fake-mailfront ready\r\n")
    await c.w.drain()
    while not tls:
        line = await c.r.readline()
        if not line:
            return
        parts = line.split()
        tag, cmd = (parts + [b"*", b""])[:2]
        cmd = cmd.upper()
        if cmd == b"CAPABILITY":
            c.w.write(b"* CAPABILITY IMAP4rev1 ID STARTTLS LOGINDISABLED\r\n" + tag + b" OK done\r\n")
        elif cmd == b"STARTTLS":
            c.w.write(tag + b" OK Begin TLS negotiation now\r\n")
            await c.w.drain()
            await c.starttls(ctx)
            tls = True
            continue
        elif cmd == b"LOGOUT":
            c.w.write(b"* BYE\r\n" + tag + b" OK bye\r\n")
            await c.w.drain()
            return
        elif cmd in (b"NOOP", b"ID"):
            c.w.write(tag + b" OK done\r\n")
        else:
            c.w.write(tag + b" NO [PRIVACYREQUIRED] TLS required\r\n")
        await c.w.drain()
    ours = f'"tls" "{c.cipher()}"'.encode()
    id_sent = False
    swallow = asyncio.Event()

    async def backend_to_client():
        try:
            while line := await br.readline():
                if swallow.is_set():
                    if line.startswith(b"mfid "):
                        swallow.clear()
                    continue
                c.w.write(line)
                await c.w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            c.w.close()

    task = asyncio.create_task(backend_to_client())
    try:
        while line := await c.r.readline():
            parts = line.split(b" ", 2)
            cmd = parts[1].upper().strip() if len(parts) > 1 else b""
            if cmd == b"ID" and not id_sent and len(parts) > 2:
                arg = parts[2].strip()
                arg = re.sub(rb'"tls"\s+"[^"]*"\s*', b"", arg, flags=re.I)
                arg = b"(" + ours + b")" if arg.upper() == b"NIL" else arg[:-1].rstrip() + b" " + ours + b")"
                line = parts[0] + b" ID " + arg.replace(b"( ", b"(") + b"\r\n"
                id_sent = True
            elif cmd in (b"LOGIN", b"AUTHENTICATE") and not id_sent:
                swallow.set()
                bw.write(b"mfid ID (" + ours + b")\r\n")
                id_sent = True
                await bw.drain()
                while swallow.is_set():
                    await asyncio.sleep(0.01)
            bw.write(line)
            await bw.drain()
    finally:
        bw.close()
        await task


# ---------------------------------------------------------------------------------------------


async def pop3_session(lst, cfg, ctx, c, br, bw):
    greeting = await br.readline()
    tls = lst["tls"] == "implicit"
    c.w.write(greeting if tls else b"+OK fake-mailfront ready\r\n")
    await c.w.drain()
    while not tls:
        line = await c.r.readline()
        if not line:
            return
        cmd = line.split()[0].upper() if line.split() else b""
        if cmd == b"CAPA":
            c.w.write(b"+OK\r\nSTLS\r\nPIPELINING\r\n.\r\n")
        elif cmd == b"STLS":
            c.w.write(b"+OK Begin TLS negotiation\r\n")
            await c.w.drain()
            await c.starttls(ctx)
            tls = True
            continue
        elif cmd == b"QUIT":
            c.w.write(b"+OK bye\r\n")
            await c.w.drain()
            return
        else:
            c.w.write(b"-ERR [AUTH] TLS required\r\n")
        await c.w.drain()
    await asyncio.gather(pump(c.r, bw), pump(br, c.w))


# ---------------------------------------------------------------------------------------------


async def serve(cfg):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.load_cert_chain(cfg["cert"], cfg["key"])
    sessions = {"smtp": smtp_session, "imap": imap_session, "pop3": pop3_session}
    servers = []
    for lst in cfg["listeners"]:
        async def handler(reader, writer, lst=lst):
            c = Conn(reader, writer)
            try:
                br, bw = await asyncio.open_connection(*hostport(lst["backend"]))
            except OSError:
                writer.close()
                return
            try:
                await sessions[lst["protocol"]](lst, cfg, ctx, c, br, bw)
            except (ConnectionError, OSError, ssl.SSLError, asyncio.IncompleteReadError):
                pass
            finally:
                for w in (writer, bw):
                    try:
                        w.close()
                    except (ConnectionError, OSError):
                        pass
        host, port = hostport(lst["listen"])
        servers.append(await asyncio.start_server(
            handler, host, port, ssl=ctx if lst["tls"] == "implicit" else None))
    await asyncio.gather(*(s.serve_forever() for s in servers))


class Metrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"fake_mailfront_up 1\n" if self.path == "/metrics" else b"ok\n"
        self.send_response(200 if self.path in ("/metrics", "/healthz", "/readyz") else 404)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main():
    args = sys.argv[1:]
    check = bool(args) and args[0] == "check"
    if check:
        args = args[1:]
    if len(args) != 2 or args[0] != "--config":
        print("usage: fake_mailfront.py [check] --config PATH", file=sys.stderr)
        return 2
    cfg = parse_config(args[1])
    if check:
        return 0 if cfg["listeners"] and "cert" in cfg else 1
    if "metrics" in cfg:
        srv = http.server.ThreadingHTTPServer(hostport(cfg["metrics"]), Metrics)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    asyncio.run(serve(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
