#!/usr/bin/env python3
"""Flood benchmark (issue 12): N idle connections (default 10,000) from 100 loopback addresses
(127.0.1.1 .. 127.0.1.100), half cleartext to a STARTTLS IMAP listener (greeting read, then
silence), half implicit TLS (handshake done, greeting read, then silence). While they are held it
prints the proxy's RSS, RSS per connection and the backend's open connection count; then a fresh
client from 127.0.0.1 logs in over TLS, SELECTs and FETCHes, timed against 1 s.

Not a test: run by hand, never in CI. Python standard library only.

    cargo build --release && python3 bench/flood.py [--connections 10000] [--bin target/release/mailfront]
"""
import argparse, asyncio, os, re, resource, shutil, socket, ssl, subprocess, sys, tempfile, time

MESSAGE = (b"From: a@example.test\r\nTo: u@example.test\r\nSubject: flood bench\r\n\r\n"
           b"hello from the fake backend\r\n")
SOURCES = [f"127.0.1.{i}" for i in range(1, 101)]


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def proc_status(pid):
    with open(f"/proc/{pid}/status") as f:
        st = f.read()
    def field(name):
        m = re.search(rf"{name}:\s+(\d+)", st)
        return int(m.group(1)) if m else 0
    return {"rss_kib": field("VmRSS"), "hwm_kib": field("VmHWM"), "threads": field("Threads")}


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


class Backend:
    """A tiny IMAP server: enough for the proxy's driver (ID, CAPABILITY) and one login+fetch."""

    def __init__(self):
        self.open = 0
        self.peak = 0
        self.total = 0

    async def handle(self, reader, writer):
        self.open += 1; self.total += 1; self.peak = max(self.peak, self.open)
        try:
            writer.write(b"* OK [CAPABILITY IMAP4rev1 ID LITERAL+ AUTH=PLAIN] fake backend ready\r\n")
            await writer.drain()
            while True:
                line = await self.read_command(reader, writer)
                if line is None:
                    return
                parts = line.split(None, 2)
                if len(parts) < 2:
                    writer.write(b"* BAD what\r\n"); await writer.drain(); continue
                tag, cmd = parts[0], parts[1].upper()
                rest = parts[2] if len(parts) > 2 else b""
                if cmd == b"ID":
                    writer.write(b'* ID ("name" "fake")\r\n' + tag + b" OK ID done\r\n")
                elif cmd == b"CAPABILITY":
                    writer.write(b"* CAPABILITY IMAP4rev1 ID LITERAL+ AUTH=PLAIN\r\n" + tag + b" OK done\r\n")
                elif cmd == b"LOGIN":
                    args = rest.replace(b'"', b"").split()
                    if args == [b"u", b"secret"]:
                        writer.write(tag + b" OK [CAPABILITY IMAP4rev1] logged in\r\n")
                    else:
                        writer.write(tag + b" NO [AUTHENTICATIONFAILED] bad credentials\r\n")
                elif cmd == b"SELECT":
                    writer.write(b"* 1 EXISTS\r\n* 0 RECENT\r\n* FLAGS (\\Seen)\r\n"
                                 b"* OK [UIDVALIDITY 1] ok\r\n" + tag + b" OK [READ-WRITE] selected\r\n")
                elif cmd == b"FETCH":
                    writer.write(b"* 1 FETCH (BODY[] {%d}\r\n" % len(MESSAGE) + MESSAGE + b")\r\n"
                                 + tag + b" OK fetched\r\n")
                elif cmd == b"LOGOUT":
                    writer.write(b"* BYE bye\r\n" + tag + b" OK logged out\r\n"); await writer.drain()
                    return
                elif cmd == b"NOOP":
                    writer.write(tag + b" OK noop\r\n")
                else:
                    writer.write(tag + b" BAD unknown command\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # cancelled: the run is over and asyncio.run is cancelling what is left
        finally:
            self.open -= 1
            writer.close()

    @staticmethod
    async def read_command(reader, writer):
        """One command line with its literals ({n} synchronising, {n+} LITERAL+) joined in."""
        out = b""
        while True:
            line = await reader.readline()
            if not line:
                return None
            line = line.rstrip(b"\r\n")
            m = re.search(rb"\{(\d+)(\+?)\}$", line)
            if not m:
                return out + line
            if not m.group(2):
                writer.write(b"+ go ahead\r\n"); await writer.drain()
            lit = await reader.readexactly(int(m.group(1)))
            out += line[:m.start()] + b'"' + lit + b'"'


def client_tls_context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def http_get(port, path):
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    w.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode()); await w.drain()
    data = await asyncio.wait_for(r.read(), 5)
    w.close()
    return data


