"""`ray job submit` end to end through jobs/submit.sh, on a real two-node Ray cluster on this machine.

The module starts a head (`ray start --head`, dashboard and job server on) and joins a second node with
`ray start --address`, each in a process group of its own on free ports, and at the end kills those two
process groups and nothing else (`ray stop` would stop every Ray of the user on the machine).

1. One stage: jobs/tiny.yaml's ingest, submitted through the wrapper, must end SUCCEEDED with a
   complete manifest in the local S3 server; the job carries no credential (the nodes hold them).
2. Two nodes: the same run continues with tokenize and pretrain (ingest is complete and skipped). The
   nodes have 3 logical CPUs each and a Ray Train worker asks for 2, so the two workers cannot share a
   node: one trains on each, gradients cross nodes through gloo, and each node keeps 1 CPU for the Ray
   Data tasks that stream token rows to them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

try:  # tests/ on sys.path (pytest's default import mode) ...
    from conftest import S3_ACCESS_KEY, S3_SECRET_KEY
except ImportError:  # ... or the repository root (importlib mode)
    from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SUBMIT = ROOT / "jobs" / "submit.sh"
TINY = ROOT / "jobs" / "tiny.yaml"
NODE_CPUS = 3  # logical; with TRAIN_CPUS = 2 no node holds two Train workers, and 1 CPU stays for Ray Data
TRAIN_CPUS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    """What the nodes and the clients run with: the venv first on PATH (the job's entrypoint is the
    `chuxin-ray` console script), auth mode fixed on both sides (ENVIRONMENT.md), the test's AWS_*."""
    return {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # job logs without tqdm redraws
        "PYTHON": sys.executable,
    }


class RayNode:
    """`ray start --block` in a process group of its own: every Ray process of the node (GCS, raylet,
    dashboard, agents, workers) is in that group, so killing the group stops this node and no other."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        # Ray picks free ports itself for everything else; this one defaults to a fixed 52365.
        cmd = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args]
        cmd += ["--dashboard-agent-listen-port", str(free_port())]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, env=ray_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stop(self) -> None:
        """SIGTERM to the group, then SIGKILL to whatever of it is left after 10 s."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


class ClusterStartFailed(AssertionError):
    pass


