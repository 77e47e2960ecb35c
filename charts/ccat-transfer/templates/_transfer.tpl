{{/* Environment of workers and managers: database, broker, CCAT_TRANSFER_*, metrics. */}}
{{- define "ccat-transfer.env" -}}
{{ include "ccat.databaseEnv" . }}
- name: CCAT_TRANSFER_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "broker.urlSecret.name is required" .Values.broker.urlSecret.name | quote }}
      key: {{ .Values.broker.urlSecret.key | quote }}
- name: CCAT_TRANSFER_LOG_DIR
  value: /var/lib/ccat/transfer-logs
- name: CCAT_TRANSFER_METRICS_PORT
  value: {{ .Values.metrics.port | quote }}
- name: CCAT_TRANSFER_METRICS_HOST
  value: "0.0.0.0"
{{- range $k, $v := .Values.transfer }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- include "ccat.extraEnv" . }}
{{- end -}}

{{- define "ccat-transfer.s3Env" -}}
{{- with .Values.s3.endpointUrl }}
- name: CCAT_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- range .Values.s3.credentials }}
- name: {{ .envPrefix }}_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ .secretName | quote }}, key: {{ .accessKeyIdKey | quote }}}
- name: {{ .envPrefix }}_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ .secretName | quote }}, key: {{ .secretAccessKeyKey | quote }}}
{{- end }}
{{- end -}}

{{/*
Operator notifications (the managers only): the webhook URL and the SMTP password, each from
the key of notifications.secretName (an existing Secret) unless that key is empty. The plain
CCAT_TRANSFER_NOTIFY_* settings go through `transfer`, like every other setting; the mail
server's CA bundle, when notifications.caConfigMap names one, is mounted (managers.yaml) and
named by CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE.
*/}}
{{- define "ccat-transfer.notifyEnv" -}}
{{- $n := .Values.notifications -}}
{{- if and $n.secretName (not $n.enabled) }}
{{- fail "notifications.secretName is set but notifications.enabled is false: enable the notifications or drop the Secret" }}
{{- end }}
{{- if and $n.enabled $n.secretName }}
{{- if not (or $n.webhookUrlKey $n.smtpPasswordKey) }}
{{- fail "notifications.secretName is set but names no key: set notifications.webhookUrlKey and/or notifications.smtpPasswordKey" }}
{{- end }}
{{- with $n.webhookUrlKey }}
- name: CCAT_TRANSFER_NOTIFY_WEBHOOK_URL
  valueFrom:
    secretKeyRef: {name: {{ $n.secretName | quote }}, key: {{ . | quote }}}
{{- end }}
{{- with $n.smtpPasswordKey }}
- name: CCAT_TRANSFER_NOTIFY_SMTP_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ $n.secretName | quote }}, key: {{ . | quote }}}
{{- end }}
{{- end }}
{{- if $n.caConfigMap }}
{{- if not $n.enabled }}
{{- fail "notifications.caConfigMap is set but notifications.enabled is false" }}
{{- end }}
{{- if hasKey (.Values.transfer | default dict) "CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE" }}
{{- fail "transfer.CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE is set and so is notifications.caConfigMap: the chart sets the variable to the mounted bundle; drop one" }}
{{- end }}
- name: CCAT_TRANSFER_NOTIFY_SMTP_CA_FILE
  value: /etc/ccat/notify-ca/ca.pem
{{- end }}
{{- end -}}

{{/* Probes running a command (the role's health key in Redis). Args: list of words. */}}
{{- define "ccat-transfer.probes" -}}
{{- $cmd := .cmd -}}
startupProbe:
  exec:
    command: {{ toJson $cmd }}
  {{- toYaml .probes.startup | nindent 2 }}
livenessProbe:
  exec:
    command: {{ toJson $cmd }}
  {{- toYaml .probes.liveness | nindent 2 }}
readinessProbe:
  exec:
    command: {{ toJson $cmd }}
  {{- toYaml .probes.readiness | nindent 2 }}
{{- end -}}

{{/* A PodDisruptionBudget. Args: root, name, component, replicas. */}}
{{- define "ccat-transfer.pdb" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .name }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "ccat.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- if gt (int .replicas) 1 }}
  minAvailable: {{ .root.Values.podDisruptionBudget.minAvailable }}
  {{- else }}
  maxUnavailable: 1
  {{- end }}
  selector:
    matchLabels:
      {{- include "ccat.selectorLabels" .root | nindent 6 }}
      app.kubernetes.io/component: {{ .component }}
{{- end -}}