async def open_idle(i, sem, held, errors, args, ports, ctx):
    """Connection i: source address i % 100, even i cleartext (STARTTLS listener), odd i TLS."""
    src = SOURCES[i % len(SOURCES)]
    tls = i % 2 == 1
    async with sem:
        try:
            if tls:
                conn = asyncio.open_connection("127.0.0.1", ports["imaps"], ssl=ctx,
                                               server_hostname="mx.example.test",
                                               local_addr=(src, 0), ssl_handshake_timeout=30)
            else:
                conn = asyncio.open_connection("127.0.0.1", ports["imap"], local_addr=(src, 0))
            r, w = await asyncio.wait_for(conn, 30)
            greeting = await asyncio.wait_for(r.readline(), 30)
            if not greeting.startswith(b"* OK"):
                errors[f"greeting {greeting[:40]!r}"] = errors.get(f"greeting {greeting[:40]!r}", 0) + 1
                w.close()
                return
            held.append((tls, r, w))
        except Exception as e:  # counted, not fatal: the point is how many the proxy accepts
            key = type(e).__name__ + (f" {e.errno}" if isinstance(e, OSError) and e.errno else "")
            errors[key] = errors.get(key, 0) + 1


def fresh_login_fetch(port):
    """Blocking, from 127.0.0.1: connect, TLS, greeting, LOGIN, SELECT, FETCH; returns (seconds, ok, detail)."""
    start = time.monotonic()
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    s = client_tls_context().wrap_socket(raw, server_hostname="mx.example.test")
    f = s.makefile("rb")

    def until_tagged(tag):
        lines = []
        while True:
            line = f.readline()
            if not line:
                raise ConnectionError("closed: " + repr(b"".join(lines)[-200:]))
            lines.append(line)
            if line.startswith(tag + b" "):
                return line, b"".join(lines)

    f.readline()  # greeting
    s.sendall(b"a1 LOGIN u secret\r\n")
    login, _ = until_tagged(b"a1")
    s.sendall(b"a2 SELECT INBOX\r\n")
    sel, _ = until_tagged(b"a2")
    s.sendall(b"a3 FETCH 1 BODY[]\r\n")
    fetch, body = until_tagged(b"a3")
    took = time.monotonic() - start
    ok = b" OK" in login and b" OK" in sel and b" OK" in fetch and MESSAGE in body
    try:
        s.sendall(b"a4 LOGOUT\r\n"); until_tagged(b"a4")
    except OSError:
        pass
    s.close()
    return took, ok, (login + sel + fetch).decode(errors="replace").strip()


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def pick_binary(arg):
    if arg:
        return arg
    for b in ("target/release/mailfront", "target/debug/mailfront"):
        if os.path.exists(b):
            return b
    sys.exit("no mailfront binary: run `cargo build --release` or pass --bin")


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=200, help="connections being opened at once")
    ap.add_argument("--per-ip", type=int, default=1000, help="limits.connections_per_ip for the proxy")
    ap.add_argument("--hold", type=float, default=2.0, help="seconds to hold the flood before measuring")
    ap.add_argument("--bin", default=None, help="default target/release/mailfront, else target/debug/mailfront")
    args = ap.parse_args()
    binary = pick_binary(args.bin)
    n = args.connections

    # The script holds n client sockets plus n/2 backend sockets (its fake backend serves the TLS
    # half); the proxy, which inherits this limit, holds n client sockets plus n/2 backend ones.
    need = n + n // 2 + 256
    soft, hard = raise_nofile(need)
    print(f"RLIMIT_NOFILE: soft {soft}, hard {hard}; needed about {need} per process")
    if soft < need:
        sys.exit(f"RLIMIT_NOFILE {soft} is below {need}: raise the hard limit (ulimit -Hn) or lower --connections")

    backend = Backend()
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0, backlog=4096)
    bport = server.sockets[0].getsockname()[1]
    ports = {"imaps": free_port(), "imap": free_port(), "metrics": free_port()}
    tmp = tempfile.mkdtemp(prefix="mailfront-flood-")
    conf = os.path.join(tmp, "mailfront.yaml")
    with open(conf, "w") as f:
        f.write(f"""hostname: mx.example.test
tls:
  certificates: []      # self-signed, made by mailfront at start
listeners:
  - name: imaps
    protocol: imap
    listen: "127.0.0.1:{ports['imaps']}"
    tls: implicit
    backend: "127.0.0.1:{bport}"
    max_connections: {n + 100}
  - name: imap
    protocol: imap
    listen: "127.0.0.1:{ports['imap']}"
    tls: starttls
    backend: "127.0.0.1:{bport}"
    max_connections: {n + 100}
metrics:
  listen: "127.0.0.1:{ports['metrics']}"
log:
  level: error
timeouts:
  idle: 30m
  login: 30m
limits:
  connections_per_ip: {args.per_ip}
""")
    proxy = subprocess.Popen([binary, "--config", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    held, errors = [], {}
    try:
        for _ in range(200):
            try:
                if b" 200 " in (await http_get(ports["metrics"], "/readyz")).split(b"\r\n")[0] + b" ":
                    break
            except (OSError, asyncio.TimeoutError):
                pass
            if proxy.poll() is not None:
                sys.exit(f"mailfront exited with {proxy.returncode}")
            await asyncio.sleep(0.05)
        else:
            sys.exit("mailfront did not become ready")
        base = proc_status(proxy.pid)
        print(f"binary: {binary} (pid {proxy.pid}); idle RSS {base['rss_kib'] / 1024:.1f} MiB, "
              f"{base['threads']} threads")

        ctx = client_tls_context()
        sem = asyncio.Semaphore(args.concurrency)
        t0 = time.monotonic()
        await asyncio.gather(*(open_idle(i, sem, held, errors, args, ports, ctx) for i in range(n)))
        opened = time.monotonic() - t0
        n_tls = sum(1 for t, _, _ in held if t)
        print(f"opened {len(held)}/{n} idle connections in {opened:.1f} s from {len(SOURCES)} addresses "
              f"({len(held) - n_tls} cleartext on STARTTLS, {n_tls} implicit TLS; concurrency {args.concurrency})")
        if errors:
            print("failures:", ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())))

        await asyncio.sleep(args.hold)
        st = proc_status(proxy.pid)
        alive = sum(1 for _, r, _ in held if not r.at_eof())
        grew = st["rss_kib"] - base["rss_kib"]
        print(f"during the flood: proxy RSS {st['rss_kib'] / 1024:.1f} MiB (peak {st['hwm_kib'] / 1024:.1f} MiB), "
              f"+{grew / 1024:.1f} MiB over idle = {grew * 1024 / max(len(held), 1) / 1024:.1f} KiB per connection "
              f"({st['rss_kib'] * 1024 / max(len(held), 1) / 1024:.1f} KiB per connection in total); "
              f"{st['threads']} threads, {open_fds(proxy.pid)} fds")
        print(f"backend connections during the flood: {backend.open} open (expected {n_tls}: one per implicit-TLS "
              f"session, none for cleartext STARTTLS sessions); {alive} client connections still open")
        try:
            metrics = (await http_get(ports["metrics"], "/metrics")).decode(errors="replace")
            wanted = [l for l in metrics.splitlines() if l and not l.startswith("#")
                      and re.search(r"active|open|refus|per_ip|limit", l)]
            if wanted:
                print("metrics:", *wanted[:12], sep="\n  ")
        except (OSError, asyncio.TimeoutError):
            pass

        loop = asyncio.get_running_loop()
        try:
            took, ok, detail = await loop.run_in_executor(None, fresh_login_fetch, ports["imaps"])
        except Exception as e:
            took, ok, detail = float("nan"), False, f"{type(e).__name__}: {e}"
        result = "PASS" if ok and took < 1.0 else "FAIL"
        print(f"fresh client (127.0.0.1, TLS): connect+handshake+LOGIN+SELECT+FETCH in {took * 1000:.0f} ms: "
              f"{result} (limit 1 s)" + ("" if ok else f"; {detail}"))
        return 0 if result == "PASS" else 1
    finally:
        for _, _, w in held:
            w.close()
        proxy.terminate()
        try:
            proxy.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proxy.kill(); proxy.wait()
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
