"""`chuxin-ray launch` and `status` against a Kubernetes API on 127.0.0.1, and against the chart.

No API server can run here (see ../shared/ENVIRONMENT.md), so `KubeAPI` below is a small HTTP server
that answers the paths launch and status use the way the real one does: objects stored as POSTed with
uid/resourceVersion/creationTimestamp added, `Status` bodies for 401/403/404/409, merge patches, list
selectors. It stands in for Kubernetes, not for any of our components; the kubernetes client talks to
it over HTTP through a real kubeconfig.

What launch builds is compared with what the real `helm template` renders from helm/chuxin-ray for the
same config and values: launch builds the objects in Python so a laptop needs no helm, and this is the
test that keeps the two one spec.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import shlex
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from chuxin_ray import launch
from chuxin_ray.cli import build_parser, main
from chuxin_ray.config import validate_config

try:  # tests/integration on sys.path (pytest's default import mode) ...
    from test_helm_chart import CHART, validate_object
except ImportError:  # ... or the repository root (importlib mode)
    from tests.integration.test_helm_chart import CHART, validate_object
try:
    from helm_tools import helm_binary
except ImportError:
    from tests.helm_tools import helm_binary

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "jobs" / "tiny.yaml"
NAMESPACE = "chuxin"
TOKEN = "stub-token-9d1c"
USER = "alice"


# --------------------------------------------------------------------------------------------------
# A Kubernetes API on 127.0.0.1 for configmaps, rayjobs, pods and events
# --------------------------------------------------------------------------------------------------

RESOURCES = {  # plural -> (API prefix, kind, group for messages)
    "configmaps": ("/api/v1", "ConfigMap", ""),
    "pods": ("/api/v1", "Pod", ""),
    "events": ("/api/v1", "Event", ""),
    "rayjobs": ("/apis/ray.io/v1", "RayJob", "ray.io"),
    "rayservices": ("/apis/ray.io/v1", "RayService", "ray.io"),
}


def status_body(code: int, reason: str, message: str, **details) -> dict:
    """A metav1.Status, the body of every API error."""
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
    body.update(message=message, reason=reason, code=code)
    if details:
        body["details"] = details
    return body


def merge_patch(target: dict, patch: dict) -> dict:
    """RFC 7386 JSON merge patch."""
    out = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_patch(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def matches(obj: dict, label_selector: str | None, field_selector: str | None) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, (label_selector or "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    for term in filter(None, (field_selector or "").split(",")):
        key, _, value = term.partition("=")
        node = obj
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node != value:
            return False
    return True


class KubeAPI:
    def __init__(self):
        self.objects: dict[tuple[str, str, str], dict] = {}  # (plural, namespace, name) -> object
        self.namespaces = {NAMESPACE, "default"}
        self.forbidden: set[tuple[str, str]] = set()  # (verb, plural)
        self.served = set(RESOURCES)  # drop "rayjobs": a cluster without the KubeRay CRDs
        self.requests: list[tuple[str, str, str]] = []  # (method, path, content type)
        self.lock = threading.Lock()
        self._rv = 1000
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                url = urlparse(self.path)
                with api.lock:
                    api.requests.append((self.command, url.path, self.headers.get("Content-Type", "")))
                    code, out = api.handle(self.command, url.path, parse_qs(url.query), body, self.headers)
                self._send(code, out)

            do_GET = do_POST = do_PATCH = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, method, path, query, body, headers):
        if headers.get("Authorization") != f"Bearer {TOKEN}":
            return 401, status_body(401, "Unauthorized", "Unauthorized")
        for plural, (prefix, kind, group) in RESOURCES.items():
            if plural not in self.served:
                continue
            head = f"{prefix}/namespaces/"
            if not path.startswith(head):
                continue
            parts = path[len(head) :].split("/")
            if len(parts) < 2 or parts[1] != plural:
                continue
            ns, name = parts[0], (parts[2] if len(parts) > 2 else None)
            resource = f"{plural}.{group}" if group else plural
            verb = {"GET": "get" if name else "list", "POST": "create", "PATCH": "patch", "DELETE": "delete"}
            verb = verb[method]
            if (verb, plural) in self.forbidden:
                where = f' in API group "{group}"' if group else ' in API group ""'
                return 403, status_body(
                    403,
                    "Forbidden",
                    f'{resource} is forbidden: User "{USER}" cannot {verb} resource "{plural}"{where} '
                    f'in the namespace "{ns}"',
                    kind=plural,
                )
            return self._serve(verb, plural, kind, resource, ns, name, query, body)
        return 404, status_body(404, "NotFound", "the server could not find the requested resource")

    def _serve(self, verb, plural, kind, resource, ns, name, query, body):
        key = (plural, ns, name)
        not_found = status_body(404, "NotFound", f'{resource} "{name}" not found', name=name, kind=plural)
        if verb == "list":
            items = [
                o
                for (p, n, _), o in self.objects.items()
                if p == plural
                and n == ns
                and matches(o, query.get("labelSelector", [None])[0], query.get("fieldSelector", [None])[0])
            ]
            self._rv += 1
            return 200, {
                "kind": f"{kind}List",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }
        if verb == "create":
            if ns not in self.namespaces:
                return 404, status_body(
                    404, "NotFound", f'namespaces "{ns}" not found', name=ns, kind="namespaces"
                )
            name = body["metadata"]["name"]
            key = (plural, ns, name)
            if key in self.objects:
                return 409, status_body(
                    409, "AlreadyExists", f'{resource} "{name}" already exists', name=name, kind=plural
                )
            self._rv += 1
            obj = copy.deepcopy(body)
            obj["metadata"].update(
                namespace=ns,
                uid=str(uuid.uuid4()),
                resourceVersion=str(self._rv),
                generation=1,
                creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            self.objects[key] = obj
            return 201, obj
        if key not in self.objects:
            return 404, not_found
        if verb == "get":
            return 200, self.objects[key]
        if verb == "patch":
            self._rv += 1
            obj = merge_patch(self.objects[key], body)
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self.objects[key] = obj
            return 200, obj
        del self.objects[key]  # delete
        return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "details": {"name": name}}

    def put(self, plural: str, obj: dict, ns: str = NAMESPACE) -> None:
        """Seed an object as a controller would have made it (pods, events, a RayJob's status)."""
        with self.lock:
            meta = obj.setdefault("metadata", {})
            meta.setdefault("namespace", ns)
            meta.setdefault("uid", str(uuid.uuid4()))
            self.objects[(plural, ns, meta["name"])] = obj

    def get(self, plural: str, name: str, ns: str = NAMESPACE) -> dict | None:
        with self.lock:
            return copy.deepcopy(self.objects.get((plural, ns, name)))

    def set_status(self, name: str, **status) -> None:
        with self.lock:
            self.objects[("rayjobs", NAMESPACE, name)]["status"] = status


@pytest.fixture
def kube(tmp_path):
    api = KubeAPI()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "stub", "cluster": {"server": api.url}}],
        "users": [{"name": USER, "user": {"token": TOKEN}}],
        "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": USER, "namespace": NAMESPACE}}],
        "current-context": "stub",
    }
    api.kubeconfig = tmp_path / "kubeconfig"
    api.kubeconfig.write_text(yaml.safe_dump(kubeconfig))
    yield api
    api.server.shutdown()


