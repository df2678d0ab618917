#!/usr/bin/env python3
"""Relay cost benchmark: proxy CPU per byte on an IMAP session after login (TLS <-> TCP relay).

Not a test (never run by `cargo test` or CI): it prints numbers. Through each proxy -- mailfront,
HAProxy (TCP mode, TLS termination), nginx `stream` (ssl termination) and the nginx `mail` IMAP
proxy (with a tiny auth_http responder) -- K concurrent clients log in to a minimal IMAP backend
and FETCH one large literal each (N MiB in all). The measured cost is the proxy process tree's
CPU time (utime+stime from /proc/<pid>/stat, summed over the master and its workers) per GB
relayed; client and backend CPU do not count. Every proxy does the same crypto: TLS 1.3 with
TLS_AES_128_GCM_SHA256 (pinned in the clients through an OpenSSL config file, and in
HAProxy/nginx with their own settings) and the same ECDSA P-256 certificate.

    python3 bench/relay_cpu.py            # 2048 MiB per run, 4 clients, 3 runs per proxy
    python3 bench/relay_cpu.py --quick    # 256 MiB per run
    python3 bench/relay_cpu.py --proxies mailfront,haproxy --mib 1024 --clients 2 --runs 5

Runs as root installs what is missing (apt-get: haproxy nginx libnginx-mod-stream
libnginx-mod-mail) and builds target/release/mailfront with `cargo build --release` if absent.
Python standard library only.
"""
import os
import sys
import tempfile

# The client's TLS 1.3 cipher suite cannot be chosen from Python's ssl module (set_ciphers covers
# TLS 1.2 and below only), so pin it through OpenSSL's own configuration, which OpenSSL reads
# when the ssl module is first imported: this must come before `import ssl`.
WORKDIR = tempfile.mkdtemp(prefix="relay-cpu-")
CLIENT_OPENSSL_CNF = os.path.join(WORKDIR, "client-openssl.cnf")
with open(CLIENT_OPENSSL_CNF, "w") as _f:
    _f.write("""openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MinProtocol = TLSv1.3
Ciphersuites = TLS_AES_128_GCM_SHA256
""")
os.environ["OPENSSL_CONF"] = CLIENT_OPENSSL_CNF

import argparse  # noqa: E402
import http.server  # noqa: E402
import multiprocessing as mp  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

CIPHER = "TLS_AES_128_GCM_SHA256"
SNI = "imap.bench.test"
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
NGINX_MODULES = "/usr/lib/nginx/modules"
# Children (proxies, openssl) must not inherit the client pinning: each proxy is pinned through
# its own configuration, and `openssl req` needs the system configuration.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


# --------------------------------------------------------------------------------------------
# Backend: a minimal, fast IMAP server (threads, big sends from one preallocated buffer).
# --------------------------------------------------------------------------------------------

class LineReader:
    """Buffered line/exact reads over a plain or TLS socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buf += data

    def readline(self):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line
            self._fill()

    def readexact(self, n):
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def drain(self, n, scratch):
        """Reads and discards n bytes, recv_into a preallocated buffer; returns the count."""
        got = min(len(self.buf), n)
        del self.buf[:got]
        view = memoryview(scratch)
        size = len(scratch)
        while got < n:
            k = self.sock.recv_into(view, min(size, n - got))
            if k == 0:
                raise EOFError
            got += k
        return got


LITERAL_AT_END = re.compile(rb"\{(\d+)(\+?)\}\r?\n$")
PARTIAL = re.compile(rb"<0\.(\d+)>")


def read_command(rd, conn):
    """One IMAP command, literals included (RFC 9051 section 4.3: a synchronizing literal gets a
    '+' continuation; LITERAL+ `{n+}` does not). nginx's mail proxy sends LOGIN with literals."""
    line = rd.readline()
    while True:
        m = LITERAL_AT_END.search(line)
        if not m:
            return line
        if not m.group(2):
            conn.sendall(b"+ go ahead\r\n")
        line += rd.readexact(int(m.group(1))) + rd.readline()


