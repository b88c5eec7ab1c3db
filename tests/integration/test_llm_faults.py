"""Synthesis against an unreliable endpoint, and a killed synthesis run.

FakeOpenAI is a test double of an EXTERNAL LLM service (a hosted API, someone's vLLM): a small
OpenAI-compatible server on 127.0.0.1 with scripted answers and faults. Our own components (the
stage, Ray Data, the client) are real.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from aiohttp import web

from chuxin_ray import storage
from chuxin_ray.config import load_config
from chuxin_ray.data.shards import read_table
from chuxin_ray.stages import synthesize

pytestmark = pytest.mark.integration

PASSAGE_ID = re.compile(r"p(\d{4})")


class FakeOpenAI:
    """answer(content) -> text; fault(content, attempt) -> None or one of 500, 429, 400, timeout,
    malformed, drop. Counts attempts per user message; runs its own event loop in a thread."""

    def __init__(
        self,
        answer: Callable[[str], str],
        fault: Callable[[str, int], str | None] | None = None,
        delay_s: float = 0.0,
        hang_s: float = 3.0,
    ):
        self.answer, self.fault, self.delay_s, self.hang_s = answer, fault, delay_s, hang_s
        self.attempts: Counter = Counter()
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> str:
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return f"http://127.0.0.1:{self.port}/v1"

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def snapshot(self) -> Counter:
        with self.lock:
            return Counter(self.attempts)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        content = body["messages"][-1]["content"]
        with self.lock:
            self.attempts[content] += 1
            attempt = self.attempts[content]
        await asyncio.sleep(self.delay_s)
        kind = self.fault(content, attempt) if self.fault else None
        if kind == "500":
            return web.Response(status=500, text="internal error")
        if kind == "429":
            return web.Response(status=429, headers={"Retry-After": "0"})
        if kind == "400":
            return web.json_response({"error": {"message": "bad request"}}, status=400)
        if kind == "timeout":
            await asyncio.sleep(self.hang_s)
        if kind == "malformed":
            return web.Response(text='{"choices": [{"message": ', content_type="application/json")
        if kind == "drop":
            request.transport.close()
            return web.Response()
        text = self.answer(content)
        return web.json_response(
            {
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": len(content), "completion_tokens": len(text)},
            }
        )


def passage_number(content: str) -> int:
    return int(PASSAGE_ID.search(content).group(1))


def write_passages(folder: Path, n: int) -> Path:
    """A plain Parquet folder of {id, text, source}: synthesize reads any such folder."""
    folder.mkdir(parents=True)
    texts = [
        f"p{i:04d} 第{i}段：国务院总理今天会见了来访的客人，双方就经贸合作交换了意见。" for i in range(n)
    ]
    half = n // 2
    for k, part in enumerate((range(half), range(half, n))):
        pq.write_table(
            pa.table(
                {
                    "id": [f"doc-{i}" for i in part],
                    "text": [texts[i] for i in part],
                    "source": ["news"] * len(part),
                }
            ),
            folder / f"part-{k}.parquet",
        )
    return folder


def config(tmp: Path, base_url: str, passages: Path, shard_rows: int = 25, **llm):
    data = {
        "run": {"name": "faults", "output": str(tmp / "run")},
        "synthesize": {
            "input": str(passages),
            "queries_per_passage": 2,
            "shard_rows": shard_rows,
            "prompts": [{"name": "plain", "user": "为这段文字写{n}个查询：{passage}"}],
            "llm": {
                "base_url": base_url,
                "model": "external-llm",
                "concurrency": 8,
                "actors": 1,
                "batch_size": 25,
                "timeout_s": 1.0,
                "max_retries": 3,
                "backoff_s": 0.02,
                "backoff_max_s": 0.1,
                **llm,
            },
        },
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return load_config(path), path


def two_queries(content: str) -> str:
    i = passage_number(content)
    return f"好的，以下是查询：\n1. 第{i}段讲了什么会见\n2. 第{i}段的经贸合作"


# passage number % 10 -> what the endpoint does with it
FAULTS = {
    0: lambda attempt: "500",  # always: the passage is lost, counted as http_5xx
    1: lambda attempt: "500" if attempt == 1 else None,
    2: lambda attempt: "timeout" if attempt == 1 else None,
    3: lambda attempt: "malformed" if attempt <= 2 else None,
    4: lambda attempt: "drop" if attempt == 1 else None,
    6: lambda attempt: "429" if attempt == 1 else None,
    7: lambda attempt: "400",  # a bad request is not retried
}


def scripted_fault(content: str, attempt: int) -> str | None:
    rule = FAULTS.get(passage_number(content) % 10)
    return rule(attempt) if rule else None


def scripted_answer(content: str) -> str:
    return "" if passage_number(content) % 10 == 5 else two_queries(content)  # 5: nothing to parse


def test_retries_lose_nothing_and_every_passage_is_accounted_for(tmp_path, ray_local):
    n = 100
    server = FakeOpenAI(scripted_answer, scripted_fault, hang_s=2.0)
    base_url = server.start()
    try:
        cfg, _ = config(tmp_path, base_url, write_passages(tmp_path / "passages", n))
        manifest = synthesize.main(cfg)
    finally:
        server.stop()
    tenth = n // 10
    funnel = manifest["counts"]["funnel"]
    assert funnel == {
        "passages_in": n,
        "passages_with_queries": 7 * tenth,
        "queries_generated": 14 * tenth,
        "unparsed_answers": tenth,
        "failed_calls": {"http_4xx": tenth, "http_5xx": tenth},
        # 3 retries for each always-500 passage, one for each 1-fault passage, two for malformed
        "retried_attempts": {
            "connection": tenth,
            "http_429": tenth,
            "http_5xx": 3 * tenth + tenth,
            "malformed": 2 * tenth,
            "timeout": tenth,
        },
    }
    expected_attempts = {0: 4, 1: 2, 2: 2, 3: 3, 4: 2, 5: 1, 6: 2, 7: 1, 8: 1, 9: 1}
    attempts = server.snapshot()
    assert len(attempts) == n
    assert {c: a for c, a in attempts.items()} == {
        c: expected_attempts[passage_number(c) % 10] for c in attempts
    }
    assert manifest["counts"]["requests"] == sum(attempts.values())

    out = storage.resolve(cfg.stage_output("synthesize"))
    data = read_table(out, [f["path"] for f in manifest["files"]["data"]]).to_pylist()
    failed = read_table(out, [f["path"] for f in manifest["files"]["failed"]]).to_pylist()
    by_passage: dict[str, list[str]] = {}
    for row in data:
        by_passage.setdefault(row["passage_id"], []).append(row["query"])
        assert row["query_id"].startswith(row["passage_id"] + "#q") and row["source"] == "news"
    ok = {f"doc-{i}" for i in range(n) if i % 10 in (1, 2, 3, 4, 6, 8, 9)}
    assert set(by_passage) == ok
    for pid, queries in by_passage.items():
        i = int(pid.split("-")[1])
        assert queries == [f"第{i}段讲了什么会见", f"第{i}段的经贸合作"]
    reasons = Counter(r["reason"] for r in failed)
    assert reasons == {"http_5xx": tenth, "http_4xx": tenth, "no_query_in_answer": tenth}
    assert {r["passage_id"] for r in failed} | ok == {f"doc-{i}" for i in range(n)}


def test_a_killed_run_resumes_without_regenerating_finished_shards(tmp_path, ray_local):
    n = 120
    server = FakeOpenAI(two_queries, delay_s=0.1)
    base_url = server.start()
    try:
        # 12 shards of 10 passages, ~0.5 s each at 2 requests in flight of 0.1 s
        passages = write_passages(tmp_path / "passages", n)
        cfg, path = config(tmp_path, base_url, passages, shard_rows=10, concurrency=2, batch_size=10)
        out = storage.resolve(cfg.stage_output("synthesize"))
        done = Path(out.path) / "_done"

        env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
        proc = subprocess.Popen(
            [sys.executable, "-m", "chuxin_ray.cli", "synthesize", str(path)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 150
            while time.time() < deadline and len(list(done.glob("*.json"))) < 3 and proc.poll() is None:
                time.sleep(0.1)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole driver process group, as a node loss would
            proc.wait(30)
        finished = sorted(p.stem for p in done.glob("*.json"))
        assert 3 <= len(finished) < 12, finished
        assert not (Path(out.path) / "_manifest.json").exists()
        before = {name: (Path(out.path) / "data" / f"{name}.parquet").read_bytes() for name in finished}
        mtimes = {name: (Path(out.path) / "data" / f"{name}.parquet").stat().st_mtime_ns for name in finished}
        time.sleep(1.0)  # requests the killed job had in flight land now, not during the rerun
        at_kill = server.snapshot()

        manifest = synthesize.main(cfg)
        after = server.snapshot()
    finally:
        server.stop()

    assert manifest["counts"]["funnel"]["passages_in"] == n
    assert manifest["counts"]["funnel"]["passages_with_queries"] == n
    assert manifest["counts"]["shards"] == 12
    for name in finished:  # untouched: same bytes, same modification time
        data_file = Path(out.path) / "data" / f"{name}.parquet"
        assert data_file.read_bytes() == before[name] and data_file.stat().st_mtime_ns == mtimes[name]
    # No passage of a finished shard was asked for again; every other passage was asked for.
    finished_rows = {int(name.split("-")[1]) for name in finished}  # shard k = passages 10k..10k+9
    rerun = {passage_number(c) for c in after if after[c] > at_kill.get(c, 0)}
    assert rerun == {i for i in range(n) if i // 10 not in finished_rows}
    data = read_table(out, [f["path"] for f in manifest["files"]["data"]]).to_pylist()
    assert len(data) == 2 * n and len({r["query_id"] for r in data}) == 2 * n
