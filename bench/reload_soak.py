#!/usr/bin/env python3
"""Reload soak: 1,000 authenticated IMAP sessions held through 20 configuration reloads.

Why: a reload must not drop a session, leak a task or a descriptor, or keep memory. This runs
the real binary on loopback in front of three small asyncio IMAP backends, logs 1,000 sessions
in over implicit TLS, then rewrites the config 20 times (each time a different backend list,
a different limits.connections_per_ip and the other log level) and sends SIGHUP, waiting for
mailfront_config_reloads_total{result="success"} to move. Between reloads 5 new sessions must
log in. At the end every held session must answer NOOP, and RSS, open descriptors and threads
(from /proc/PID) are printed before, after and after settling. Not run in CI; bounded (~1 min).

Usage: bench/reload_soak.py [path/to/mailfront]   (default target/release, then target/debug)
"""
import asyncio, os, resource, signal, ssl, subprocess, sys, tempfile, time, urllib.request

SESSIONS = 1000
RELOADS = 20
NEW_PER_RELOAD = 5

def binary():
    if len(sys.argv) > 1:
        return sys.argv[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target"))
    for kind in ("release", "debug"):
        path = os.path.join(target, kind, "mailfront")
        if os.path.exists(path):
            return path
    sys.exit("no mailfront binary: cargo build --release")

async def backend(name):
    async def serve(reader, writer):
        writer.write(b"* OK fake IMAP ready\r\n")
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                tag, _, rest = line.decode(errors="replace").partition(" ")
                cmd = rest.split(" ")[0].strip().upper()
                if cmd == "LOGOUT":
                    writer.write(f"* BYE\r\n{tag} OK LOGOUT\r\n".encode())
                    await writer.drain()
                    break
                writer.write(f"{tag} OK {cmd} done by {name}\r\n".encode())
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()
    server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=2048)
    return server, server.sockets[0].getsockname()[1]

def proc(pid):
    status = open(f"/proc/{pid}/status").read()
    field = lambda k: next(l.split()[1] for l in status.splitlines() if l.startswith(k))
    return {"rss_kib": int(field("VmRSS:")), "threads": int(field("Threads:")),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}

def config(ports, backends, per_ip, level):
    items = ", ".join(f'"127.0.0.1:{p}"' for p in backends)
    return f"""hostname: mx.example.test
tls:
  reload_interval: 1h
listeners:
  - name: imaps
    protocol: imap
    listen: "127.0.0.1:{ports['imaps']}"
    tls: implicit
    backend: [{items}]
metrics:
  listen: "127.0.0.1:{ports['metrics']}"
log:
  level: {level}
limits:
  connections_per_ip: {per_ip}
"""

def free_port():
    import socket
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def scrape(port, series):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None

async def login(port, ctx):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="mx.example.test")
    greeting = await reader.readline()
    assert greeting.startswith(b"* OK"), greeting
    writer.write(b"a LOGIN user pass\r\n")
    await writer.drain()
    while True:
        line = await reader.readline()
        if line.startswith(b"a "):
            assert line.startswith(b"a OK"), line
            return reader, writer

async def noop(session):
    reader, writer = session
    writer.write(b"n NOOP\r\n")
    await writer.drain()
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        if not line:
            return False
        if line.startswith(b"n "):
            return line.startswith(b"n OK")

async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    backends = [await backend(f"b{i}") for i in range(3)]
    bports = [p for _, p in backends]
    ports = {"imaps": free_port(), "metrics": free_port()}
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "mailfront.yaml")
    def write(text):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.rename(path + ".tmp", path)
    write(config(ports, bports[:2], 2000, "info"))
    log = open(os.path.join(tmp, "log"), "w")
    child = subprocess.Popen([binary(), "--config", path], stderr=log, stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                scrape(ports["metrics"], "mailfront_ready"); break
            except OSError:
                await asyncio.sleep(0.1)
        ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
        started = time.monotonic()
        held = []
        for i in range(0, SESSIONS, 100):
            held += await asyncio.gather(*(login(ports["imaps"], ctx) for _ in range(100)))
        print(f"{len(held)} sessions logged in in {time.monotonic() - started:.1f}s")
        await asyncio.sleep(1)
        before = proc(child.pid)
        print("before reloads:", before)
        new_ok = 0
        for n in range(RELOADS):
            lists = [bports[:2], bports[1:], [bports[0], bports[2]]]
            write(config(ports, lists[n % 3], 2000 + n, "warn" if n % 2 == 0 else "info"))
            done = scrape(ports["metrics"], 'mailfront_config_reloads_total{result="success"}')
            child.send_signal(signal.SIGHUP)
            for _ in range(100):
                if scrape(ports["metrics"], 'mailfront_config_reloads_total{result="success"}') > done:
                    break
                await asyncio.sleep(0.05)
            else:
                sys.exit(f"reload {n + 1} not applied")
            fresh = await asyncio.gather(*(login(ports["imaps"], ctx) for _ in range(NEW_PER_RELOAD)))
            for r, w in fresh:
                new_ok += await noop((r, w))
                w.close()
        failures = scrape(ports["metrics"], 'mailfront_config_reloads_total{result="failure"}')
        after = proc(child.pid)
        print(f"after {RELOADS} reloads:", after, f"(failed reloads: {failures:.0f})")
        alive = sum(await asyncio.gather(*(noop(s) for s in held)))
        print(f"held sessions answering NOOP: {alive}/{SESSIONS}; new sessions during reloads: {new_ok}/{RELOADS * NEW_PER_RELOAD}")
        await asyncio.sleep(3)
        settled = proc(child.pid)
        print("settled:", settled)
        for _, w in held:
            w.close()
        await asyncio.sleep(2)
        print("all sessions closed:", proc(child.pid))
        ok = alive == SESSIONS and new_ok == RELOADS * NEW_PER_RELOAD and failures == 0
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        child.terminate()
        child.wait(timeout=40)

if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
