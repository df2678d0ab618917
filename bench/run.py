#!/usr/bin/env python3
"""mailfront benchmark suite: mailfront side by side with nginx (mail module) and HAProxy (TCP mode).

    bench/run.sh            # full run (about 15 minutes on 2 cores): writes bench/results/ and BENCHMARKS.md
    bench/run.sh --quick    # smoke run (a minute or two): writes target/bench-quick/, BENCHMARKS.md untouched

Not a test: `cargo test` and CI never run it. Run as root on Debian: it installs what is missing
(apt-get: nginx libnginx-mod-mail haproxy), raises the file descriptor limit, builds
target/release/mailfront and target/release/loadgen (bench/loadgen), and pins each proxy to one
CPU and the load generator and fake backends to another. Python standard library only.

Every scenario runs in rounds; each round runs every proxy in turn (mailfront, nginx, HAProxy,
mailfront, ...) so that a noisy moment on a shared machine spreads over all of them; the table
shows the median over the rounds. Proxy CPU is utime+stime from /proc/<pid>/stat and memory VmRSS
from /proc/<pid>/status, summed over the proxy's process tree (nginx: master and worker).
"""
import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")
SNI = "imap.bench.test"
CIPHER = "TLS_AES_128_GCM_SHA256"
NGINX_MODULES = "/usr/lib/nginx/modules"
PEERS = ["mailfront", "nginx", "haproxy"]
LABEL = {"mailfront": "mailfront", "nginx": "nginx", "haproxy": "HAProxy"}
COLOR = {"mailfront": "#1f77b4", "nginx": "#2ca02c", "haproxy": "#d62728"}
# mailfront's tls.session_tickets for the "tickets on" rows (rustls' default is 2 per handshake).
TICKETS_ON = 2

# Per mode: scenario parameters.
PARAMS = {
    "full": dict(rounds=3, seconds=5.0, fetch_mib=1024, smtp_small_s=5.0, big_msgs=12, idle=(1000, 10000),
                 latency_n=3000),
    "quick": dict(rounds=1, seconds=1.5, fetch_mib=128, smtp_small_s=1.5, big_msgs=3, idle=(1000,),
                  latency_n=500),
}


def log(*a):
    print(*a, flush=True)


def sh(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# ------------------------------------------------------------------------------------------------
# /proc accounting over a process tree.
# ------------------------------------------------------------------------------------------------

def proc_stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[1]), int(rest[11]) + int(rest[12])  # ppid, utime+stime


def tree(root):
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parents[int(d)] = proc_stat(int(d))[0]
            except (OSError, IndexError, ValueError):
                pass
    pids, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier]
        pids += frontier
    return pids


def tree_cpu(root):
    total = 0
    for pid in tree(root):
        try:
            total += proc_stat(pid)[1]
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def tree_rss_kib(root):
    total = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                m = re.search(r"^VmRSS:\s+(\d+)", f.read(), re.M)
            total += int(m.group(1)) if m else 0
        except OSError:
            pass
    return total


# ------------------------------------------------------------------------------------------------
# Setup: packages, builds, certificate, backends.
# ------------------------------------------------------------------------------------------------

def ensure_peers():
    def have():
        return (shutil.which("nginx") and shutil.which("haproxy")
                and os.path.exists(f"{NGINX_MODULES}/ngx_mail_module.so"))
    if have():
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        log("nginx/HAProxy missing and cannot install them (needs root and apt-get): mailfront only")
        return False
    log("installing nginx libnginx-mod-mail haproxy with apt-get ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx",
                    "libnginx-mod-mail", "haproxy"], env=env, stdout=subprocess.DEVNULL)
    # Debian starts the packaged services; the benchmark runs its own instances.
    for svc in ("nginx", "haproxy"):
        subprocess.run(["service", svc, "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return bool(have())


def build(args):
    if not args.no_build:
        log("building mailfront (cargo build --release) and the load generator ...")
        if subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT).returncode:
            sys.exit("cargo build --release failed")
        # The load generator is its own workspace (bench/loadgen, like fuzz/), built into the root
        # target/ so that the dependencies it shares with mailfront are compiled once.
        if subprocess.run(["cargo", "build", "--release", "--quiet", "--locked", "--manifest-path",
                           "bench/loadgen/Cargo.toml", "--target-dir", "target"], cwd=ROOT).returncode:
            sys.exit("building bench/loadgen failed")
    for b in (args.bin, args.loadgen):
        if not os.path.exists(b):
            sys.exit(f"{b} missing")


def make_cert(d):
    key, cert, both = (os.path.join(d, n) for n in ("key.pem", "cert.pem", "both.pem"))
    r = sh(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={SNI}", "-addext",
            f"subjectAltName=DNS:{SNI},DNS:smtp.bench.test"])
    if r.returncode:
        sys.exit(f"openssl req failed: {r.stderr}")
    with open(both, "w") as f:
        f.write(open(cert).read() + open(key).read())
    return cert, key, both


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, proc, name, logfile):
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: {open(logfile).read()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.03)
    raise RuntimeError(f"{name} not listening on {port}")


# ------------------------------------------------------------------------------------------------
# Proxies.
# ------------------------------------------------------------------------------------------------

