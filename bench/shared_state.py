#!/usr/bin/env python3
"""What shared_state (Redis/Valkey) adds to the login path and to an accepted connection.

Runs, on loopback, a fake IMAP backend (LOGIN u secret succeeds, anything else fails at once), a
real redis-server on a free port, and the mailfront binary twice: without shared_state, then with
it. For each it times, from the client (Python, so absolute figures include Python's overhead;
compare the two columns):

  accept   connect -> cleartext greeting on a STARTTLS listener (connections_per_ip on: with
           shared_state one script call before the greeting)
  fail     LOGIN with a wrong password -> NO, inside one TLS session (one charge script call)
  success  LOGIN with the right password -> OK, on a fresh TLS session each (one charge call;
           the refund is not waited for)

Bounded: a fixed number of samples, each with a 5 s timeout; nothing here is a test.

    bench/shared_state.py [--bin target/release/mailfront] [--samples 300]
"""

import argparse
import asyncio
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

TIMEOUT = 5.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def fake_imap(reader, writer):
    writer.write(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake ready\r\n")
    await writer.drain()
    while True:
        line = await reader.readline()
        if not line:
            break
        parts = line.decode(errors="replace").split()
        if len(parts) < 2:
            continue
        tag, cmd = parts[0], parts[1].upper()
        if cmd == "LOGIN":
            ok = len(parts) >= 4 and parts[3].strip('"') == "secret"
            writer.write(f"{tag} OK logged in\r\n".encode() if ok else f"{tag} NO [AUTHENTICATIONFAILED] no\r\n".encode())
        elif cmd == "CAPABILITY":
            writer.write(f"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n{tag} OK done\r\n".encode())
        elif cmd == "ID":
            writer.write(f"* ID NIL\r\n{tag} OK done\r\n".encode())
        elif cmd == "LOGOUT":
            writer.write(f"* BYE\r\n{tag} OK bye\r\n".encode())
            await writer.drain()
            break
        else:
            writer.write(f"{tag} OK done\r\n".encode())
        await writer.drain()
    writer.close()


def start_mailfront(binary, workdir, backend_port, redis_url, name):
    imaps, imap, metrics = free_port(), free_port(), free_port()
    shared = f'shared_state:\n  redis: "{redis_url}"\n  timeout: 50ms\n  key_prefix: bench\n' if redis_url else ""
    config = f"""hostname: mail.example.org
tls:
  certificates:
    - cert: {workdir}/tls.crt
      key: {workdir}/tls.key
listeners:
  - name: imaps
    protocol: imap
    listen: "127.0.0.1:{imaps}"
    tls: implicit
    backend: "127.0.0.1:{backend_port}"
  - name: imap
    protocol: imap
    listen: "127.0.0.1:{imap}"
    tls: starttls
    backend: "127.0.0.1:{backend_port}"
metrics:
  listen: "127.0.0.1:{metrics}"
log:
  level: warn
limits:
  connections_per_ip: 1000
  auth_failures_per_ip: 100
  auth_failure_window: 1s
  preauth_commands: 1000
{shared}"""
    path = os.path.join(workdir, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(config)
    proc = subprocess.Popen([binary, "--config", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with urlopen_metrics(metrics) as text:
                if redis_url is None or "mailfront_shared_state_up 1" in text:
                    return proc, imaps, imap
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    sys.exit(f"mailfront ({name}) did not become ready")


class urlopen_metrics:
    def __init__(self, port):
        import urllib.request
        self.text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()

    def __enter__(self):
        return self.text

    def __exit__(self, *exc):
        return False


async def tls_session(port, ctx):
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="mail.example.org"), TIMEOUT)
    await asyncio.wait_for(reader.readline(), TIMEOUT)
    return reader, writer


async def login(reader, writer, tag, password):
    start = time.perf_counter()
    writer.write(f"{tag} LOGIN u {password}\r\n".encode())
    await writer.drain()
    while True:
        line = await asyncio.wait_for(reader.readline(), TIMEOUT)
        if line.startswith(tag.encode() + b" "):
            return time.perf_counter() - start, line


async def measure(imaps, imap, samples, ctx):
    accept, fail, success = [], [], []
    for _ in range(samples):
        start = time.perf_counter()
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", imap), TIMEOUT)
        await asyncio.wait_for(reader.readline(), TIMEOUT)
        accept.append(time.perf_counter() - start)
        writer.close()
    reader, writer = await tls_session(imaps, ctx)
    done = 0
    while done < samples:
        # 50 failures, then let the 1 s window empty, so the throttle (100) never answers.
        for i in range(min(50, samples - done)):
            took, line = await login(reader, writer, f"f{done}", "wrong")
            assert b"NO [AUTHENTICATIONFAILED]" in line, line
            fail.append(took)
            done += 1
        await asyncio.sleep(1.1)
    writer.close()
    for i in range(samples):
        reader, writer = await tls_session(imaps, ctx)
        took, line = await login(reader, writer, "s", "secret")
        assert b"OK" in line, line
        success.append(took)
        writer.close()
    return accept, fail, success


def summary(values):
    values = sorted(values)
    return statistics.median(values) * 1e3, values[int(len(values) * 0.95)] * 1e3


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", default="target/release/mailfront")
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    if not shutil.which("redis-server"):
        sys.exit("redis-server not found (apt-get install redis-server)")
    work = tempfile.mkdtemp(prefix="mailfront-bench-shared-")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "2", "-subj", "/CN=mail.example.org", "-addext", "subjectAltName=DNS:mail.example.org",
                    "-keyout", f"{work}/tls.key", "-out", f"{work}/tls.crt"], check=True, capture_output=True)
    ctx = ssl.create_default_context(cafile=f"{work}/tls.crt")
    server = await asyncio.start_server(fake_imap, "127.0.0.1", 0)
    backend_port = server.sockets[0].getsockname()[1]
    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", work], stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    results = {}
    try:
        for name, url in [("alone", None), ("shared_state", f"redis://127.0.0.1:{redis_port}/0")]:
            proc, imaps, imap = await asyncio.to_thread(start_mailfront, args.bin, work, backend_port, url, name)
            try:
                results[name] = await measure(imaps, imap, args.samples, ctx)
            finally:
                proc.terminate()
                proc.wait(timeout=40)
    finally:
        redis.kill()
        server.close()
    print(f"{args.samples} samples each, loopback, Python client; milliseconds, median / p95")
    print(f"{'':10} {'alone':>16} {'shared_state':>16} {'added (median)':>16}")
    for i, what in enumerate(["accept", "fail", "success"]):
        a, s = summary(results["alone"][i]), summary(results["shared_state"][i])
        print(f"{what:10} {a[0]:7.3f} / {a[1]:6.3f} {s[0]:7.3f} / {s[1]:6.3f} {s[0] - a[0]:16.3f}")


if __name__ == "__main__":
    asyncio.run(main())
