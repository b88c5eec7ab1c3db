{{/*
Checks values.schema.json cannot express (combinations), and repeats the single-value checks so
they hold under `--skip-schema-validation` too. Each message names the value and what is allowed.
KubeRay v1.7.0 rejects the same combinations only after install, on the custom resource's status.
*/}}

{{/* replicas, minReplicas, maxReplicas of a worker group; arguments: path (for messages), group. */}}
{{- define "chuxin-ray.validateGroup" -}}
{{- $g := .group }}
{{- range $key := list "replicas" "minReplicas" "maxReplicas" }}
{{- if lt (int (get $g $key)) 0 }}
{{- fail (printf "%s.%s must be >= 0 (got %v)" $.path $key (get $g $key)) }}
{{- end }}
{{- end }}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) }}
{{- fail (printf "%s.minReplicas (%v) must be <= %s.maxReplicas (%v)" .path $g.minReplicas .path $g.maxReplicas) }}
{{- end }}
{{- if or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas)) }}
{{- fail (printf "%s.replicas (%v) must lie between %s.minReplicas (%v) and %s.maxReplicas (%v)" .path $g.replicas .path $g.minReplicas .path $g.maxReplicas) }}
{{- end }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" (toString $g.groupName)) }}
{{- fail (printf "%s.groupName %q must be a DNS label (lowercase letters, digits, '-')" .path (toString $g.groupName)) }}
{{- end }}
{{- end }}

{{- define "chuxin-ray.validate" -}}
{{- $v := .Values }}
{{- $stages := splitList " " (include "chuxin-ray.stages" .) }}
{{- $_ := include "chuxin-ray.image" . }}
{{- $_ := include "chuxin-ray.fullname" . }}

{{- /* jobs: stages, --from */}}
{{- if $v.jobs.perStage }}
{{- if not $v.jobs.stages }}
{{- fail (printf "jobs.stages is empty but jobs.perStage is true: list the stages to run, from: %s" (join ", " $stages)) }}
{{- end }}
{{- range $v.jobs.stages }}
{{- if not (has . $stages) }}
{{- fail (printf "jobs.stages: unknown stage %q; allowed: %s" (toString .) (join ", " $stages)) }}
{{- end }}
{{- end }}
{{- if ne (len (uniq $v.jobs.stages)) (len $v.jobs.stages) }}
{{- fail (printf "jobs.stages lists a stage twice: %s" (join ", " $v.jobs.stages)) }}
{{- end }}
{{- if $v.jobs.from }}
{{- fail "jobs.from applies to the single pipeline RayJob only: with jobs.perStage list the stages in jobs.stages" }}
{{- end }}
{{- end }}
{{- if and $v.jobs.from (not (has $v.jobs.from $stages)) }}
{{- fail (printf "jobs.from: unknown stage %q; allowed: %s" (toString $v.jobs.from) (join ", " $stages)) }}
{{- end }}
{{- if not (has $v.jobs.submissionMode (list "K8sJobMode" "HTTPMode" "SidecarMode")) }}
{{- fail (printf "jobs.submissionMode %q is not one of K8sJobMode, HTTPMode, SidecarMode" (toString $v.jobs.submissionMode)) }}
{{- end }}

{{- /* RayJob lifecycle: the rules KubeRay's RayJob validation applies */}}
{{- range $key := list "ttlSecondsAfterFinished" "activeDeadlineSeconds" "backoffLimit" }}
{{- if lt (int (get $v.jobs $key)) 0 }}
{{- fail (printf "jobs.%s must be >= 0 (got %v)" $key (get $v.jobs $key)) }}
{{- end }}
{{- end }}
{{- $suspend := or $v.jobs.suspend $v.jobs.kueue.queueName }}
{{- if and $suspend (not $v.jobs.shutdownAfterJobFinishes) }}
{{- fail "jobs.suspend / jobs.kueue.queueName need jobs.shutdownAfterJobFinishes: true (KubeRay cannot suspend a RayJob whose cluster outlives it)" }}
{{- end }}
{{- if and (gt (int $v.jobs.ttlSecondsAfterFinished) 0) (not $v.jobs.shutdownAfterJobFinishes) (not $v.sharedCluster.enabled) }}
{{- fail (printf "jobs.ttlSecondsAfterFinished (%v) needs jobs.shutdownAfterJobFinishes: true; set it to 0 to keep the cluster" $v.jobs.ttlSecondsAfterFinished) }}
{{- end }}
{{- if and (hasKey (default dict $v.jobs.deletionStrategy) "deletionRules") $v.jobs.shutdownAfterJobFinishes }}
{{- fail "jobs.deletionStrategy.deletionRules and jobs.shutdownAfterJobFinishes: true are mutually exclusive in KubeRay: set shutdownAfterJobFinishes to false" }}
{{- end }}
{{- if and $v.jobs.kueue.queueName $v.ray.autoscaling.enabled }}
{{- fail (printf "jobs.kueue.queueName (%s) needs ray.autoscaling.enabled: false: Kueue admits a RayJob as a fixed set of pods (worker groups run at their replicas)" $v.jobs.kueue.queueName) }}
{{- end }}

{{- /* shared cluster */}}
{{- if $v.sharedCluster.enabled }}
{{- if $suspend }}
{{- fail "sharedCluster.enabled: KubeRay cannot suspend RayJobs that attach to an existing cluster; unset jobs.suspend and jobs.kueue.queueName" }}
{{- end }}
{{- if eq $v.jobs.submissionMode "SidecarMode" }}
{{- fail "sharedCluster.enabled: jobs.submissionMode SidecarMode needs a cluster per RayJob; use K8sJobMode or HTTPMode" }}
{{- end }}
{{- end }}

{{- /* the training cluster's worker groups */}}
{{- if not (and $v.sharedCluster.enabled $v.sharedCluster.existingName) }}
{{- if not (or $v.ray.cpuWorkers.enabled $v.ray.gpuWorkers.enabled) }}
{{- fail "ray.cpuWorkers.enabled and ray.gpuWorkers.enabled are both false: the head runs no tasks (num-cpus 0), so the pipeline would wait forever" }}
{{- end }}
{{- if $v.ray.cpuWorkers.enabled }}
{{- include "chuxin-ray.validateGroup" (dict "path" "ray.cpuWorkers" "group" $v.ray.cpuWorkers) }}
{{- end }}
{{- if $v.ray.gpuWorkers.enabled }}
{{- include "chuxin-ray.validateGroup" (dict "path" "ray.gpuWorkers" "group" $v.ray.gpuWorkers) }}
{{- if lt (int $v.ray.gpuWorkers.gpus) 1 }}
{{- fail (printf "ray.gpuWorkers.gpus must be >= 1 (got %v): it is the nvidia.com/gpu limit of each GPU worker; to run without GPUs set ray.gpuWorkers.enabled=false" $v.ray.gpuWorkers.gpus) }}
{{- end }}
{{- end }}
{{- if and $v.ray.cpuWorkers.enabled $v.ray.gpuWorkers.enabled (eq (toString $v.ray.cpuWorkers.groupName) (toString $v.ray.gpuWorkers.groupName)) }}
{{- fail (printf "ray.cpuWorkers.groupName and ray.gpuWorkers.groupName are both %q: worker group names must differ" (toString $v.ray.cpuWorkers.groupName)) }}
{{- end }}
{{- end }}

{{- /* object storage: credentials only by reference, never in the ConfigMap */}}
{{- $storage := get (fromYaml (include "chuxin-ray.config" .)) "storage" }}
{{- if kindIs "map" $storage }}
{{- range $key := list "access_key_id" "secret_access_key" "session_token" }}
{{- if get $storage $key }}
{{- fail (printf "config.storage.%s is set: the config lands in a ConfigMap that anyone who can read the namespace can read; put the credential in a Secret and reference it with objectStorage.existingSecret" $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- with $v.objectStorage.existingSecret }}
{{- if and .name (or (not .accessKeyIdKey) (not .secretAccessKeyKey)) }}
{{- fail "objectStorage.existingSecret.accessKeyIdKey and .secretAccessKeyKey must name the Secret's keys when objectStorage.existingSecret.name is set" }}
{{- end }}
{{- end }}

{{- /* the LLM service */}}
{{- if $v.llm.enabled }}
{{- if $v.llm.externalUrl }}
{{- fail "llm.enabled and llm.externalUrl are both set: the synthesize stage would get one URL; unset one" }}
{{- end }}
{{- $_ := include "chuxin-ray.llmImage" . }}
{{- if or (not $v.llm.modelId) (not $v.llm.modelSource) }}
{{- fail "llm.modelId and llm.modelSource must both be set when llm.enabled" }}
{{- end }}
{{- if lt (int $v.llm.tensorParallelSize) 1 }}
{{- fail (printf "llm.tensorParallelSize must be >= 1 (got %v)" $v.llm.tensorParallelSize) }}
{{- end }}
{{- if lt (int $v.llm.maxModelLen) 1 }}
{{- fail (printf "llm.maxModelLen must be >= 1 (got %v)" $v.llm.maxModelLen) }}
{{- end }}
{{- include "chuxin-ray.validateGroup" (dict "path" "llm.workers" "group" $v.llm.workers) }}
{{- if lt (int $v.llm.workers.gpus) 1 }}
{{- fail (printf "llm.workers.gpus must be >= 1 (got %v): vLLM needs a GPU per tensor-parallel rank" $v.llm.workers.gpus) }}
{{- end }}
{{- if lt (int $v.llm.workers.gpus) (int $v.llm.tensorParallelSize) }}
{{- fail (printf "llm.workers.gpus (%v) must be >= llm.tensorParallelSize (%v): a replica's tensor-parallel ranks share one pod" $v.llm.workers.gpus $v.llm.tensorParallelSize) }}
{{- end }}
{{- $as := $v.llm.autoscaling }}
{{- if or (lt (int $as.minReplicas) 0) (lt (int $as.maxReplicas) 1) (gt (int $as.minReplicas) (int $as.maxReplicas)) }}
{{- fail (printf "llm.autoscaling: need 0 <= minReplicas (%v) <= maxReplicas (%v) and maxReplicas >= 1" $as.minReplicas $as.maxReplicas) }}
{{- end }}
{{- end }}
{{- end }}
