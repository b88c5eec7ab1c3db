"""`chuxin-ray launch` and `chuxin-ray status`: one pipeline run as KubeRay objects, from a laptop.

`launch CONFIG` validates the config with the schema every stage uses, then creates what the Helm
chart (helm/chuxin-ray) renders for a pipeline run:

    ConfigMap <name>-config   the config (overrides applied), mounted at /etc/chuxin-ray/config.yaml
    RayJob    <name>          `chuxin-ray pipeline /etc/chuxin-ray/config.yaml [--only|--from STAGE]`
                              on a RayCluster of its own: head (num-cpus 0), CPU group, GPU group

It builds them in Python, so a laptop needs no helm binary. The chart stays the spec: the defaults
below are the chart's `values.yaml`, `-f VALUES` takes the chart's own keys (one values file serves
`helm install` and `launch`), and tests/integration/test_launch.py renders the chart with the real
helm for the same config and values and requires the same objects. What launch does not make: the
ServiceAccount (k8s/ ships `chuxin-ray`), the NetworkPolicy, monitoring objects and the LLM
RayService; install the chart for those.

`status NAME` prints the RayJob's status, why its pods are not running (unschedulable, image pulls,
OOM kills), the stage manifests found under `run.output`, and the port-forward line for the Ray
dashboard; `--watch` polls until the job ends.

The kubernetes client is imported on use: `chuxin-ray --help` and the stage commands never load it.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from chuxin_ray import __version__
from chuxin_ray.config import STAGES, Config, ConfigError, apply_override, load_config, validate_config

CHART = "chuxin-ray"
CONFIG_DIR = "/etc/chuxin-ray"  # where every Ray pod mounts the ConfigMap (the chart's path)
CONFIG_PATH = f"{CONFIG_DIR}/config.yaml"
MANAGED_BY = "chuxin-ray-launch"  # app.kubernetes.io/managed-by; the chart's objects say Helm
RAYJOB = ("ray.io", "v1", "rayjobs")
RAYSERVICE = ("ray.io", "v1", "rayservices")
MAX_RAYJOB_NAME = 47  # KubeRay: a RayCluster name of at most 53 characters minus its 6-character suffix
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class LaunchError(RuntimeError):
    """A run that cannot be launched or read; the message names the object, namespace and value."""


# --------------------------------------------------------------------------------------------------
# The chart's values: defaults, user values files, checks
# --------------------------------------------------------------------------------------------------

# helm/chuxin-ray/values.yaml: the keys that shape a pipeline RayJob, with the chart's defaults
# (test_launch.py keeps them equal). One deliberate difference: launch creates no ServiceAccount and
# uses the one k8s/ ships, `chuxin-ray`.
DEFAULT_VALUES: dict[str, Any] = yaml.safe_load(
    """
nameOverride: ""
image: {repository: chuxin-ray, tag: "", digest: "", pullPolicy: IfNotPresent}
imagePullSecrets: []
objectStorage:
  endpoint: ""
  region: ""
  existingSecret:
    name: ""
    accessKeyIdKey: AWS_ACCESS_KEY_ID
    secretAccessKeyKey: AWS_SECRET_ACCESS_KEY
    sessionTokenKey: ""
serviceAccount: {create: false, name: chuxin-ray}
extraEnv: []
podLabels: {}
podAnnotations: {}
podSecurityContext:
  runAsNonRoot: true
  runAsUser: 1000
  runAsGroup: 100
  fsGroup: 100
  seccompProfile: {type: RuntimeDefault}
securityContext:
  allowPrivilegeEscalation: false
  capabilities: {drop: [ALL]}
  runAsNonRoot: true
  runAsUser: 1000
  seccompProfile: {type: RuntimeDefault}
ray:
  version: "2.60.0"
  auth: {enabled: false, secretName: ""}
  autoscaling:
    enabled: true
    version: v2
    idleTimeoutSeconds: 120
    upscalingMode: Default
    resources:
      requests: {cpu: 200m, memory: 512Mi}
      limits: {cpu: 500m, memory: 512Mi}
  head:
    rayStartParams: {num-cpus: "0", dashboard-host: "0.0.0.0"}
    resources:
      requests: {cpu: "2", memory: 8Gi}
      limits: {cpu: "2", memory: 8Gi}
    shmSize: 2Gi
    nodeSelector: {}
    tolerations: []
    affinity: {}
  cpuWorkers:
    enabled: true
    groupName: cpu
    replicas: 1
    minReplicas: 0
    maxReplicas: 8
    rayStartParams: {}
    resources:
      requests: {cpu: "8", memory: 32Gi}
      limits: {cpu: "8", memory: 32Gi}
    shmSize: 8Gi
    nodeSelector: {}
    tolerations: []
    affinity: {}
  gpuWorkers:
    enabled: true
    groupName: gpu
    replicas: 0
    minReplicas: 0
    maxReplicas: 4
    gpus: 1
    rayStartParams: {}
    resources:
      requests: {cpu: "8", memory: 64Gi}
      limits: {cpu: "8", memory: 64Gi}
    shmSize: 16Gi
    nodeSelector: {nvidia.com/gpu.present: "true"}
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
    affinity: {}
jobs:
  perStage: false
  from: ""
  overrides: []
  submissionMode: K8sJobMode
  shutdownAfterJobFinishes: true
  ttlSecondsAfterFinished: 600
  activeDeadlineSeconds: 0
  backoffLimit: 2
  suspend: false
  kueue: {queueName: "", priorityClass: ""}
  runtimeEnv: {}
  submitterResources:
    requests: {cpu: 100m, memory: 256Mi}
    limits: {cpu: 500m, memory: 512Mi}
  deletionStrategy: {}
