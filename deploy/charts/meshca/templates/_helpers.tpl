{{/* The image reference: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "meshca.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* Labels on every object; the selector uses only name and instance. */}}
{{- define "meshca.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshca
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "meshca.server.selector" -}}
app.kubernetes.io/name: {{ .Values.server.name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "meshca.signer.selector" -}}
app.kubernetes.io/name: {{ .Values.signer.name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: signer
{{- end -}}

{{/* The signer's ServiceAccount (the seed's name for it). */}}
{{- define "meshca.signer.serviceAccount" -}}
{{ .Values.signer.name }}-controller-manager
{{- end -}}

{{/* ztunnel's account unless set: the accounts allowed to impersonate. */}}
{{- define "meshca.server.trustedNodeAccounts" -}}
{{- if kindIs "invalid" .Values.server.trustedNodeAccounts -}}
{{ .Values.istioNamespace }}/ztunnel
{{- else -}}
{{ join "," .Values.server.trustedNodeAccounts }}
{{- end -}}
{{- end -}}

{{/* The server's ServiceAccount as an RBAC subject. */}}
{{- define "meshca.server.subject" -}}
- kind: ServiceAccount
  name: {{ .Values.server.name }}
  namespace: {{ .Release.Namespace }}
{{- end -}}

{{- define "meshca.signer.subject" -}}
- kind: ServiceAccount
  name: {{ include "meshca.signer.serviceAccount" . }}
  namespace: {{ .Release.Namespace }}
{{- end -}}

{{/* Cluster-scoped names carry the release namespace, so two installs
     (e.g. a server in istio-system and one in a test namespace) never share
     a ClusterRole. */}}
{{- define "meshca.server.clusterName" -}}
{{ .Values.server.name }}-{{ .Release.Namespace }}
{{- end -}}

{{/* Pod scheduling and security settings shared by both Deployments. */}}
{{- define "meshca.podSpecCommon" -}}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .root.Values.hostNetwork }}
hostNetwork: true
dnsPolicy: ClusterFirstWithHostNet
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ .component.terminationGracePeriodSeconds }}
{{- with .component.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .component.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .component.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A Go duration of hours (e.g. 720h) as seconds, for alert thresholds. */}}
{{- define "meshca.seconds" -}}
{{- if hasSuffix "h" . -}}
{{ mul (trimSuffix "h" . | atoi) 3600 }}
{{- else -}}
{{- fail (printf "durations in monitoring values are whole hours such as 720h, not %q" .) -}}
{{- end -}}
{{- end -}}

{{/* "true" when the signer publishes ClusterTrustBundles (default: with podCertificates). */}}
{{- define "meshca.signer.clusterTrustBundle" -}}
{{- $g := .Values.signer -}}
{{- if kindIs "bool" $g.clusterTrustBundle -}}
{{- if $g.clusterTrustBundle }}true{{ end -}}
{{- else if $g.podCertificates.enabled -}}
true
{{- end -}}
{{- end -}}

{{/* PKCS#11: the env of a container whose CA key is in an HSM. */}}
{{- define "meshca.pkcs11.env" -}}
{{- with .Values.pkcs11 }}
{{- if .module }}
- name: MESHCA_PKCS11_MODULE
  value: {{ .module | quote }}
{{- if .pinSecret }}
- name: MESHCA_PKCS11_PIN_FILE
  value: /var/run/secrets/meshca/pkcs11/pin
{{- end }}
{{- with .env }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* PKCS#11: the container's mounts (PIN Secret, module volumes). */}}
{{- define "meshca.pkcs11.volumeMounts" -}}
{{- with .Values.pkcs11 }}
{{- if .module }}
{{- if .pinSecret }}
- name: pkcs11-pin
  mountPath: /var/run/secrets/meshca/pkcs11
  readOnly: true
{{- end }}
{{- with .volumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* PKCS#11: the pod's volumes. */}}
{{- define "meshca.pkcs11.volumes" -}}
{{- with .Values.pkcs11 }}
{{- if .module }}
{{- if .pinSecret }}
- name: pkcs11-pin
  secret:
    secretName: {{ .pinSecret }}
    # 0400 (decimal: YAML 1.1 and 1.2 readers would differ on 0400).
    defaultMode: 256
    items:
      - key: pin
        path: pin
{{- end }}
{{- with .volumes }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}
