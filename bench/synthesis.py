"""Synthesis throughput: the `synthesize` stage against a plain async client on the same endpoint.

    .venv/bin/python bench/synthesis.py                              # simulated LLM, 20,000 passages
    .venv/bin/python bench/synthesis.py --endpoint serve             # our Serve app, a tiny random LM
    .venv/bin/python bench/synthesis.py --url http://host:8000/v1 --model Qwen/Qwen2.5-7B-Instruct

Both sides send the same chat requests (the stage's own prompts, for the same passages) at the same
concurrency to the same endpoint:
  plain   one asyncio loop, one ChatClient, `--concurrency` requests in flight
  stage   `synthesize` on a local Ray (1 caller actor, llm.concurrency = --concurrency), Ray start-up
          excluded; its time includes reading passages, writing shards and markers, the manifest
Prints requests/s and completion tokens/s of each and the stage's overhead (target <= 10%).
The default 20,000 passages run ~70 s a side: the stage's fixed start-up (its Ray Data read and the
caller actor, ~4-7 s here) is then a few percent, as at the recipe's ~1e6 passages; at 2,000 passages
(--passages 2000) the start-up alone is a third of the run. Both figures are printed: end to end, and
at the endpoint from first to last request (the steady state).

Endpoints: `simulated` is an OpenAI-compatible server in its own process answering after a fixed
latency (--latency-ms) with a fixed answer, so the endpoint's own capacity is not what is measured;
`serve` deploys chuxin_ray's CPU service with a tiny random LM (on 2 cores the service itself is the
bottleneck, so both sides measure it); `--url` is any endpoint (a vLLM server on a GPU machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def simulated_server(port: int, latency_ms: float) -> None:
    """Runs in a child process: every chat request is answered after `latency_ms`. GET /stats gives
    the arrival times of the first and last request since POST /reset: the endpoint's view of a
    run, start-up excluded."""
    from aiohttp import web

    answer = "北京有哪些著名景点\n故宫的门票多少钱"
    seen = {"first": None, "last": None, "requests": 0}

    async def chat(request: web.Request) -> web.Response:
        now = time.time()
        seen["first"] = seen["first"] or now
        seen["last"] = now
        seen["requests"] += 1
        body = await request.json()
        await asyncio.sleep(latency_ms / 1000)
        return web.json_response(
            {
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 200, "completion_tokens": 16, "total_tokens": 216},
            }
        )

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(seen)

    async def reset(request: web.Request) -> web.Response:
        seen.update(first=None, last=None, requests=0)
        return web.json_response(seen)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def endpoint_stats(port: int | None, reset: bool = False) -> dict | None:
    import urllib.request

    if port is None:
        return None
    url = f"http://127.0.0.1:{port}/{'reset' if reset else 'stats'}"
    with urllib.request.urlopen(
        urllib.request.Request(url, method="POST" if reset else "GET"), timeout=10
    ) as r:
        return json.loads(r.read())


def wait_for(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def write_passages(folder: Path, n: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from chuxin_ray import demo

    pool = demo.people_daily()
    folder.mkdir(parents=True, exist_ok=True)
    texts = [pool[i % len(pool)] for i in range(n)]
    pq.write_table(
        pa.table({"id": [f"p{i}" for i in range(n)], "text": texts, "source": ["bench"] * n}),
        folder / "passages.parquet",
    )
    return folder


def plain_client(cfg, passages: Path) -> tuple[float, int, int]:
    """(seconds, requests, completion tokens) for the stage's prompts sent by one ChatClient."""
    import pyarrow.parquet as pq

    from chuxin_ray.llm.calls import endpoint, sampling_params
    from chuxin_ray.llm.client import ChatClient
    from chuxin_ray.llm.prompts import cut, messages_for, pick_template

    section = cfg.synthesize
    table = pq.read_table(passages / "passages.parquet")
    conversations = [
        messages_for(
            pick_template(section.prompts, pid),
            passage=cut(text, section.max_passage_chars),
            n=section.queries_per_passage,
        )
        for pid, text in zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True)
    ]
    base_url, model = endpoint(section.llm, cfg, "synthesize")

    async def go():
        async with ChatClient(base_url, model, concurrency=section.llm.concurrency, timeout_s=300) as client:
            started = time.perf_counter()
            results = await client.chat_many(conversations, **sampling_params(section.llm))
            return time.perf_counter() - started, results, client.requests

    seconds, results, requests = asyncio.run(go())
    failed = sum(r.error is not None for r in results)
    if failed:
        raise RuntimeError(f"plain client: {failed} failed requests")
    return seconds, requests, sum(r.completion_tokens for r in results)