sharedCluster: {enabled: false}
llm: {enabled: false, externalUrl: ""}
monitoring: {grafanaHost: "", grafanaIframeHost: "", prometheusHost: ""}
"""
)

# Mappings whose keys are the user's (Kubernetes objects, Ray parameters), not the chart's.
_FREE_FORM = {
    "nodeSelector", "tolerations", "affinity", "resources", "rayStartParams", "podLabels",
    "podAnnotations", "runtimeEnv", "deletionStrategy", "podSecurityContext", "securityContext",
    "submitterResources",
}  # fmt: skip
# Chart keys launch accepts in a shared values file and ignores: the objects they shape (or the
# config they carry) are the chart's alone; `config`/`configYaml` are refused in check_values.
_IGNORED = {"fullnameOverride", "networkPolicy", "monitoring.podMonitor", "monitoring.grafanaDashboard"}


def merge_values(base: dict, override: dict) -> dict:
    """Helm's merge of a values file into the defaults: maps merge key by key, `null` deletes a key,
    anything else (lists included) replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_values(paths: list[str]) -> dict:
    """The chart defaults merged with each values file in order (later files win, as `helm -f`)."""
    values = copy.deepcopy(DEFAULT_VALUES)
    for path in paths:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise LaunchError(f"values file not found: {path}") from None
        except yaml.YAMLError as e:
            raise LaunchError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise LaunchError(f"{path}: a values file is a mapping of the chart's keys")
        _check_keys(data, DEFAULT_VALUES, [], path)
        values = merge_values(values, data)
    return values


def _check_keys(data: dict, defaults: dict, where: list[str], origin: str) -> None:
    for key, value in data.items():
        path = [*where, str(key)]
        dotted = ".".join(path)
        if dotted in _IGNORED or (not where and key == "llm"):
            if key == "llm" and isinstance(value, dict):  # of llm, only enabled/externalUrl matter here
                used = {k: x for k, x in value.items() if k in ("enabled", "externalUrl")}
                _check_keys(used, defaults["llm"], path, origin)
            continue
        if key in ("config", "configYaml") and not where:
            raise LaunchError(
                f"{origin}: `{key}`: launch takes the pipeline config from its CONFIG argument, not from values"
            )
        if key not in defaults:
            hint = difflib.get_close_matches(str(key), list(defaults), n=1)
            maybe = f" (did you mean `{hint[0]}`?)" if hint else ""
            raise LaunchError(
                f"{origin}: {dotted}: unknown or unsupported key{maybe}; allowed here: {', '.join(sorted(defaults))}"
            )
        if isinstance(value, dict) and isinstance(defaults[key], dict) and key not in _FREE_FORM:
            _check_keys(value, defaults[key], path, origin)


def check_values(v: dict) -> None:
    """What the chart's _validate.tpl refuses, for the values launch uses, plus what launch cannot do.
    Each message names the value, as the chart's does."""
    unsupported = {
        "jobs.perStage": (v["jobs"].get("perStage"), "run one stage with --only STAGE"),
        "sharedCluster.enabled": (
            v["sharedCluster"].get("enabled"),
            "launch creates a cluster per RayJob; install the chart for a shared one",
        ),
        "llm.enabled": (
            v["llm"].get("enabled"),
            "launch does not create the LLM RayService: install the chart, or set llm.externalUrl",
        ),
        "serviceAccount.create": (
            v["serviceAccount"].get("create"),
            "launch creates no ServiceAccount: apply k8s/ (ServiceAccount chuxin-ray) or name one with --service-account",
        ),
    }
    for key, (value, hint) in unsupported.items():
        if value:
            raise LaunchError(f"{key}: not supported by launch: {hint}")
    if not v["image"].get("repository"):
        raise LaunchError(
            "image.repository is empty: pass --image REPOSITORY[:TAG] (the image built from the Dockerfile)"
        )
    groups = [(k, v["ray"][k]) for k in ("cpuWorkers", "gpuWorkers") if v["ray"][k].get("enabled")]
    if not groups:
        raise LaunchError(
            "ray.cpuWorkers.enabled and ray.gpuWorkers.enabled are both false: the head runs no tasks (num-cpus 0)"
        )
    for key, g in groups:
        for field in ("replicas", "minReplicas", "maxReplicas"):
            if int(g[field]) < 0:
                raise LaunchError(f"ray.{key}.{field} must be >= 0 (got {g[field]})")
        if not int(g["minReplicas"]) <= int(g["replicas"]) <= int(g["maxReplicas"]):
            raise LaunchError(
                f"ray.{key}.replicas ({g['replicas']}) must lie between ray.{key}.minReplicas "
                f"({g['minReplicas']}) and ray.{key}.maxReplicas ({g['maxReplicas']})"
            )
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", str(g["groupName"])):
            raise LaunchError(f"ray.{key}.groupName {g['groupName']!r} must be a DNS label")
    if v["ray"]["gpuWorkers"].get("enabled") and int(v["ray"]["gpuWorkers"]["gpus"]) < 1:
        raise LaunchError(
            f"ray.gpuWorkers.gpus must be >= 1 (got {v['ray']['gpuWorkers']['gpus']}); "
            "to run without GPUs set ray.gpuWorkers.enabled=false"
        )
    if len(groups) == 2 and groups[0][1]["groupName"] == groups[1][1]["groupName"]:
        raise LaunchError("ray.cpuWorkers.groupName and ray.gpuWorkers.groupName must differ")
    jobs = v["jobs"]
    if jobs["submissionMode"] not in ("K8sJobMode", "HTTPMode", "SidecarMode"):
        raise LaunchError(
            f"jobs.submissionMode {jobs['submissionMode']!r} is not one of K8sJobMode, HTTPMode, SidecarMode"
        )
    for field in ("ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"):
        if int(jobs[field]) < 0:
            raise LaunchError(f"jobs.{field} must be >= 0 (got {jobs[field]})")
    suspend = jobs["suspend"] or jobs["kueue"]["queueName"]
    if suspend and not jobs["shutdownAfterJobFinishes"]:
        raise LaunchError("jobs.suspend / jobs.kueue.queueName need jobs.shutdownAfterJobFinishes: true")
    if int(jobs["ttlSecondsAfterFinished"]) > 0 and not jobs["shutdownAfterJobFinishes"]:
        raise LaunchError(
            f"jobs.ttlSecondsAfterFinished ({jobs['ttlSecondsAfterFinished']}) needs jobs.shutdownAfterJobFinishes: true"
        )
    if "deletionRules" in (jobs["deletionStrategy"] or {}) and jobs["shutdownAfterJobFinishes"]:
        raise LaunchError(
            "jobs.deletionStrategy.deletionRules and jobs.shutdownAfterJobFinishes: true are mutually exclusive"
        )
    if jobs["kueue"]["queueName"] and v["ray"]["autoscaling"]["enabled"]:
        raise LaunchError(
            f"jobs.kueue.queueName ({jobs['kueue']['queueName']}) needs ray.autoscaling.enabled: false"
        )
    secret = v["objectStorage"]["existingSecret"]
    if secret.get("name") and not (secret.get("accessKeyIdKey") and secret.get("secretAccessKeyKey")):
        raise LaunchError(
            "objectStorage.existingSecret.accessKeyIdKey and .secretAccessKeyKey must name the Secret's keys"
        )


