"""The CPU LLM service on the local Ray: a tiny random causal LM (built from a config, with a tokenizer
trained here) behind Ray Serve answers OpenAI-style requests; batching does not change greedy
answers; bad requests get OpenAI-style errors; `chuxin-ray serve` deploys it and prints the URL."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import yaml

from chuxin_ray import demo
from chuxin_ray.config import validate_config
from chuxin_ray.llm.client import HTTP_4XX, ChatClient
from chuxin_ray.llm.tiny import build_tiny_causal_lm

pytestmark = pytest.mark.integration

MODEL_ID = "tiny-chat"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | bytes | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    tok = demo.train_tokenizer(demo.people_daily()[:400], root / "tokenizer", vocab_size=800)
    return build_tiny_causal_lm(tok, root / "model")


@pytest.fixture(scope="module")
def service(tiny_lm, ray_local, tmp_path_factory):
    from ray import serve

    from chuxin_ray.llm.service import deploy

    data = {
        "run": {"name": "serve", "output": str(tmp_path_factory.mktemp("run"))},
        "serve": {
            "model": str(tiny_lm),
            "model_id": MODEL_ID,
            "port": free_port(),
            "max_batch_size": 4,
            "batch_wait_timeout_s": 0.05,
            "max_model_len": 256,
        },
    }
    url = deploy(validate_config(data), wait=False)
    yield data, url
    serve.shutdown()


def test_models_and_an_openai_style_request(service):
    _, url = service
    status, models = http("GET", f"{url}/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [MODEL_ID]
    # The body the OpenAI SDK sends for client.chat.completions.create(...)
    status, body = http(
        "POST",
        f"{url}/chat/completions",
        {
            "model": MODEL_ID,
            "messages": [
                {"role": "system", "content": "你是一名数据标注员。"},
                {"role": "user", "content": "为这段文字写一个搜索查询：国务院总理李鹏会见日本客人。"},
            ],
            "max_tokens": 12,
            "temperature": 0.7,
            "n": 2,
            "logprobs": False,  # accepted and ignored, as vLLM ignores what it does not use
        },
    )
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["model"] == MODEL_ID
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 10 and 0 < usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_openai_sdk_if_installed(service):
    openai = pytest.importorskip("openai")
    _, url = service
    client = openai.OpenAI(base_url=url, api_key="unused")
    out = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "你好"}], max_tokens=4, temperature=0
    )
    assert out.choices[0].message.content is not None


def test_batched_greedy_answers_equal_one_at_a_time(service):
    _, url = service
    conversations = [[{"role": "user", "content": text[:80]}] for text in demo.people_daily()[:12]]

    async def ask(concurrency: int):
        async with ChatClient(url, MODEL_ID, concurrency=concurrency, timeout_s=60, max_retries=0) as client:
            return await client.chat_many(conversations, temperature=0.0, max_tokens=10)

    alone = asyncio.run(ask(1))
    together = asyncio.run(ask(12))  # batches of up to max_batch_size=4
    assert all(r.error is None for r in alone + together)
    assert [r.text for r in together] == [r.text for r in alone]
    assert any(r.text for r in alone)  # a 0.2-init model writes tokens, not only specials


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
        ({"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "stream": True}, 400, "stream"),
        ({"model": MODEL_ID, "messages": []}, 400, "invalid request"),
        ({"model": MODEL_ID, "messages": [{"role": "user", "content": "长" * 400}]}, 400, "max_model_len"),
        (b"{not json", 400, "invalid request"),
    ],
)
def test_bad_requests_get_openai_errors(service, body, status, words):
    _, url = service
    code, answer = http("POST", f"{url}/chat/completions", body)
    assert code == status and words in answer["error"]["message"]


def test_the_client_does_not_retry_a_bad_request(service):
    _, url = service

    async def ask():
        async with ChatClient(url, "other-model", max_retries=3) as client:
            return await client.chat([{"role": "user", "content": "x"}])

    result = asyncio.run(ask())
    assert (result.error, result.attempts) == (HTTP_4XX, 1)


def test_cli_serve_deploys_on_a_running_cluster_and_prints_the_url(service, ray_local, tmp_path):
    data, url = service
    data = json.loads(json.dumps(data))
    # A second application on the same Serve instance (same HTTP port), under its own prefix.
    data["serve"].update(app_name="llm-cli", route_prefix="/cli")
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(data))
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    out = subprocess.run(
        [sys.executable, "-m", "chuxin_ray.cli", "serve", str(config), "serve.model_id=cli-model"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    cli_url = url.replace("/v1", "/cli/v1")
    assert cli_url in out.stdout
    status, models = http("GET", f"{cli_url}/models")
    assert status == 200 and models["data"][0]["id"] == "cli-model"