class Proxy:
    """One proxy instance with an IMAP and an SMTP implicit-TLS listener."""

    def __init__(self, env, peer, tickets):
        self.env, self.peer, self.tickets = env, peer, tickets
        self.imap, self.smtp = free_port(), free_port()
        self.proc = None
        self.extra_env = {}

    def config(self):
        e, d = self.env, self.env["dir"]
        b = e["backend"]
        if self.peer == "mailfront":
            conf = os.path.join(d, "mailfront.yaml")
            tickets = ""
            if e["mf_tickets_key"]:
                tickets = f"\n  session_tickets: {TICKETS_ON if self.tickets else 0}"
            with open(conf, "w") as f:
                f.write(mailfront_config(e["cert"], e["key"], tickets, self.imap, self.smtp, b))
            return [os.path.abspath(e["bin"]), "--config", conf]
        if self.peer == "haproxy":
            conf = os.path.join(d, "haproxy.cfg")
            with open(conf, "w") as f:
                f.write(f"""global
    nbthread 1
    maxconn {e['maxconn']}
    ssl-default-bind-ciphersuites {CIPHER}
    ssl-default-bind-options ssl-min-ver TLSv1.3{"" if self.tickets else " no-tls-tickets"}
    ssl-default-bind-curves X25519
    tune.ssl.cachesize {20000 if self.tickets else 0}
defaults
    mode tcp
    maxconn {e['maxconn']}
    timeout connect 10s
    timeout client 1h
    timeout server 1h
frontend imaps
    bind 127.0.0.1:{self.imap} ssl crt {e['both']}
    default_backend imap
frontend smtps
    bind 127.0.0.1:{self.smtp} ssl crt {e['both']}
    default_backend smtp
backend imap
    server s1 127.0.0.1:{b['imap']}
backend smtp
    server s1 127.0.0.1:{b['smtp']}
""")
            if not self.tickets:
                # HAProxy 2.6 has no setting for the number of TLS 1.3 tickets (no-tls-tickets only
                # makes them stateful); OpenSSL's own configuration does, for every SSL_CTX.
                cnf = os.path.join(d, "haproxy-openssl.cnf")
                with open(cnf, "w") as f:
                    f.write("openssl_conf = init\n[init]\nssl_conf = ssl\n[ssl]\nsystem_default = sys\n"
                            "[sys]\nNumTickets = 0\n")
                self.extra_env = {"OPENSSL_CONF": cnf}
            return ["haproxy", "-db", "-f", conf]
        conf = os.path.join(d, "nginx.conf")
        # Tickets off: OpenSSL still sends TLS 1.3 tickets unless NumTickets is 0.
        tickets = ("ssl_session_tickets on;" if self.tickets else
                   "ssl_session_tickets off;\n    ssl_conf_command NumTickets 0;")
        with open(conf, "w") as f:
            f.write(f"""load_module {NGINX_MODULES}/ngx_mail_module.so;
worker_processes 1;
worker_rlimit_nofile {e['nofile']};
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log error;
events {{ worker_connections {2 * e['maxconn']}; }}
mail {{
    auth_http 127.0.0.1:{b['auth_http']}/auth;
    proxy_buffer 16k;
    ssl_certificate {e['cert']};
    ssl_certificate_key {e['key']};
    ssl_protocols TLSv1.3;
    ssl_conf_command Ciphersuites {CIPHER};
    ssl_ecdh_curve X25519;
    {tickets}
    server {{
        listen 127.0.0.1:{self.imap} ssl;
        protocol imap;
    }}
    server {{
        listen 127.0.0.1:{self.smtp} ssl;
        protocol smtp;
        smtp_auth plain login;
        xclient off;
    }}
}}
""")
        return ["nginx", "-p", d, "-e", f"{d}/nginx-error.log", "-c", conf]

    def start(self):
        argv = ["taskset", "-c", str(self.env["proxy_cpu"])] + self.config()
        self.logname = os.path.join(self.env["dir"], f"{self.peer}.log")
        self.logf = open(self.logname, "w")
        self.proc = subprocess.Popen(argv, stdout=self.logf, stderr=subprocess.STDOUT, cwd=self.env["dir"],
                                     env=dict(os.environ, **self.extra_env))
        wait_port(self.imap, self.proc, self.peer, self.logname)
        wait_port(self.smtp, self.proc, self.peer, self.logname)
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                for pid in reversed(tree(self.proc.pid)):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                self.proc.wait(5)
        self.logf.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def mailfront_config(cert, key, tickets, imap, smtp, b):
    return f"""hostname: {SNI}
tls:
  certificates:
    - cert: {cert}
      key: {key}
  min_version: "1.3"{tickets}
listeners:
  - name: imaps
    protocol: imap
    listen: "127.0.0.1:{imap}"
    tls: implicit
    backend: "127.0.0.1:{b['imap']}"
    max_connections: 50000
  - name: submissions
    protocol: smtp
    listen: "127.0.0.1:{smtp}"
    tls: implicit
    backend: "127.0.0.1:{b['smtp']}"
    max_connections: 50000
log:
  level: error
timeouts:
  shutdown_grace: 1s
limits:
  connections_per_ip: 0
  auth_failures_per_ip: 0
"""


