{{/* Chart name, shortened to the 63 characters a label value may hold. */}}
{{- define "mailfront.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object name prefix. Shorter than 63 so "-metrics" and friends still fit. */}}
{{- define "mailfront.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mailfront.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mailfront.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailfront.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every object: the chart's version is here, never on the pod template. */}}
{{- define "mailfront.labels" -}}
helm.sh/chart: {{ include "mailfront.chart" . }}
{{ include "mailfront.selectorLabels" . }}
app.kubernetes.io/version: {{ include "mailfront.imageTag" . | trunc 63 | trimSuffix "-" | trimSuffix "." | trimSuffix "_" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mailfront
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels of the pod template: only what changes when the pod itself does (the image tag), so a
chart release that leaves the pod alone does not roll every pod. No helm.sh/chart here.
*/}}
{{- define "mailfront.podLabels" -}}
{{ include "mailfront.selectorLabels" . }}
app.kubernetes.io/version: {{ include "mailfront.imageTag" . | trunc 63 | trimSuffix "-" | trimSuffix "." | trimSuffix "_" | quote }}
app.kubernetes.io/part-of: mailfront
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- with .Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* commonAnnotations as a block for metadata.annotations (empty when none). */}}
{{- define "mailfront.annotations" -}}
{{- with .Values.commonAnnotations }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{- define "mailfront.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mailfront.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image tag that runs: image.tag, or the chart's appVersion. */}}
{{- define "mailfront.imageTag" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag | toString }}
{{- if eq $tag "latest" }}
{{- fail "image.tag: \"latest\" is not allowed; pin a version (and optionally image.digest)" }}
{{- end }}
{{- $tag }}
{{- end }}

{{/*
The image repository: image.repository, or the one the chart was released with (the
Chart.yaml annotation mailfront/image, stamped by the release workflow from the GitHub
repository it runs in; see packaging/stamp-release.sh).
*/}}
{{- define "mailfront.imageRepository" -}}
{{- $repo := .Values.image.repository | default (index (.Chart.Annotations | default dict) "mailfront/image") }}
{{- required "image.repository is empty and Chart.yaml has no mailfront/image annotation" $repo }}
{{- end }}

{{/* repository:tag, or repository:tag@digest when a digest is pinned. */}}
{{- define "mailfront.image" -}}
{{- $tag := include "mailfront.imageTag" . }}
{{- $repo := include "mailfront.imageRepository" . }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" $repo $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}
{{- end }}

{{/*
Pull policy: image.pullPolicy, else IfNotPresent for a digest or a version tag (1.2.3, v1.2,
1.2.3-rc.1: published once, never moved), Always for anything else (a branch-like tag such as
"main" that is pushed again).
*/}}
{{- define "mailfront.imagePullPolicy" -}}
{{- if .Values.image.pullPolicy }}
{{- .Values.image.pullPolicy }}
{{- else if or .Values.image.digest (regexMatch "^v?[0-9]+\\.[0-9]+([.+-].*)?$" (include "mailfront.imageTag" .)) }}
{{- "IfNotPresent" }}
{{- else }}
{{- "Always" }}
{{- end }}
{{- end }}

{{/* The Secret holding one certificate entry: dict "name" NAME "cert" ENTRY "root" $. */}}
{{- define "mailfront.certSecretName" -}}
{{- $cert := .cert }}
{{- if $cert.secretName }}
{{- $cert.secretName }}
{{- else if and $cert.certManager $cert.certManager.enabled }}
{{- printf "%s-%s-tls" (include "mailfront.fullname" .root) .name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- fail (printf "certificates.%s: set secretName or certManager.enabled" .name) }}
{{- end }}
{{- end }}

{{/*
Listeners, certificates and backendCa are maps keyed by name (so `--set listeners.imaps.backend=…`
and overlays change one field). Until chart 0.2.0 they were lists: refuse those with the way out.
*/}}
{{- define "mailfront.checkMaps" -}}
{{- range $key := list "listeners" "certificates" "backendCa" }}
{{- if kindIs "slice" (index $.Values $key) }}
{{- fail (printf "%s is a list; since chart 0.2.0 it is a map keyed by name (`%s: {<name>: {...}}`, the entry's `name:` becomes its key): see \"Upgrading from 0.1\" in the chart README" $key $key) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The enabled listeners' names in order (sorted; mailfront does not care about their order), one
per line. An entry is enabled unless it says `enabled: false` (or is null).
*/}}
{{- define "mailfront.listenerNames" -}}
{{- include "mailfront.checkMaps" . }}
{{- range $name, $l := .Values.listeners }}
{{- if and $l (dig "enabled" true $l) }}
{{ $name }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The enabled certificates' names, the default one first (mailfront serves the first certificate to
clients without a matching SNI): `defaultCertificate`, else the entry named "default", else the
first by name. One per line.
*/}}
{{- define "mailfront.certificateNames" -}}
{{- include "mailfront.checkMaps" . }}
{{- $names := list }}
{{- range $name, $c := .Values.certificates }}
{{- if and $c (dig "enabled" true $c) }}{{ $names = append $names $name }}{{ end }}
{{- end }}
{{- $first := .Values.defaultCertificate }}
{{- if and $first (not (has $first $names)) }}
{{- fail (printf "defaultCertificate %q names no enabled entry of certificates" $first) }}
{{- end }}
{{- if and (not $first) (has "default" $names) }}{{ $first = "default" }}{{ end }}
{{- if and (not $first) $names }}{{ $first = first $names }}{{ end }}
{{- if $first }}
{{ $first }}
{{- range $names }}
{{- if ne . $first }}
{{ . }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Every backend address (host:port) of one listener: `backend`, its routes' backends and those of
its userMap when the chart renders that map (`entries`): dict "l" LISTENER "root" $.
*/}}
{{- define "mailfront.backendAddresses" -}}
{{- $l := .l }}
{{- $backends := list }}
{{- if kindIs "slice" $l.backend }}{{ $backends = concat $backends $l.backend }}{{ else }}{{ $backends = append $backends $l.backend }}{{ end }}
{{- range $l.routes }}
{{- if kindIs "slice" .backend }}{{ $backends = concat $backends .backend }}{{ else }}{{ $backends = append $backends .backend }}{{ end }}
{{- end }}
{{- with $l.userMap }}
{{- range $user, $b := (index ($.root.Values.userMaps | default dict) . | default dict).entries }}
{{- if kindIs "slice" $b }}{{ $backends = concat $backends $b }}{{ else if $b }}{{ $backends = append $backends $b }}{{ end }}
{{- end }}
{{- end }}
{{- range $backends }}
{{ . }}
{{- end }}
{{- end }}

{{/*
The ports mailfront's connections to the backends arrive on, as a NetworkPolicy sees them (after
a Service's DNAT): each listener's backendTargetPorts, else the ports its backends name.
*/}}
{{- define "mailfront.backendTargetPorts" -}}
{{- $seen := dict }}
{{- range $name := splitList "\n" (include "mailfront.listenerNames" . | trim) }}
{{- $l := index $.Values.listeners $name }}
{{- $ports := list }}
{{- if $l.backendTargetPorts }}
{{- $ports = $l.backendTargetPorts }}
{{- else }}
{{- range splitList "\n" (include "mailfront.backendAddresses" (dict "l" $l "root" $) | trim) }}
{{- $ports = append $ports (regexFind "[0-9]+$" .) }}
{{- end }}
{{- end }}
{{- range $ports }}
{{- if not (hasKey $seen (toString .)) }}
{{- $_ := set $seen (toString .) true }}
{{ . }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The enabled userMaps entries' names (sorted), one per line; each has `entries` or
`existingConfigMap`, not both, and no two entries' names differ only in case (mailfront compares
them case-insensitively and would refuse the file).
*/}}
{{- define "mailfront.userMapNames" -}}
{{- range $name, $m := .Values.userMaps }}
{{- if and $m (dig "enabled" true $m) }}
{{- if eq (hasKey $m "entries") (not (empty $m.existingConfigMap)) }}
{{- fail (printf "userMaps.%s: set either entries (a map the chart renders) or existingConfigMap" $name) }}
{{- end }}
{{- $seen := dict }}
{{- range $user, $backends := $m.entries }}
{{- if $backends }}
{{- if hasKey $seen (lower $user) }}
{{- fail (printf "userMaps.%s.entries: %q and %q differ only in case (mailfront compares names case-insensitively)" $name (get $seen (lower $user)) $user) }}
{{- end }}
{{- $_ := set $seen (lower $user) $user }}
{{- end }}
{{- end }}
{{ $name }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The ports of the enabled listeners' user_lookup URLs (the scheme's default when none is
written), one per line, each once.
*/}}
{{- define "mailfront.userLookupPorts" -}}
{{- $seen := dict }}
{{- range $name := splitList "\n" (include "mailfront.listenerNames" . | trim) }}
{{- with (index $.Values.listeners $name).user_lookup }}
{{- $u := urlParse .url }}
{{- $port := regexFind ":[0-9]+$" $u.host | trimPrefix ":" | default (ternary "443" "80" (eq (lower $u.scheme) "https")) }}
{{- if not (hasKey $seen $port) }}
{{- $_ := set $seen $port true }}
{{ $port }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The Secret holding the session ticket keys, empty when none is used (no Secret named or
generated, or config.tls.session_tickets is 0).
*/}}
{{- define "mailfront.ticketKeysSecretName" -}}
{{- $tls := default dict .Values.config.tls }}
{{- $off := and (hasKey $tls "session_tickets") (eq (int $tls.session_tickets) 0) }}
{{- if not $off }}
{{- if .Values.ticketKeys.existingSecret }}
{{- .Values.ticketKeys.existingSecret }}
{{- else if .Values.ticketKeys.create }}
{{- printf "%s-ticket-keys" (include "mailfront.fullname" .) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A mailfront duration ("30s", "5m", "1h", "250ms", also "1m30s") in whole seconds, rounded up.
Used to keep terminationGracePeriodSeconds above the drain time.
*/}}
{{- define "mailfront.durationSeconds" -}}
{{- $d := toString . }}
{{- if not (regexMatch "^([0-9]+(ms|s|m|h))+$" $d) }}
{{- fail (printf "not a duration: %q (write it like 30s, 5m, 1h, 250ms)" $d) }}
{{- end }}
{{- $ms := 0 }}
{{- range (regexFindAll "[0-9]+(ms|s|m|h)" $d -1) }}
{{- $n := regexFind "^[0-9]+" . | atoi }}
{{- $unit := regexFind "[a-z]+$" . }}
{{- if eq $unit "ms" }}{{ $ms = add $ms $n }}
{{- else if eq $unit "s" }}{{ $ms = add $ms (mul $n 1000) }}
{{- else if eq $unit "m" }}{{ $ms = add $ms (mul $n 60000) }}
{{- else if eq $unit "h" }}{{ $ms = add $ms (mul $n 3600000) }}
{{- end }}
{{- end }}
{{- div (add $ms 999) 1000 }}
{{- end }}

