{{/*
Names are cut at 63 characters (the DNS label limit of most Kubernetes names).
*/}}
{{- define "cpt-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cpt-operator.fullname" -}}
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

{{- define "cpt-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cpt-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cpt-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "cpt-operator.labels" -}}
helm.sh/chart: {{ include "cpt-operator.chart" . }}
{{ include "cpt-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cpt-operator
{{- end }}

{{- define "cpt-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cpt-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cpt-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "cpt-operator.trainerImage" -}}
{{- printf "%s:%s" .Values.trainer.image.repository (default .Chart.AppVersion .Values.trainer.image.tag) }}
{{- end }}

{{/*
Peering is forced on with more than one replica: two standalone kopf operators would both handle
every CptRun and launch duplicate attempts.
*/}}
{{- define "cpt-operator.peering" -}}
{{- if or .Values.operator.peering.enabled (gt (int .Values.operator.replicas) 1) }}true{{ end }}
{{- end }}

{{- define "cpt-operator.peeringName" -}}
{{- default (include "cpt-operator.fullname" .) .Values.operator.peering.name }}
{{- end }}

{{- define "cpt-operator.webhookSecretName" -}}
{{- default (printf "%s-webhook" (include "cpt-operator.fullname" .)) .Values.webhook.existingSecret }}
{{- end }}

{{- define "cpt-operator.dashboardNamespace" -}}
{{- default .Release.Namespace .Values.dashboards.namespace }}
{{- end }}