def cli(*args: str) -> tuple[int, str, str]:
    """`chuxin-ray ARGS` in this process (the kubeconfig is passed with --kubeconfig)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def launch_args(kube: KubeAPI, *extra: str) -> list[str]:
    return ["launch", str(TINY), "run.output=s3://runs/tiny", *extra, "--kubeconfig", str(kube.kubeconfig)]


SERVER_FIELDS = ("uid", "resourceVersion", "generation", "creationTimestamp", "ownerReferences")


def without_server_fields(obj: dict) -> dict:
    obj = copy.deepcopy(obj)
    for key in SERVER_FIELDS:
        obj["metadata"].pop(key, None)
    obj.pop("status", None)
    return obj


# --------------------------------------------------------------------------------------------------
# launch --dry-run and the chart
# --------------------------------------------------------------------------------------------------


def test_dry_run_prints_valid_objects_and_contacts_no_cluster(kube):
    rc, out, err = cli(*launch_args(kube, "ingest.rules.min_chars=20", "--dry-run"))
    assert rc == 0, err
    assert kube.requests == []  # the kubeconfig was read for its namespace; the server was not called
    cm, job = list(yaml.safe_load_all(out))
    assert (cm["kind"], job["kind"]) == ("ConfigMap", "RayJob")
    assert (cm["metadata"]["name"], cm["metadata"]["namespace"]) == ("tiny-config", NAMESPACE)
    assert (job["metadata"]["name"], job["metadata"]["namespace"]) == ("tiny", NAMESPACE)
    for doc in (cm, job):
        validate_object(doc)
    # The ConfigMap holds the config with the overrides applied, and our schema loads it.
    cfg = validate_config(yaml.safe_load(cm["data"]["config.yaml"]))
    assert cfg.ingest.rules.min_chars == 20 and cfg.run.output == "s3://runs/tiny"
    args = build_parser().parse_args(shlex.split(job["spec"]["entrypoint"])[1:])
    assert (args.command, args.config, args.overrides, args.only) == (
        "pipeline", launch.CONFIG_PATH, [], None,
    )  # fmt: skip
    spec = job["spec"]["rayClusterSpec"]
    assert [g["groupName"] for g in spec["workerGroupSpecs"]] == ["cpu", "gpu"]
    gpu = spec["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["image"] == "chuxin-ray:0.1.0"
    assert spec["headGroupSpec"]["template"]["spec"]["serviceAccountName"] == "chuxin-ray"
    ann = spec["headGroupSpec"]["template"]["metadata"]["annotations"]
    assert ann["checksum/config"] == hashlib.sha256(cm["data"]["config.yaml"].encode()).hexdigest()


def test_config_and_value_errors_fail_before_any_request(kube, tmp_path):
    rc, _, err = cli(*launch_args(kube, "ingest.rules.min_char=3"))
    assert rc == 2 and "ingest.rules.min_char: unknown key (did you mean `min_chars`?)" in err
    rc, _, err = cli(*launch_args(kube, "--only", "tokenise"))
    assert rc == 2 and "--only 'tokenise': not a stage; stages: ingest, tokenize" in err
    rc, _, err = cli(*launch_args(kube, "storage.secret_access_key=abc"))
    assert rc == 2 and "storage.secret_access_key is set" in err and "abc" not in err
    values = tmp_path / "v.yaml"
    values.write_text("ray:\n  gpuWorkers:\n    gpu: 8\n")
    rc, _, err = cli(*launch_args(kube, "-f", str(values)))
    assert rc == 2 and "ray.gpuWorkers.gpu: unknown or unsupported key (did you mean `gpus`?)" in err
    values.write_text("ray:\n  gpuWorkers:\n    gpus: 0\n")
    rc, _, err = cli(*launch_args(kube, "-f", str(values)))
    assert rc == 2 and "ray.gpuWorkers.gpus must be >= 1 (got 0)" in err
    rc, _, err = cli(*launch_args(kube, "--name", "Bad_Name"))
    assert rc == 2 and "RayJob name 'Bad_Name'" in err
    assert kube.requests == []


def _helm_template(name: str, values: dict, tmp: Path) -> list[dict]:
    path = tmp / "helm-values.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False, allow_unicode=True), encoding="utf-8")
    out = subprocess.run(
        [str(helm_binary()), "template", name, str(CHART), "-n", NAMESPACE, "--kube-version", "1.37.0", "-f", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def normalise(doc: dict, config_map: str) -> dict:
    """What may differ between a chart rendering and launch's objects: who manages them (labels),
    the namespace field (helm template leaves it out), the config checksum (each hashes its own YAML
    text of the same data), YAML text vs data, shell quoting of the entrypoint."""
    doc = copy.deepcopy(doc)
    meta = doc["metadata"]
    meta.pop("namespace", None)
    for key in ("helm.sh/chart", "app.kubernetes.io/managed-by"):
        meta.get("labels", {}).pop(key, None)
    if doc["kind"] == "ConfigMap":
        meta["name"] = config_map
        doc["data"] = {k: yaml.safe_load(v) for k, v in doc["data"].items()}
        return doc
    spec = doc["spec"]
    spec["entrypoint"] = shlex.split(spec["entrypoint"])
    if "runtimeEnvYAML" in spec:
        spec["runtimeEnvYAML"] = yaml.safe_load(spec["runtimeEnvYAML"])
    cluster = spec["rayClusterSpec"]
    for tmpl in [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster.get("workerGroupSpecs", [])
    ]:
        tmpl["metadata"]["annotations"].pop("checksum/config")
        for vol in tmpl["spec"]["volumes"]:
            if "configMap" in vol:
                vol["configMap"]["name"] = config_map
    return doc


def differences(ours, chart, path: str = "") -> list[str]:
    """Where two objects differ, as `path: launch value != chart value` lines."""
    if isinstance(ours, dict) and isinstance(chart, dict):
        return [
            d
            for k in sorted(set(ours) | set(chart), key=str)
            for d in differences(ours.get(k), chart.get(k), f"{path}.{k}")
        ]
    if isinstance(ours, list) and isinstance(chart, list) and len(ours) == len(chart):
        return [
            d
            for i, (a, b) in enumerate(zip(ours, chart, strict=True))
            for d in differences(a, b, f"{path}[{i}]")
        ]
    return [] if ours == chart else [f"{path}: {ours!r} != {chart!r}"]


GPU_VALUES = {
    "image": {"pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "registry"}],
    "objectStorage": {
        "endpoint": "https://minio.storage.svc:9000",
        "region": "cn-north-1",
        "existingSecret": {"name": "s3-creds", "sessionTokenKey": "token"},
    },
    "extraEnv": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
    "podLabels": {"team": "search"},
    "podAnnotations": {"owner": "search"},
    "ray": {
        # Unquoted: to Helm a float64, which the chart must still render "2000000000", not "2e+09".
        "head": {"rayStartParams": {"num-cpus": 0, "object-store-memory": 2000000000}},
        "cpuWorkers": {"replicas": 2, "maxReplicas": 16},
        "gpuWorkers": {
            "gpus": 8,
            "replicas": 1,
            "minReplicas": 1,
            "maxReplicas": 2,
            "shmSize": "64Gi",
            "resources": {
                "requests": {"cpu": "96", "memory": "960Gi"},
                "limits": {"cpu": "96", "memory": "960Gi"},
            },
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        },
        "auth": {"enabled": True},
    },
    "jobs": {
        "overrides": ["pretrain.training.steps=1000"],
        "runtimeEnv": {"env_vars": {"NCCL_DEBUG": "WARN"}},
        "activeDeadlineSeconds": 172800,
        "backoffLimit": 5,
        "deletionStrategy": {"onSuccess": {"policy": "DeleteCluster"}},
    },
    "llm": {"externalUrl": "http://vllm.inference.svc:8000/v1"},
    "monitoring": {
        "grafanaHost": "http://grafana.monitoring.svc",
        "prometheusHost": "http://prom.monitoring.svc:9090",
    },
}
KUEUE_VALUES = {
    "ray": {"autoscaling": {"enabled": False}, "gpuWorkers": {"enabled": False}},
    "jobs": {"kueue": {"queueName": "chuxin-ray", "priorityClass": "research"}, "submissionMode": "HTTPMode"},
}
CASES = {  # name -> (launch flags, values file, chart values that say the same)
    "defaults": ([], {}, {}),
    "gpu-pretrain-only": (["--only", "pretrain", "--image", "ghcr.io/org/chuxin-ray:0.2.0"], GPU_VALUES, {
        "image": {"repository": "ghcr.io/org/chuxin-ray", "tag": "0.2.0"},
        "jobs": {"perStage": True, "stages": ["pretrain"]},
    }),
    "kueue-from": (["--from", "tokenize", "--image", "reg.io/cx@sha256:" + "a" * 64, "--service-account", "runner"], KUEUE_VALUES, {
        "image": {"repository": "reg.io/cx", "digest": "sha256:" + "a" * 64},
        "serviceAccount": {"name": "runner"},
        "jobs": {"from": "tokenize"},
    }),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_launch_objects_equal_the_chart_rendering(case, kube, tmp_path):
    flags, values, chart_only = CASES[case]
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    rc, out, err = cli(*launch_args(kube, "-f", str(values_file), *flags, "--dry-run"))
    assert rc == 0, err
    cm, job = list(yaml.safe_load_all(out))
    validate_object(job)
    # The chart, released under the run's name, with the same config and values.
    chart_values = launch.merge_values(values, chart_only)
    chart_values = launch.merge_values(
        chart_values,
        {
            "fullnameOverride": "tiny",
            "configYaml": cm["data"]["config.yaml"],
            "serviceAccount": {
                "create": False,
                "name": chart_values.get("serviceAccount", {}).get("name", "chuxin-ray"),
            },
        },
    )
    docs = _helm_template("tiny", chart_values, tmp_path)
    (chart_job,) = [d for d in docs if d["kind"] == "RayJob"]
    (chart_cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "tiny-config"]
    assert chart_job["metadata"]["name"] == job["metadata"]["name"]
    name = cm["metadata"]["name"]
    assert differences(normalise(job, name), normalise(chart_job, name)) == []
    assert differences(normalise(cm, name), normalise(chart_cm, name)) == []


def test_defaults_are_the_charts_values():
    """launch.DEFAULT_VALUES is the chart's values.yaml, key by key (serviceAccount aside: launch
    creates none and uses k8s/'s `chuxin-ray`)."""
    chart = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))

    def walk(ours, theirs, path):
        for key, value in ours.items():
            assert key in theirs, f"{'.'.join(path + [key])} is not in values.yaml"
            if isinstance(value, dict) and value:
                walk(value, theirs[key], path + [key])
            else:
                assert value == theirs[key], ".".join(path + [key])

    defaults = copy.deepcopy(launch.DEFAULT_VALUES)
    assert defaults.pop("serviceAccount") == {"create": False, "name": "chuxin-ray"}
    walk(defaults, chart, [])
    assert (ROOT / "k8s" / "serviceaccount.yaml").read_text().count("name: chuxin-ray\n") == 1