def mailfront_accepts_tickets_key(env):
    """Whether the built mailfront knows tls.session_tickets (`mailfront check`)."""
    conf = os.path.join(env["dir"], "check.yaml")
    b = {"imap": 1, "smtp": 2}
    with open(conf, "w") as f:
        f.write(mailfront_config(env["cert"], env["key"], "\n  session_tickets: 0", free_port(), free_port(), b))
    r = sh([env["bin"], "check", "--config", conf])
    return r.returncode == 0, (r.stdout + r.stderr).strip()


# ------------------------------------------------------------------------------------------------
# Scenarios. Each returns a dict of metrics for one proxy in one round.
# ------------------------------------------------------------------------------------------------

def loadgen(env, args, timeout=600, stdin=None):
    argv = ["taskset", "-c", str(env["load_cpu"]), env["loadgen"]] + [str(a) for a in args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"loadgen {args[0]} failed: {r.stderr.strip()[-1500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def check(out, what):
    if out["errors"]:
        log(f"    {what}: {out['errors']} errors (first: {out['first_error']})")
    if not out["ok"]:
        raise RuntimeError(f"{what}: nothing succeeded ({out['first_error']})")


def measured(env, p, args, timeout=600):
    c0 = tree_cpu(p.proc.pid)
    out = loadgen(env, args, timeout)
    out["cpu_s"] = tree_cpu(p.proc.pid) - c0
    check(out, args[0])
    return out


def sc_handshake(env, peer, prm, tickets):
    with Proxy(env, peer, tickets) as p:
        loadgen(env, ["handshake", "--target", f"127.0.0.1:{p.imap}", "--clients", 4, "--seconds", 0.3])
        o = measured(env, p, ["handshake", "--target", f"127.0.0.1:{p.imap}", "--clients", 32,
                              "--seconds", prm["seconds"], "--sources", 32])
    return {"per_cpu_s": o["ok"] / max(o["cpu_s"], 1e-9), "per_s": o["ok"] / o["wall_s"],
            "tickets_each": o["tickets"] / o["ok"], "cpu_util": o["cpu_s"] / o["wall_s"]}


def sc_login(env, peer, prm):
    with Proxy(env, peer, False) as p:
        loadgen(env, ["login", "--target", f"127.0.0.1:{p.imap}", "--clients", 4, "--seconds", 0.3])
        o = measured(env, p, ["login", "--target", f"127.0.0.1:{p.imap}", "--clients", 32,
                              "--seconds", prm["seconds"], "--sources", 32])
    return {"per_s": o["ok"] / o["wall_s"], "per_cpu_s": o["ok"] / max(o["cpu_s"], 1e-9),
            "cpu_util": o["cpu_s"] / o["wall_s"]}


def sc_fetch(env, peer, prm):
    with Proxy(env, peer, False) as p:
        loadgen(env, ["fetch", "--target", f"127.0.0.1:{p.imap}", "--clients", 1, "--bytes", 1 << 20])
        o = measured(env, p, ["fetch", "--target", f"127.0.0.1:{p.imap}", "--clients", 4,
                              "--bytes", prm["fetch_mib"] << 20])
    return {"cpu_s_per_gb": o["cpu_s"] / (o["bytes"] / 1e9), "mb_per_s": o["bytes"] / o["wall_s"] / 1e6}


def sc_smtp_small(env, peer, prm):
    with Proxy(env, peer, False) as p:
        loadgen(env, ["smtp", "--target", f"127.0.0.1:{p.smtp}", "--clients", 2, "--size", 10240,
                      "--messages", 5])
        o = measured(env, p, ["smtp", "--target", f"127.0.0.1:{p.smtp}", "--clients", 16, "--size", 10240,
                              "--seconds", prm["smtp_small_s"]])
    return {"per_s": o["ok"] / o["wall_s"], "per_cpu_s": o["ok"] / max(o["cpu_s"], 1e-9),
            "p50_ms": o["p50_us"] / 1000, "p99_ms": o["p99_us"] / 1000}


def sc_smtp_big(env, peer, prm):
    size = 10 * 1000 * 1000
    with Proxy(env, peer, False) as p:
        loadgen(env, ["smtp", "--target", f"127.0.0.1:{p.smtp}", "--clients", 1, "--size", size, "--messages", 1])
        o = measured(env, p, ["smtp", "--target", f"127.0.0.1:{p.smtp}", "--clients", 4, "--size", size,
                              "--messages", prm["big_msgs"]])
    return {"cpu_s_per_gb": o["cpu_s"] / (o["bytes"] / 1e9), "mb_per_s": o["bytes"] / o["wall_s"] / 1e6,
            "p50_ms": o["p50_us"] / 1000, "p99_ms": o["p99_us"] / 1000}


def sc_idle(env, peer, n):
    with Proxy(env, peer, False) as p:
        # Warm-up (lazy allocations, TLS contexts), then the baseline.
        loadgen(env, ["login", "--target", f"127.0.0.1:{p.imap}", "--clients", 8, "--seconds", 0.3])
        time.sleep(0.5)
        base = tree_rss_kib(p.proc.pid)
        argv = ["taskset", "-c", str(env["load_cpu"]), env["loadgen"], "idle", "--target",
                f"127.0.0.1:{p.imap}", "--sessions", str(n), "--clients", "64", "--sources", "100",
                "--hold", "120"]
        g = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = g.stdout.readline()
            if not line:
                raise RuntimeError(f"loadgen idle: {g.stderr.read()[-1500:]}")
            o = json.loads(line)
            check(o, f"idle {n}")
            time.sleep(1.0)
            rss = tree_rss_kib(p.proc.pid)
            g.stdin.write("\n")
            g.stdin.flush()
            g.wait(60)
        finally:
            if g.poll() is None:
                g.kill()
                g.wait()
    return {"kib_each": (rss - base) / o["held"], "held": o["held"], "rss_kib": rss, "base_kib": base,
            "open_s": o["wall_s"]}


def sc_latency(env, peer, prm):
    args = ["latency", "--count", prm["latency_n"]]
    if peer == "direct":
        o = loadgen(env, args + ["--target", f"127.0.0.1:{env['backend']['imap']}", "--plain"])
    else:
        with Proxy(env, peer, False) as p:
            o = loadgen(env, args + ["--target", f"127.0.0.1:{p.imap}"])
    check(o, "latency")
    return {"p50_us": o["p50_us"], "p99_us": o["p99_us"]}


# ------------------------------------------------------------------------------------------------
# Metrics shown: key, scenario label, metric label, which way is better, formatter.
# ------------------------------------------------------------------------------------------------

ROWS = [
    ("handshake_off.per_cpu_s", "New TLS sessions per proxy CPU-second (handshake, greeting, LOGOUT), tickets off", "higher", "{:.0f}"),
    ("handshake_on.per_cpu_s", "New TLS sessions per proxy CPU-second, tickets on (the proxy's default)", "higher", "{:.0f}"),
    ("handshake_off.tickets_each", "TLS 1.3 tickets sent per handshake, tickets off", "info", "{:.1f}"),
    ("handshake_on.tickets_each", "TLS 1.3 tickets sent per handshake, tickets on", "info", "{:.1f}"),
    ("login.per_s", "Login sessions/s (handshake + LOGIN + LOGOUT, 32 clients)", "higher", "{:.0f}"),
    ("login.per_cpu_s", "Login sessions per proxy CPU-second", "higher", "{:.0f}"),
    ("fetch.cpu_s_per_gb", "IMAP FETCH relay, proxy CPU-s per GB", "lower", "{:.2f}"),
    ("smtp_small.per_s", "SMTP 10 KB messages/s (16 clients)", "higher", "{:.0f}"),
    ("smtp_small.per_cpu_s", "SMTP 10 KB messages per proxy CPU-second", "higher", "{:.0f}"),
    ("smtp_big.cpu_s_per_gb", "SMTP 10 MB messages, proxy CPU-s per GB", "lower", "{:.2f}"),
    ("smtp_big.p50_ms", "SMTP 10 MB message, p50 ms (DATA content to 250)", "lower", "{:.0f}"),
    ("smtp_big.p99_ms", "SMTP 10 MB message, p99 ms", "lower", "{:.0f}"),
    ("idle_small.kib_each", "Idle authenticated IMAP session, RSS KiB each ({small} held)", "lower", "{:.1f}"),
    ("idle_large.kib_each", "Idle authenticated IMAP session, RSS KiB each ({large} held)", "lower", "{:.1f}"),
    ("latency.added_p50_us", "Added latency of a NOOP round trip, p50 µs (vs direct)", "lower", "{:.0f}"),
    ("latency.added_p99_us", "Added latency of a NOOP round trip, p99 µs (vs direct)", "lower", "{:.0f}"),
]

CHARTS = [
    ("handshake", "New TLS sessions per proxy CPU-second (higher is better)",
     [("tickets off", "handshake_off.per_cpu_s"), ("tickets on", "handshake_on.per_cpu_s")]),
    ("login", "Login sessions per second, 32 clients (higher is better)", [("sessions/s", "login.per_s")]),
    ("fetch", "IMAP FETCH relay: proxy CPU-seconds per GB (lower is better)", [("CPU-s/GB", "fetch.cpu_s_per_gb")]),
    ("smtp_10k", "SMTP 10 KB messages per second, 16 clients (higher is better)", [("messages/s", "smtp_small.per_s")]),
    ("smtp_10m_cpu", "SMTP 10 MB messages: proxy CPU-seconds per GB (lower is better)",
     [("CPU-s/GB", "smtp_big.cpu_s_per_gb")]),
    ("smtp_10m_latency", "SMTP 10 MB message latency, ms (lower is better)",
     [("p50", "smtp_big.p50_ms"), ("p99", "smtp_big.p99_ms")]),
    ("idle", "Idle authenticated IMAP session: proxy RSS KiB each (lower is better)",
     [("{small} held", "idle_small.kib_each"), ("{large} held", "idle_large.kib_each")]),
    ("latency", "Added latency of a small command round trip, µs (lower is better)",
     [("p50", "latency.added_p50_us"), ("p99", "latency.added_p99_us")]),
]


def held(med, sc):
    """Sessions held in an idle scenario (the same for every peer), as a label."""
    for p in med:
        n = med[p].get(sc, {}).get("held")
        if n:
            return f"{n / 1000:g}k"
    return {"idle_small": "1k", "idle_large": "10k"}.get(sc, "?")


def labels(text, med):
    return text.replace("{small}", held(med, "idle_small")).replace("{large}", held(med, "idle_large"))


def lookup(med, peer, key):
    sc, m = key.split(".")
    return med.get(peer, {}).get(sc, {}).get(m)


# ------------------------------------------------------------------------------------------------
# Output: SVG charts, markdown, BENCHMARKS.md.
# ------------------------------------------------------------------------------------------------

def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg_chart(title, groups, med, peers, fmt="{:.0f}"):
    """Horizontal grouped bar chart, no dependencies. groups: [(label, key)]."""
    bar, gap, left, width = 22, 14, 190, 460
    rows = [(g, p) for g, _ in groups for p in peers]
    height = 48 + len(groups) * (len(peers) * bar + gap) + 24
    vals = [lookup(med, p, k) for _, k in groups for p in peers]
    top = max([v for v in vals if v is not None] + [1e-9])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 90}" height="{height}" '
           f'font-family="sans-serif" font-size="13">',
           f'<rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="22" font-size="14" font-weight="bold">{esc(title)}</text>']
    y = 40
    for glabel, key in groups:
        if len(groups) > 1:
            out.append(f'<text x="10" y="{y + len(peers) * bar / 2 + 4}" font-weight="bold">'
                       f'{esc(labels(glabel, med))}</text>')
        for p in peers:
            v = lookup(med, p, key)
            out.append(f'<text x="{left - 8}" y="{y + bar * 0.7}" text-anchor="end">{esc(LABEL.get(p, p))}</text>')
            if v is None:
                out.append(f'<text x="{left + 4}" y="{y + bar * 0.7}" fill="#777">n/a</text>')
            else:
                w = max(1.0, width * v / top)
                out.append(f'<rect x="{left}" y="{y + 2}" width="{w:.1f}" height="{bar - 4}" '
                           f'fill="{COLOR.get(p, "#888")}"/>')
                out.append(f'<text x="{left + w + 6:.1f}" y="{y + bar * 0.7}">{esc(fmt.format(v))}</text>')
            y += bar
        y += gap
    out.append("</svg>")
    return "\n".join(out) + "\n"


