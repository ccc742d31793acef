{{/*
Name of the chart.
*/}}
{{- define "podnat-controller.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the release name when it contains the chart name, else
release-chart; truncated to 63 characters (DNS label).
*/}}
{{- define "podnat-controller.fullname" -}}
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

{{- define "podnat-controller.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "podnat-controller.labels" -}}
helm.sh/chart: {{ include "podnat-controller.chart" . }}
{{ include "podnat-controller.selectorLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The DaemonSet's selector, which Kubernetes never lets change: the Go chart's
(app.kubernetes.io/name = the full name), so `helm upgrade` from it works.
*/}}
{{- define "podnat-controller.selectorLabels" -}}
app.kubernetes.io/name: {{ include "podnat-controller.fullname" . }}
{{- end }}

{{- define "podnat-controller.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "podnat-controller.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Container args: -httpport when httpPort is not the default (and extraArgs
does not set it), -httpauth=false when httpAuth is off (likewise), the TLS
files when tls.secretName mounts them, then extraArgs followed by "-logtostderr" with duplicates
removed, as the Go chart appended them (it also read the older key
extra_args).
*/}}
{{- define "podnat-controller.args" -}}
{{- $extra := concat (.Values.extraArgs | default list) (.Values.extra_args | default list) }}
{{- $portInExtra := false }}
{{- $authInExtra := false }}
{{- range $extra }}
{{- if regexMatch "(?i)^--?(httpport|http-port)(=|$)" (toString .) }}
{{- $portInExtra = true }}
{{- end }}
{{- if regexMatch "(?i)^--?(httpauth|http-auth)(=|$)" (toString .) }}
{{- $authInExtra = true }}
{{- end }}
{{- end }}
{{- $args := list }}
{{- if and (ne (int .Values.httpPort) 8484) (not $portInExtra) }}
{{- $args = append $args (printf "-httpport=%d" (int .Values.httpPort)) }}
{{- end }}
{{- with .Values.namespaceSelector }}
{{- $args = append $args (printf "-namespaceselector=%s" .) }}
{{- end }}
{{- if eq (toString .Values.guardNodePorts) "false" }}
{{- $args = append $args "-guardnodeports=false" }}
{{- end }}
{{- if and (not .Values.httpAuth) (not $authInExtra) }}
{{- $args = append $args "-httpauth=false" }}
{{- end }}
{{- if and .Values.httpAuth .Values.tls.secretName }}
{{- $args = concat $args (list "--tls-cert-file=/etc/podnat-controller/tls/tls.crt" "--tls-private-key-file=/etc/podnat-controller/tls/tls.key") }}
{{- end }}
{{- concat $args (uniq (append $extra "-logtostderr")) | toYaml }}
{{- end }}

{{/*
The image: repository@digest when a digest pins it, else
repository:tag with the chart's appVersion (the crate's version) as the
default tag.
*/}}
{{- define "podnat-controller.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}
