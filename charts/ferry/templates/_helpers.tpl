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
spoken to over mutual TLS (etcds://): with each pod's certificate from the cluster CA, or
with the client certificate of catalog.etcd.tlsSecret (see "ferry.catalogTlsSecret"). */ -}}
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
The Secret (ca.crt, tls.crt, tls.key) of an existing etcd with its own PKI, or "" for
Ferry's cluster CA. Only for an existing etcd: the chart's own members use the cluster CA,
so a tlsSecret next to deploy: true would be silently unused; refuse it instead.
*/ -}}
{{- define "ferry.catalogTlsSecret" -}}
{{- $e := .Values.catalog.etcd -}}
{{- if and $e.deploy $e.tlsSecret -}}
{{- fail "catalog.etcd.tlsSecret is for an existing etcd: set catalog.etcd.deploy=false and catalog.etcd.endpoints, or drop tlsSecret" -}}
{{- end -}}
{{- if not $e.deploy -}}{{ $e.tlsSecret }}{{- end -}}
{{- end -}}

{{- /* Pieces of the controller and node pods for catalog.etcd.tlsSecret (if set). */ -}}
{{- define "ferry.catalogTlsArg" -}}
{{- if include "ferry.catalogTlsSecret" . -}}
- --catalog-tls-dir=/catalog-tls
{{- end -}}
{{- end -}}

{{- define "ferry.catalogTlsMount" -}}
{{- if include "ferry.catalogTlsSecret" . -}}
- {name: catalog-tls, mountPath: /catalog-tls, readOnly: true}
{{- end -}}
{{- end -}}

{{- define "ferry.catalogTlsVolume" -}}
{{- with include "ferry.catalogTlsSecret" . -}}
- name: catalog-tls
  secret: {secretName: {{ . }}, defaultMode: 0400}
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