def fmt_val(fmt, v):
    return "n/a" if v is None else fmt.format(v)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def table(med, peers):
    head = "| scenario | " + " | ".join(LABEL[p] for p in peers) + " | mailfront ÷ nginx | mailfront ÷ HAProxy | better |"
    lines = [head, "|---" * (len(peers) + 4) + "|"]
    for key, label, better, fmt in ROWS:
        vals = [lookup(med, p, key) for p in peers]
        mf = lookup(med, "mailfront", key)
        lines.append(f"| {labels(label, med)} | " + " | ".join(fmt_val(fmt, v) for v in vals) +
                     f" | {ratio(mf, lookup(med, 'nginx', key))} | {ratio(mf, lookup(med, 'haproxy', key))}"
                     f" | {better if better != 'info' else ''} |")
    return "\n".join(lines)


def targets(med):
    """The issue 15 targets, computed from this run."""
    out = []
    idle = lookup(med, "mailfront", "idle_large.kib_each")
    if idle is not None:
        out.append(f"- idle ≤ 8 KiB per session ({held(med, 'idle_large')} held): mailfront {idle:.1f} KiB — "
                   f"{'met' if idle <= 8 else f'missed by {idle - 8:.1f} KiB'}")
    mf, ha = lookup(med, "mailfront", "smtp_big.cpu_s_per_gb"), lookup(med, "haproxy", "smtp_big.cpu_s_per_gb")
    if mf is not None and ha is not None:
        out.append(f"- 10 MB DATA CPU per GB ≤ HAProxy's: mailfront {mf:.2f}, HAProxy {ha:.2f} "
                   f"({mf / ha:.2f}×) — {'met' if mf <= ha else 'missed'}")
    mf, ng = lookup(med, "mailfront", "handshake_off.per_cpu_s"), lookup(med, "nginx", "handshake_off.per_cpu_s")
    on = lookup(med, "mailfront", "handshake_on.per_cpu_s")
    if mf is not None and ng is not None:
        out.append(f"- handshakes per CPU-second ≥ 1.5× nginx, tickets off: {mf:.0f} vs {ng:.0f} "
                   f"({mf / ng:.2f}×) — {'met' if mf >= 1.5 * ng else 'missed'}; tickets on: "
                   f"{fmt_val('{:.0f}', on)} ({ratio(on, ng)} nginx with its tickets off)")
    return "\n".join(out)


