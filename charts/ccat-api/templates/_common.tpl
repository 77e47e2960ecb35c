{{/*
Shared helpers of the CCAT charts. The master copy is charts/_common.tpl; every chart carries an
identical copy as templates/_common.tpl (tests/charts checks they match). Edit the master and
copy it: cp charts/_common.tpl charts/<chart>/templates/_common.tpl
*/}}

{{- define "ccat.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ccat.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ccat.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ccat.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ccat.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "ccat.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ccat-data-center
{{- end -}}

{{/* The image reference: repository:tag, or repository@digest when a digest is given. */}}
{{- define "ccat.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{- define "ccat.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ccat.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Pod-level security context: the image's user (uid/gid 10001), never root. */}}
{{- define "ccat.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level security context: read-only root fs, no privilege, no capability. */}}
{{- define "ccat.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The operations database, from parts; the password only as a reference to a Secret. */}}
{{- define "ccat.databaseEnv" -}}
- name: CCAT_OPS_DB_ENV
  value: {{ .Values.database.env | quote }}
- name: CCAT_OPS_DB_DATABASE_TYPE
  value: postgresql
- name: CCAT_OPS_DB_DATABASE_POSTGRESQL_HOST
  value: {{ required "database.host is required" .Values.database.host | quote }}
- name: CCAT_OPS_DB_DATABASE_POSTGRESQL_PORT
  value: {{ .Values.database.port | quote }}
- name: CCAT_OPS_DB_DATABASE_POSTGRESQL_DATABASE
  value: {{ .Values.database.name | quote }}
- name: CCAT_OPS_DB_DATABASE_POSTGRESQL_USER
  value: {{ .Values.database.user | quote }}
- name: CCAT_OPS_DB_DATABASE_POSTGRESQL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ required "database.passwordSecret.name is required" .Values.database.passwordSecret.name | quote }}
      key: {{ .Values.database.passwordSecret.key | quote }}
- name: CCAT_OPS_DB_POOL_SIZE
  value: {{ .Values.database.poolSize | quote }}
{{- end -}}

{{/* Plain extra environment variables (a map; nothing secret goes here). */}}
{{- define "ccat.extraEnv" -}}
{{- range $k, $v := .Values.extraEnv }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end -}}

{{/* Egress every CCAT pod needs: cluster DNS and the database. */}}
{{- define "ccat.egressBase" -}}
- ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
- ports:
    - {port: {{ .Values.database.port }}, protocol: TCP}
  {{- with .Values.networkPolicy.databaseTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/*
checkov skip annotations of a workload (metadata.annotations). An image pinned by tag only
cannot pass "image should use digest" (CKV_K8S_43): the skip is written only while
image.digest is empty, so a release pinned by digest is scanned for it.
*/}}
{{- define "ccat.checkovImageSkip" -}}
{{- if not .Values.image.digest -}}
checkov.io/skip9: CKV_K8S_43=pinned by tag in values; set image.digest to pin by digest (production stacks do)
{{- end -}}
{{- end -}}

{{/*
A PrometheusRule whose groups are the chart's files/alerts.yml as it is: the same file the
compose stack's Prometheus loads. .Files.Get returns raw text and fromYaml parses it, so the
{{ $labels.x }} / {{ $value }} templates of the annotations reach Prometheus untouched (never
pass the file through tpl). Values: prometheusRule.enabled, .labels, .namespace.
*/}}
{{- define "ccat.prometheusRule" -}}
{{- if .Values.prometheusRule.enabled }}
{{- $rules := .Files.Get "files/alerts.yml" | fromYaml }}
{{- if or (hasKey $rules "Error") (not $rules.groups) }}
{{- fail (printf "files/alerts.yml: no rule groups (%v)" (get $rules "Error")) }}
{{- end }}
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: {{ include "ccat.fullname" . }}
  namespace: {{ .Values.prometheusRule.namespace | default .Release.Namespace }}
  labels:
    {{- include "ccat.labels" . | nindent 4 }}
    app.kubernetes.io/component: alerts
    {{- with .Values.prometheusRule.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  groups:
    {{- toYaml $rules.groups | nindent 4 }}
{{- end }}
{{- end -}}
