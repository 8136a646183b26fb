{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "llm-slo-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the objects: <release>-<chart>, or <release> when it already contains the chart
name, or fullnameOverride.
*/}}
{{- define "llm-slo-agent.fullname" -}}
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

{{- define "llm-slo-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the agent pods (immutable in a DaemonSet: never add to them). */}}
{{- define "llm-slo-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-slo-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llm-slo-agent.labels" -}}
helm.sh/chart: {{ include "llm-slo-agent.chart" . }}
{{ include "llm-slo-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: node-agent
app.kubernetes.io/part-of: llm-slo-ebpf-toolkit
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "llm-slo-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llm-slo-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llm-slo-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The agent's listen address: listenAddress:metricsPort ([v6]:port for an IPv6 address). */}}
{{- define "llm-slo-agent.listen" -}}
{{- if contains ":" .Values.listenAddress }}
{{- printf "[%s]:%d" (trimAll "[]" .Values.listenAddress) (int .Values.metricsPort) }}
{{- else }}
{{- printf "%s:%d" .Values.listenAddress (int .Values.metricsPort) }}
{{- end }}
{{- end }}

{{/* Volume name of a CNI state directory: cni-state-<last path element>. */}}
{{- define "llm-slo-agent.cniStateVolume" -}}
{{- printf "cni-state-%s" (base .) | trunc 63 | trimSuffix "-" }}
{{- end }}