def backend_session(conn, chunk):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rd = LineReader(conn)
    view = memoryview(chunk)
    try:
        conn.sendall(b"* OK [CAPABILITY IMAP4rev1 ID LITERAL+ AUTH=PLAIN] bench backend ready\r\n")
        while True:
            cmd = read_command(rd, conn)
            parts = cmd.split(None, 2)
            if len(parts) < 2:
                conn.sendall(b"* BAD empty command\r\n")
                continue
            tag, verb = parts[0], parts[1].upper()
            if verb == b"UID" and len(parts) > 2:
                verb = parts[2].split(None, 1)[0].upper()
            if verb == b"ID":
                conn.sendall(b"* ID NIL\r\n" + tag + b" OK ID completed\r\n")
            elif verb == b"CAPABILITY":
                conn.sendall(b"* CAPABILITY IMAP4rev1 ID LITERAL+ AUTH=PLAIN\r\n" + tag + b" OK done\r\n")
            elif verb in (b"SELECT", b"EXAMINE"):
                conn.sendall(b"* 1 EXISTS\r\n* 0 RECENT\r\n* FLAGS (\\Seen)\r\n" + tag +
                             b" OK [READ-WRITE] selected\r\n")
            elif verb == b"FETCH":
                m = PARTIAL.search(cmd)
                n = int(m.group(1)) if m else MIB
                conn.sendall(b"* 1 FETCH (BODY[]<0> {%d}\r\n" % n)
                left = n
                while left:
                    k = min(left, len(chunk))
                    conn.sendall(view[:k])
                    left -= k
                conn.sendall(b")\r\n" + tag + b" OK FETCH completed\r\n")
            elif verb == b"LOGOUT":
                conn.sendall(b"* BYE bench backend\r\n" + tag + b" OK LOGOUT completed\r\n")
                return
            else:  # LOGIN, NOOP, and anything a proxy may inject: all succeed
                conn.sendall(tag + b" OK " + verb + b" completed\r\n")
    except (EOFError, OSError):
        pass
    finally:
        conn.close()


def backend_main(lsock):
    # 4 MiB of message-like text (998-octet lines), sent as views: no per-send allocation.
    line = b"x" * 998 + b"\r\n"
    chunk = bytearray(line * (4 * MIB // len(line)))
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=backend_session, args=(conn, chunk), daemon=True).start()


def start_auth_http(backend_port):
    """nginx mail's auth_http: every login is accepted and sent to the backend."""

    class Auth(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Auth-Status", "OK")
            self.send_header("Auth-Server", "127.0.0.1")
            self.send_header("Auth-Port", str(backend_port))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Auth)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv.server_address[1]


# --------------------------------------------------------------------------------------------
# Clients: processes with Python ssl sockets; their CPU is not measured.
# --------------------------------------------------------------------------------------------

def until_tagged(rd, tag):
    while True:
        line = rd.readline()
        if line.startswith(tag + b" "):
            if not line[len(tag) + 1:].startswith(b"OK"):
                raise RuntimeError(f"{tag.decode()} failed: {line!r}")
            return line


def client_session(port, nbytes, ready, go, results):
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s = ctx.wrap_socket(raw, server_hostname=SNI)
        rd = LineReader(s)
        greeting = rd.readline()
        if not greeting.startswith(b"* OK"):
            raise RuntimeError(f"greeting {greeting!r}")
        s.sendall(b"a LOGIN u p\r\n")
        until_tagged(rd, b"a")
        s.sendall(b"s SELECT INBOX\r\n")
        until_tagged(rd, b"s")
        scratch = bytearray(MIB)
        if ready is not None:
            ready.wait(120)
            go.wait(120)
        t0 = time.perf_counter()
        s.sendall(b"b FETCH 1 BODY[]<0.%d>\r\n" % nbytes)
        head = rd.readline()
        m = re.search(rb"\{(\d+)\}\r\n$", head)
        if not m or int(m.group(1)) != nbytes:
            raise RuntimeError(f"FETCH header {head!r}")
        got = rd.drain(nbytes, scratch)
        until_tagged(rd, b"b")
        took = time.perf_counter() - t0
        s.sendall(b"c LOGOUT\r\n")
        try:
            until_tagged(rd, b"c")
        except (EOFError, OSError):
            pass
        results.put(("ok", got, took, s.cipher()[0], s.version()))
        s.close()
    except Exception as e:  # reported to the parent, which fails the run
        results.put(("error", repr(e)))
        if ready is not None:
            ready.abort()
            go.abort()


# --------------------------------------------------------------------------------------------
# /proc accounting over a process tree.
# --------------------------------------------------------------------------------------------

def proc_stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[1]), int(rest[11]) + int(rest[12])  # ppid, utime+stime (fields 4, 14, 15)