def set_image(values: dict, image: str) -> None:
    """`--image REPO[:TAG]` or `REPO@sha256:...` into the chart's image.repository/tag/digest."""
    repo, at, digest = image.partition("@")
    tag = ""
    if not at and ":" in repo.rsplit("/", 1)[-1]:
        repo, tag = repo.rsplit(":", 1)
    values["image"].update(repository=repo, tag=tag, digest=digest)


# --------------------------------------------------------------------------------------------------
# The objects: a port of the chart's templates (rayjob.yaml, configmap.yaml, _helpers.tpl)
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One launch: the config as it goes into the ConfigMap, the names, the stage selection."""

    name: str  # the RayJob
    instance: str  # app.kubernetes.io/instance: the run (the chart's release)
    namespace: str
    config_text: str
    stage: str  # "pipeline", or the stage of --only
    flags: list[str]  # --only STAGE / --from STAGE

    @property
    def config_map(self) -> str:
        return f"{self.name}-config"


def _go_string(value: Any) -> str:
    """Go's toString, as the chart applies it to rayStartParams: true -> "true", 8.0 -> "8"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _image(v: dict) -> str:
    img = v["image"]
    if img.get("digest"):
        return f"{img['repository']}@{img['digest']}"
    return f"{img['repository']}:{img.get('tag') or __version__}"  # appVersion == package version


def _selector_labels(v: dict, run: Run) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": v.get("nameOverride") or CHART,
        "app.kubernetes.io/instance": run.instance,
    }


def _labels(v: dict, run: Run) -> dict[str, str]:
    return {
        **_selector_labels(v, run),
        "app.kubernetes.io/version": __version__,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": CHART,
    }


def _env(v: dict, head: bool) -> list[dict]:
    env: list[dict] = []
    store = v["objectStorage"]
    if store.get("endpoint"):
        env.append({"name": "AWS_ENDPOINT_URL", "value": str(store["endpoint"])})
    if store.get("region"):
        env += [{"name": n, "value": str(store["region"])} for n in ("AWS_REGION", "AWS_DEFAULT_REGION")]
    secret = store["existingSecret"]
    if secret.get("name"):
        keys = [("AWS_ACCESS_KEY_ID", "accessKeyIdKey"), ("AWS_SECRET_ACCESS_KEY", "secretAccessKeyKey")]
        if secret.get("sessionTokenKey"):
            keys.append(("AWS_SESSION_TOKEN", "sessionTokenKey"))
        env += [
            {"name": n, "valueFrom": {"secretKeyRef": {"name": secret["name"], "key": secret[k]}}}
            for n, k in keys
        ]
    if v["llm"].get("externalUrl"):
        env.append({"name": "CHUXIN_LLM_URL", "value": str(v["llm"]["externalUrl"])})
    env += copy.deepcopy(v.get("extraEnv") or [])
    mon = v["monitoring"]
    if head and mon.get("grafanaHost"):
        env.append({"name": "RAY_GRAFANA_HOST", "value": str(mon["grafanaHost"])})
        iframe = mon.get("grafanaIframeHost") or mon["grafanaHost"]
        env.append({"name": "RAY_GRAFANA_IFRAME_HOST", "value": str(iframe)})
    if head and mon.get("prometheusHost"):
        env.append({"name": "RAY_PROMETHEUS_HOST", "value": str(mon["prometheusHost"])})
    return env


