#!/usr/bin/env python3
"""Rotate mailfront's TLS session ticket keys (tls.ticket_key_file).

The file is raw bytes, whole 80-byte keys (16-byte name + 64 secret bytes); mailfront seals new
tickets with the first key and opens tickets with any of them (src/tls/tickets.rs). Each pod
re-reads the mounted Secret when the kubelet updates it, which happens at a different moment on
every node (up to a minute or two apart). So a key must be known to every pod *before* any pod
seals with it, or tickets sealed on one pod fail to open on another until its mount catches up.

Hence a staged rotation, with the last key as the next one:

    [seal, older..., staged]  ->  [staged, seal, older...(trimmed), new]

The key that starts sealing has been in every pod's file for a whole period; the key that stops
sealing stays for at least one more period (longer than a ticket's 6-hour lifetime), so tickets
it sealed still open. A one-key file (made by hand, or by chart 0.1) first gets a staged key only.

Two ways to run it (standard library only):

    rotate-ticket-keys.py --file ticket.keys [--keep 3]   # a local file (SOPS, bare metal)
    rotate-ticket-keys.py --secret NAME [--keep 3]        # in a pod: the Secret's ticket.keys,
                                                          # through the API with the pod's token
"""

import argparse
import base64
import json
import os
import ssl
import sys
import urllib.error
import urllib.request

KEY_LEN = 80  # src/tls/tickets.rs KEY_LEN
NAME_LEN = 16
MAX_KEYS = 16  # src/tls/tickets.rs MAX_KEYS
DATA_KEY = "ticket.keys"
# The pod's service account mount (token, ca.crt, namespace); another directory for tests.
SA = os.environ.get("ROTATE_SA_DIR", "/var/run/secrets/kubernetes.io/serviceaccount")


def split(blob):
    if not blob or len(blob) % KEY_LEN:
        raise ValueError(f"{len(blob)} bytes: not whole {KEY_LEN}-byte keys")
    keys = [blob[i : i + KEY_LEN] for i in range(0, len(blob), KEY_LEN)]
    if len(keys) > MAX_KEYS:
        raise ValueError(f"{len(keys)} keys: mailfront takes at most {MAX_KEYS}")
    return keys


def new_key(existing):
    while True:
        key = os.urandom(KEY_LEN)
        if all(key[:NAME_LEN] != k[:NAME_LEN] for k in existing):  # names must differ
            return key


def rotate(blob, keep):
    """The next file: the staged (last) key first, a new key staged last, `keep` keys in all."""
    if not 3 <= keep <= MAX_KEYS:
        raise ValueError(f"keep must be 3..{MAX_KEYS}")
    keys = split(blob)
    if len(keys) == 1:  # nothing staged yet: stage only, keep sealing with the one key
        return keys[0] + new_key(keys)
    staged, sealing = keys[-1], keys[:-1]
    keys = [staged] + sealing[: keep - 2]
    return b"".join(keys + [new_key(keys)])


def api(method, url, body=None):
    token = open(f"{SA}/token").read().strip()
    ctx = ssl.create_default_context(cafile=f"{SA}/ca.crt")
    req = urllib.request.Request(url, method=method, data=body)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Accept", "application/json")
    if body is not None:
        req.add_header("Content-Type", "application/merge-patch+json")
    with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
        return json.load(resp)


def rotate_secret(name, keep):
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:
        host = f"[{host}]"
    namespace = open(f"{SA}/namespace").read().strip()
    url = f"https://{host}:{port}/api/v1/namespaces/{namespace}/secrets/{name}"
    secret = api("GET", url)
    blob = base64.b64decode(secret.get("data", {}).get(DATA_KEY, ""))
    out = rotate(blob, keep)
    # resourceVersion makes the patch conditional: a concurrent change fails it (409) and the
    # Job's retry starts over from what is there now.
    patch = {
        "metadata": {"resourceVersion": secret["metadata"]["resourceVersion"]},
        "data": {DATA_KEY: base64.b64encode(out).decode()},
    }
    api("PATCH", url, json.dumps(patch).encode())
    print(f"rotated {namespace}/{name}: {len(blob) // KEY_LEN} keys -> {len(out) // KEY_LEN} keys")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--file", help="rotate this key file in place")
    where.add_argument("--secret", help="rotate this Secret's ticket.keys (in a pod)")
    p.add_argument("--keep", type=int, default=3, help="keys to keep, 3..16 (default 3)")
    args = p.parse_args()
    try:
        if args.file:
            try:
                blob = open(args.file, "rb").read()
            except FileNotFoundError:
                blob = b""
            out = rotate(blob, args.keep) if blob else new_key([]) + new_key([])
            tmp = args.file + ".tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(out)
            os.replace(tmp, args.file)
            print(f"{args.file}: {len(out) // KEY_LEN} keys")
        else:
            rotate_secret(args.secret, args.keep)
    except (ValueError, OSError, urllib.error.URLError, KeyError) as e:
        print(f"rotate-ticket-keys: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
