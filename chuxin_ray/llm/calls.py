"""The LLM step of a Ray Data pipeline: rows with a `messages` column (JSON chat messages, or null
for rows that need no call) gain `answer`, `error`, `attempts` and `retried` columns.

    llm.engine: http   a pool of caller actors, each holding one async ChatClient (bounded
                       concurrency, timeouts, retries) against any OpenAI-compatible URL
    llm.engine: vllm   ray.data.llm's vLLM processor with the `serve` section's model, on GPUs;
                       imported lazily (the CPU image has no vLLM)

No Ray Serve here: stages import this module, and nothing below stages/ imports Serve.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import pyarrow as pa
import ray

from chuxin_ray.config import Config, ConfigError, LLMCallConfig
from chuxin_ray.llm.client import ChatClient

CALLS_PER_ACTOR = 4  # Ray Data blocks a caller actor works on at once
RESULT_SCHEMA = pa.schema(
    [
        ("answer", pa.string()),  # null when the call failed or no call was needed
        ("error", pa.string()),  # the last failure's reason when every attempt failed
        ("attempts", pa.int32()),
        ("retried", pa.string()),  # JSON {reason: failed attempts that were retried}
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
    ]
)


# Set by the Helm chart on every pod when it deploys the LLM RayService: its OpenAI base URL.
LLM_URL_ENV = "CHUXIN_LLM_URL"


def endpoint(llm: LLMCallConfig, cfg: Config, where: str) -> tuple[str, str]:
    """(base URL, model name) for the http engine: the section's base_url, else CHUXIN_LLM_URL (the Helm
    chart's RayService, set on every pod), else the `serve` section's URL; ConfigError when none says
    where the LLM is."""
    base_url = llm.base_url or os.environ.get(LLM_URL_ENV) or (cfg.serve.url if cfg.serve else None)
    model = llm.model or (cfg.serve.served_model if cfg.serve else None)
    if base_url is None or model is None:
        raise ConfigError(
            f"{where}.llm: set base_url and model (any OpenAI-compatible endpoint), or add a `serve` "
            f"section describing the model that `chuxin-ray serve` deploys"
        )
    return base_url, model


def sampling_params(llm: LLMCallConfig) -> dict[str, Any]:
    return {"temperature": llm.temperature, "top_p": llm.top_p, "max_tokens": llm.max_tokens}


def add_llm_answers(
    ds: ray.data.Dataset, llm: LLMCallConfig, cfg: Config, where: str, columns: list[str]
) -> ray.data.Dataset:
    """`ds` (whose columns are `columns`, `messages` among them) with the result columns appended.
    Config errors surface here, before any Ray work runs."""
    if llm.engine == "vllm":
        return _vllm_answers(ds, llm, cfg, where, columns)
    base_url, model = endpoint(llm, cfg, where)
    api_key = os.environ.get(llm.api_key_env) if llm.api_key_env else None
    if llm.api_key_env and not api_key:
        raise ConfigError(f"{where}.llm.api_key_env: environment variable {llm.api_key_env} is not set")
    return ds.map_batches(
        ChatCaller,
        batch_size=llm.batch_size,
        batch_format="pyarrow",
        num_cpus=llm.num_cpus,
        # Several blocks at once per actor: while one block waits on its last slow answers, the next
        # keeps the client's `concurrency` slots busy (one at a time left ~6% idle per 500-row block).
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=llm.actors, max_concurrent_calls_per_actor=CALLS_PER_ACTOR
        ),
        fn_constructor_kwargs={
            "base_url": base_url,
            "model": model,
            "api_key": api_key,
            "llm": llm,
        },
    )


class ChatCaller:
    """A Ray Data actor with one ChatClient. `__call__` is async, so Ray Data runs several batches
    on the actor's event loop at once; the client's semaphore caps requests in flight at
    llm.concurrency across them."""

    def __init__(self, base_url: str, model: str, api_key: str | None, llm: LLMCallConfig):
        self.client = ChatClient(
            base_url,
            model,
            api_key=api_key,
            concurrency=llm.concurrency,
            timeout_s=llm.timeout_s,
            max_retries=llm.max_retries,
            backoff_s=llm.backoff_s,
            backoff_max_s=llm.backoff_max_s,
        )
        self.params = sampling_params(llm)

    def __del__(self):
        # Ray Data deletes the UDF when the pool shuts down gracefully; without this, aiohttp logs
        # "Unclosed client session" from every caller actor.
        self.client.close_from_another_thread()

    async def __call__(self, batch: pa.Table) -> pa.Table:
        raw = batch.column("messages").to_pylist()
        todo = [i for i, m in enumerate(raw) if m is not None]
        results = await self.client.chat_many([json.loads(raw[i]) for i in todo], **self.params)
        columns: dict[str, list] = {name: [None] * batch.num_rows for name in RESULT_SCHEMA.names}
        columns["attempts"] = [0] * batch.num_rows
        columns["prompt_tokens"] = [0] * batch.num_rows
        columns["completion_tokens"] = [0] * batch.num_rows
        for i, r in zip(todo, results, strict=True):
            columns["answer"][i] = r.text
            columns["error"][i] = r.error
            columns["attempts"][i] = r.attempts
            columns["retried"][i] = json.dumps(dict(r.retried)) if r.retried else None
            columns["prompt_tokens"][i] = r.prompt_tokens
            columns["completion_tokens"][i] = r.completion_tokens
        for field in RESULT_SCHEMA:
            batch = batch.append_column(field, pa.array(columns[field.name], field.type))
        return batch


def retried_counts(values: list[str | None]) -> Counter:
    total: Counter = Counter()
    for v in values:
        if v:
            total.update(json.loads(v))
    return total


# --------------------------------------------------------------------------------------------------
# GPU: vLLM inside Ray Data
# --------------------------------------------------------------------------------------------------


def vllm_processor_config(llm: LLMCallConfig, cfg: Config, where: str) -> dict[str, Any]:
    """The kwargs of ray.data.llm.vLLMEngineProcessorConfig: the `serve` section's model and engine
    settings, the stage's batch size and engine count."""
    if cfg.serve is None:
        raise ConfigError(f"{where}.llm.engine vllm: add a `serve` section naming the model to load")
    s = cfg.serve
    engine_kwargs: dict[str, Any] = {
        "tensor_parallel_size": s.tensor_parallel_size,
        "gpu_memory_utilization": s.gpu_memory_utilization,
    }
    if s.max_model_len is not None:
        engine_kwargs["max_model_len"] = s.max_model_len
    engine_kwargs.update(s.engine_kwargs)
    config: dict[str, Any] = {
        "model_source": s.model,
        "engine_kwargs": engine_kwargs,
        "batch_size": llm.batch_size,
        "concurrency": llm.actors,
        "should_continue_on_error": True,  # a failed row is counted, not a failed stage
    }
    if s.accelerator_type:
        config["accelerator_type"] = s.accelerator_type
    return config