class Cluster:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.gcs, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # One temp dir per node, short (Ray's socket paths): nodes on one machine must not share the
        # session's runtime_resources, or one node's runtime-env cleanup deletes the other's working_dir
        # (the driver's cwd) when its last worker of the job exits.
        self.temp_dirs = [tempfile.mkdtemp(prefix="cxr-", dir="/tmp") for _ in range(2)]
        head_args = [
            "--head", "--port", str(self.gcs), "--node-ip-address", "127.0.0.1",
            "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port()),
            "--num-cpus", str(NODE_CPUS), "--temp-dir", self.temp_dirs[0],
        ]  # fmt: skip
        self.head = RayNode(head_args, tmp / "head.log")
        self.worker: RayNode | None = None
        self._wait(lambda: self._get("/api/version") is not None, "the head's dashboard", tmp / "head.log")
        worker_args = [
            "--address", f"127.0.0.1:{self.gcs}", "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(NODE_CPUS), "--resources", json.dumps({"second_node": 1}),
            "--temp-dir", self.temp_dirs[1],
        ]  # fmt: skip
        self.worker = RayNode(worker_args, tmp / "worker.log")
        self._wait(lambda: len(self.alive_nodes()) == 2, "the second node", tmp / "worker.log", timeout=150)

    def _get(self, path: str):
        try:
            with urllib.request.urlopen(self.address + path, timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            return None

    def _wait(self, ready, what: str, log: Path, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            time.sleep(1)
        head = "running" if self.head.proc.poll() is None else f"exited {self.head.proc.returncode}"
        message = (
            f"{what} did not come up in {timeout:.0f} s (head: {head}):\n{log.read_text()[-2000:]}\n"
            f"--- head.log ---\n{self.head.log.read_text()[-1500:]}"
        )
        self.stop()
        raise ClusterStartFailed(message)

    def alive_nodes(self) -> list[dict]:
        from ray.util.state import list_nodes

        try:
            return [
                n
                for n in list_nodes(address=self.address, raise_on_missing_output=False)
                if n.state == "ALIVE"
            ]
        except Exception:  # the state API is not up yet
            return []

    def stop(self) -> None:
        for node in (self.worker, self.head):
            if node is not None:
                node.stop()
        for path in self.temp_dirs:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """Started after the S3 server, whose AWS_* credentials are in os.environ by then: the nodes hold
    them, the job's processes inherit them, and no credential travels with a job."""
    started = time.time()
    try:
        c = Cluster(tmp_path_factory.mktemp("ray"))
    except ClusterStartFailed as first:
        # Seen a few times in ~20 starts on a loaded shared machine: the second node never reaches the
        # head's GCS. A fresh pair of nodes on new ports has always come up.
        print(f"retrying with a fresh cluster: {str(first)[:300]}")
        c = Cluster(tmp_path_factory.mktemp("ray"))
    print(f"two-node Ray up in {time.time() - started:.0f} s")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    subprocess.run([str(BIN / "chuxin-ray"), "demo-data", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def run(cluster, demo, s3_server):
    """The overrides both jobs share: tiny.yaml's demo inputs as absolute paths (the job runs in its
    own working_dir), outputs in a bucket of the S3 server, a short 2-worker pretrain."""
    bucket = s3_server.new_bucket("jobs")
    names = ["news.jsonl.gz", "reviews.jsonl", "reviews_more.parquet"]
    overrides = [f"ingest.inputs.{i}.uri={demo}/raw/{n}" for i, n in enumerate(names)]
    overrides += [
        f"tokenize.tokenizer={demo}/tokenizer",
        f"run.output=s3://{bucket}/tiny",
        f"storage.endpoint_url={s3_server.endpoint}",  # an endpoint, not a credential
        "storage.region=us-east-1",
        "pretrain.training.workers=2",
        f"pretrain.training.cpus_per_worker={TRAIN_CPUS}",
        "pretrain.training.steps=3",
        "pretrain.training.batch_size=8",
        "pretrain.training.checkpoint_every=3",
    ]
    return {"bucket": bucket, "overrides": overrides}


def submit(cluster: Cluster, config: Path, *args: str, submission_id: str) -> subprocess.CompletedProcess:
    env = {
        **ray_env(),
        "RAY_ADDRESS": cluster.address,
        "CHUXIN_SUBMIT_ARGS": f"--submission-id {submission_id}",
        "TMPDIR": str(cluster.tmp),  # the wrapper's staging folder, even when a timeout kills it
    }
    return subprocess.run(
        [str(SUBMIT), str(config), *args],
        env=env, capture_output=True, text=True, timeout=600, cwd=cluster.tmp,
    )  # fmt: skip


def job_info(cluster: Cluster, submission_id: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.address).get_job_info(submission_id)


def failed(cluster: Cluster, sid: str, result: subprocess.CompletedProcess) -> str:
    """What to show when a job fails: its log without progress lines, and the wrapper's stderr."""
    from ray.job_submission import JobSubmissionClient

    try:
        logs = JobSubmissionClient(cluster.address).get_job_logs(sid)
    except Exception as e:  # the job may not exist (the wrapper failed first)
        logs = f"(no job logs: {e})"
    keep = [x for x in logs.splitlines() if "logging_progress" not in x and "row/s]" not in x]
    return "\n".join(keep)[-6000:] + "\n--- submit.sh stderr ---\n" + result.stderr[-2000:]


def manifest(s3_server, bucket: str, stage: str) -> dict:
    body = s3_server.client().get_object(Bucket=bucket, Key=f"tiny/{stage}/_manifest.json")["Body"].read()
    return json.loads(body)


@pytest.fixture(scope="module")
def ingested(cluster, run):
    """`jobs/submit.sh jobs/tiny.yaml ... --only ingest`, waited for as a user would."""
    sid = f"ingest-{uuid.uuid4().hex[:8]}"
    started = time.time()
    result = submit(cluster, TINY, *run["overrides"], "--only", "ingest", submission_id=sid)
    assert result.returncode == 0, failed(cluster, sid, result)
    print(f"ingest job: {time.time() - started:.0f} s")
    return {"submission_id": sid, "stdout": result.stdout}


def test_submit_one_stage_through_the_wrapper(cluster, run, ingested, s3_server):
    info = job_info(cluster, ingested["submission_id"])
    assert info.status == "SUCCEEDED"
    assert f"Job '{ingested['submission_id']}' succeeded" in ingested["stdout"]
    argv = info.entrypoint.split()
    assert argv[:3] == ["chuxin-ray", "pipeline", "config.yaml"] and argv[-2:] == ["--only", "ingest"]
    done = manifest(s3_server, run["bucket"], "ingest")
    assert done["status"] == "complete" and done["stage"] == "ingest"
    assert done["counts"]["kept"] > 0 and done["counts"]["read"] == 6000
    listed = s3_server.client().list_objects_v2(Bucket=run["bucket"], Prefix="tiny/tokenize/")
    assert listed["KeyCount"] == 0  # --only ingest
    # The runtime env carried the package and settings; credentials stayed on the nodes.
    env = info.runtime_env
    assert env["py_modules"] and env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    sent = json.dumps(env) + info.entrypoint
    assert S3_SECRET_KEY not in sent and S3_ACCESS_KEY not in sent


def test_submit_config_error_fails_before_any_job(cluster):
    result = submit(cluster, TINY, "ingest.rules.min_char=3", submission_id=f"bad-{uuid.uuid4().hex[:8]}")
    assert result.returncode == 2
    assert "ingest.rules.min_char: unknown key (did you mean `min_chars`?)" in result.stderr
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(cluster.address).list_jobs()
    assert not [j for j in jobs if (j.submission_id or "").startswith("bad-")]


def test_two_nodes_train_one_worker_each_with_outputs_in_s3(cluster, run, ingested, s3_server, tmp_path):
    from ray.util.state import list_actors, list_tasks

    # tiny.yaml up to pretrain: the ingest output of the job above is complete for the same ingest
    # section, so this pipeline skips it and runs tokenize and pretrain.
    data = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    config = tmp_path / "tiny-pretrain.yaml"
    keep = ("run", "storage", "ray", "ingest", "tokenize", "pretrain")
    config.write_text(yaml.safe_dump({k: v for k, v in data.items() if k in keep}, allow_unicode=True))
    sid = f"two-nodes-{uuid.uuid4().hex[:8]}"
    started = time.time()
    result = submit(cluster, config, *run["overrides"], submission_id=sid)
    assert result.returncode == 0, failed(cluster, sid, result)
    print(f"tokenize + pretrain job: {time.time() - started:.0f} s")
    assert job_info(cluster, sid).status == "SUCCEEDED"
    assert "ingest: " in result.stdout and "already complete" in result.stdout

    nodes = {n.node_id: n for n in cluster.alive_nodes()}
    (head,) = [i for i, n in nodes.items() if n.is_head_node]
    (second,) = [i for i, n in nodes.items() if not n.is_head_node]
    workers = list_actors(
        address=cluster.address, filters=[("class_name", "=", "RayTrainWorker")], detail=True
    )
    assert len(workers) == 2
    assert {w.node_id for w in workers} == {head, second}  # one Train worker per node
    # Ray Data ran on both nodes too: reading, cleaning, dedup, tokenising, feeding the workers.
    tasks = list_tasks(
        address=cluster.address, filters=[("type", "=", "NORMAL_TASK")], detail=True, limit=10_000
    )
    assert {t.node_id for t in tasks if t.node_id} == {head, second}

    for stage in ("ingest", "tokenize", "pretrain"):
        assert manifest(s3_server, run["bucket"], stage)["status"] == "complete", stage
    assert manifest(s3_server, run["bucket"], "pretrain")["counts"]["steps"] == 3
    listed = s3_server.client().list_objects_v2(Bucket=run["bucket"], Prefix="tiny/pretrain/encoder_model/")
    assert listed["KeyCount"] > 0