# --------------------------------------------------------------------------------------------------
# launch against the API
# --------------------------------------------------------------------------------------------------


def test_launch_creates_the_configmap_then_the_rayjob_that_owns_it(kube, tmp_path):
    """The console script, as a user runs it, with KUBECONFIG from the environment."""
    _, dry, _ = cli(*launch_args(kube, "--dry-run"))
    env = {"KUBECONFIG": str(kube.kubeconfig), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "chuxin_ray.cli", "launch", str(TINY), "run.output=s3://runs/tiny"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"created ConfigMap {NAMESPACE}/tiny-config and RayJob {NAMESPACE}/tiny" in out.stdout
    assert f"chuxin-ray status tiny -n {NAMESPACE} --watch" in out.stdout
    assert [(m, p) for m, p, _ in kube.requests] == [
        ("POST", f"/api/v1/namespaces/{NAMESPACE}/configmaps"),
        ("POST", f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayjobs"),
        ("PATCH", f"/api/v1/namespaces/{NAMESPACE}/configmaps/tiny-config"),
    ]
    assert kube.requests[-1][2] == "application/merge-patch+json"
    want_cm, want_job = list(yaml.safe_load_all(dry))
    job, cm = kube.get("rayjobs", "tiny"), kube.get("configmaps", "tiny-config")
    assert without_server_fields(job) == want_job
    assert without_server_fields(cm) == want_cm
    (owner,) = cm["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "name": "tiny",
        "uid": job["metadata"]["uid"],
    }


def test_second_launch_names_the_existing_rayjob(kube):
    assert cli(*launch_args(kube))[0] == 0
    kube.set_status("tiny", jobStatus="RUNNING", jobDeploymentStatus="Running")
    before = kube.get("configmaps", "tiny-config")
    rc, _, err = cli(*launch_args(kube))
    assert rc == 2
    assert f"RayJob tiny already exists in namespace {NAMESPACE} (job status: RUNNING)" in err
    assert f"kubectl delete rayjob tiny -n {NAMESPACE}" in err
    assert kube.get("configmaps", "tiny-config") == before  # untouched

    # The API's own 409 on the RayJob (made by someone else, no ConfigMap of ours): the ConfigMap
    # launch just created goes again.
    kube.put("rayjobs", {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "other"}})
    rc, _, err = cli(*launch_args(kube, "--name", "other"))
    assert rc == 2 and f"RayJob other already exists in namespace {NAMESPACE}" in err
    assert ("POST", f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayjobs") in [
        (m, p) for m, p, _ in kube.requests
    ]
    assert kube.get("configmaps", "other-config") is None


def test_forbidden_missing_namespace_and_missing_crd_are_named(kube):
    kube.forbidden.add(("create", "rayjobs"))
    rc, _, err = cli(*launch_args(kube))
    assert rc == 2
    assert f"cannot create RayJob tiny in namespace {NAMESPACE}: forbidden (403)" in err
    assert f'User "{USER}" cannot create resource "rayjobs"' in err and "chuxin-ray-launcher" in err
    assert kube.get("configmaps", "tiny-config") is None  # rolled back

    rc, _, err = cli(*launch_args(kube, "-n", "nope"))
    assert (
        rc == 2 and "cannot create ConfigMap tiny-config in namespace nope: namespace nope not found" in err
    )

    kube.forbidden.clear()
    kube.served.discard("rayjobs")  # an API server without the KubeRay CRDs
    rc, _, err = cli(*launch_args(kube))
    assert rc == 2 and "is the KubeRay operator v1.7.0 installed" in err
    assert kube.get("configmaps", "tiny-config") is None

    rc, _, err = cli("status", "ghost", "--kubeconfig", str(kube.kubeconfig))
    kube.served.add("rayjobs")
    rc, _, err = cli("status", "ghost", "--kubeconfig", str(kube.kubeconfig))
    assert rc == 2 and f"RayJob ghost in namespace {NAMESPACE} not found" in err


# --------------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------------


def _pod(name: str, phase: str, labels: dict, **status) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "spec": {"containers": [{"name": "ray-worker", "image": "chuxin-ray:0.1.0"}]},
        "status": {"phase": phase, **status},
    }


