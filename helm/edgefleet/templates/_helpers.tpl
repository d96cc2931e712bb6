{{/*
The chart name, overridable.
*/}}
{{- define "edgefleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name: the release name, suffixed with the chart name unless the release name
already contains it. 63 characters at most (a DNS label).
*/}}
{{- define "edgefleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The name of one component's resources: fullname-component, still 63 characters at most
(the fullname is cut, never the component).
Usage: include "edgefleet.componentName" (dict "root" . "component" "api")
*/}}
{{- define "edgefleet.componentName" -}}
{{- $suffix := printf "-%s" .component }}
{{- $prefix := include "edgefleet.fullname" .root | trunc (int (sub 63 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s%s" $prefix $suffix }}
{{- end }}

{{- define "edgefleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource.
*/}}
{{- define "edgefleet.labels" -}}
helm.sh/chart: {{ include "edgefleet.chart" . }}
{{ include "edgefleet.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: edgefleet
{{- end }}

{{/*
Selector labels: minimal, and never changed once released (a Deployment's selector is
immutable). A workload adds app.kubernetes.io/component.
*/}}
{{- define "edgefleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edgefleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels and selector labels of one component.
Usage: include "edgefleet.componentLabels" (dict "root" . "component" "api")
*/}}
{{- define "edgefleet.componentLabels" -}}
{{ include "edgefleet.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "edgefleet.componentSelectorLabels" -}}
{{ include "edgefleet.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "edgefleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "edgefleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The migration Job runs before the release's own resources exist, so it cannot use a
ServiceAccount the chart is about to create: it runs as an existing one or as default.
*/}}
{{- define "edgefleet.migrationServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- "default" }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "edgefleet.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "edgefleet.secretName" -}}
{{- default (include "edgefleet.fullname" .) .Values.secret.existingSecret }}
{{- end }}

{{- define "edgefleet.configMapName" -}}
{{- include "edgefleet.fullname" . }}
{{- end }}

{{- define "edgefleet.claimName" -}}
{{- default (include "edgefleet.componentName" (dict "root" . "component" "artifacts")) .Values.persistence.existingClaim }}
{{- end }}

{{/*
The signing key of a chart-managed Secret: the value given, else the one already in the
cluster (so an upgrade keeps it), else a random one, generated once per render so the
Secret and the migration's copy of it agree.
*/}}
{{- define "edgefleet.secretKey" -}}
{{- if .Values.secret.secretKey }}
{{- .Values.secret.secretKey }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "edgefleet.fullname" .) }}
{{- $key := .Values.secret.keys.secretKey }}
{{- if and $existing $existing.data (hasKey $existing.data $key) }}
{{- index $existing.data $key | b64dec }}
{{- else }}
{{- if not (hasKey .Release "edgefleetGeneratedSecretKey") }}
{{- $_ := set .Release "edgefleetGeneratedSecretKey" (randAlphaNum 48) }}
{{- end }}
{{- .Release.edgefleetGeneratedSecretKey }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The environment every control plane container reads: the ConfigMap, and the secret
settings by key.
*/}}
{{- define "edgefleet.envFrom" -}}
- configMapRef:
    name: {{ include "edgefleet.configMapName" . }}
{{- end }}

{{- define "edgefleet.secretEnv" -}}
- name: EDGEFLEET_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "edgefleet.secretName" . }}
      key: {{ .Values.secret.keys.secretKey }}
- name: EDGEFLEET_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "edgefleet.secretName" . }}
      key: {{ .Values.secret.keys.databaseUrl }}
- name: EDGEFLEET_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "edgefleet.secretName" . }}
      key: {{ .Values.secret.keys.redisUrl }}
{{- end }}

{{/*
Volumes and mounts shared by the API and the workers: the artifact store and /tmp.
*/}}
{{- define "edgefleet.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
- name: artifacts
  persistentVolumeClaim:
    claimName: {{ include "edgefleet.claimName" . }}
{{- end }}

{{- define "edgefleet.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: artifacts
  mountPath: /var/lib/edgefleet/artifacts
{{- end }}

{{/*
Pod template annotations that roll the pods when their configuration changes.
*/}}
{{- define "edgefleet.configChecksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if not .Values.secret.existingSecret }}
checksum/secret: {{ omit .Values.secret "secretKey" | toJson | sha256sum }}
{{- end }}
{{- end }}
