#!/usr/bin/env python3
"""Idle authenticated IMAP sessions: N clients log in over implicit TLS (TLS 1.3) through mailfront
to a fake backend and then stay silent. Prints the proxy's RSS before and while they are held and
the KiB per idle authenticated session. Not a test; run by hand on a release build:

    cargo build --release && python3 bench/idle_auth.py --sessions 10000 --concurrency 200 2>/dev/null

Clients come from 127.0.1.1-100 (Linux routes all of 127/8 to lo); limits.connections_per_ip is
off. Under `valgrind --tool=massif` (a wrapper script as --bin) the peak snapshot shows where the
heap goes."""
import argparse, asyncio, os, re, socket, ssl, subprocess, sys, tempfile, time

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def rss_kib(pid):
    st = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+)", st).group(1))

async def backend(reader, writer):
    writer.write(b"* OK [CAPABILITY IMAP4rev1 ID AUTH=PLAIN] ready\r\n"); await writer.drain()
    while True:
        line = await reader.readline()
        if not line:
            return
        parts = line.split(None, 2)
        if len(parts) < 2:
            continue
        tag, cmd = parts[0], parts[1].upper()
        if cmd == b"ID":
            writer.write(b'* ID NIL\r\n' + tag + b" OK ID\r\n")
        elif cmd == b"CAPABILITY":
            writer.write(b"* CAPABILITY IMAP4rev1 ID AUTH=PLAIN\r\n" + tag + b" OK done\r\n")
        elif cmd == b"LOGOUT":
            writer.write(b"* BYE\r\n" + tag + b" OK\r\n"); await writer.drain(); return
        else:
            writer.write(tag + b" OK done\r\n")
        await writer.drain()

async def client(port, ctx, src, held):
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="mx.example.test",
                                         local_addr=(src, 0))
    await r.readline()
    w.write(b"a LOGIN u secret\r\n"); await w.drain()
    while True:
        line = await r.readline()
        if line.startswith(b"a "):
            assert b"OK" in line, line
            break
    held.append((r, w))

async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--bin", default="target/release/mailfront")
    ap.add_argument("--concurrency", type=int, default=100)
    args = ap.parse_args()
    srv = await asyncio.start_server(backend, "127.0.0.1", 0, backlog=4096)
    bport = srv.sockets[0].getsockname()[1]
    port = free_port()
    conf = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    conf.write(f"""hostname: mx.example.test
tls:
  min_version: "1.3"
listeners:
  - name: imaps
    protocol: imap
    listen: "127.0.0.1:{port}"
    tls: implicit
    backend: "127.0.0.1:{bport}"
    max_connections: 20000
limits:
  connections_per_ip: 0
  auth_failures_per_ip: 0
log:
  level: warn
""")
    conf.close()
    proxy = subprocess.Popen([args.bin, "--config", conf.name], stderr=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL)
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    held = []
    try:
        for _ in range(1000):
            try:
                socket.create_connection(("127.0.0.1", port)).close(); break
            except OSError:
                await asyncio.sleep(0.05)
        await client(port, ctx, "127.0.0.1", held)  # warm-up
        for r, w in held: w.close()
        held.clear()
        await asyncio.sleep(0.5)
        base = rss_kib(proxy.pid)
        sem = asyncio.Semaphore(args.concurrency)
        async def one(i):
            async with sem:
                await client(port, ctx, f"127.0.1.{i % 100 + 1}", held)
            if len(held) % 1000 == 0:
                now = rss_kib(proxy.pid)
                print(f"  {len(held)} held: {(now - base) / len(held):.1f} KiB per session so far", flush=True)
        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(args.sessions)))
        await asyncio.sleep(2)
        now = rss_kib(proxy.pid)
        print(f"{len(held)} idle authenticated sessions in {time.monotonic()-t0:.0f} s: proxy RSS {base} KiB -> {now} KiB, "
              f"{(now-base)/len(held):.1f} KiB per session")
    finally:
        proxy.terminate(); proxy.wait()
        os.unlink(conf.name)

if __name__ == "__main__":
    asyncio.run(main())