def tree(root):
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parents[int(d)] = proc_stat(int(d))[0]
            except (OSError, IndexError):
                pass
    pids, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier]
        pids += frontier
    return pids


def tree_cpu_seconds(root):
    total = 0
    for pid in tree(root):
        try:
            total += proc_stat(pid)[1]
        except OSError:
            pass
    return total / CLK_TCK


def status_field(pid, name):
    with open(f"/proc/{pid}/status") as f:
        m = re.search(rf"^{name}:\s+(\d+)", f.read(), re.M)
    return int(m.group(1)) if m else 0


def tree_shape(root):
    """(processes, threads, summed VmHWM in KiB) of the tree."""
    pids = tree(root)
    return (len(pids), sum(status_field(p, "Threads") for p in pids),
            sum(status_field(p, "VmHWM") for p in pids))


# --------------------------------------------------------------------------------------------
# Proxies.
# --------------------------------------------------------------------------------------------

def run_quiet(cmd, **kw):
    return subprocess.run(cmd, env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, **kw)


def make_cert(d):
    key, cert, both = (os.path.join(d, n) for n in ("key.pem", "cert.pem", "both.pem"))
    r = run_quiet(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                   "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={SNI}",
                   "-addext", f"subjectAltName=DNS:{SNI}"])
    if r.returncode:
        sys.exit(f"openssl req failed: {r.stderr}")
    with open(both, "w") as f:
        f.write(open(cert).read() + open(key).read())
    return cert, key, both


def ensure_mailfront(binary):
    if os.path.exists(binary):
        return True
    print(f"{binary} missing: cargo build --release ...", flush=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(["cargo", "build", "--release"], cwd=root).returncode == 0 and os.path.exists(binary)


def ensure_packages(names):
    """Installs what is missing with apt-get (root only); returns whether the tools are there."""
    have = shutil.which("haproxy") and shutil.which("nginx") and all(
        os.path.exists(f"{NGINX_MODULES}/ngx_{m}_module.so") for m in ("stream", "mail"))
    if have:
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    print(f"installing {' '.join(names)} with apt-get ...", flush=True)
    env = dict(CHILD_ENV, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *names], env=env,
                   stdout=subprocess.DEVNULL)
    return bool(shutil.which("haproxy") and shutil.which("nginx"))


class Proxy:
    def __init__(self, name, port, argv, workdir):
        self.name, self.port, self.argv, self.workdir = name, port, argv, workdir
        self.proc = None

    def start(self):
        self.log = open(os.path.join(self.workdir, f"{self.name}.log"), "w")
        self.proc = subprocess.Popen(self.argv, env=CHILD_ENV, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir)
        for _ in range(200):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {open(self.log.name).read()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} not listening on {self.port}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def mailfront_proxy(d, binary, cert, key, backend):
    port = free_port()
    conf = os.path.join(d, "mailfront.yaml")
    with open(conf, "w") as f:
        f.write(f"""hostname: {SNI}
tls:
  certificates:
    - cert: {cert}
      key: {key}
  min_version: "1.3"
listeners:
  - name: imaps
    protocol: imap
    listen: "127.0.0.1:{port}"
    tls: implicit
    backend: "127.0.0.1:{backend}"
log:
  level: warn
""")
    return Proxy("mailfront", port, [os.path.abspath(binary), "--config", conf], d)


def haproxy_proxy(d, both, backend):
    port = free_port()
    conf = os.path.join(d, "haproxy.cfg")
    with open(conf, "w") as f:
        f.write(f"""global
    nbthread 1
    maxconn 1000
    ssl-default-bind-ciphersuites {CIPHER}
    ssl-default-bind-options ssl-min-ver TLSv1.3
defaults
    mode tcp
    timeout connect 10s
    timeout client 1h
    timeout server 1h
frontend imaps
    bind 127.0.0.1:{port} ssl crt {both}
    default_backend imap
backend imap
    server s1 127.0.0.1:{backend}
""")
    # -db: foreground, no master-worker: one process, one thread.
    return Proxy("haproxy", port, ["haproxy", "-db", "-f", conf], d)


