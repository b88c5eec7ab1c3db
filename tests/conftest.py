"""Real components, started by the tests themselves: an S3 server on 127.0.0.1 and a local Ray.

Both are session-scoped: one moto S3 server (boto3 and pyarrow talk to it over HTTP) and one local
Ray cluster for every test that asks for them.
"""

from __future__ import annotations

import logging
import os
import uuid

import pytest

# A local ray.init() writes ~/.ray/auth_token and a later `ray start` would then require it:
# fix the mode for every Ray process these tests start (see ../shared/ENVIRONMENT.md).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded from a model hub in tests

# Distinctive credentials, so a test can prove they never reach an output or a log.
S3_ACCESS_KEY = "AKIACHUXINTEST0000001"
S3_SECRET_KEY = "chuxin-secret-do-not-leak-7f3a9c"


class S3Server:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
        )

    def new_bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def storage_config(self):
        from chuxin_ray.config import StorageConfig

        return StorageConfig(endpoint_url=self.endpoint, region="us-east-1")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free port of 127.0.0.1; credentials through the standard AWS env."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    os.environ.update(
        AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY, AWS_REGION="us-east-1"
    )
    yield S3Server(f"http://{host}:{port}")
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, started through the same bootstrap the stages use."""
    import ray

    from chuxin_ray.config import RayConfig
    from chuxin_ray.ray_cluster import connect

    connect(RayConfig(num_cpus=2, object_store_memory_mb=1024))
    yield ray
    ray.shutdown()