def observations(res):
    """Notes computed from this run's numbers, for the reader of BENCHMARKS.md."""
    med, out = res["median"], []
    utils = [v for p in res["peers"] for sc in ("handshake_off", "handshake_on", "login")
             for v in [lookup(med, p, f"{sc}.cpu_util")] if v is not None]
    if utils and max(utils) < 0.9:
        out.append(f"- Handshake and login: the proxies used {min(utils) * 100:.0f}–{max(utils) * 100:.0f}% of "
                   "their core: the load generator (one core, shared with the fake backends and with anything else "
                   "the machine runs) did not saturate them. Hence sessions per proxy CPU-second; sessions "
                   "per second say more about the machine.")
    ng = lookup(med, "nginx", "smtp_small.p50_ms")
    if ng is not None and ng >= 30:
        out.append(f"- nginx, SMTP 10 KB: each message waited p50 {ng:.0f} ms for its reply, which looks like "
                   "Nagle's algorithm meeting a delayed ACK (40 ms) on one of its connections (not "
                   "investigated further). That is nginx as "
                   "configured here (Debian defaults plus `proxy_buffer 16k`), not tuned further; its CPU "
                   "per message is in the next row.")
    d = lookup(med, "direct", "latency.p99_us")
    p99 = [v for p in res["peers"] for v in [lookup(med, p, "latency.p99_us")] if v is not None]
    if d is not None and p99 and min(p99) > 20 * max(d, 1) and min(p99) > 1000:
        out.append(f"- Latency p99: {min(p99) / 1000:.1f}–{max(p99) / 1000:.1f} ms through every proxy against "
                   f"{d} µs direct. When all three agree like this, it is the machine (the proxy's core "
                   "shared with other processes: a preempted proxy waits for a scheduler slice), not "
                   "the proxy.")
    if not res["meta"]["mf_tickets_key"]:
        out.append("- This mailfront has no `tls.session_tickets` key: it sent 2 tickets per handshake in "
                   "both handshake rows, so their difference is noise.")
    return "\n".join(out) or "- (none)"


