{{/*
Names, labels and the pieces every Ray pod shares. Validation of values lives in _validate.tpl.
*/}}

{{/* The recipe's stages in pipeline order: chuxin_ray.config.STAGES (a test keeps the two equal). */}}
{{- define "chuxin-ray.stages" -}}
ingest tokenize pretrain synthesize judge mine score finetune unified evaluate export
{{- end }}

{{/* Chart name; 63: DNS label limit. */}}
{{- define "chuxin-ray.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every resource name. 36 = 47 (KubeRay's RayJob and RayService name limit: a RayCluster
name of at most 53 characters minus the 6-character random suffix KubeRay appends) - 11 (the
"-synthesize" per-stage suffix, the longest). KubeRay also requires DNS-1035 labels: lowercase
letters, digits and "-", starting with a letter.
*/}}
{{- define "chuxin-ray.fullname" -}}
{{- $name := "" }}
{{- if .Values.fullnameOverride }}
{{- $name = .Values.fullnameOverride }}
{{- else }}
{{- $chart := default .Chart.Name .Values.nameOverride }}
{{- if contains $chart .Release.Name }}
{{- $name = .Release.Name }}
{{- else }}
{{- $name = printf "%s-%s" .Release.Name $chart }}
{{- end }}
{{- end }}
{{- $name = regexReplaceAll "-+$" ($name | replace "." "-" | trunc 36) "" }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "fullnameOverride / release name: %q is not a DNS-1035 label (lowercase letters, digits, '-', starting with a letter), which KubeRay requires of RayJob and RayService names" $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{- define "chuxin-ray.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every pod of the release carries; the PodMonitor and the NetworkPolicy select by them. */}}
{{- define "chuxin-ray.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chuxin-ray.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "chuxin-ray.labels" -}}
helm.sh/chart: {{ include "chuxin-ray.chart" . }}
{{ include "chuxin-ray.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chuxin-ray
{{- end }}

{{- define "chuxin-ray.configMapName" -}}
{{- printf "%s-config" (include "chuxin-ray.fullname" .) }}
{{- end }}

{{- define "chuxin-ray.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chuxin-ray.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The RayCluster the RayJobs attach to in sharedCluster mode. */}}
{{- define "chuxin-ray.sharedClusterName" -}}
{{- default (printf "%s-cluster" (include "chuxin-ray.fullname" .)) .Values.sharedCluster.existingName }}
{{- end }}

{{- define "chuxin-ray.llmServiceName" -}}
{{- printf "%s-llm" (include "chuxin-ray.fullname" .) }}
{{- end }}

{{/*
The OpenAI-compatible URL the synthesize and judge stages call: the Serve Service KubeRay creates
for a RayService is "<rayservice>-serve-svc" on port 8000; Ray Serve LLM answers under /v1.
*/}}
{{- define "chuxin-ray.llmUrl" -}}
{{- if .Values.llm.enabled }}
{{- printf "http://%s-serve-svc.%s.svc:8000/v1" (include "chuxin-ray.llmServiceName" .) .Release.Namespace }}
{{- else }}
{{- .Values.llm.externalUrl }}
{{- end }}
{{- end }}

{{/* repository:tag or repository@digest of the training image. */}}
{{- define "chuxin-ray.image" -}}
{{- $img := .Values.image }}
{{- if not $img.repository }}
{{- fail "image.repository is empty: set it to where the image built from the repository's Dockerfile is pushed (e.g. --set image.repository=ghcr.io/my-org/chuxin-ray)" }}
{{- end }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- $tag := toString (default .Chart.AppVersion $img.tag) }}
{{- if not $tag }}
{{- fail "image.tag is empty and the chart has no appVersion to fall back to: set image.tag" }}
{{- end }}
{{- printf "%s:%s" $img.repository $tag }}
{{- end }}
{{- end }}

{{- define "chuxin-ray.llmImage" -}}
{{- $img := .Values.llm.image }}
{{- if or (not $img.repository) (not $img.tag) }}
{{- fail (printf "llm.image.repository and llm.image.tag must both be set (got %q:%q); the default is the stock Ray LLM image" (toString $img.repository) (toString $img.tag)) }}
{{- end }}
{{- printf "%s:%s" $img.repository (toString $img.tag) }}
{{- end }}

{{/*
The pipeline config as YAML: `configYaml` when set, else `config`; `run.output` defaults to
s3://<objectStorage.bucket>/<objectStorage.prefix>/<run.name>.
*/}}
{{- define "chuxin-ray.config" -}}
{{- $cfg := dict }}
{{- if .Values.configYaml }}
{{- $cfg = fromYaml .Values.configYaml }}
{{- if hasKey $cfg "Error" }}
{{- fail (printf "configYaml is not a YAML mapping: %s" (get $cfg "Error")) }}
{{- end }}
{{- else }}
{{- $cfg = deepCopy (default dict .Values.config) }}
{{- end }}
{{- $run := get $cfg "run" }}
{{- if not (kindIs "map" $run) }}
{{- fail "config.run is missing: the pipeline config needs a `run` section with `name` (and `output`, or objectStorage.bucket)" }}
{{- end }}
{{- if not $run.name }}
{{- fail "config.run.name is missing: name the run (a DNS label)" }}
{{- end }}
{{- if not $run.output }}
{{- if not .Values.objectStorage.bucket }}
{{- fail "config.run.output is unset and objectStorage.bucket is empty: set one of them" }}
{{- end }}
{{- $path := compact (list (trimAll "/" (toString .Values.objectStorage.prefix)) (toString $run.name)) }}
{{- $_ := set $run "output" (printf "s3://%s/%s" .Values.objectStorage.bucket (join "/" $path)) }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* Environment of every Ray container: object storage, the LLM URL, extraEnv. */}}
{{- define "chuxin-ray.env" -}}
{{- with .Values.objectStorage }}
{{- if .endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ .endpoint | quote }}
{{- end }}
{{- if .region }}
- name: AWS_REGION
  value: {{ .region | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ .region | quote }}
{{- end }}
{{- with .existingSecret }}
{{- if .name }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .name | quote }}
      key: {{ .accessKeyIdKey | quote }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .name | quote }}
      key: {{ .secretAccessKeyKey | quote }}
{{- if .sessionTokenKey }}
- name: AWS_SESSION_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .name | quote }}
      key: {{ .sessionTokenKey | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- with include "chuxin-ray.llmUrl" . }}
- name: CHUXIN_LLM_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Head-only environment: embed Grafana panels in the Ray dashboard. */}}
{{- define "chuxin-ray.headEnv" -}}
{{- with .Values.monitoring }}
{{- if .grafanaHost }}
- name: RAY_GRAFANA_HOST
  value: {{ .grafanaHost | quote }}
