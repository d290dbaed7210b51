{{- define "ferry.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "ferry.labels" -}}
app.kubernetes.io/part-of: ferry
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- /* Ferry's catalog: the etcd client URLs of the chart's own members or the given ones,
spoken to over mutual TLS (etcds://) with each pod's certificate from the cluster CA. */ -}}
{{- define "ferry.catalog" -}}
{{- if .Values.catalog.etcd.deploy -}}
{{- $ns := .Release.Namespace -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.catalog.etcd.replicas) -}}
{{- $urls = append $urls (printf "ferry-etcd-%d.ferry-etcd.%s.svc:2379" $i $ns) -}}
{{- end -}}
etcds://{{ join "," $urls }}
{{- else -}}
{{- required "catalog.etcd.endpoints is required when catalog.etcd.deploy is false" .Values.catalog.etcd.endpoints | join "," | printf "etcds://%s" -}}
{{- end -}}
{{- end -}}

{{- /*
An init container that issues this pod's own certificate from the cluster CA
into the "tls" emptyDir. Call with (dict "ctx" $ "name" "<identity>" "extra" "<flags>").
*/ -}}
{{- define "ferry.issueCert" -}}
- name: issue-certificate
  image: {{ include "ferry.image" .ctx }}
  imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
  args: [ca, issue, --dir=/ca, --name={{ .name }}, --out=/tls{{ with .extra }}, {{ . }}{{ end }}]
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
  volumeMounts:
    - {name: cluster-ca, mountPath: /ca, readOnly: true}
    - {name: tls, mountPath: /tls}
{{- end -}}

{{- define "ferry.tlsVolumes" -}}
- name: cluster-ca
  secret: {secretName: {{ .Values.tls.caSecret }}, defaultMode: 0400}
- name: tls
  emptyDir: {medium: Memory}
{{- end -}}