def _pod_template(
    v: dict, run: Run, group: dict, component: str, container: str, gpus: int, head: bool
) -> dict:
    """The chart's `chuxin-ray.podTemplate` for a training-cluster pod (config mounted, no serve port)."""
    annotations = {"checksum/config": hashlib.sha256(run.config_text.encode()).hexdigest()}
    annotations.update(v.get("podAnnotations") or {})
    spec: dict[str, Any] = {
        "serviceAccountName": v["serviceAccount"]["name"] or "default",
        # The head's autoscaler sidecar calls the Kubernetes API; no other Ray pod needs a token.
        "automountServiceAccountToken": bool(head and v["ray"]["autoscaling"]["enabled"]),
        "securityContext": copy.deepcopy(v["podSecurityContext"]),
    }
    for key, value in (("imagePullSecrets", v.get("imagePullSecrets")),) + tuple(
        (k, group.get(k)) for k in ("nodeSelector", "tolerations", "affinity")
    ):
        if value:
            spec[key] = copy.deepcopy(value)
    ports = (
        [
            {"name": "gcs-server", "containerPort": 6379},
            {"name": "dashboard", "containerPort": 8265},
            {"name": "client", "containerPort": 10001},
            {"name": "as-metrics", "containerPort": 44217},
            {"name": "dash-metrics", "containerPort": 44227},
        ]
        if head
        else []
    )
    ports.append({"name": "metrics", "containerPort": 8080})
    c: dict[str, Any] = {
        "name": container,
        "image": _image(v),
        "imagePullPolicy": v["image"]["pullPolicy"],
        "securityContext": copy.deepcopy(v["securityContext"]),
    }
    env = _env(v, head)
    if env:
        c["env"] = env
    c["ports"] = ports
    resources = copy.deepcopy(group.get("resources") or {})
    if gpus > 0:
        for kind in ("limits", "requests"):
            resources[kind] = {**(resources.get(kind) or {}), "nvidia.com/gpu": gpus}
    if resources:
        c["resources"] = resources
    c["volumeMounts"] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
    ]
    spec["containers"] = [c]
    shm: dict[str, Any] = {"medium": "Memory"}  # Ray's object store and NCCL live in /dev/shm
    if group.get("shmSize"):
        shm["sizeLimit"] = group["shmSize"]
    spec["volumes"] = [
        {"name": "dshm", "emptyDir": shm},
        {"name": "config", "configMap": {"name": run.config_map}},
    ]
    labels = {
        **_selector_labels(v, run),
        "app.kubernetes.io/component": component,
        **(v.get("podLabels") or {}),
    }
    return {"metadata": {"labels": labels, "annotations": annotations}, "spec": spec}


def _cluster_spec(v: dict, run: Run) -> dict:
    ray = v["ray"]
    spec: dict[str, Any] = {"rayVersion": str(ray["version"])}
    if ray["auth"]["enabled"]:
        spec["authOptions"] = {"mode": "token"}
        if ray["auth"].get("secretName"):
            spec["authOptions"]["secretName"] = ray["auth"]["secretName"]
    auto = ray["autoscaling"]
    spec["enableInTreeAutoscaling"] = bool(auto["enabled"])
    if auto["enabled"]:
        options = {"version": auto["version"], "idleTimeoutSeconds": int(auto["idleTimeoutSeconds"])}
        options["upscalingMode"] = auto["upscalingMode"]
        if auto.get("resources"):
            options["resources"] = copy.deepcopy(auto["resources"])
        options["securityContext"] = copy.deepcopy(v["securityContext"])
        spec["autoscalerOptions"] = options
    params = lambda p: {str(k): _go_string(x) for k, x in (p or {}).items()}  # noqa: E731
    spec["headGroupSpec"] = {
        "rayStartParams": params(ray["head"]["rayStartParams"]),
        "template": _pod_template(v, run, ray["head"], "ray-head", "ray-head", 0, head=True),
    }
    workers = []
    for key in ("cpuWorkers", "gpuWorkers"):
        g = ray[key]
        if not g.get("enabled"):
            continue
        gpus = int(g["gpus"]) if key == "gpuWorkers" else 0
        workers.append(
            {
                "groupName": g["groupName"],
                "replicas": int(g["replicas"]),
                "minReplicas": int(g["minReplicas"]),
                "maxReplicas": int(g["maxReplicas"]),
                "rayStartParams": params(g["rayStartParams"]),
                "template": _pod_template(
                    v, run, g, f"ray-worker-{g['groupName']}", "ray-worker", gpus, head=False
                ),
            }
        )
    if workers:
        spec["workerGroupSpecs"] = workers
    return spec


def rayjob(v: dict, run: Run) -> dict:
    """The chart's RayJob for a run (rayjob.yaml with its own cluster)."""
    jobs = v["jobs"]
    labels = {**_labels(v, run), "app.kubernetes.io/component": run.stage, "chuxin-ray/stage": run.stage}
    if jobs["kueue"]["queueName"]:
        labels["kueue.x-k8s.io/queue-name"] = jobs["kueue"]["queueName"]
    if jobs["kueue"]["priorityClass"]:
        labels["kueue.x-k8s.io/priority-class"] = jobs["kueue"]["priorityClass"]
    # Overrides go before --only/--from: argparse takes positionals in one run.
    argv = ["chuxin-ray", "pipeline", CONFIG_PATH, *map(str, jobs["overrides"] or []), *run.flags]
    spec: dict[str, Any] = {"entrypoint": shlex.join(argv), "submissionMode": jobs["submissionMode"]}
    if jobs["runtimeEnv"]:
        spec["runtimeEnvYAML"] = yaml.safe_dump(jobs["runtimeEnv"], sort_keys=False)
    spec["shutdownAfterJobFinishes"] = bool(jobs["shutdownAfterJobFinishes"])
    if jobs["shutdownAfterJobFinishes"]:
        spec["ttlSecondsAfterFinished"] = int(jobs["ttlSecondsAfterFinished"])
    if int(jobs["activeDeadlineSeconds"]) > 0:
        spec["activeDeadlineSeconds"] = int(jobs["activeDeadlineSeconds"])
    spec["backoffLimit"] = int(jobs["backoffLimit"])
    if jobs["suspend"] or jobs["kueue"]["queueName"]:
        spec["suspend"] = True
    if jobs["deletionStrategy"]:
        spec["deletionStrategy"] = copy.deepcopy(jobs["deletionStrategy"])
    spec["rayClusterSpec"] = _cluster_spec(v, run)
    if jobs["submissionMode"] == "K8sJobMode":
        # KubeRay fills in the `ray job submit` command; this template adds the restricted
        # securityContext and the release's labels, which the chart's NetworkPolicy admits.
        submitter: dict[str, Any] = {
            "name": "ray-job-submitter",
            "image": _image(v),
            "imagePullPolicy": v["image"]["pullPolicy"],
            "securityContext": copy.deepcopy(v["securityContext"]),
        }
        if jobs["submitterResources"]:
            submitter["resources"] = copy.deepcopy(jobs["submitterResources"])
        pod_spec: dict[str, Any] = {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": copy.deepcopy(v["podSecurityContext"]),
        }
        if v.get("imagePullSecrets"):
            pod_spec["imagePullSecrets"] = copy.deepcopy(v["imagePullSecrets"])
        pod_spec["containers"] = [submitter]
        spec["submitterPodTemplate"] = {
            "metadata": {"labels": {**_selector_labels(v, run), "app.kubernetes.io/component": "submitter"}},
            "spec": pod_spec,
        }
    metadata = {"name": run.name, "namespace": run.namespace, "labels": labels}
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": metadata, "spec": spec}