- name: RAY_GRAFANA_IFRAME_HOST
  value: {{ default .grafanaHost .grafanaIframeHost | quote }}
{{- end }}
{{- if .prometheusHost }}
- name: RAY_PROMETHEUS_HOST
  value: {{ .prometheusHost | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* rayStartParams: KubeRay wants every value as a string. YAML numbers arrive as float64, which
toString writes in exponent form past 1e6 (2000000000 -> "2e+09"): whole numbers are printed as integers. */}}
{{- define "chuxin-ray.rayStartParams" -}}
{{- $params := dict }}
{{- range $k, $v := . }}
{{- $s := toString $v }}
{{- if and (kindIs "float64" $v) (eq (float64 (int64 $v)) $v) }}
{{- $s = printf "%d" (int64 $v) }}
{{- end }}
{{- $_ := set $params $k $s }}
{{- end }}
{{- toYaml $params }}
{{- end }}

{{/*
A Ray pod template. Arguments (a dict):
  root           the chart's top-level context
  component      app.kubernetes.io/component label (ray-head, ray-worker-<group>, llm-...)
  container      container name (KubeRay: the Ray container comes first)
  image, pullPolicy
  group          the values of the head or worker group (resources, shmSize, nodeSelector, ...)
  gpus           nvidia.com/gpu per pod (0: none)
  head           true for a head pod (head env, head ports, service-account token)
  serve          true in the LLM cluster (serve port 8000)
  mountConfig    mount the pipeline config at /etc/chuxin-ray
*/}}
{{- define "chuxin-ray.podTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $g := .group -}}
metadata:
  labels:
    {{- include "chuxin-ray.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- if or .mountConfig $v.podAnnotations }}
  annotations:
    {{- if .mountConfig }}
    checksum/config: {{ include "chuxin-ray.config" $root | sha256sum }}
    {{- end }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
spec:
  serviceAccountName: {{ include "chuxin-ray.serviceAccountName" $root }}
  # The head's autoscaler sidecar calls the Kubernetes API; no other Ray pod needs a token.
  automountServiceAccountToken: {{ ternary true false (and .head $v.ray.autoscaling.enabled) }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ .image | quote }}
      imagePullPolicy: {{ .pullPolicy }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      {{- $env := include "chuxin-ray.env" $root }}
      {{- if .head }}
      {{- $env = print $env (include "chuxin-ray.headEnv" $root) }}
      {{- end }}
      {{- if trim $env }}
      env:
        {{- trim $env | nindent 8 }}
      {{- end }}
      ports:
        {{- if .head }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        - {name: as-metrics, containerPort: 44217}
        - {name: dash-metrics, containerPort: 44227}
        {{- end }}
        - {name: metrics, containerPort: 8080}
        {{- if .serve }}
        - {name: serve, containerPort: 8000}
        {{- end }}
      {{- $res := deepCopy (default dict $g.resources) }}
      {{- if gt (int .gpus) 0 }}
      {{- $limits := default dict (get $res "limits") }}
      {{- $requests := default dict (get $res "requests") }}
      {{- $_ := set $limits "nvidia.com/gpu" (int .gpus) }}
      {{- $_ := set $requests "nvidia.com/gpu" (int .gpus) }}
      {{- $_ := set $res "limits" $limits }}
      {{- $_ := set $res "requests" $requests }}
      {{- end }}
      {{- with $res }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        {{- if .mountConfig }}
        - name: config
          mountPath: /etc/chuxin-ray
          readOnly: true
        {{- end }}
  volumes:
    # Ray's object store and NCCL live in /dev/shm; the container runtime's default is 64 MiB.
    - name: dshm
      emptyDir:
        medium: Memory
        {{- with $g.shmSize }}
        sizeLimit: {{ . }}
        {{- end }}
    {{- if .mountConfig }}
    - name: config
      configMap:
        name: {{ include "chuxin-ray.configMapName" $root }}
    {{- end }}
{{- end }}

{{/* The autoscaler block shared by every RayCluster spec of the release. */}}
{{- define "chuxin-ray.autoscaling" -}}
{{- $a := .Values.ray.autoscaling -}}
enableInTreeAutoscaling: {{ $a.enabled | ternary true false }}
{{- if $a.enabled }}
autoscalerOptions:
  version: {{ $a.version }}
  idleTimeoutSeconds: {{ int $a.idleTimeoutSeconds }}
  upscalingMode: {{ $a.upscalingMode }}
  {{- with $a.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
{{- end }}
{{- end }}

{{- define "chuxin-ray.authOptions" -}}
{{- if .Values.ray.auth.enabled }}
authOptions:
  mode: token
  {{- with .Values.ray.auth.secretName }}
  secretName: {{ . | quote }}
  {{- end }}
{{- end }}
{{- end }}

{{/* A worker group entry; arguments: root, group (values), gpus, image, pullPolicy, component, serve, mountConfig. */}}
{{- define "chuxin-ray.workerGroup" -}}
{{- $g := .group -}}
- groupName: {{ $g.groupName }}
  replicas: {{ int $g.replicas }}
  minReplicas: {{ int $g.minReplicas }}
  maxReplicas: {{ int $g.maxReplicas }}
  rayStartParams:
    {{- include "chuxin-ray.rayStartParams" $g.rayStartParams | nindent 4 }}
  template:
    {{- include "chuxin-ray.podTemplate" (dict "root" .root "component" .component "container" "ray-worker" "image" .image "pullPolicy" .pullPolicy "group" $g "gpus" .gpus "head" false "serve" .serve "mountConfig" .mountConfig) | nindent 4 }}
{{- end }}

{{/* The training cluster: spec of a RayJob's rayClusterSpec and of the shared RayCluster. */}}
{{- define "chuxin-ray.rayClusterSpec" -}}
{{- $v := .Values }}
{{- $image := include "chuxin-ray.image" . -}}
rayVersion: {{ $v.ray.version | quote }}
{{- with include "chuxin-ray.authOptions" . }}
{{ trim . }}
{{- end }}
{{ include "chuxin-ray.autoscaling" . }}
headGroupSpec:
  rayStartParams:
    {{- include "chuxin-ray.rayStartParams" $v.ray.head.rayStartParams | nindent 4 }}
  template:
    {{- include "chuxin-ray.podTemplate" (dict "root" . "component" "ray-head" "container" "ray-head" "image" $image "pullPolicy" $v.image.pullPolicy "group" $v.ray.head "gpus" 0 "head" true "serve" false "mountConfig" true) | nindent 4 }}
{{- if or $v.ray.cpuWorkers.enabled $v.ray.gpuWorkers.enabled }}
workerGroupSpecs:
  {{- if $v.ray.cpuWorkers.enabled }}
  {{- include "chuxin-ray.workerGroup" (dict "root" . "group" $v.ray.cpuWorkers "gpus" 0 "image" $image "pullPolicy" $v.image.pullPolicy "component" (printf "ray-worker-%s" $v.ray.cpuWorkers.groupName) "serve" false "mountConfig" true) | nindent 2 }}
  {{- end }}
  {{- if $v.ray.gpuWorkers.enabled }}
  {{- include "chuxin-ray.workerGroup" (dict "root" . "group" $v.ray.gpuWorkers "gpus" $v.ray.gpuWorkers.gpus "image" $image "pullPolicy" $v.image.pullPolicy "component" (printf "ray-worker-%s" $v.ray.gpuWorkers.groupName) "serve" false "mountConfig" true) | nindent 2 }}
  {{- end }}
{{- end }}
{{- end }}
