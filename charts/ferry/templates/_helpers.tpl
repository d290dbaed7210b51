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

{{- /*
A node pod's init container: it makes its key and gets its certificate from the
controller (enrollment), holding only the CA certificate and the enrollment token.
*/ -}}
{{- define "ferry.enroll" -}}
- name: enroll
  image: {{ include "ferry.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - ca
    - enroll
    - --server=tcp://ferry-controller.{{ .Release.Namespace }}.svc:{{ .Values.controller.enrollPort }}
    - --token-file=/enrollment/token
    - --ca-cert=/ca/ca.crt
    - --name=node/$(NODE_NAME)
    - --ip=$(POD_IP)
    - --out=/tls
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
  volumeMounts:
    - {name: ca-cert, mountPath: /ca, readOnly: true}
    - {name: enrollment, mountPath: /enrollment, readOnly: true}
    - {name: tls, mountPath: /tls}
{{- end -}}

{{- /* A node pod's TLS volumes: no CA key among them. */ -}}
{{- define "ferry.nodeTlsVolumes" -}}
- name: ca-cert
  configMap: {name: {{ .Values.tls.caCertConfigMap }}}
- name: enrollment
  secret: {secretName: {{ .Values.tls.enrollmentSecret }}, defaultMode: 0400}
- name: tls
  emptyDir: {medium: Memory}
{{- end -}}

{{- /* The controller's and etcd members' TLS volumes: the CA with its key. */ -}}
{{- define "ferry.tlsVolumes" -}}
- name: cluster-ca
  secret: {secretName: {{ .Values.tls.caSecret }}, defaultMode: 0400}
- name: tls
  emptyDir: {medium: Memory}
{{- end -}}

{{- /* The chart's backup: block, for the node pods (they ship and restore snapshot
backups) and the controller (it resolves backup-<id> snapshot handles). */}}
{{- define "ferry.backupEnv" -}}
{{- with .Values.backup.target }}
- {name: FERRY_BACKUP_TARGET, value: {{ . | quote }}}
{{- end }}
{{- if .Values.backup.keySecret }}
- {name: FERRY_BACKUP_KEY_FILE, value: /backup/key/key}
{{- end }}
{{- if .Values.backup.s3Secret }}
- {name: FERRY_BACKUP_S3_CONFIG, value: /backup/s3}
{{- end }}
{{- end }}

{{- define "ferry.backupMounts" -}}
{{- if .Values.backup.keySecret }}
- {name: backup-key, mountPath: /backup/key, readOnly: true}
{{- end }}
{{- if .Values.backup.s3Secret }}
- {name: backup-s3, mountPath: /backup/s3, readOnly: true}
{{- end }}
{{- if hasPrefix "/" .Values.backup.target }}
- {name: backup-target, mountPath: {{ .Values.backup.target }}}
{{- end }}
{{- end }}

{{- define "ferry.backupVolumes" -}}
{{- with .Values.backup.keySecret }}
- name: backup-key
  secret: {secretName: {{ . }}, defaultMode: 0400}
{{- end }}
{{- with .Values.backup.s3Secret }}
- name: backup-s3
  secret: {secretName: {{ . }}, defaultMode: 0400}
{{- end }}
{{- if hasPrefix "/" .Values.backup.target }}
- name: backup-target
  hostPath: {path: {{ .Values.backup.target }}, type: DirectoryOrCreate}
{{- end }}
{{- end }}