{{- define "mailfront.terminationGracePeriodSeconds" -}}
{{- $grace := include "mailfront.durationSeconds" (.Values.config.timeouts.shutdown_grace | default "30s") | atoi }}
{{- $needed := add $grace (int .Values.preStopSleepSeconds) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $needed 10 }}
{{- else if le (int .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be larger than config.timeouts.shutdown_grace + preStopSleepSeconds (%d), or the kubelet kills sessions that are still draining" (int .Values.terminationGracePeriodSeconds) $needed) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
Per-address limits need real client addresses. They are lost (every client one address, so ten
wrong passwords lock everyone out) behind a LoadBalancer/NodePort Service with
externalTrafficPolicy Cluster (kube-proxy SNATs to a node address) and, as far as the chart can
tell, behind a ClusterIP Service (reached through some TCP proxy: an ingress controller's TCP
services, a Gateway, HAProxy). Kept: externalTrafficPolicy Local on a LoadBalancer/NodePort, or
the PROXY protocol on every listener. Otherwise the limits must be off, or the operator says
they know (acknowledgeSharedClientAddress).
*/}}
{{- define "mailfront.checkClientAddresses" -}}
{{- $limits := default dict .Values.config.limits }}
{{- $perIp := int (hasKey $limits "connections_per_ip" | ternary $limits.connections_per_ip 50) }}
{{- $authIp := int (hasKey $limits "auth_failures_per_ip" | ternary $limits.auth_failures_per_ip 10) }}
{{- $svc := .Values.service }}
{{- $local := and (has $svc.type (list "LoadBalancer" "NodePort")) (eq $svc.externalTrafficPolicy "Local") }}
{{- $proxied := true }}
{{- range $name := splitList "\n" (include "mailfront.listenerNames" . | trim) }}
{{- $l := index $.Values.listeners $name }}
{{- $from := hasKey $l "proxy_protocol_from" | ternary $l.proxy_protocol_from $.Values.proxyProtocolFrom }}
{{- if not $from }}{{ $proxied = false }}{{ end }}
{{- end }}
{{- if and (or (gt $perIp 0) (gt $authIp 0)) (not $local) (not $proxied) (not .Values.acknowledgeSharedClientAddress) }}
{{- $setup := ternary (printf "service.type %s with externalTrafficPolicy %s" $svc.type ($svc.externalTrafficPolicy | default "Cluster")) (printf "service.type %s (whatever proxies to it hides the clients)" $svc.type) (has $svc.type (list "LoadBalancer" "NodePort")) }}
{{- fail (printf "client addresses would be lost: %s and no PROXY protocol on every listener, so every client shares one address and config.limits.auth_failures_per_ip (%d) / connections_per_ip (%d) would lock everyone out at once. Use service.externalTrafficPolicy=Local (LoadBalancer/NodePort), or proxyProtocolFrom with a balancer that sends the PROXY protocol, or turn both limits off (0), or set acknowledgeSharedClientAddress=true if the pods do see real client addresses (see \"Client addresses and the per-address limits\" in the chart README)" $setup $authIp $perIp) }}
{{- end }}
{{- end }}

{{/*
mailfront's config.yaml: `config` verbatim, plus the keys the chart owns (certificate paths into
the Secret mounts, listen addresses from the container ports, metrics.listen).
*/}}
{{- define "mailfront.config" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $tls := deepCopy (default dict $cfg.tls) }}
{{- $certs := list }}
{{- range $name := splitList "\n" (include "mailfront.certificateNames" . | trim) }}
{{- if $name }}
{{- $certs = append $certs (dict "cert" (printf "/etc/mailfront/tls/%s/tls.crt" $name) "key" (printf "/etc/mailfront/tls/%s/tls.key" $name)) }}
{{- end }}
{{- end }}
{{- $_ := set $tls "certificates" $certs }}
{{- if include "mailfront.ticketKeysSecretName" . }}
{{- $_ := set $tls "ticket_key_file" "/etc/mailfront/tickets/ticket.keys" }}
{{- end }}
{{- $_ := set $cfg "tls" $tls }}
{{- $listeners := list }}
{{- range $name := splitList "\n" (include "mailfront.listenerNames" . | trim) }}
{{- $in := index $.Values.listeners $name }}
{{- $l := dict "name" $name "listen" (printf "%s:%d" $.Values.bindAddress (int $in.containerPort)) }}
{{- range $key := list "protocol" "tls" "backend" "require_tls_for_mail" "max_connections" "backend_proxy_protocol" "routes" "backend_tls" "backend_health" "backend_client_info" "user_affinity" "user_map" "user_lookup" }}
{{- if hasKey $in $key }}{{ $_ := set $l $key (index $in $key) }}{{ end }}
{{- end }}
{{- with $in.userMap }}
{{- if hasKey $in "user_map" }}
{{- fail (printf "listeners.%s: set userMap (an entry of userMaps) or user_map (a path of your own), not both" $name) }}
{{- end }}
{{- if not (has . (splitList "\n" (include "mailfront.userMapNames" $ | trim))) }}
{{- fail (printf "listeners.%s.userMap %q names no enabled entry of userMaps" $name .) }}
{{- end }}
{{- $_ := set $l "user_map" (printf "/etc/mailfront/user-maps/%s/users.yaml" .) }}
{{- end }}
{{- if hasKey $in "proxy_protocol_from" }}{{ $_ := set $l "proxy_protocol_from" $in.proxy_protocol_from }}{{ else if $.Values.proxyProtocolFrom }}{{ $_ := set $l "proxy_protocol_from" $.Values.proxyProtocolFrom }}{{ end }}
{{- $listeners = append $listeners $l }}
{{- end }}
{{- if not $listeners }}
{{- fail "listeners: no enabled listener" }}
{{- end }}
{{- $_ := set $cfg "listeners" $listeners }}
{{- $_ := set $cfg "metrics" (dict "listen" (printf "%s:%d" .Values.bindAddress (int .Values.metrics.port))) }}
{{- with include "mailfront.sharedStateURL" . }}
{{- $shared := dict "redis" . "timeout" $.Values.sharedState.timeout }}
{{- if $.Values.sharedState.keyPrefix }}{{ $_ := set $shared "key_prefix" $.Values.sharedState.keyPrefix }}{{ end }}
{{- if include "mailfront.sharedStatePasswordSecret" $ }}
{{- $_ := set $shared "password_file" "/etc/mailfront/shared-state/password/password" }}
{{- end }}
{{- if and (not $.Values.sharedState.valkey.enabled) $.Values.sharedState.redis.caSecret }}
{{- $_ := set $shared "ca" "/etc/mailfront/shared-state/ca/ca.crt" }}
{{- end }}
{{- $_ := set $cfg "shared_state" $shared }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/*
shared_state.redis: the chart's Valkey (as the ACL user "mailfront" when it asks for a password),
else sharedState.redis.url, else empty (off).
*/}}
{{- define "mailfront.sharedStateURL" -}}
{{- if .Values.sharedState.valkey.enabled -}}
redis://{{ if .Values.sharedState.valkey.auth.enabled }}mailfront@{{ end }}{{ include "mailfront.fullname" . }}-valkey.{{ .Release.Namespace }}.svc:6379/0
{{- else if .Values.sharedState.redis.url -}}
{{ .Values.sharedState.redis.url }}
{{- end -}}
{{- end }}