def _vllm_answers(
    ds: ray.data.Dataset, llm: LLMCallConfig, cfg: Config, where: str, columns: list[str]
) -> ray.data.Dataset:
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig  # vLLM at run time: GPU image

    processor = build_processor(
        vLLMEngineProcessorConfig(**vllm_processor_config(llm, cfg, where)),
        preprocess=_VllmPre(sampling_params(llm)),
        postprocess=_VllmPost(columns),
    )
    # Rows without messages skip the engine: split, then union the passthrough back.
    needs = ds.filter(lambda row: row["messages"] is not None)
    skip = ds.filter(lambda row: row["messages"] is None).map_batches(
        _no_call, batch_format="pyarrow", batch_size=None
    )
    return processor(needs).union(skip)


class _VllmPre:
    def __init__(self, params: dict):
        self.params = params

    def __call__(self, row: dict) -> dict:
        return dict(row, messages=json.loads(row["messages"]), sampling_params=self.params)


class _VllmPost:
    """Back to the stage's columns plus the result columns: the processor adds its own (prompt,
    token ids, timings), and the union with the passthrough rows needs one schema."""

    def __init__(self, columns: list[str]):
        self.columns = columns

    def __call__(self, row: dict) -> dict:
        error = row.get("__inference_error__") or None
        out = {c: row[c] for c in self.columns}
        out["messages"] = json.dumps(row["messages"], ensure_ascii=False)
        out.update(
            answer=None if error else row.get("generated_text"),
            error="engine" if error else None,
            attempts=1,
            retried=None,
            prompt_tokens=int(row.get("num_input_tokens") or 0),
            completion_tokens=int(row.get("num_generated_tokens") or 0),
        )
        return out


def _no_call(batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    defaults = {"attempts": 0, "prompt_tokens": 0, "completion_tokens": 0}
    for field in RESULT_SCHEMA:
        batch = batch.append_column(field, pa.array([defaults.get(field.name)] * n, field.type))
    return batch
