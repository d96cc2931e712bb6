{{/*
The chart name, overridable.
*/}}
{{- define "edgefleet-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name: the release name, suffixed with the chart name unless the release name
already contains it. 63 characters at most (a DNS label).
*/}}
{{- define "edgefleet-agent.fullname" -}}
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
fullname-suffix, 63 characters at most (the fullname is cut, never the suffix).
Usage: include "edgefleet-agent.suffixedName" (dict "root" . "suffix" "controller")
*/}}
{{- define "edgefleet-agent.suffixedName" -}}
{{- $suffix := printf "-%s" .suffix }}
{{- $prefix := include "edgefleet-agent.fullname" .root | trunc (int (sub 63 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s%s" $prefix $suffix }}
{{- end }}

{{- define "edgefleet-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource.
*/}}
{{- define "edgefleet-agent.labels" -}}
helm.sh/chart: {{ include "edgefleet-agent.chart" . }}
{{ include "edgefleet-agent.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: edgefleet
{{- end }}

{{/*
Selector labels: minimal, and never changed once released (the DaemonSet's selector is
immutable).
*/}}
{{- define "edgefleet-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edgefleet-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "edgefleet-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "edgefleet-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The ServiceAccount the controller's driver acts as in this cluster.
*/}}
{{- define "edgefleet-agent.controllerServiceAccountName" -}}
{{- default (include "edgefleet-agent.suffixedName" (dict "root" . "suffix" "controller")) .Values.rbac.controllerServiceAccount.name }}
{{- end }}

{{/*
The subjects granted the driver's permissions: the controller's identity (push mode),
and the cluster agent, which does in pull mode exactly what the driver does in push.
*/}}
{{- define "edgefleet-agent.controllerSubjects" -}}
{{- if .Values.rbac.controllerServiceAccount.create }}
- kind: ServiceAccount
  name: {{ include "edgefleet-agent.controllerServiceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end }}
{{- if .Values.clusterAgent.enabled }}
- kind: ServiceAccount
  name: {{ include "edgefleet-agent.clusterAgentName" . }}
  namespace: {{ .Release.Namespace }}
{{- end }}
{{- with .Values.rbac.extraSubjects }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "edgefleet-agent.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "edgefleet-agent.joinTokenSecretName" -}}
{{- if .Values.joinToken.value }}
{{- include "edgefleet-agent.suffixedName" (dict "root" . "suffix" "join-token") }}
{{- else }}
{{- required "joinToken.existingSecret or joinToken.value is required" .Values.joinToken.existingSecret }}
{{- end }}
{{- end }}

{{/*
The cluster agent (pull mode): its own name label, so the agent DaemonSet's selector
never matches its pod.
*/}}
{{- define "edgefleet-agent.clusterAgentName" -}}
{{- include "edgefleet-agent.suffixedName" (dict "root" . "suffix" "cluster-agent") }}
{{- end }}

{{- define "edgefleet-agent.clusterAgentSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-cluster-agent" (include "edgefleet-agent.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "edgefleet-agent.clusterAgentLabels" -}}
helm.sh/chart: {{ include "edgefleet-agent.chart" . }}
{{ include "edgefleet-agent.clusterAgentSelectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: edgefleet
app.kubernetes.io/component: cluster-agent
{{- end }}