def test_status_shows_the_job_why_pods_wait_the_outputs_and_the_dashboard(kube, tmp_path):
    out_dir = tmp_path / "runs"
    assert cli(*launch_args(kube, f"run.output={out_dir}"))[0] == 0
    (out_dir / "ingest").mkdir(parents=True)
    (out_dir / "ingest" / "_manifest.json").write_text(
        json.dumps({"stage": "ingest", "status": "complete", "finished_at": "2026-11-27T01:02:03Z"})
    )
    cluster = "tiny-x7k2p"
    kube.set_status(
        "tiny",
        jobStatus="RUNNING",
        jobDeploymentStatus="Running",
        rayClusterName=cluster,
        dashboardURL=f"{cluster}-head-svc.{NAMESPACE}.svc.cluster.local:8265",
        startTime="2026-11-27T01:00:00Z",
        jobId="tiny-abc12",
    )
    ray = {"ray.io/cluster": cluster}
    kube.put("pods", _pod(f"{cluster}-head-4hq8z", "Running", {**ray, "ray.io/node-type": "head"}))
    unschedulable = (
        "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available."
    )
    kube.put("pods", _pod(f"{cluster}-gpu-worker-m2x9d", "Pending", ray, conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable},
    ]))  # fmt: skip
    kube.put("pods", _pod(f"{cluster}-cpu-worker-7tq2w", "Pending", ray, containerStatuses=[
        {"name": "ray-worker", "ready": False, "restartCount": 0, "image": "chuxin-ray:0.1.0", "imageID": "",
         "state": {"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "chuxin-ray:0.1.0"'}}},
    ]))  # fmt: skip
    kube.put("pods", _pod("tiny-s8f7d", "Running", {"job-name": "tiny"}, containerStatuses=[
        {"name": "ray-job-submitter", "ready": True, "restartCount": 1, "image": "x", "imageID": "",
         "state": {"running": {}}, "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}},
    ]))  # fmt: skip
    kube.put("pods", _pod("someone-elses-pod", "Pending", {"app": "other"}))
    instance = kube.get("rayjobs", "tiny")["metadata"]["labels"]["app.kubernetes.io/instance"]
    kube.put("rayservices", {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": "tiny-llm", "labels": {"app.kubernetes.io/instance": instance}},
        "status": {"serviceStatus": "Running", "numServeEndpoints": 1},
    })  # fmt: skip
    kube.put("rayservices", {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": "other-llm", "labels": {"app.kubernetes.io/instance": "other"}},
    })  # fmt: skip
    kube.put("events", {
        "apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": "FailedScheduling",
        "message": unschedulable, "metadata": {"name": "ev1"}, "lastTimestamp": "2026-11-27T01:01:00Z",
        "involvedObject": {"kind": "Pod", "name": f"{cluster}-gpu-worker-m2x9d"},
    })  # fmt: skip

    rc, out, err = cli("status", "tiny", "--kubeconfig", str(kube.kubeconfig))
    assert rc == 0, err
    lines = out.splitlines()
    assert f"RayJob              {NAMESPACE}/tiny" in lines
    assert "job status          RUNNING" in lines
    assert "deployment status   Running" in lines
    assert f"ray cluster         {cluster}" in lines
    assert "started             2026-11-27T01:00:00Z" in lines
    assert "LLM RayService      tiny-llm: Running, 1 serve endpoints" in lines
    assert "other-llm" not in out
    assert "pods                4 (2 pending, 2 running)" in lines
    assert any(f"{cluster}-gpu-worker-m2x9d" in x and f"Unschedulable: {unschedulable}" in x for x in lines)
    assert any(
        f"{cluster}-cpu-worker-7tq2w" in x and "ray-worker: ImagePullBackOff: Back-off pulling" in x
        for x in lines
    )
    assert any("tiny-s8f7d" in x and "ray-job-submitter: OOMKilled (restarts 1)" in x for x in lines)
    assert not any(f"{cluster}-head-4hq8z" in x for x in lines)  # running and fine: not listed
    assert "someone-elses-pod" not in out
    assert f"outputs             {out_dir}" in lines
    assert "  ingest            complete, finished 2026-11-27T01:02:03Z" in lines
    assert any(x.startswith("  tokenize          not complete") for x in lines)
    assert f"kubectl port-forward -n {NAMESPACE} svc/{cluster}-head-svc 8265:8265" in out
    assert f"kubectl logs -n {NAMESPACE} -f job/tiny" in out


@pytest.mark.parametrize(("final", "rc_want"), [("SUCCEEDED", 0), ("FAILED", 1)])
def test_status_watch_polls_until_the_job_ends(kube, final, rc_want):
    assert cli(*launch_args(kube))[0] == 0
    kube.set_status("tiny", jobStatus="PENDING", jobDeploymentStatus="Initializing")

    def progress():
        time.sleep(0.6)
        kube.set_status("tiny", jobStatus="RUNNING", jobDeploymentStatus="Running")
        time.sleep(0.6)
        end = "Complete" if final == "SUCCEEDED" else "Failed"
        kube.set_status(
            "tiny", jobStatus=final, jobDeploymentStatus=end, endTime="2026-11-27T02:00:00Z",
            message="Job finished" if final == "SUCCEEDED" else "Job entrypoint command failed with exit code 2",
        )  # fmt: skip

    thread = threading.Thread(target=progress)
    thread.start()
    rc, out, err = cli(
        "status", "tiny", "--watch", "--interval", "0.1", "--no-outputs", "--kubeconfig", str(kube.kubeconfig)
    )
    thread.join()
    assert rc == rc_want, err
    changes = [x.split("  ", 1)[1] for x in out.splitlines() if x[:2].isdigit() and x[2] == ":"]
    end = "Complete" if final == "SUCCEEDED" else "Failed"
    assert changes == [
        "tiny: job PENDING, deployment Initializing",
        "tiny: job RUNNING, deployment Running",
        f"tiny: job {final}, deployment {end}",
    ]
    assert "ended               2026-11-27T02:00:00Z" in out


def test_an_unreachable_api_server_is_named(kube, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = yaml.safe_load(kube.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{port}"
    dead = tmp_path / "dead-kubeconfig"
    dead.write_text(yaml.safe_dump(config))
    rc, _, err = cli("launch", str(TINY), "run.output=s3://runs/tiny", "--kubeconfig", str(dead))
    assert rc == 2 and f"cannot reach the Kubernetes API server at http://127.0.0.1:{port}" in err
    assert "Traceback" not in err
