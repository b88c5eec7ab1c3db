"""The Helm chart, rendered by the real `helm` under several value sets and checked object by object.

Core kinds are validated with kubernetes-validate (strict) for Kubernetes 1.30 and 1.37; ray.io/v1
kinds against the openAPIV3Schema of the KubeRay v1.7.0 CRDs in ../shared/kuberay-crds, with unknown
fields rejected as `kubectl apply --validate=strict` would. Then what matters for a run: entrypoints
the real CLI parser accepts, GPU limits, the config our schema loads, no credential values, non-root
pods, /dev/shm, monitoring selectors that match the pods, the LLM's serve config.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from chuxin_ray.cli import build_parser
from chuxin_ray.config import STAGES, validate_config

try:  # tests/ is on sys.path through its conftest.py (pytest's default import mode) ...
    from helm_tools import helm_binary
except ImportError:  # ... or the repository root is (tests/ as a package, importlib mode)
    from tests.helm_tools import helm_binary

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "chuxin-ray"
CRDS = REPO / ".." / "shared" / "kuberay-crds"
K8S_DIR = REPO / "k8s"
K8S_VERSIONS = ("1.30", "1.37")
RELEASE, NAMESPACE = "emb", "chuxin"
FULLNAME = "emb-chuxin-ray"
CONFIG_PATH = "/etc/chuxin-ray/config.yaml"

# A credential a careless chart would leak: it appears only as what a Secret would hold, never in
# values; the chart must reference the Secret's keys and the rendered output must not contain it.
CANARY_SECRET = "chuxin-canary-secret-4b7e19d2"
CANARY_KEY_ID = "AKIACHUXINCANARY0001"

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "gpu-training": {
        "image": {"repository": "ghcr.io/example/chuxin-ray", "tag": "0.1.0"},
        "ray": {
            "gpuWorkers": {
                "gpus": 8,
                "replicas": 1,
                "minReplicas": 1,
                "maxReplicas": 4,
                "shmSize": "64Gi",
                "resources": {
                    "requests": {"cpu": "48", "memory": "480Gi"},
                    "limits": {"cpu": "48", "memory": "480Gi"},
                },
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                "affinity": {
                    "podAntiAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {
                                "weight": 100,
                                "podAffinityTerm": {
                                    "topologyKey": "kubernetes.io/hostname",
                                    "labelSelector": {
                                        "matchLabels": {"app.kubernetes.io/component": "ray-worker-gpu"}
                                    },
                                },
                            }
                        ]
                    }
                },
            },
        },
        "jobs": {"from": "pretrain", "activeDeadlineSeconds": 86400},
    },
    "per-stage": {
        "jobs": {
            "perStage": True,
            "stages": ["ingest", "tokenize", "pretrain", "synthesize"],
            "overrides": ["ingest.rules.min_chars=20", "tokenize.max_length=256"],
        },
    },
    "shared-cluster": {
        "sharedCluster": {"enabled": True},
        "jobs": {"perStage": True, "stages": ["ingest", "pretrain"]},
    },
    "existing-cluster": {
        "sharedCluster": {"enabled": True, "existingName": "team-ray"},
        "jobs": {"submissionMode": "HTTPMode"},
    },
    "llm": {
        "llm": {
            "enabled": True,
            "modelId": "qwen2.5-14b",
            "modelSource": "s3://models/qwen2.5-14b-instruct",
            "tensorParallelSize": 2,
            "maxModelLen": 4096,
            "acceleratorType": "A100",
            "engineKwargs": {"gpu_memory_utilization": 0.9},
            "workers": {"gpus": 2},
        },
    },
    "llm-external": {"llm": {"externalUrl": "http://vllm.inference.svc:8000/v1"}},
    "monitoring": {
        "monitoring": {
            "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "chuxin-ray"}},
            "grafanaHost": "http://kube-prometheus-stack-grafana.monitoring.svc:80",
            "grafanaIframeHost": "http://127.0.0.1:3000",
            "prometheusHost": "http://kube-prometheus-stack-prometheus.monitoring.svc:9090",
        },
        "llm": {"enabled": True},
    },
    "auth": {
        "ray": {"auth": {"enabled": True}},
        "llm": {"enabled": True},
        "sharedCluster": {"enabled": True},
    },
    "secret-refs": {
        "objectStorage": {
            "endpoint": "https://minio.storage.svc:9000",
            "region": "cn-north-1",
            "bucket": "corpus",
            "prefix": "chuxin/runs",
            "existingSecret": {
                "name": "s3-creds",
                "accessKeyIdKey": "access-key",
                "secretAccessKeyKey": "secret-key",
                "sessionTokenKey": "session-token",
            },
        },
        "serviceAccount": {
            "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/chuxin"}
        },
        "extraEnv": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
    },
    "kueue": {
        "jobs": {"kueue": {"queueName": "chuxin-ray", "priorityClass": "research"}},
        "ray": {
            "autoscaling": {"enabled": False},
            "cpuWorkers": {"replicas": 2, "minReplicas": 2, "maxReplicas": 2},
        },
    },
    "sidecar-mode": {"jobs": {"submissionMode": "SidecarMode"}, "networkPolicy": {"enabled": False}},
    "config-file": {"configYaml": (REPO / "jobs" / "tiny.yaml").read_text(encoding="utf-8")},
}


# --------------------------------------------------------------------------------------------------
# helm
# --------------------------------------------------------------------------------------------------


def _helm(*args: str, values: dict | None = None, tmp: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [str(helm_binary()), *args]
    if values:
        assert tmp is not None
        path = tmp / "values.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
        cmd += ["-f", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@functools.cache
def render_text(name: str) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = _helm(
            "template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", "1.37.0",
            values=VALUE_SETS[name], tmp=Path(tmp),
        )  # fmt: skip
    assert out.returncode == 0, f"helm template ({name}) failed:\n{out.stderr}"
    return out.stdout


def rendered(name: str) -> list[dict]:
    docs = [d for d in yaml.load_all(render_text(name), Loader=Loader) if d]
    return copy.deepcopy(docs)


def render_error(values: dict, tmp: Path, *extra: str) -> str:
    out = _helm("template", RELEASE, str(CHART), "-n", NAMESPACE, *extra, values=values, tmp=tmp)
    assert out.returncode != 0, f"rendering should have failed for {values}"
    return out.stderr


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


# --------------------------------------------------------------------------------------------------
# walking the rendered objects
# --------------------------------------------------------------------------------------------------


def cluster_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "RayJob":
        return [doc["spec"]["rayClusterSpec"]] if "rayClusterSpec" in doc["spec"] else []
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    if doc["kind"] == "RayService":
        return [doc["spec"]["rayClusterConfig"]]
    return []


def ray_pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(group, pod template) of every Ray head and worker the object describes."""
    out = []
    for spec in cluster_specs(doc):
        out.append(("head", spec["headGroupSpec"]["template"]))
        out += [(g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return out


def all_pod_templates(doc: dict) -> list[dict]:
    pods = [t for _, t in ray_pod_templates(doc)]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        pods.append(doc["spec"]["submitterPodTemplate"])
    return pods


def group(doc: dict, name: str) -> dict:
    (spec,) = cluster_specs(doc)
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == name)


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def config_map_config(docs: list[dict]) -> dict:
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == f"{FULLNAME}-config"]
    return yaml.safe_load(cm["data"]["config.yaml"])


