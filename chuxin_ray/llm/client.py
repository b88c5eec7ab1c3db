"""An async client for any OpenAI-compatible chat endpoint: our Serve app, vLLM, a hosted API.

Bounded concurrency (a semaphore and a connection pool of the same size), a per-request timeout,
retries with exponential backoff and full jitter (sleep ~ U(0, min(cap, base * 2^attempt)), as in
AWS's "Exponential Backoff and Jitter") on the failures that a retry can fix: 5xx, 429, 408,
timeouts, dropped connections and malformed answers. A call never raises: it returns a ChatResult
whose `error` names the reason of its last failure, and every failed attempt is counted by reason,
so a stage can account for every row.

aiohttp, not httpx: ray[serve] and ray[default] already require it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

TIMEOUT = "timeout"
CONNECTION = "connection"
HTTP_5XX = "http_5xx"
HTTP_429 = "http_429"
HTTP_4XX = "http_4xx"  # not retried: the request itself is wrong (prompt too long, unknown model)
MALFORMED = "malformed"  # a 200 whose body is not JSON or has no choices[0].message.content
REASONS = (TIMEOUT, CONNECTION, HTTP_5XX, HTTP_429, HTTP_4XX, MALFORMED)
RETRYABLE = frozenset({TIMEOUT, CONNECTION, HTTP_5XX, HTTP_429, MALFORMED})
RETRY_AFTER_CAP_S = 60.0  # a server's Retry-After is honoured up to this


@dataclass
class ChatResult:
    text: str | None  # the answer, None when every attempt failed
    error: str | None  # reason of the last failed attempt when text is None
    attempts: int
    retried: Counter = field(default_factory=Counter)  # reasons of the failed attempts before the last
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0


class MalformedAnswer(ValueError):
    pass


class ChatClient:
    """Use inside one event loop: `async with ChatClient(...) as client: await client.chat(messages)`.
    A long-lived owner (a Ray Data actor) may call `chat` without `async with`: the session opens on
    first use, in the running loop."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        concurrency: int = 16,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
        seed: int | None = None,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.concurrency = concurrency
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.rng = random.Random(seed)
        self.failures: Counter = Counter()  # every failed attempt, by reason
        self.requests = 0
        self._session: aiohttp.ClientSession | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> ChatClient:
        self._open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _open(self) -> None:
        if self._session is None or self._session.closed:
            # limit = concurrency: the pool never holds more sockets than requests in flight
            connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=self.concurrency)
            self._session = aiohttp.ClientSession(connector=connector, headers=self.headers)
            self._semaphore = asyncio.Semaphore(self.concurrency)
            self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def close_from_another_thread(self, timeout_s: float = 5.0) -> None:
        """For owners that cannot await (an actor's __del__): the session's own loop closes it."""
        loop = self._loop
        if self._session is None or loop is None or loop.is_closed() or not loop.is_running():
            return
        with contextlib.suppress(Exception):  # shutting down: the sockets close with the process anyway
            asyncio.run_coroutine_threadsafe(self.close(), loop).result(timeout_s)

    async def chat_many(self, conversations: list[list[dict]], **params) -> list[ChatResult]:
        """All conversations at once, at most `concurrency` in flight; results in input order."""
        return list(await asyncio.gather(*(self.chat(m, **params) for m in conversations)))

    async def chat(self, messages: list[dict], **params) -> ChatResult:
        """One chat completion with retries. `params`: temperature, max_tokens, top_p, stop, seed."""
        self._open()
        body = json.dumps({"model": self.model, "messages": messages, **params}, ensure_ascii=False)
        retried: Counter = Counter()
        started = time.perf_counter()
        attempt = 0
        while True:
            attempt += 1
            async with self._semaphore:
                reason, retry_after, result = await self._attempt(body)
            if reason is None:
                result.attempts, result.retried = attempt, retried
                result.latency_s = time.perf_counter() - started
                return result
            self.failures[reason] += 1
            if reason not in RETRYABLE or attempt > self.max_retries:
                return ChatResult(None, reason, attempt, retried, latency_s=time.perf_counter() - started)
            retried[reason] += 1
            await asyncio.sleep(self._backoff(attempt, retry_after))

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, RETRY_AFTER_CAP_S)
        return self.rng.uniform(0.0, min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)))

    async def _attempt(self, body: str) -> tuple[str | None, float | None, ChatResult | None]:
        """(failure reason or None, Retry-After seconds, result on success)."""
        self.requests += 1
        try:
            async with self._session.post(self.url, data=body.encode("utf-8"), timeout=self.timeout) as r:
                raw = await r.read()
                if r.status >= 500:
                    return HTTP_5XX, None, None
                if r.status == 429:
                    return HTTP_429, _retry_after(r.headers.get("Retry-After")), None
                if r.status == 408:
                    return TIMEOUT, None, None
                if r.status >= 400:
                    return HTTP_4XX, None, None
        except TimeoutError:
            return TIMEOUT, None, None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError):
            return CONNECTION, None, None
        try:
            return None, None, parse_completion(raw)
        except MalformedAnswer:
            return MALFORMED, None, None

    def stats(self) -> dict:
        return {"requests": self.requests, "failed_attempts": dict(self.failures)}


def parse_completion(raw: bytes) -> ChatResult:
    """The first choice of an OpenAI chat.completion body; MalformedAnswer when it is not one."""
    try:
        data = json.loads(raw)
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise MalformedAnswer(f"not a chat completion: {e}") from None
    if not isinstance(text, str):
        raise MalformedAnswer(f"message.content is {type(text).__name__}, not a string")
    usage = data.get("usage") or {}
    return ChatResult(
        text=text,
        error=None,
        attempts=1,
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: rare from LLM servers; back off normally
        return None
