#!/usr/bin/env python3
"""Proxy CPU for SMTP DATA: N messages of M MB (76-char lines) over SMTPS through mailfront to a
sink. Prints proxy CPU seconds (utime+stime) per GB of content; with --callgrind runs the proxy
under callgrind (instructions per octet: Ir of a run with N messages minus Ir of a run with
--messages 0, divided by the octets). Not a test; run by hand on a release build:

    python3 bench/smtp_data_cpu.py --messages 50 --mb 10
    python3 bench/smtp_data_cpu.py --messages 3 --callgrind /tmp/cg.3; python3 bench/smtp_data_cpu.py --messages 0 --callgrind /tmp/cg.0
"""
import argparse, asyncio, os, socket, ssl, subprocess, sys, tempfile, time

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

async def sink(reader, writer):
    writer.write(b"220 sink ESMTP\r\n"); await writer.drain()
    while True:
        line = await reader.readline()
        if not line:
            return
        cmd = line.strip().upper()
        if cmd.startswith(b"EHLO"):
            writer.write(b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 AUTH PLAIN\r\n")
        elif cmd.startswith(b"AUTH"):
            writer.write(b"235 2.7.0 ok\r\n")
        elif cmd == b"DATA":
            writer.write(b"354 go\r\n"); await writer.drain()
            tail = b""
            while True:
                chunk = await reader.read(1 << 20)
                if not chunk:
                    return
                tail = (tail + chunk[-5:])[-5:]
                if tail == b"\r\n.\r\n":
                    break
            writer.write(b"250 2.0.0 queued\r\n")
        elif cmd == b"QUIT":
            writer.write(b"221 bye\r\n"); await writer.drain(); return
        else:
            writer.write(b"250 ok\r\n")
        await writer.drain()

def cpu(pid):
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        f = open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()
        total += int(f[11]) + int(f[12])
    return total / os.sysconf("SC_CLK_TCK")

def submit(port, messages, mb):
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="mx.example.test")
    f = s.makefile("rb")
    def reply():
        while True:
            line = f.readline()
            if len(line) < 4 or line[3:4] == b" ":
                return line
    reply()
    for cmd in (b"EHLO bench.example\r\n", b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\n"):
        s.sendall(cmd); reply()
    line = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/" * 2)[:76] + b"\r\n"
    block = line * (1 << 14)  # ~1.28 MB
    if mb * 1e6 < len(block):
        # Small messages (e.g. --mb 0.01, the suite's 10 KB): one block of that size.
        block = line * max(1, int(mb * 1e6 / len(line)))
    nblocks = max(1, int(mb * 1e6 / len(block)))
    sent = 0
    for _ in range(messages):
        for cmd in (b"MAIL FROM:<a@example.test>\r\n", b"RCPT TO:<b@example.test>\r\n", b"DATA\r\n"):
            s.sendall(cmd); reply()
        s.sendall(b"Subject: bench\r\n\r\n")
        for _ in range(nblocks):
            s.sendall(block)
        sent += nblocks * len(block)
        s.sendall(b".\r\n")
        r = reply()
        assert r.startswith(b"250"), r
    s.sendall(b"QUIT\r\n"); reply(); s.close()
    return sent

async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=10)
    ap.add_argument("--mb", type=float, default=10)
    ap.add_argument("--bin", default="target/release/mailfront")
    ap.add_argument("--callgrind", default="")
    args = ap.parse_args()
    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    backend = server.sockets[0].getsockname()[1]
    port = free_port()
    conf = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    conf.write(f"""hostname: mx.example.test
tls:
  min_version: "1.3"
listeners:
  - name: submissions
    protocol: smtp
    listen: "127.0.0.1:{port}"
    tls: implicit
    backend: "127.0.0.1:{backend}"
log:
  level: warn
""")
    conf.close()
    cmd = [args.bin, "--config", conf.name]
    if args.callgrind:
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={args.callgrind}"] + cmd
    proxy = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port)).close(); break
            except OSError:
                await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, submit, port, 1, 0.1)
        c0 = cpu(proxy.pid); t0 = time.monotonic()
        sent = await loop.run_in_executor(None, submit, port, args.messages, args.mb) if args.messages else 0
        c1 = cpu(proxy.pid); t1 = time.monotonic()
        if sent:
            print(f"{args.messages} x {args.mb} MB: {sent} octets, proxy CPU {c1-c0:.2f} s = {(c1-c0)/sent*1e9:.3f} CPU-s/GB, wall {t1-t0:.1f} s")
    finally:
        proxy.terminate(); proxy.wait(); os.unlink(conf.name)

if __name__ == "__main__":
    asyncio.run(main())