def config_map(v: dict, run: Run) -> dict:
    metadata = {"name": run.config_map, "namespace": run.namespace, "labels": _labels(v, run)}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {"config.yaml": run.config_text},
    }


# --------------------------------------------------------------------------------------------------
# From a config file to the objects
# --------------------------------------------------------------------------------------------------


def plan_run(
    config_path: str,
    overrides: list[str],
    values: dict,
    namespace: str,
    name: str | None = None,
    only: str | None = None,
    start: str | None = None,
) -> tuple[Run, Config]:
    """Validate the config (the same schema and overrides every stage takes) and name the run.
    Raises ConfigError or LaunchError before anything is created."""
    from chuxin_ray.pipeline import selected_stages

    cfg = load_config(config_path, overrides)
    start = start or values["jobs"].get("from") or None
    if only and start:
        raise LaunchError("--only and --from (jobs.from) exclude each other")
    selected_stages(cfg, start=start, only=only)  # --only/--from name stages the config has
    for key in ("access_key_id", "secret_access_key", "session_token"):
        if getattr(cfg.storage, key) is not None:
            raise LaunchError(
                f"config storage.{key} is set: the config lands in a ConfigMap that anyone who can read "
                f"namespace {namespace} can read; put the credential in a Secret and reference it "
                "with objectStorage.existingSecret (-f VALUES)"
            )
    # The ConfigMap holds the file with the overrides applied: what runs is what it shows.
    data = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    for item in overrides:
        apply_override(data, item)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    base = name or cfg.run.name
    job_name = f"{base}-{only}" if only else base
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job_name) or len(job_name) > MAX_RAYJOB_NAME:
        raise LaunchError(
            f"RayJob name {job_name!r} (from {'--name' if name else 'run.name'}{' and --only' if only else ''}) "
            f"must be a DNS-1035 label of at most {MAX_RAYJOB_NAME} characters (lowercase letters, digits, "
            "'-', starting with a letter): KubeRay names the RayCluster after it; choose one with --name"
        )
    flags = ["--only", only] if only else (["--from", start] if start else [])
    return Run(job_name, base, namespace, text, only or "pipeline", flags), cfg


def manifests(run: Run, values: dict) -> list[dict]:
    check_values(values)
    return [config_map(values, run), rayjob(values, run)]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's config.yaml) as `|` blocks, readable in --dry-run output."""


_Dumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def to_yaml(objects: list[dict]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def local_output_warning(cfg: Config) -> str | None:
    if "://" in cfg.run.output and not cfg.run.output.startswith("file://"):
        return None
    return (
        f"warning: run.output {cfg.run.output!r} is a local path: on the cluster it is a folder inside "
        "the pods, gone with the cluster; use s3://bucket/prefix to keep the outputs"
    )


# --------------------------------------------------------------------------------------------------
# The Kubernetes API
# --------------------------------------------------------------------------------------------------


def kube_namespace(kubeconfig: str | None, context: str | None) -> str | None:
    """The namespace of the kubeconfig context (or the in-cluster account); None when there is none.
    Reads files only: `--dry-run` uses it without contacting the cluster."""
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    try:
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
    except (ConfigException, OSError):
        if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(SA_NAMESPACE_FILE):
            return Path(SA_NAMESPACE_FILE).read_text().strip()
        return None
    chosen = next((c for c in contexts if c["name"] == context), None) if context else active
    if chosen is None:
        raise LaunchError(
            f"kubeconfig has no context {context!r}; it has: {', '.join(c['name'] for c in contexts)}"
        )
    return (chosen.get("context") or {}).get("namespace")


def kube_client(kubeconfig: str | None, context: str | None):
    """An ApiClient for the kubeconfig context (KUBECONFIG, ~/.kube/config) or the in-cluster account."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    configuration = client.Configuration()
    try:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    except (ConfigException, OSError) as e:
        if not os.environ.get("KUBERNETES_SERVICE_HOST"):
            raise LaunchError(
                f"no usable kubeconfig ({e}); set KUBECONFIG, --kubeconfig or --context, or use --dry-run"
            ) from None
        config.load_incluster_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def _server_message(e) -> str:
    try:
        body = json.loads(e.body)
        return str(body.get("message") or e.reason)
    except (TypeError, ValueError, AttributeError):
        return str(e.reason)


def api_error(e, verb: str, kind: str, name: str, namespace: str) -> LaunchError:
    """An ApiException as a message that names the object, the namespace and what to do."""
    what = f"{kind} {name}".rstrip() + f" in namespace {namespace}"
    msg = _server_message(e)
    if e.status == 401:
        return LaunchError(f"cannot {verb} {what}: the API server rejected your credentials (401): {msg}")
    if e.status == 403:
        return LaunchError(
            f"cannot {verb} {what}: forbidden (403): {msg}. The Role chuxin-ray-launcher in "
            "k8s/rbac.yaml grants what launch and status need; ask for a RoleBinding to it"
        )
    if e.status == 404 and verb == "create":
        if "namespace" in msg:
            return LaunchError(
                f"cannot create {what}: namespace {namespace} not found ({msg}); see k8s/README.md"
            )
        return LaunchError(
            f"cannot create {what}: the API server does not serve {kind} ({msg}): is the KubeRay operator "
            "v1.7.0 installed with its CRDs? See k8s/README.md"
        )
    if e.status == 404:
        return LaunchError(f"{what} not found (kubectl get {kind.lower()}s -n {namespace})")
    if e.status == 409:
        return LaunchError(f"{what} already exists (409): {msg}")
    if e.status == 422:
        return LaunchError(f"the API server rejected {what} as invalid (422): {msg}")
    return LaunchError(f"cannot {verb} {what}: HTTP {e.status} {msg}")


def _unreachable(api, e) -> LaunchError:
    return LaunchError(f"cannot reach the Kubernetes API server at {api.configuration.host}: {e}")


def _exists_message(name: str, namespace: str, job: dict) -> str:
    state = (job.get("status") or {}).get("jobStatus") or "no status yet"
    return (
        f"RayJob {name} already exists in namespace {namespace} (job status: {state}). Follow it with "
        f"`chuxin-ray status {name} -n {namespace}`; to run again, delete it (`kubectl delete rayjob "
        f"{name} -n {namespace}`; its ConfigMap goes with it) or choose another name (--name)"
    )


def create(api, objects: list[dict]) -> dict:
    """Create the ConfigMap, then the RayJob, then make the RayJob the ConfigMap's owner, so deleting
    the RayJob deletes its config. The ConfigMap goes first: the pods mount it at start. A RayJob that
    cannot be created takes the ConfigMap just made with it. Returns the created RayJob."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    cm, job = objects
    ns, cm_name, job_name = job["metadata"]["namespace"], cm["metadata"]["name"], job["metadata"]["name"]
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    try:
        try:
            core.create_namespaced_config_map(ns, cm)
        except ApiException as e:
            if e.status != 409:
                raise api_error(e, "create", "ConfigMap", cm_name, ns) from None
            existing = get_rayjob(api, ns, job_name, missing_ok=True)
            if existing is not None:
                raise LaunchError(_exists_message(job_name, ns, existing)) from None
            raise LaunchError(
                f"ConfigMap {cm_name} already exists in namespace {ns} but RayJob {job_name} does not "
                f"(left by an interrupted launch?): delete it (`kubectl delete configmap {cm_name} -n {ns}`) "
                "or choose another name (--name)"
            ) from None
        try:
            created = custom.create_namespaced_custom_object(*RAYJOB[:2], ns, RAYJOB[2], job)
        except ApiException as e:
            try:
                core.delete_namespaced_config_map(cm_name, ns)
            except ApiException:
                print(f"warning: could not delete ConfigMap {cm_name} in namespace {ns}", file=sys.stderr)
            if e.status == 409:
                existing = get_rayjob(api, ns, job_name, missing_ok=True) or {}
                raise LaunchError(_exists_message(job_name, ns, existing)) from None
            raise api_error(e, "create", "RayJob", job_name, ns) from None
        owner = {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "name": job_name,
            "uid": created["metadata"]["uid"],
        }
        try:
            core.patch_namespaced_config_map(
                cm_name,
                ns,
                {"metadata": {"ownerReferences": [owner]}},
                _content_type="application/merge-patch+json",
            )
        except ApiException as e:
            print(
                f"warning: ConfigMap {cm_name} in namespace {ns} will outlive RayJob {job_name}: "
                f"setting its owner failed: {_server_message(e)}",
                file=sys.stderr,
            )
        return created
    except HTTPError as e:
        raise _unreachable(api, e) from None


def get_rayjob(api, namespace: str, name: str, missing_ok: bool = False) -> dict | None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return client.CustomObjectsApi(api).get_namespaced_custom_object(
            *RAYJOB[:2], namespace, RAYJOB[2], name
        )
    except ApiException as e:
        if e.status == 404 and missing_ok:
            return None
        raise api_error(e, "get", "RayJob", name, namespace) from None
    except HTTPError as e:
        raise _unreachable(api, e) from None


def _list(api, path: str, namespace: str, **query: str) -> list[dict]:
    """Items of a core/v1 list as plain JSON (the typed models add nothing here)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    core = client.CoreV1Api(api)
    call = {"pods": core.list_namespaced_pod, "events": core.list_namespaced_event}[path]
    try:
        resp = call(namespace, _preload_content=False, **query)
    except ApiException as e:
        raise api_error(e, "list", path, "", namespace) from None
    except HTTPError as e:
        raise _unreachable(api, e) from None
    return json.loads(resp.data).get("items") or []


def rayservices(api, namespace: str, job: dict) -> list[dict]:
    """The RayServices of the job's release (the chart's synthesis LLM), by its instance label; none when
    the release has none, or when listing them is not allowed (status stays useful without them)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    instance = ((job.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/instance")
    if not instance:
        return []
    try:
        found = client.CustomObjectsApi(api).list_namespaced_custom_object(
            *RAYSERVICE[:2], namespace, RAYSERVICE[2], label_selector=f"app.kubernetes.io/instance={instance}"
        )
    except (ApiException, HTTPError):
        return []
    return found.get("items") or []


# --------------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------------

TERMINAL_DEPLOYMENT = ("Complete", "Failed", "ValidationFailed")  # KubeRay v1.7.0 JobDeploymentStatus
_NORMAL_WAITING = ("ContainerCreating", "PodInitializing")


def pod_problem(pod: dict) -> str | None:
    """Why a pod is not running, from its status: unschedulable, image pulls, crashes, OOM kills."""
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return f"{cond.get('reason', 'Unschedulable')}: {cond.get('message', '')}".strip()
    containers = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
    for cs in containers:
        for state in (cs.get("state") or {}, cs.get("lastState") or {}):
            term = state.get("terminated") or {}
            if term.get("reason") == "OOMKilled":
                return (
                    f"{cs['name']}: OOMKilled (restarts {cs.get('restartCount', 0)}): the container hit "
                    "its memory limit; raise the group's resources.limits.memory"
                )
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") and waiting["reason"] not in _NORMAL_WAITING:
            return f"{cs['name']}: {waiting['reason']}: {waiting.get('message', '')}".strip().rstrip(":")
    if status.get("phase") == "Failed":
        return f"{status.get('reason', 'Failed')}: {status.get('message', '')}".strip()
    return None


def _latest_warnings(events: list[dict]) -> dict[str, str]:
    latest: dict[str, tuple[str, str]] = {}
    for ev in events:
        if ev.get("type") != "Warning":
            continue
        pod = (ev.get("involvedObject") or {}).get("name", "")
        when = ev.get("lastTimestamp") or ev.get("eventTime") or ""
        if pod not in latest or when >= latest[pod][0]:
            latest[pod] = (when, f"{ev.get('reason', '')}: {ev.get('message', '')}")
    return {pod: text for pod, (_, text) in latest.items()}


def _config_of(api, namespace: str, job: dict) -> Config | None:
    """The run's config from the RayJob's ConfigMap (the `config` volume of its head pod)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    head = ((job.get("spec") or {}).get("rayClusterSpec") or {}).get("headGroupSpec") or {}
    volumes = ((head.get("template") or {}).get("spec") or {}).get("volumes") or []
    name = next(
        (v["configMap"]["name"] for v in volumes if v.get("name") == "config" and "configMap" in v), None
    )
    if name is None:
        return None
    try:
        resp = client.CoreV1Api(api).read_namespaced_config_map(name, namespace, _preload_content=False)
        text = (json.loads(resp.data).get("data") or {}).get("config.yaml", "")
        return validate_config(yaml.safe_load(text), origin=f"ConfigMap {name}")
    except (ApiException, HTTPError, ConfigError, yaml.YAMLError, TypeError):
        return None


def _outputs(cfg: Config, entrypoint: str) -> list[tuple[str, str]]:
    from chuxin_ray import storage
    from chuxin_ray.pipeline import selected_stages

    argv = shlex.split(entrypoint)
    flag = lambda f: argv[argv.index(f) + 1] if f in argv[:-1] else None  # noqa: E731
    try:
        names = selected_stages(cfg, start=flag("--from"), only=flag("--only"))
    except ConfigError:
        names = [s for s in STAGES if getattr(cfg, s, None) is not None]
    rows = []
    for stage in names:
        uri = cfg.stage_output(stage)
        try:
            manifest = storage.read_manifest(storage.resolve(uri, cfg.storage))
        except Exception as e:  # any storage failure is reported, never fatal to `status`
            rows.append((stage, f"cannot read {uri}: {type(e).__name__}: {str(e)[:160]}"))
            continue
        rows.append(
            (stage, f"complete, finished {manifest['finished_at']}" if manifest else f"not complete ({uri})")
        )
    return rows


def status_report(api, namespace: str, job: dict, outputs: bool = True) -> str:
    """The table `chuxin-ray status` prints."""
    name = job["metadata"]["name"]
    st = job.get("status") or {}
    cluster = st.get("rayClusterName") or ""
    rows = [
        ("RayJob", f"{namespace}/{name}"),
        ("job status", st.get("jobStatus") or "-"),
        ("deployment status", st.get("jobDeploymentStatus") or "-"),
        ("ray cluster", cluster or "-"),
        ("dashboard URL", st.get("dashboardURL") or "-"),
        ("started", st.get("startTime") or "-"),
        ("ended", st.get("endTime") or "-"),
        ("message", st.get("message") or st.get("reason") or "-"),
    ]
    if "failed" in st or "succeeded" in st:
        rows.append(("attempts", f"{st.get('succeeded', 0)} succeeded, {st.get('failed', 0)} failed"))
    for service in rayservices(api, namespace, job):
        sst = service.get("status") or {}
        endpoints = sst.get("numServeEndpoints")
        state = sst.get("serviceStatus") or "-"
        rows.append(
            (
                "LLM RayService",
                f"{service['metadata']['name']}: {state}"
                + (f", {endpoints} serve endpoints" if endpoints is not None else ""),
            )
        )
    lines = [f"{k:<19} {v}" for k, v in rows]
    if cluster:
        pods = _list(api, "pods", namespace, label_selector=f"ray.io/cluster={cluster}")
        pods += _list(api, "pods", namespace, label_selector=f"job-name={name}")  # the K8sJobMode submitter
        warnings = _latest_warnings(_list(api, "events", namespace, field_selector="type=Warning"))
        phases: dict[str, int] = {}
        for pod in pods:
            phase = (pod.get("status") or {}).get("phase", "Unknown")
            phases[phase] = phases.get(phase, 0) + 1
        summary = ", ".join(f"{n} {p.lower()}" for p, n in sorted(phases.items()))
        lines.append(f"{'pods':<19} {len(pods)}{f' ({summary})' if pods else ''}")
        for pod in pods:
            pname = pod["metadata"]["name"]
            problem = pod_problem(pod)
            phase = (pod.get("status") or {}).get("phase", "Unknown")
            if problem or phase not in ("Running", "Succeeded"):
                lines.append(f"  {pname:<40} {phase:<9} {problem or warnings.get(pname, '')}".rstrip())
    if outputs:
        cfg = _config_of(api, namespace, job)
        if cfg is not None:
            lines.append(f"{'outputs':<19} {cfg.run.output}")
            entrypoint = (job.get("spec") or {}).get("entrypoint", "")
            lines += [f"  {stage:<17} {state}" for stage, state in _outputs(cfg, entrypoint)]
    if cluster:
        lines.append(
            f"Ray dashboard: kubectl port-forward -n {namespace} svc/{cluster}-head-svc 8265:8265, "
            "then http://127.0.0.1:8265"
        )
    if (job.get("spec") or {}).get("submissionMode", "K8sJobMode") == "K8sJobMode":
        lines.append(f"driver log:    kubectl logs -n {namespace} -f job/{name}")
    return "\n".join(lines)


def watch(api, namespace: str, name: str, interval: float, outputs: bool) -> int:
    """Print each change of (jobStatus, jobDeploymentStatus) until the deployment is terminal, then the
    whole table. 0 when the job SUCCEEDED."""
    seen = None
    while True:
        job = get_rayjob(api, namespace, name)
        st = job.get("status") or {}
        state = (st.get("jobStatus") or "-", st.get("jobDeploymentStatus") or "-")
        if state != seen:
            seen = state
            print(f"{time.strftime('%H:%M:%S')}  {name}: job {state[0]}, deployment {state[1]}", flush=True)
        if state[1] in TERMINAL_DEPLOYMENT:
            print(status_report(api, namespace, job, outputs))
            return 0 if state[0] == "SUCCEEDED" else 1
        time.sleep(interval)


# --------------------------------------------------------------------------------------------------
# The commands (cli.py registers them)
# --------------------------------------------------------------------------------------------------


def _kube_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", help="default: the kubeconfig context's namespace, else `default`")
    p.add_argument("--context", help="kubeconfig context; default: the current one")
    p.add_argument("--kubeconfig", help="kubeconfig file; default: KUBECONFIG, else ~/.kube/config")


def add_parsers(sub) -> None:
    launch_help = "create the chart's ConfigMap + RayJob for CONFIG on a Kubernetes cluster with KubeRay"
    p = sub.add_parser("launch", help=launch_help, description=launch_help)
    p.add_argument("config", metavar="CONFIG", help="YAML config file (validated before anything is created)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted config overrides, before any --flag"
    )
    _kube_flags(p)
    p.add_argument(
        "--image", help="training image REPO[:TAG] or REPO@sha256:...; default: chuxin-ray:<version>"
    )
    p.add_argument(
        "--service-account", help="ServiceAccount of the Ray pods; default: chuxin-ray (from k8s/)"
    )
    p.add_argument(
        "-f", "--values", action="append", default=[], metavar="VALUES",
        help="a values file of the Helm chart (ray.*, jobs.*, objectStorage.*, image, ...); repeatable",
    )  # fmt: skip
    p.add_argument("--name", help="RayJob name; default: run.name (plus -STAGE with --only)")
    p.add_argument("--only", metavar="STAGE", help="run only this stage")
    p.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage")
    p.add_argument("--dry-run", action="store_true", help="print the objects as YAML; contact no cluster")
    status_help = "the state of a launched RayJob: status, pod problems, stage outputs, dashboard"
    s = sub.add_parser("status", help=status_help, description=status_help)
    s.add_argument("name", metavar="RUN", help="RayJob name (what launch printed)")
    _kube_flags(s)
    s.add_argument(
        "--watch", action="store_true", help="poll until the job ends; exit 0 only if it SUCCEEDED"
    )
    s.add_argument("--interval", type=float, default=10.0, help="seconds between polls (default 10)")
    s.add_argument("--no-outputs", action="store_true", help="do not read stage manifests from storage")


def run_command(args: argparse.Namespace) -> int:
    try:
        return _launch(args) if args.command == "launch" else _status(args)
    except (LaunchError, ConfigError) as e:
        print(f"chuxin-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _launch(args: argparse.Namespace) -> int:
    values = load_values(args.values)
    if args.image:
        set_image(values, args.image)
    if args.service_account:
        values["serviceAccount"]["name"] = args.service_account
    namespace = args.namespace or kube_namespace(args.kubeconfig, args.context) or "default"
    run, cfg = plan_run(args.config, args.overrides, values, namespace, args.name, args.only, args.start)
    objects = manifests(run, values)
    warning = local_output_warning(cfg)
    if warning:
        print(warning, file=sys.stderr)
    if args.dry_run:
        sys.stdout.write(to_yaml(objects))
        return 0
    api = kube_client(args.kubeconfig, args.context)
    create(api, objects)
    print(f"created ConfigMap {namespace}/{run.config_map} and RayJob {namespace}/{run.name}")
    print(f"follow it:  chuxin-ray status {run.name} -n {namespace} --watch")
    if values["jobs"]["submissionMode"] == "K8sJobMode":
        print(f"driver log: kubectl logs -n {namespace} -f job/{run.name}")
    return 0


def _status(args: argparse.Namespace) -> int:
    namespace = args.namespace or kube_namespace(args.kubeconfig, args.context) or "default"
    api = kube_client(args.kubeconfig, args.context)
    if args.watch:
        return watch(api, namespace, args.name, args.interval, not args.no_outputs)
    job = get_rayjob(api, namespace, args.name)
    print(status_report(api, namespace, job, outputs=not args.no_outputs))
    return 0