def missing(res):
    """Which proxy has no result for which scenario (n/a in the table), or that none is missing."""
    keys = sorted({sc for p in res["peers"] for sc in res["median"].get(p, {})})
    gaps = [f"{LABEL[p]}: {sc}" for p in res["peers"] for sc in keys if sc not in res["median"].get(p, {})]
    if not gaps:
        return "Every peer did every scenario."
    return ("No result (every round failed; the log of the run says why), shown as n/a: "
            + ", ".join(gaps) + ".")


def write_outputs(res, outdir, update_benchmarks):
    os.makedirs(outdir, exist_ok=True)
    med, peers = res["median"], [p for p in res["peers"]]
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = table(med, peers)
    with open(os.path.join(outdir, "results.md"), "w") as f:
        f.write(md + "\n")
    charts = []
    for name, title, groups in CHARTS:
        fmt = "{:.2f}" if "gb" in groups[0][1] else ("{:.1f}" if "kib" in groups[0][1] else "{:.0f}")
        with open(os.path.join(outdir, f"{name}.svg"), "w") as f:
            f.write(svg_chart(title, groups, med, peers, fmt))
        charts.append(name)
    log("\n" + md + "\n")
    log(targets(med))
    log(f"\nresults: {outdir}/results.json, results.md, {len(charts)} SVG charts")
    if not update_benchmarks:
        return
    rel = os.path.relpath(outdir, ROOT)
    m = res["meta"]
    chart_md = "\n".join(f"![{n}]({rel}/{n}.svg)" for n in charts)
    doc = f"""# Benchmarks

```sh
bench/run.sh          # as root; full run, about {m['mode_minutes']} minutes here; bench/run.sh --quick for a smoke run
```

One run of `bench/run.sh` ({m['date']}): mailfront side by side with nginx (mail module) and
HAProxy (TCP mode TLS), medians of {m['rounds']} rounds. Raw numbers per round:
[`{rel}/results.json`]({rel}/results.json). How the suite works: [bench/README.md](bench/README.md).

{m['noise_note']}

## Results

{md}

Ratios are mailfront's figure divided by the peer's; whether above 1 is good depends on the
"better" column. Tickets: mailfront with `tls.session_tickets: 0` / `{TICKETS_ON}`{'' if m['mf_tickets_key'] else ' (this build has no `tls.session_tickets` key: both rows are its fixed default)'}, nginx
`ssl_session_tickets off` + `ssl_conf_command NumTickets 0` / its defaults, HAProxy `no-tls-tickets`
and no session cache / its defaults; the "tickets sent" rows show what each really sent (counted by
the client). {missing(res)}

### Read with care

{observations(res)}

### Issue 15 targets, from this run

{targets(med)}

## Charts

{chart_md}

## How it was run

- Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB RAM, Linux {m['kernel']}; load
  average {m['load_before']} before the run, {m['load_after']} after.
- Pinning: each proxy on CPU {m['proxy_cpu']} (`taskset`; nginx 1 worker, HAProxy `nbthread 1`,
  mailfront's tokio runtime sees one CPU), the load generator and the fake backends on CPU
  {m['load_cpu']}. Only one proxy runs at a time; it is restarted for every scenario and round.
- TLS for every proxy: TLS 1.3 only, `{CIPHER}`, X25519, the same ECDSA P-256 certificate
  (`openssl req`, self-signed). The client offers nothing else, does no certificate or signature
  check, and never resumes: every session is a full handshake.
- Versions: {m['versions']}.
- mailfront: `target/release/mailfront` at `{m['mailfront_rev']}`, log level `error`, per-address
  limits off (`connections_per_ip: 0`, `auth_failures_per_ip: 0`).
- Load generator: `bench/loadgen` (Rust: tokio current-thread, rustls {m['rustls']} with aws-lc-rs,
  the same crates as mailfront). Fake backends in the same binary (IMAP: LOGIN/SELECT/FETCH/IDLE/
  NOOP/LOGOUT, FETCH literals from a preallocated buffer; SMTP: EHLO/AUTH/MAIL/RCPT/DATA with a
  `memchr` end-of-data search; nginx's `auth_http` answered with `Auth-Status: OK`).
- Measurement: proxy CPU = utime+stime from `/proc/<pid>/stat` over the proxy's process tree,
  read before and after the measured load (a short warm-up runs first); RSS = `VmRSS` over the
  tree, after a warm-up and with the sessions held, minus the same before they were opened.
- Scenarios:
{m['scenario_note']}
"""
    with open(os.path.join(ROOT, "BENCHMARKS.md"), "w") as f:
        f.write(doc)
    log("BENCHMARKS.md updated")