{{/*
The Secret and key mounted as shared_state.password_file ("name/key"), or empty: the chart's
Valkey's (its own generated Secret, or valkey.auth.existingSecret; key "password"), else
sharedState.redis.existingSecret.
*/}}
{{- define "mailfront.sharedStatePasswordSecret" -}}
{{- $v := .Values.sharedState.valkey -}}
{{- if $v.enabled -}}
{{- if $v.auth.enabled -}}{{ include "mailfront.valkeyAuthSecretName" . }}/password{{- end -}}
{{- else if .Values.sharedState.redis.existingSecret -}}
{{ .Values.sharedState.redis.existingSecret }}/{{ .Values.sharedState.redis.passwordKey }}
{{- end -}}
{{- end }}

{{/* The Secret with the chart's Valkey's password and users.acl. */}}
{{- define "mailfront.valkeyAuthSecretName" -}}
{{- default (printf "%s-valkey-auth" (include "mailfront.fullname" .)) .Values.sharedState.valkey.auth.existingSecret -}}
{{- end }}

{{/* The rules of mailfront's ACL user in the chart's Valkey: files/valkey-acl-rules without comments. */}}
{{- define "mailfront.valkeyAclRules" -}}
{{- $rules := list }}
{{- range $line := splitList "\n" (.Files.Get "files/valkey-acl-rules") }}
{{- if and (trim $line) (not (hasPrefix "#" $line)) }}{{ $rules = append $rules (trim $line) }}{{ end }}
{{- end }}
{{- join " " $rules }}
{{- end }}

{{/* The Valkey pods' selector labels. */}}
{{- define "mailfront.valkeySelectorLabels" -}}
app.kubernetes.io/name: {{ include "mailfront.name" . }}-valkey
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
A Kubernetes memory quantity ("256Mi", "1Gi", "500M", "268435456") in KiB, 0 when unset.
*/}}
{{- define "mailfront.memoryKiB" -}}
{{- $q := toString . }}
{{- $n := regexFind "^[0-9.]+" $q | float64 }}
{{- $unit := regexFind "[A-Za-z]+$" $q }}
{{- $factor := dict "" (divf 1 1024) "Ki" 1 "Mi" 1024 "Gi" 1048576 "Ti" 1073741824 "k" (divf 1000 1024) "K" (divf 1000 1024) "M" (divf 1000000 1024) "G" (divf 1000000000 1024) }}
{{- mulf $n (get $factor $unit | default 0) | int }}
{{- end }}
