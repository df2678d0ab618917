#!/usr/bin/env python3
"""Streaming benchmark: one message of N MiB (default 1024) submitted over SMTPS through mailfront
to a sink backend; reports the proxy's peak RSS (VmHWM) before and after, and throughput.

Not a test: it prints numbers. The claim it checks is "bounded memory": peak RSS must not grow
with message size (issue target: < 16 MiB growth for a 1 GiB message).

    cargo build --release && python3 bench/smtp_stream_rss.py [--mib 1024] [--bin target/release/mailfront]
"""
import argparse, asyncio, os, re, socket, ssl, subprocess, sys, tempfile, time


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


class SinkStats:
    bytes = 0
    messages = 0
    received_field = None


async def sink_backend(reader, writer, stats):
    """A minimal SMTP server that discards message content but counts it."""
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
            first = True
            while True:
                chunk = await reader.read(1 << 20)
                if not chunk:
                    return
                if first:
                    stats.received_field = chunk[:400].split(b"\r\n\r\n")[0][:400]
                    first = False
                stats.bytes += len(chunk)
                tail = (tail + chunk)[-5:]
                if tail == b"\r\n.\r\n":
                    break
            stats.messages += 1
            writer.write(b"250 2.0.0 queued\r\n")
        elif cmd == b"QUIT":
            writer.write(b"221 bye\r\n"); await writer.drain(); return
        else:
            writer.write(b"250 ok\r\n")
        await writer.drain()


def hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)), int(re.search(r"VmRSS:\s+(\d+)", status).group(1))


def submit(port, mib):
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port))
    s = ctx.wrap_socket(raw, server_hostname="mx.example.test")
    f = s.makefile("rb")
    def reply():
        while True:
            line = f.readline()
            if len(line) < 4 or line[3:4] == b" ":
                return line
    reply()
    for cmd in (b"EHLO bench.example\r\n", b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\n", b"MAIL FROM:<a@example.test>\r\n",
                b"RCPT TO:<b@example.test>\r\n", b"DATA\r\n"):
        s.sendall(cmd); r = reply()
    line = b"x" * 510 + b"\r\n"
    block = line * 2048  # exactly 1 MiB of 512-octet lines
    s.sendall(b"Subject: bench\r\n\r\n")
    start = time.monotonic()
    for _ in range(mib):
        s.sendall(block)
    s.sendall(b".\r\n")
    final = reply()
    took = time.monotonic() - start
    s.sendall(b"QUIT\r\n"); reply(); s.close()
    return final, took, s.cipher()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--bin", default="target/release/mailfront")
    args = ap.parse_args()
    stats = SinkStats()
    server = await asyncio.start_server(lambda r, w: sink_backend(r, w, stats), "127.0.0.1", 0)
    backend = server.sockets[0].getsockname()[1]
    port = free_port()
    conf = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    conf.write(f"""hostname: mx.example.test
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
    proxy = subprocess.Popen([args.bin, "--config", conf.name], stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port)).close(); break
            except OSError:
                await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, submit, port, 1)  # warm-up: one 1 MiB message
        hwm0, rss0 = hwm_kib(proxy.pid)
        final, took, cipher = await loop.run_in_executor(None, submit, port, args.mib)
        hwm1, rss1 = hwm_kib(proxy.pid)
        size = args.mib * 1024 * 1024 + len(b"Subject: bench\r\n\r\n")
        print(f"message: {args.mib} MiB content ({size} octets) over {cipher[1]} {cipher[0]}")
        print(f"backend reply: {final.decode().strip()}; backend received {stats.bytes} octets in {stats.messages} message(s)")
        print(f"Received field at the backend: {stats.received_field.decode(errors='replace')!r}")
        print(f"throughput: {size / took / 1e6:.0f} MB/s ({took:.1f} s)")
        print(f"proxy peak RSS (VmHWM): {hwm0 / 1024:.1f} MiB after warm-up -> {hwm1 / 1024:.1f} MiB after the message; growth {(hwm1 - hwm0) / 1024:.2f} MiB")
        print(f"proxy RSS now: {rss1 / 1024:.1f} MiB")
        ok = (hwm1 - hwm0) < 16 * 1024 and final.startswith(b"250")
        print("RESULT:", "bounded (growth < 16 MiB)" if ok else "NOT bounded or not accepted")
        return 0 if ok else 1
    finally:
        proxy.terminate(); proxy.wait(); os.unlink(conf.name)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