NGINX_TLS = """ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        ssl_conf_command Ciphersuites {cipher};"""


def nginx_proxy(name, d, module, body):
    port = free_port()
    conf = os.path.join(d, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(f"""load_module {NGINX_MODULES}/ngx_{module}_module.so;
worker_processes 1;
daemon off;
pid {d}/{name}.pid;
error_log {d}/{name}-error.log warn;
events {{ worker_connections 1024; }}
{body.replace("PORT", str(port))}
""")
    return Proxy(name, port, ["nginx", "-p", d, "-e", f"{d}/{name}-error.log", "-c", conf], d)


def nginx_stream_proxy(d, cert, key, backend):
    tls = NGINX_TLS.format(cert=cert, key=key, cipher=CIPHER)
    return nginx_proxy("nginx-stream", d, "stream", f"""stream {{
    server {{
        listen 127.0.0.1:PORT ssl;
        {tls}
        proxy_pass 127.0.0.1:{backend};
    }}
}}""")


def nginx_mail_proxy(d, cert, key, auth_port):
    tls = NGINX_TLS.format(cert=cert, key=key, cipher=CIPHER)
    # proxy_buffer defaults to one page (4k); 16k matches the stream module's proxy_buffer_size,
    # mailfront's and HAProxy's 16k buffers, so every proxy writes full TLS records.
    return nginx_proxy("nginx-mail", d, "mail", f"""mail {{
    auth_http 127.0.0.1:{auth_port}/auth;
    proxy_buffer 16k;
    server {{
        listen 127.0.0.1:PORT ssl;
        protocol imap;
        {tls}
    }}
}}""")


# --------------------------------------------------------------------------------------------
# Runs.
# --------------------------------------------------------------------------------------------

def measured_run(proxy, total_bytes, clients):
    """Starts the proxy, warms it up with one small session, then K clients fetch together."""
    ctx = mp.get_context("fork")
    proxy.start()
    try:
        results = ctx.Queue()
        client_session(proxy.port, MIB, None, None, results)  # warm-up, in this process
        warm = results.get(timeout=60)
        if warm[0] != "ok":
            raise RuntimeError(f"{proxy.name} warm-up: {warm[1]}")
        ready, go = ctx.Barrier(clients + 1), ctx.Barrier(clients + 1)
        each = total_bytes // clients
        procs = [ctx.Process(target=client_session, args=(proxy.port, each, ready, go, results))
                 for _ in range(clients)]
        for p in procs:
            p.start()
        ready.wait(120)  # every client is logged in and idle
        cpu0 = tree_cpu_seconds(proxy.proc.pid)
        t0 = time.perf_counter()
        go.wait(120)
        outs = [results.get(timeout=600) for _ in procs]
        wall = time.perf_counter() - t0
        cpu1 = tree_cpu_seconds(proxy.proc.pid)
        nproc, nthreads, hwm = tree_shape(proxy.proc.pid)
        for p in procs:
            p.join(30)
        errors = [o[1] for o in outs if o[0] != "ok"]
        if errors:
            raise RuntimeError(f"{proxy.name}: {errors[0]}")
        got = sum(o[1] for o in outs)
        if got != each * clients:
            raise RuntimeError(f"{proxy.name}: {got} bytes received, {each * clients} expected")
        return {"bytes": got, "wall": wall, "cpu": cpu1 - cpu0, "procs": nproc, "threads": nthreads,
                "hwm_kib": hwm, "cipher": f"{outs[0][4]} {outs[0][3]}"}
    finally:
        proxy.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=2048, help="MiB relayed per run, split over the clients")
    ap.add_argument("--quick", action="store_true", help="256 MiB per run")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--proxies", default="mailfront,haproxy,nginx-stream,nginx-mail")
    ap.add_argument("--bin", default="target/release/mailfront")
    args = ap.parse_args()
    mib = 256 if args.quick else args.mib
    total = mib * MIB
    wanted = args.proxies.split(",")

    d = WORKDIR
    cert, key, both = make_cert(d)
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    backend = lsock.getsockname()[1]
    backend_proc = mp.get_context("fork").Process(target=backend_main, args=(lsock,), daemon=True)
    backend_proc.start()
    lsock.close()
    auth_port = start_auth_http(backend)

    makers = {}
    if "mailfront" in wanted:
        if ensure_mailfront(args.bin):
            makers["mailfront"] = lambda: mailfront_proxy(d, args.bin, cert, key, backend)
        else:
            print(f"skipping mailfront: no {args.bin}")
    if any(w != "mailfront" for w in wanted):
        if not ensure_packages(["haproxy", "nginx", "libnginx-mod-stream", "libnginx-mod-mail"]):
            print("skipping HAProxy/nginx: not installed and cannot install (needs root and apt-get)")
        else:
            makers["haproxy"] = lambda: haproxy_proxy(d, both, backend)
            makers["nginx-stream"] = lambda: nginx_stream_proxy(d, cert, key, backend)
            makers["nginx-mail"] = lambda: nginx_mail_proxy(d, cert, key, auth_port)
    order = [w for w in wanted if w in makers]

    cpu_model = "?"
    with open("/proc/cpuinfo") as f:
        m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
        cpu_model = m.group(1) if m else cpu_model
    print(f"machine: {os.cpu_count()} CPUs, {cpu_model}; load average {os.getloadavg()[0]:.2f}")
    print(f"each run: {mib} MiB relayed backend -> client as IMAP FETCH literals, {args.clients} "
          f"concurrent sessions of {mib // args.clients} MiB; {args.runs} runs per proxy, medians shown")
    versions = {}
    for name, cmd in (("haproxy", ["haproxy", "-v"]), ("nginx", ["nginx", "-v"])):
        if shutil.which(cmd[0]):
            out = (subprocess.run(cmd, env=CHILD_ENV, capture_output=True, text=True))
            versions[name] = (out.stdout + out.stderr).splitlines()[0].strip()
    for v in versions.values():
        print(f"  {v}")

    # Round-robin over the proxies, so that a noisy moment on a shared machine spreads over all.
    allruns = {name: [] for name in order}
    for i in range(args.runs):
        for name in order:
            r = measured_run(makers[name](), total, args.clients)
            allruns[name].append(r)
            print(f"  run {i + 1} {name:13s} {r['bytes'] / r['wall'] / 1e6:7.0f} MB/s  "
                  f"{r['cpu'] / (r['bytes'] / 1e9):6.2f} CPU s/GB  ({r['cpu']:.2f} s CPU in "
                  f"{r['wall']:.2f} s wall)  peak RSS {r['hwm_kib'] / 1024:.1f} MiB  {r['cipher']}", flush=True)
    rows = {}
    for name, runs in allruns.items():
        rows[name] = {
            "mbps": statistics.median(r["bytes"] / r["wall"] / 1e6 for r in runs),
            "cpu_gb": statistics.median(r["cpu"] / (r["bytes"] / 1e9) for r in runs),
            "util": statistics.median(r["cpu"] / r["wall"] for r in runs),
            "hwm": statistics.median(r["hwm_kib"] for r in runs) / 1024,
            "shape": f"{runs[-1]['procs']}p/{runs[-1]['threads']}t",
            "cipher": runs[-1]["cipher"],
        }

    base = rows.get("mailfront")
    print()
    print("proxy          procs/threads     MB/s  (xMF)  CPU s/GB  (xMF)  CPU use  peak RSS MiB  TLS")
    for name, r in rows.items():
        rt = f"{r['mbps'] / base['mbps']:5.2f}" if base else "   - "
        rc = f"{r['cpu_gb'] / base['cpu_gb']:5.2f}" if base else "   - "
        print(f"{name:14s} {r['shape']:>13s} {r['mbps']:8.0f}  {rt}  {r['cpu_gb']:8.2f}  {rc}  "
              f"{r['util'] * 100:6.0f}%  {r['hwm']:12.1f}  {r['cipher']}")
    print()
    print("MB/s = 10^6 payload bytes per second of wall time; CPU s/GB = proxy CPU seconds (user+system,")
    print("summed over the proxy's process tree) per 10^9 payload bytes; xMF = ratio to mailfront")
    print("(CPU: above 1 = more CPU per byte than mailfront). Peak RSS = VmHWM summed over the tree.")
    print("nginx/HAProxy run 1 worker with 1 thread; mailfront runs its tokio multi-thread runtime as")
    print(f"shipped (threads above). On {os.cpu_count()} CPUs shared with clients and backend, compare")
    print("CPU per byte first; throughput depends on what else the machine runs.")
    backend_proc.terminate()
    shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