def parse_entrypoint(entrypoint: str):
    argv = shlex.split(entrypoint)
    assert argv[0] == "chuxin-ray"
    return build_parser().parse_args(argv[1:])


# --------------------------------------------------------------------------------------------------
# schemas
# --------------------------------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """Reject unknown fields: an object schema with `properties` gets additionalProperties false,
    unless Kubernetes keeps unknown fields there (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
        if crd["spec"]["names"]["kind"] != kind:
            continue
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = _strict(version["schema"]["openAPIV3Schema"])
        return jsonschema.Draft7Validator(schema)
    raise LookupError(f"no CRD for kind {kind} in {CRDS}")


def validate_object(doc: dict) -> None:
    api = doc["apiVersion"]
    if api == "ray.io/v1":
        errors = sorted(crd_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(
            f"{doc['kind']}/{doc['metadata']['name']} {'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in errors[:10]
        )
    elif api == "monitoring.coreos.com/v1":
        assert doc["kind"] == "PodMonitor"
        assert doc["spec"]["selector"]["matchLabels"]
        assert all(ep["port"] for ep in doc["spec"]["podMetricsEndpoints"])
    else:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_crd_validation_rejects_unknown_fields_and_wrong_types():
    (job,) = by_kind(rendered("defaults"), "RayJob")
    validate_object(job)
    misspelt = copy.deepcopy(job)
    misspelt["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(AssertionError, match="rayStartParam"):
        validate_object(misspelt)
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    with pytest.raises(AssertionError, match="maxReplicas"):
        validate_object(wrong_type)


# --------------------------------------------------------------------------------------------------
# every value set
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_lint_strict(name, tmp_path):
    out = _helm("lint", "--strict", str(CHART), "-n", NAMESPACE, values=VALUE_SETS[name], tmp=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_object_validates(name):
    docs = rendered(name)
    assert docs
    for doc in docs:
        validate_object(doc)
        assert len(doc["metadata"]["name"]) <= 63
        if doc["kind"] in ("RayJob", "RayService"):
            assert len(doc["metadata"]["name"]) <= 47  # KubeRay: 53-char cluster name - 6-char suffix


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_config_map_loads_with_our_schema(name):
    docs = rendered(name)
    cfg = validate_config(config_map_config(docs), origin=f"ConfigMap ({name})")
    assert cfg.run.output.startswith(("s3://", "runs/"))
    # Every Ray pod mounts that ConfigMap where the entrypoint reads it.
    for doc in docs:
        for _, pod in ray_pod_templates(doc):
            if doc["kind"] == "RayService":
                continue
            vols = {v["name"]: v for v in pod["spec"]["volumes"]}
            assert vols["config"]["configMap"]["name"] == f"{FULLNAME}-config"
            mounts = {m["name"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
            assert str(Path(mounts["config"]["mountPath"]) / "config.yaml") == CONFIG_PATH


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_pods_run_as_non_root(name):
    docs = rendered(name)
    pods = [p for d in docs for p in all_pod_templates(d)]
    assert pods or name == "existing-cluster"  # HTTPMode on someone else's cluster: no pod of ours
    for pod in pods:
        spec = pod["spec"]
        ctx = spec["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert sc.get("privileged") is not True
        assert not any("hostPath" in v for v in spec.get("volumes", []))
        assert not spec.get("hostNetwork")
    for doc in docs:
        for spec in cluster_specs(doc):
            if spec.get("enableInTreeAutoscaling"):  # KubeRay's autoscaler sidecar
                sc = spec["autoscalerOptions"]["securityContext"]
                assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_ray_container_has_memory_backed_dev_shm(name):
    for doc in rendered(name):
        for _, pod in ray_pod_templates(doc):
            vols = {v["name"]: v for v in pod["spec"]["volumes"]}
            (shm,) = [m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert vols[shm["name"]]["emptyDir"]["medium"] == "Memory"
            assert vols[shm["name"]]["emptyDir"]["sizeLimit"]


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_no_credential_value_and_nothing_exposed(name):
    text = render_text(name)
    assert CANARY_SECRET not in text and CANARY_KEY_ID not in text
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)
    docs = rendered(name)
    assert not by_kind(docs, "Secret")
    assert not by_kind(docs, "Ingress")
    assert not by_kind(docs, "Service")  # KubeRay makes the ClusterIP head/serve Services itself
    secret_env = {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "HF_TOKEN",
        "RAY_AUTH_TOKEN",
    }
    for doc in docs:
        for spec in cluster_specs(doc):
            assert "serviceType" not in spec["headGroupSpec"]
            assert not spec["headGroupSpec"].get("enableIngress")
        for pod in all_pod_templates(doc):
            for c in pod["spec"]["containers"]:
                for var in c.get("env", []):
                    if var["name"] in secret_env:
                        assert "value" not in var and "secretKeyRef" in var["valueFrom"], var


# --------------------------------------------------------------------------------------------------
# what each value set is for
# --------------------------------------------------------------------------------------------------


def test_defaults_one_pipeline_job_with_head_cpu_and_autoscaling_gpu_groups():
    docs = rendered("defaults")
    (job,) = by_kind(docs, "RayJob")
    assert job["metadata"]["name"] == FULLNAME
    assert job["spec"]["entrypoint"] == f"chuxin-ray pipeline {CONFIG_PATH}"
    args = parse_entrypoint(job["spec"]["entrypoint"])
    assert (args.command, args.config, args.only, args.start) == ("pipeline", CONFIG_PATH, None, None)
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 600
    assert spec["backoffLimit"] == 2 and "suspend" not in spec
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert [g["groupName"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]] == ["cpu", "gpu"]
    assert "nvidia.com/gpu" not in json.dumps(group(job, "cpu"))
    gpu = group(job, "gpu")
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (0, 4)
    res = gpu["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1
    pod = gpu["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # The synthesize stage has no LLM unless one is configured.
    assert not by_kind(docs, "RayService")
    for _, t in ray_pod_templates(job):
        assert "CHUXIN_LLM_URL" not in env_of(t["spec"]["containers"][0])
    assert not by_kind(docs, "RayCluster")
    (np,) = by_kind(docs, "NetworkPolicy")
    assert np["spec"]["policyTypes"] == ["Ingress"]


def test_gpu_training_values_reach_the_gpu_group():
    (job,) = by_kind(rendered("gpu-training"), "RayJob")
    gpu = group(job, "gpu")
    c = gpu["template"]["spec"]["containers"][0]
    assert c["image"] == "ghcr.io/example/chuxin-ray:0.1.0"
    assert c["resources"]["limits"] == {"cpu": "48", "memory": "480Gi", "nvidia.com/gpu": 8}
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert gpu["template"]["spec"]["affinity"]["podAntiAffinity"]
    vols = {v["name"]: v for v in gpu["template"]["spec"]["volumes"]}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (1, 1, 4)
    args = parse_entrypoint(job["spec"]["entrypoint"])
    assert args.start == "pretrain" and args.only is None
    assert job["spec"]["activeDeadlineSeconds"] == 86400


def test_per_stage_jobs_run_only_their_stage_with_overrides():
    docs = rendered("per-stage")
    jobs = by_kind(docs, "RayJob")
    stages = VALUE_SETS["per-stage"]["jobs"]["stages"]
    assert [j["metadata"]["name"] for j in jobs] == [f"{FULLNAME}-{s}" for s in stages]
    for job, stage in zip(jobs, stages, strict=True):
        args = parse_entrypoint(job["spec"]["entrypoint"])
        assert (args.command, args.config, args.only) == ("pipeline", CONFIG_PATH, stage)
        assert args.overrides == VALUE_SETS["per-stage"]["jobs"]["overrides"]
        assert job["metadata"]["labels"]["chuxin-ray/stage"] == stage
        assert "rayClusterSpec" in job["spec"]


def test_shared_cluster_jobs_attach_with_cluster_selector():
    docs = rendered("shared-cluster")
    (cluster,) = by_kind(docs, "RayCluster")
    assert cluster["metadata"]["name"] == f"{FULLNAME}-cluster"
    assert [g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]] == ["cpu", "gpu"]
    jobs = by_kind(docs, "RayJob")
    assert len(jobs) == 2
    for job in jobs:
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        assert "rayClusterSpec" not in job["spec"]
        assert job["spec"]["shutdownAfterJobFinishes"] is False
        assert "ttlSecondsAfterFinished" not in job["spec"]

    docs = rendered("existing-cluster")
    assert not by_kind(docs, "RayCluster")
    (job,) = by_kind(docs, "RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "team-ray"}
    assert job["spec"]["submissionMode"] == "HTTPMode"
    assert "submitterPodTemplate" not in job["spec"]


def test_llm_rayservice_serves_build_openai_app_and_the_pipeline_gets_its_url():
    docs = rendered("llm")
    (svc,) = by_kind(docs, "RayService")
    assert svc["metadata"]["name"] == f"{FULLNAME}-llm"
    serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    (llm,) = app["args"]["llm_configs"]
    assert llm["model_loading_config"] == {
        "model_id": "qwen2.5-14b",
        "model_source": "s3://models/qwen2.5-14b-instruct",
    }
    assert llm["engine_kwargs"] == {
        "tensor_parallel_size": 2,
        "max_model_len": 4096,
        "gpu_memory_utilization": 0.9,
    }
    assert llm["accelerator_type"] == "A100"
    assert llm["deployment_config"]["autoscaling_config"]["min_replicas"] == 1
    assert llm["deployment_config"]["autoscaling_config"]["max_replicas"] == 2
    # The stock Ray LLM image, not the training image; one tensor-parallel replica per pod.
    for _, pod in ray_pod_templates(svc):
        assert pod["spec"]["containers"][0]["image"].startswith("rayproject/ray-llm:2.60.0-")
    (workers,) = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    # KubeRay's Serve Service for a RayService is "<name>-serve-svc" on port 8000.
    url = f"http://{FULLNAME}-llm-serve-svc.{NAMESPACE}.svc:8000/v1"
    (job,) = by_kind(docs, "RayJob")
    for _, pod in ray_pod_templates(job):
        assert env_of(pod["spec"]["containers"][0])["CHUXIN_LLM_URL"]["value"] == url

    (job,) = by_kind(rendered("llm-external"), "RayJob")
    for _, pod in ray_pod_templates(job):
        assert (
            env_of(pod["spec"]["containers"][0])["CHUXIN_LLM_URL"]["value"]
            == "http://vllm.inference.svc:8000/v1"
        )


def _labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_monitoring_selects_the_release_pods_and_embeds_grafana():
    docs = rendered("monitoring")
    (pm,) = by_kind(docs, "PodMonitor")
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = pm["spec"]["selector"]["matchLabels"]
    ports = {ep["port"] for ep in pm["spec"]["podMetricsEndpoints"]}
    assert ports == {"metrics", "as-metrics", "dash-metrics"}
    ray_pods = [(d, g, p) for d in docs for g, p in ray_pod_templates(d)]
    assert {d["kind"] for d, _, _ in ray_pods} == {"RayJob", "RayService"}
    for doc, grp, pod in ray_pods:
        assert _labels_match(selector, pod["metadata"]["labels"]), (doc["kind"], grp)
        named = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        assert named["metrics"] == 8080  # Ray's metrics export port
        if grp == "head":
            assert (named["as-metrics"], named["dash-metrics"]) == (44217, 44227)
            env = env_of(pod["spec"]["containers"][0])
            assert (
                env["RAY_GRAFANA_HOST"]["value"] == "http://kube-prometheus-stack-grafana.monitoring.svc:80"
            )
            assert env["RAY_GRAFANA_IFRAME_HOST"]["value"] == "http://127.0.0.1:3000"
            assert (
                env["RAY_PROMETHEUS_HOST"]["value"]
                == "http://kube-prometheus-stack-prometheus.monitoring.svc:9090"
            )
    # The NetworkPolicy covers the same pods and lets Prometheus reach the metrics ports.
    (np,) = by_kind(docs, "NetworkPolicy")
    for _, _, pod in ray_pods:
        assert _labels_match(np["spec"]["podSelector"]["matchLabels"], pod["metadata"]["labels"])
    allowed = {p["port"] for rule in np["spec"]["ingress"] for p in rule.get("ports", [])}
    assert {8080, 44217, 44227, 8265} <= allowed

    (dash,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(dash["data"]["chuxin-ray.json"])
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p["targets"])
    for metric in (
        "ray_data_output_rows",
        "ray_chuxin_train_loss",
        "ray_chuxin_train_tokens_total",
        "ray_node_gpus_utilization",
    ):
        assert metric in exprs
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])


def test_submitter_pod_is_ours_and_labelled_for_the_network_policy():
    docs = rendered("defaults")
    (job,) = by_kind(docs, "RayJob")
    sub = job["spec"]["submitterPodTemplate"]
    assert sub["spec"]["restartPolicy"] == "Never"
    assert (
        sub["spec"]["containers"][0]["image"]
        == f"chuxin-ray:{yaml.safe_load((CHART / 'Chart.yaml').read_text())['appVersion']}"
    )
    assert "command" not in sub["spec"]["containers"][0]  # KubeRay fills in `ray job submit`
    (np,) = by_kind(docs, "NetworkPolicy")
    assert _labels_match(
        np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"], sub["metadata"]["labels"]
    )
    (job,) = by_kind(rendered("sidecar-mode"), "RayJob")
    assert "submitterPodTemplate" not in job["spec"]  # KubeRay rejects it in SidecarMode


def test_auth_sets_kuberay_token_mode_on_every_cluster():
    docs = rendered("auth")
    specs = [s for d in docs for s in cluster_specs(d)]
    assert {d["kind"] for d in docs if cluster_specs(d)} == {"RayCluster", "RayService"}
    for spec in specs:
        assert spec["authOptions"] == {"mode": "token"}
        assert spec["rayVersion"] >= "2.52"
    assert all("authOptions" not in s for d in rendered("defaults") for s in cluster_specs(d))


def test_object_storage_settings_and_credentials_by_reference():
    docs = rendered("secret-refs")
    cfg = config_map_config(docs)
    assert cfg["run"]["output"] == "s3://corpus/chuxin/runs/chuxin-embedding"
    (sa,) = by_kind(docs, "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(":role/chuxin")
    (job,) = by_kind(docs, "RayJob")
    for _, pod in ray_pod_templates(job):
        assert pod["spec"]["serviceAccountName"] == sa["metadata"]["name"]
        env = env_of(pod["spec"]["containers"][0])
        assert env["AWS_ENDPOINT_URL"]["value"] == "https://minio.storage.svc:9000"
        assert env["AWS_REGION"]["value"] == env["AWS_DEFAULT_REGION"]["value"] == "cn-north-1"
        for var, key in [
            ("AWS_ACCESS_KEY_ID", "access-key"),
            ("AWS_SECRET_ACCESS_KEY", "secret-key"),
            ("AWS_SESSION_TOKEN", "session-token"),
        ]:
            assert env[var] == {"name": var, "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": key}}}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}


def test_credentials_in_the_config_are_refused_without_echoing_them(tmp_path):
    values = {"config": {"storage": {"access_key_id": CANARY_KEY_ID, "secret_access_key": CANARY_SECRET}}}
    err = render_error(values, tmp_path)
    assert "config.storage.access_key_id is set" in err and "objectStorage.existingSecret" in err
    assert CANARY_SECRET not in err and CANARY_KEY_ID not in err


def test_kueue_jobs_start_suspended_with_the_queue_label_and_fixed_size():
    (job,) = by_kind(rendered("kueue"), "RayJob")
    labels = job["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "chuxin-ray"
    assert labels["kueue.x-k8s.io/priority-class"] == "research"
    assert job["spec"]["suspend"] is True and job["spec"]["shutdownAfterJobFinishes"] is True
    spec = job["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in spec
    head = spec["headGroupSpec"]["template"]["spec"]
    assert head["automountServiceAccountToken"] is False  # no autoscaler: no token anywhere


def test_config_file_is_mounted_unchanged():
    cfg = config_map_config(rendered("config-file"))
    assert cfg == yaml.safe_load((REPO / "jobs" / "tiny.yaml").read_text(encoding="utf-8"))


def test_notes_print_how_to_follow_the_job_and_open_the_dashboard(tmp_path):
    out = _helm(
        "install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client",
        values=VALUE_SETS["llm"], tmp=tmp_path,
    )  # fmt: skip
    if "cluster unreachable" in out.stderr:  # helm 3's client dry-run still asks the API server
        pytest.skip("this helm cannot render NOTES.txt without a cluster; helm_tools' helm 4 can")
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert f"kubectl logs -n {NAMESPACE} -f job/{FULLNAME}" in notes
    assert "kubectl port-forward" in notes and "8265:8265" in notes and "rayClusterName" in notes
    assert f"svc/{FULLNAME}-llm-serve-svc 8000:8000" in notes


# --------------------------------------------------------------------------------------------------
# bad values: the schema rejects them, and so do the templates when the schema is skipped
# --------------------------------------------------------------------------------------------------

BAD_VALUES = [
    pytest.param({"ray": {"cpuWorkers": {"replicas": -1}}}, "/ray/cpuWorkers/replicas", "ray.cpuWorkers.replicas must be >= 0 (got -1)", id="negative-replicas"),
    pytest.param({"ray": {"gpuWorkers": {"maxReplicas": -2, "minReplicas": 0, "replicas": 0}}}, "/ray/gpuWorkers/maxReplicas", "ray.gpuWorkers.maxReplicas must be >= 0 (got -2)", id="negative-max-replicas"),
    pytest.param({"jobs": {"perStage": True, "stages": ["ingest", "pretrian"]}}, "/jobs/stages/1", 'jobs.stages: unknown stage "pretrian"', id="unknown-stage"),
    pytest.param({"jobs": {"from": "finetuning"}}, "/jobs/from", 'jobs.from: unknown stage "finetuning"', id="unknown-from-stage"),
    pytest.param({"image": {"repository": ""}}, "/image/repository", "image.repository is empty", id="missing-image"),
    pytest.param({"ray": {"gpuWorkers": {"gpus": 0}}}, "/ray/gpuWorkers/gpus", "ray.gpuWorkers.gpus must be >= 1 (got 0)", id="gpu-group-without-gpus"),
    pytest.param({"llm": {"enabled": True, "workers": {"gpus": 0}}}, "/llm/workers/gpus", "llm.workers.gpus must be >= 1 (got 0)", id="llm-group-without-gpus"),
    pytest.param({"jobs": {"submissionMode": "Batch"}}, "/jobs/submissionMode", 'jobs.submissionMode "Batch"', id="unknown-submission-mode"),
    pytest.param({"jobs": {"perStage": True, "stages": ["mine", "mine"]}}, "/jobs/stages", "jobs.stages lists a stage twice", id="duplicate-stage"),
]  # fmt: skip


@pytest.mark.parametrize(("values", "schema_path", "template_message"), BAD_VALUES)
def test_bad_values_fail_naming_the_value(values, schema_path, template_message, tmp_path):
    err = render_error(values, tmp_path)
    # helm 4 names the value as a JSON pointer, helm 3 with dots.
    assert schema_path in err or schema_path.strip("/").replace("/", ".") in err, err
    assert template_message in render_error(values, tmp_path, "--skip-schema-validation")


BAD_COMBINATIONS = [
    pytest.param({"ray": {"cpuWorkers": {"minReplicas": 5, "maxReplicas": 2, "replicas": 2}}}, "ray.cpuWorkers.minReplicas (5) must be <= ray.cpuWorkers.maxReplicas (2)", id="min-above-max"),
    pytest.param({"ray": {"gpuWorkers": {"replicas": 9}}}, "ray.gpuWorkers.replicas (9) must lie between", id="replicas-above-max"),
    pytest.param({"jobs": {"kueue": {"queueName": "q"}}}, "jobs.kueue.queueName (q) needs ray.autoscaling.enabled: false", id="kueue-with-autoscaling"),
    pytest.param({"jobs": {"suspend": True, "shutdownAfterJobFinishes": False}}, "jobs.suspend / jobs.kueue.queueName need jobs.shutdownAfterJobFinishes: true", id="suspend-keeps-cluster"),
    pytest.param({"jobs": {"shutdownAfterJobFinishes": False, "ttlSecondsAfterFinished": 60}}, "jobs.ttlSecondsAfterFinished (60) needs jobs.shutdownAfterJobFinishes: true", id="ttl-without-shutdown"),
    pytest.param({"sharedCluster": {"enabled": True}, "jobs": {"submissionMode": "SidecarMode"}}, "sharedCluster.enabled: jobs.submissionMode SidecarMode", id="shared-cluster-sidecar"),
    pytest.param({"jobs": {"perStage": True, "from": "mine"}}, "jobs.from applies to the single pipeline RayJob only", id="from-with-per-stage"),
    pytest.param({"ray": {"cpuWorkers": {"enabled": False}, "gpuWorkers": {"enabled": False}}}, "ray.cpuWorkers.enabled and ray.gpuWorkers.enabled are both false", id="no-workers"),
    pytest.param({"llm": {"enabled": True, "tensorParallelSize": 4, "workers": {"gpus": 2}}}, "llm.workers.gpus (2) must be >= llm.tensorParallelSize (4)", id="llm-tp-above-gpus"),
    pytest.param({"llm": {"enabled": True, "externalUrl": "http://x:8000/v1"}}, "llm.enabled and llm.externalUrl are both set", id="llm-two-urls"),
    pytest.param({"config": {"run": {"name": None}}}, "config.run.name is missing", id="config-without-run-name"),
    pytest.param({"objectStorage": {"bucket": ""}}, "config.run.output is unset and objectStorage.bucket is empty", id="no-output"),
    pytest.param({"fullnameOverride": "9-lives"}, "is not a DNS-1035 label", id="name-starts-with-digit"),
]  # fmt: skip


@pytest.mark.parametrize(("values", "message"), BAD_COMBINATIONS)
def test_bad_combinations_fail_naming_the_values(values, message, tmp_path):
    assert message in render_error(values, tmp_path)


# --------------------------------------------------------------------------------------------------
# the chart's own files
# --------------------------------------------------------------------------------------------------


def test_chart_stage_list_is_the_package_stage_list():
    helpers = (CHART / "templates" / "_helpers.tpl").read_text(encoding="utf-8")
    m = re.search(r'define "chuxin-ray\.stages" -}}\s*\n(.*?)\n', helpers)
    assert m and tuple(m.group(1).split()) == STAGES
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    jobs = schema["properties"]["jobs"]["properties"]
    assert tuple(jobs["stages"]["items"]["enum"]) == STAGES
    assert tuple(jobs["from"]["enum"]) == ("", *STAGES)


def test_default_values_pass_the_schema_and_every_value_is_documented():
    values_text = (CHART / "values.yaml").read_text(encoding="utf-8")
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load(values_text))
    # Every key outside free-form data maps (resources, selectors, the pipeline config, ...) sits
    # under a `# --` comment, so `helm show values` documents the chart key by key.
    data_maps = {
        "config", "resources", "submitterResources", "nodeSelector", "tolerations", "affinity", "labels",
        "rayStartParams", "podSecurityContext", "securityContext", "namespaceSelector", "podSelector",
        "annotations", "engineKwargs", "podLabels", "podAnnotations", "runtimeEnv", "deletionStrategy",
    }  # fmt: skip
    undocumented, stack = [], []  # stack: (indent, key)
    lines = values_text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        inside_data = any(k in data_maps for _, k in stack)
        stack.append((indent, key))
        if inside_data:
            continue
        j = i - 1
        block = []
        while j >= 0 and lines[j].strip().startswith("#"):
            block.append(lines[j].strip())
            j -= 1
        if not any(c.startswith("# --") for c in block):
            undocumented.append(".".join(k for _, k in stack))
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


def test_k8s_manifests_validate_and_bind_what_exists():
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text(encoding="utf-8"))
    namespace = kustomization["namespace"]
    docs = [
        d
        for res in kustomization["resources"]
        for d in yaml.safe_load_all((K8S_DIR / res).read_text(encoding="utf-8"))
        if d
    ]
    for doc in docs:
        doc.setdefault("metadata", {})
        if doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = namespace
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    (ns,) = by_kind(docs, "Namespace")
    assert ns["metadata"]["name"] == namespace
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    accounts = {d["metadata"]["name"] for d in by_kind(docs, "ServiceAccount")}
    roles = {d["metadata"]["name"] for d in by_kind(docs, "Role")}
    assert "chuxin-ray" in accounts
    for binding in by_kind(docs, "RoleBinding"):
        assert binding["roleRef"]["name"] in roles
        for subject in binding["subjects"]:
            assert subject["kind"] != "ServiceAccount" or subject["name"] in accounts
    launcher = next(d for d in by_kind(docs, "Role") if d["metadata"]["name"] == "chuxin-ray-launcher")
    assert not any("secrets" in r["resources"] for r in launcher["rules"])
    readme = (K8S_DIR / "README.md").read_text(encoding="utf-8")
    assert "kuberay/kuberay-operator --version 1.7.0" in readme
    kueue = [
        d for d in yaml.safe_load_all((K8S_DIR / "kueue" / "queues.yaml").read_text(encoding="utf-8")) if d
    ]
    (lq,) = by_kind(kueue, "LocalQueue")
    (cq,) = by_kind(kueue, "ClusterQueue")
    assert lq["spec"]["clusterQueue"] == cq["metadata"]["name"] and lq["metadata"]["namespace"] == namespace