def stage(cfg) -> tuple[float, int, int]:
    from chuxin_ray.stages import synthesize

    started = time.perf_counter()
    manifest = synthesize.main(cfg, force=True)
    seconds = time.perf_counter() - started
    counts = manifest["counts"]
    if counts["funnel"]["failed_calls"]:
        raise RuntimeError(f"stage: failed calls {counts['funnel']['failed_calls']}")
    return seconds, counts["requests"], counts["completion_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--endpoint", choices=["simulated", "serve"], default="simulated")
    parser.add_argument("--url", help="an external OpenAI-compatible base URL (overrides --endpoint)")
    parser.add_argument("--model", default="bench-llm", help="model name sent with --url")
    parser.add_argument("--passages", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=100.0, help="simulated: latency per request")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each side; the best is reported")
    parser.add_argument("--serve-simulated", nargs=2, metavar=("PORT", "LATENCY_MS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_simulated:
        simulated_server(int(args.serve_simulated[0]), float(args.serve_simulated[1]))
        return
    logging.basicConfig(level=logging.WARNING)

    from chuxin_ray.config import validate_config
    from chuxin_ray.ray_cluster import connect

    tmp = Path(tempfile.mkdtemp(prefix="bench-synthesis-"))
    passages = write_passages(tmp / "passages", args.passages)
    llm = {
        "concurrency": args.concurrency,
        "actors": 1,
        "max_tokens": args.max_tokens,
        "batch_size": 4 * args.concurrency,
    }
    data = {
        "run": {"name": "bench", "output": str(tmp / "run")},
        "ray": {"num_cpus": os.cpu_count()},
        "synthesize": {"input": str(passages), "queries_per_passage": 2, "shard_rows": 500, "llm": llm},
    }
    child, port = None, None
    if args.url:
        llm.update(base_url=args.url, model=args.model)
        where = args.url
    elif args.endpoint == "simulated":
        port = free_port()
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve-simulated", str(port), str(args.latency_ms)]
        )
        wait_for(port)
        llm.update(base_url=f"http://127.0.0.1:{port}/v1", model="bench-llm")
        where = f"simulated endpoint, {args.latency_ms:.0f} ms per request"
    else:
        from chuxin_ray.demo import people_daily, train_tokenizer
        from chuxin_ray.llm.tiny import build_tiny_causal_lm

        tok = train_tokenizer(people_daily()[:2000], tmp / "tokenizer", vocab_size=2000)
        lm = build_tiny_causal_lm(tok, tmp / "lm")
        data["serve"] = {"model": str(lm), "model_id": "tiny", "port": free_port(), "max_batch_size": 16}
        where = "chuxin_ray Serve app, tiny random LM on CPU"
    cfg = validate_config(data)
    try:
        connect(cfg.ray)
        if cfg.serve is not None:
            from chuxin_ray.llm.service import deploy

            deploy(cfg, wait=False)
        plain_client(cfg, passages)  # warm-up: connections, the endpoint's first batches
        results = {"plain": [], "stage": []}
        steady = {"plain": [], "stage": []}
        for _ in range(args.repeat):
            for side, fn in (("plain", lambda: plain_client(cfg, passages)), ("stage", lambda: stage(cfg))):
                endpoint_stats(port, reset=True)
                results[side].append(fn())
                seen = endpoint_stats(port)
                if seen:  # the endpoint's view: first to last request, start-up excluded
                    steady[side].append(seen["requests"] / max(seen["last"] - seen["first"], 1e-9))
    finally:
        if child is not None:
            child.terminate()
    print(f"\n{args.passages} passages, concurrency {args.concurrency}, {where}")
    best = {}
    for side, runs in results.items():
        seconds, requests, tokens = min(runs)
        best[side] = requests / seconds
        print(
            f"  {side:<6} {seconds:7.2f} s  {requests / seconds:8.1f} requests/s  {tokens / seconds:9.1f} tokens/s"
        )
    overhead = 1 - best["stage"] / best["plain"]
    verdict = "ok" if overhead <= 0.10 else "ABOVE TARGET"
    print(f"  stage overhead, end to end: {overhead:.1%} (target <= 10%: {verdict})")
    report = {"passages": args.passages, "concurrency": args.concurrency, "overhead": round(overhead, 4)}
    if steady["plain"]:
        rates = {side: max(v) for side, v in steady.items()}
        steady_overhead = 1 - rates["stage"] / rates["plain"]
        startup = min(r[0] for r in results["stage"]) - args.passages / rates["stage"]
        print(
            f"  at the endpoint, first to last request: plain {rates['plain']:.1f}, stage {rates['stage']:.1f} "
            f"requests/s; overhead {steady_overhead:.1%}; stage start-up (Ray Data, actor) ~{startup:.1f} s"
        )
        report.update(steady_overhead=round(steady_overhead, 4), startup_s=round(startup, 2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
