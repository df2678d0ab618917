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

{{- define "mailfront.labels" -}}
helm.sh/chart: {{ include "mailfront.chart" . }}
{{ include "mailfront.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mailfront
{{- end }}

{{- define "mailfront.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mailfront.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository:tag@digest when a digest is pinned. */}}
{{- define "mailfront.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if eq $tag "latest" }}
{{- fail "image.tag: \"latest\" is not allowed; pin a version (and optionally image.digest)" }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The Secret holding one certificate entry. */}}
{{- define "mailfront.certSecretName" -}}
{{- $cert := .cert }}
{{- if $cert.secretName }}
{{- $cert.secretName }}
{{- else if and $cert.certManager $cert.certManager.enabled }}
{{- printf "%s-%s-tls" (include "mailfront.fullname" .root) $cert.name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- fail (printf "certificates[%s]: set secretName or certManager.enabled" $cert.name) }}
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
mailfront's config.yaml: `config` verbatim, plus the keys the chart owns (certificate paths into
the Secret mounts, listen addresses from the container ports, metrics.listen).
*/}}
{{- define "mailfront.config" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $tls := deepCopy (default dict $cfg.tls) }}
{{- $certs := list }}
{{- range .Values.certificates }}
{{- $certs = append $certs (dict "cert" (printf "/etc/mailfront/tls/%s/tls.crt" .name) "key" (printf "/etc/mailfront/tls/%s/tls.key" .name)) }}
{{- end }}
{{- $_ := set $tls "certificates" $certs }}
{{- if include "mailfront.ticketKeysSecretName" . }}
{{- $_ := set $tls "ticket_key_file" "/etc/mailfront/tickets/ticket.keys" }}
{{- end }}
{{- $_ := set $cfg "tls" $tls }}
{{- $listeners := list }}
{{- range .Values.listeners }}
{{- $l := dict "name" .name "protocol" .protocol "tls" .tls "backend" .backend "listen" (printf "%s:%d" $.Values.bindAddress (int .containerPort)) }}
{{- if hasKey . "require_tls_for_mail" }}{{ $_ := set $l "require_tls_for_mail" .require_tls_for_mail }}{{ end }}
{{- if hasKey . "max_connections" }}{{ $_ := set $l "max_connections" .max_connections }}{{ end }}
{{- if hasKey . "backend_proxy_protocol" }}{{ $_ := set $l "backend_proxy_protocol" .backend_proxy_protocol }}{{ end }}
{{- if hasKey . "routes" }}{{ $_ := set $l "routes" .routes }}{{ end }}
{{- if hasKey . "backend_tls" }}{{ $_ := set $l "backend_tls" .backend_tls }}{{ end }}
{{- if hasKey . "backend_health" }}{{ $_ := set $l "backend_health" .backend_health }}{{ end }}
{{- if hasKey . "proxy_protocol_from" }}{{ $_ := set $l "proxy_protocol_from" .proxy_protocol_from }}{{ else if $.Values.proxyProtocolFrom }}{{ $_ := set $l "proxy_protocol_from" $.Values.proxyProtocolFrom }}{{ end }}
{{- if hasKey . "backend_client_info" }}{{ $_ := set $l "backend_client_info" .backend_client_info }}{{ end }}
{{- $listeners = append $listeners $l }}
{{- end }}
{{- $_ := set $cfg "listeners" $listeners }}
{{- $_ := set $cfg "metrics" (dict "listen" (printf "%s:%d" .Values.bindAddress (int .Values.metrics.port))) }}
{{- toYaml $cfg }}
{{- end }}