# ------------------------------------------------------------------------------------------------
# Main.
# ------------------------------------------------------------------------------------------------

def versions(env):
    v = []
    v.append(sh([env["bin"], "--version"]).stdout.strip() or "mailfront")
    for cmd in (["nginx", "-v"], ["haproxy", "-v"], ["openssl", "version"], ["rustc", "--version"]):
        if shutil.which(cmd[0]):
            r = sh(cmd)
            v.append((r.stdout + r.stderr).strip().splitlines()[0])
    return "; ".join(f"`{x}`" for x in v)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one short round: a smoke run of a minute or two")
    ap.add_argument("--rounds", type=int, help="rounds per scenario (default 3, --quick 1)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated: mailfront,nginx,haproxy")
    ap.add_argument("--scenarios", default="handshake,login,fetch,smtp_small,smtp_big,idle,latency")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/mailfront"))
    ap.add_argument("--loadgen", default=os.path.join(ROOT, "target/release/loadgen"))
    ap.add_argument("--no-build", action="store_true", help="use the binaries as they are")
    ap.add_argument("--proxy-cpu", type=int, default=0)
    ap.add_argument("--load-cpu", type=int, default=1)
    ap.add_argument("--out", help="results folder (default bench/results, --quick target/bench-quick)")
    ap.add_argument("--no-benchmarks-md", action="store_true", help="do not write BENCHMARKS.md")
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    prm = dict(PARAMS[mode])
    if args.rounds:
        prm["rounds"] = args.rounds
    outdir = args.out or os.path.join(ROOT, "target/bench-quick" if args.quick else "bench/results")
    update_md = not args.quick and not args.no_benchmarks_md and not args.out
    scenarios = args.scenarios.split(",")
    t_start = time.time()
    load_before = "%.2f" % os.getloadavg()[0]

    # Sessions x (client + backend + proxy sides): 10k idle sessions need well over 20k descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 250000
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        log(f"cannot raise RLIMIT_NOFILE past its hard limit {hard} (no CAP_SYS_RESOURCE?)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]

    peers = [p for p in args.peers.split(",") if p in PEERS]
    if any(p != "mailfront" for p in peers) and not ensure_peers():
        peers = [p for p in peers if p == "mailfront"]
    build(args)

    d = tempfile.mkdtemp(prefix="mailfront-bench-")
    cert, key, both = make_cert(d)
    env = {"dir": d, "cert": cert, "key": key, "both": both, "bin": args.bin, "loadgen": args.loadgen,
           "proxy_cpu": args.proxy_cpu, "load_cpu": args.load_cpu}
    backend = subprocess.Popen(["taskset", "-c", str(args.load_cpu), args.loadgen, "backend"],
                               stdout=subprocess.PIPE, text=True)
    env["backend"] = json.loads(backend.stdout.readline())
    ok, msg = mailfront_accepts_tickets_key(env)
    env["mf_tickets_key"] = ok
    log(f"mailfront tls.session_tickets: {'supported' if ok else 'not in this build (' + msg[-200:] + ')'}")
    log(f"peers: {', '.join(peers)}; {prm['rounds']} round(s); proxy on CPU {args.proxy_cpu}, load on CPU "
        f"{args.load_cpu}; RLIMIT_NOFILE {nofile}")

    # The proxy holds two descriptors per session (client and backend side): with a hard limit of
    # 20000 (containers without CAP_SYS_RESOURCE), "10k" becomes as many as fit.
    idle_sizes = [min(n, (nofile - 600) // 2) for n in prm["idle"]]
    env["nofile"], env["maxconn"] = nofile, min(50000, (nofile - 200) // 2)
    plan = []  # (result key, runner(peer))
    if "handshake" in scenarios:
        plan.append(("handshake_off", lambda p: sc_handshake(env, p, prm, False)))
        plan.append(("handshake_on", lambda p: sc_handshake(env, p, prm, True)))
    if "login" in scenarios:
        plan.append(("login", lambda p: sc_login(env, p, prm)))
    if "fetch" in scenarios:
        plan.append(("fetch", lambda p: sc_fetch(env, p, prm)))
    if "smtp_small" in scenarios:
        plan.append(("smtp_small", lambda p: sc_smtp_small(env, p, prm)))
    if "smtp_big" in scenarios:
        plan.append(("smtp_big", lambda p: sc_smtp_big(env, p, prm)))
    if "idle" in scenarios:
        for name, n in zip(("idle_small", "idle_large"), idle_sizes):
            plan.append((name, lambda p, n=n: sc_idle(env, p, n)))
    runs = {p: {} for p in peers + ["direct"]}
    try:
        for rnd in range(prm["rounds"]):
            log(f"round {rnd + 1}/{prm['rounds']}")
            for key, fn in plan:
                for p in peers:
                    try:
                        r = fn(p)
                    except Exception as e:  # one failure must not lose the whole run
                        log(f"  {key:14s} {p:9s} FAILED: {e}")
                        continue
                    runs[p].setdefault(key, []).append(r)
                    log(f"  {key:14s} {p:9s} " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in r.items()))
            if "latency" in scenarios:
                for p in ["direct"] + peers:
                    try:
                        r = sc_latency(env, p, prm)
                    except Exception as e:
                        log(f"  latency        {p:9s} FAILED: {e}")
                        continue
                    runs[p].setdefault("latency", []).append(r)
                    log(f"  latency        {p:9s} p50 {r['p50_us']} µs  p99 {r['p99_us']} µs")
    finally:
        backend.terminate()
        backend.wait(10)
    # Added latency: the proxy's round trip minus the direct one of the same round.
    direct = runs["direct"].get("latency", [])
    for p in peers:
        for i, r in enumerate(runs[p].get("latency", [])):
            if i < len(direct):
                r["added_p50_us"] = r["p50_us"] - direct[i]["p50_us"]
                r["added_p99_us"] = r["p99_us"] - direct[i]["p99_us"]
    median = {}
    for p, scs in runs.items():
        for sc, rs in scs.items():
            keys = {k for r in rs for k in r}
            median.setdefault(p, {})[sc] = {k: statistics.median(r[k] for r in rs if k in r) for k in keys}
    minutes = (time.time() - t_start) / 60
    with open("/proc/cpuinfo") as f:
        m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
    with open("/proc/meminfo") as f:
        mem = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1)) / 1024 / 1024
    rustls = "0.23"
    lock = os.path.join(ROOT, "bench/loadgen/Cargo.lock")
    if os.path.exists(lock):
        mm = re.search(r'name = "rustls"\nversion = "([^"]+)"', open(lock).read())
        rustls = mm.group(1) if mm else rustls
    rev = sh(["git", "-C", ROOT, "describe", "--always", "--dirty"]).stdout.strip()
    load_after = "%.2f" % os.getloadavg()[0]
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "mode": mode, "rounds": prm["rounds"],
        "minutes": round(minutes, 1), "mode_minutes": max(1, round(minutes)), "cpus": os.cpu_count(),
        "cpu_model": m.group(1) if m else "?", "mem_gib": round(mem), "kernel": platform.release(),
        "load_before": load_before, "load_after": load_after, "proxy_cpu": args.proxy_cpu,
        "load_cpu": args.load_cpu, "versions": versions(env), "mailfront_rev": rev, "rustls": rustls,
        "mf_tickets_key": env["mf_tickets_key"], "params": prm,
        "noise_note": ("The load average before and after the run is under *How it was run*; on a "
                       "machine running other jobs the figures are noisy (the rounds and medians "
                       "soften that, they do not remove it)."),
        "scenario_note": "\n".join("  - " + x for x in [
            f"handshake: 32 clients for {prm['seconds']} s, each session a full handshake, the greeting, "
            "`LOGOUT`; sessions per proxy CPU-second.",
            "login: the same with `LOGIN` before `LOGOUT`.",
            f"fetch: 4 clients log in, `SELECT`, and fetch {prm['fetch_mib']} MiB in all, one literal each.",
            "SMTP 10 KB: 16 clients, each authenticates once (`AUTH PLAIN`), then sends 10,240-octet "
            f"messages one after another for {prm['smtp_small_s']} s (MAIL, RCPT, DATA; no pipelining).",
            f"SMTP 10 MB: 4 clients × {prm['big_msgs']} messages of 10,000,000 octets (76-character "
            "lines); latency from the first content octet to the `250`.",
            "idle: sessions log in and send `IDLE`, opened 64 at a time from 100 source addresses "
            "(127.0.1.x); RSS with them held minus RSS before, per session.",
            f"latency: one logged-in session, {prm['latency_n']} `NOOP`s one after another, through the "
            "proxy, minus the same straight to the backend (cleartext) in the same round.",
            "Handshake and login connections come from 32 loopback addresses, so that no ephemeral "
            "port range runs out."]),
    }
    res = {"meta": meta, "peers": peers, "median": median, "runs": runs}
    write_outputs(res, outdir, update_md)
    shutil.rmtree(d, ignore_errors=True)
    log(f"done in {minutes:.1f} minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
