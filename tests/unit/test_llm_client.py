"""The async OpenAI client against a scripted aiohttp server on 127.0.0.1: each failure kind is retried
or not as documented, counted by reason, and concurrency stays bounded."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from chuxin_ray.llm.client import (
    CONNECTION,
    HTTP_4XX,
    HTTP_5XX,
    HTTP_429,
    MALFORMED,
    TIMEOUT,
    ChatClient,
    MalformedAnswer,
    parse_completion,
)

MESSAGES = [{"role": "user", "content": "你好"}]


def completion(text: str) -> dict:
    return {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }


class Script:
    """Answers the n-th request with script[n] (the last entry repeats)."""

    def __init__(self, *steps: str, delay_s: float = 0.0):
        self.steps = list(steps)
        self.seen = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay_s = delay_s
        self.bodies: list[dict] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        step = self.steps[min(self.seen, len(self.steps) - 1)]
        self.seen += 1
        self.bodies.append(await request.json())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            if step == "ok":
                return web.json_response(completion("好的"))
            if step == "500":
                return web.Response(status=503, text="overloaded")
            if step == "429":
                return web.Response(status=429, headers={"Retry-After": "0"})
            if step == "400":
                return web.json_response({"error": {"message": "too long"}}, status=400)
            if step == "malformed":
                return web.Response(text='{"choices": [', content_type="application/json")
            if step == "no_content":
                return web.json_response({"choices": [{"message": {"role": "assistant"}}]})
            if step == "timeout":
                await asyncio.sleep(2.0)
                return web.json_response(completion("late"))
            if step == "drop":
                request.transport.close()
                return web.Response()
            raise AssertionError(step)
        finally:
            self.in_flight -= 1


async def with_server(script: Script, fn):
    app = web.Application()
    app.router.add_post("/v1/chat/completions", script.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await fn(f"http://127.0.0.1:{port}/v1")
    finally:
        await runner.cleanup()


def run(script: Script, calls: int = 1, **client_kwargs):
    kwargs = {"timeout_s": 0.5, "max_retries": 3, "backoff_s": 0.01, "backoff_max_s": 0.05, "seed": 0}
    kwargs.update(client_kwargs)

    async def go(base_url):
        async with ChatClient(base_url, "m", **kwargs) as client:
            results = await client.chat_many([MESSAGES] * calls, temperature=0.0, max_tokens=8)
            return results, client

    return asyncio.run(with_server(script, go))


def test_success_and_request_body():
    script = Script("ok")
    (result,), client = run(script)
    assert (result.text, result.error, result.attempts) == ("好的", None, 1)
    assert (result.prompt_tokens, result.completion_tokens, result.finish_reason) == (3, 2, "stop")
    assert script.bodies[0] == {"model": "m", "messages": MESSAGES, "temperature": 0.0, "max_tokens": 8}
    assert client.stats() == {"requests": 1, "failed_attempts": {}}


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("500", HTTP_5XX),
        ("429", HTTP_429),
        ("malformed", MALFORMED),
        ("no_content", MALFORMED),
        ("timeout", TIMEOUT),
        ("drop", CONNECTION),
    ],
)
def test_retryable_failures_are_retried_and_counted(fault, reason):
    (result,), client = run(Script(fault, fault, "ok"))
    assert (result.text, result.error, result.attempts) == ("好的", None, 3)
    assert result.retried == {reason: 2}
    assert client.stats() == {"requests": 3, "failed_attempts": {reason: 2}}


def test_a_bad_request_is_not_retried():
    (result,), client = run(Script("400", "ok"))
    assert (result.text, result.error, result.attempts) == (None, HTTP_4XX, 1)


def test_retries_run_out_with_the_last_reason():
    (result,), client = run(Script("500", "malformed", "500", "timeout", "ok"), max_retries=3)
    assert (result.text, result.error, result.attempts) == (None, TIMEOUT, 4)
    assert result.retried == {HTTP_5XX: 2, MALFORMED: 1}
    assert client.failures == {HTTP_5XX: 2, MALFORMED: 1, TIMEOUT: 1}


def test_concurrency_is_bounded():
    script = Script("ok", delay_s=0.05)
    results, _ = run(script, calls=20, concurrency=3)
    assert all(r.text == "好的" for r in results)
    assert script.max_in_flight == 3


def test_backoff_is_jittered_and_capped():
    client = ChatClient("http://127.0.0.1:1/v1", "m", backoff_s=0.5, backoff_max_s=4.0, seed=1)
    waits = [client._backoff(attempt, None) for attempt in range(1, 10) for _ in range(50)]
    assert all(0.0 <= w <= 4.0 for w in waits) and len(set(waits)) > 100
    assert max(client._backoff(1, None) for _ in range(200)) <= 0.5
    assert client._backoff(3, 7.5) == 7.5  # Retry-After wins


def test_parse_completion_rejects_non_completions():
    for body in (b"", b"[]", b'{"choices": []}', b'{"choices": [{"message": {"content": 3}}]}'):
        with pytest.raises(MalformedAnswer):
            parse_completion(body)
    assert parse_completion(json.dumps(completion("x")).encode()).text == "x"
