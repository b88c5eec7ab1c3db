"""The OpenAI-compatible LLM service on Ray Serve; `build_app(cfg)` is a function of the config alone,
so `chuxin-ray serve`, a test and the Helm chart's RayService build the same application.

    serve.engine: vllm          ray.serve.llm's OpenAI app with vLLM (GPU image; imported lazily:
                                `import ray.serve.llm` raises ImportError where vLLM is absent)
    serve.engine: transformers  a FastAPI ingress over any transformers causal LM, requests batched
                                with @serve.batch (CPU, tests, the laptop demo)

Both answer POST /v1/chat/completions and GET /v1/models under `serve.route_prefix`.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures (`request:
# Request`) at class-definition time through Serve's ingress wrapper, which sees strings otherwise.
import asyncio
import logging
import os
import time
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve

from chuxin_ray.config import Config, ServeConfig, StorageConfig
from chuxin_ray.llm.generate import ChatGenerator, GenRequest, GenResult, PromptError
from chuxin_ray.llm.model_files import is_remote, local_model_dir
from chuxin_ray.llm.protocol import ChatCompletionRequest, completion_body, error_body, models_body

log = logging.getLogger(__name__)

# Requests a replica holds: one batch generating while up to three more fill. Serve's default (5)
# would cap a batch of 8 at 5 requests.
ONGOING_PER_BATCH = 4

api = FastAPI(title="chuxin-ray LLM", docs_url=None, redoc_url=None)


@serve.deployment(name="TransformersChat", health_check_period_s=10)
@serve.ingress(api)
class TransformersChat:
    """One replica: one model in memory, requests batched into `generate` calls in a worker thread
    (the event loop keeps accepting requests while a batch runs)."""

    def __init__(self, section: ServeConfig, storage_cfg: StorageConfig):
        torch.set_num_threads(max(1, round(section.num_cpus)))
        self.engine = ChatGenerator(
            local_model_dir(section.model, storage_cfg),
            chat_template=section.chat_template,
            dtype=section.dtype,
            max_model_len=section.max_model_len,
        )
        self.model_id = section.served_model
        self.default_max_tokens = section.default_max_tokens
        self.created = time.time()
        self.generate_batch.set_max_batch_size(section.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(section.batch_wait_timeout_s)

    @api.get("/v1/models")
    def models(self) -> dict:
        return models_body(self.model_id, self.created)

    @api.get("/health")
    def health(self) -> dict:
        return {"status": "ok"}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        try:
            req = ChatCompletionRequest.model_validate(await request.json())
        except (ValueError, ValidationError) as e:
            return JSONResponse(error_body(f"invalid request: {e}"), status_code=400)
        if req.stream:
            return JSONResponse(error_body("stream=true is not supported by this server"), status_code=400)
        if req.model != self.model_id:
            message = f"model {req.model!r} does not exist; this server serves {self.model_id!r}"
            return JSONResponse(error_body(message, "NotFoundError", 404), status_code=404)
        max_tokens = req.max_completion_tokens or req.max_tokens or self.default_max_tokens
        try:
            ids = self.engine.prompt_ids([m.model_dump() for m in req.messages], max_tokens)
        except PromptError as e:
            return JSONResponse(error_body(str(e)), status_code=400)
        gen = GenRequest(ids, max_tokens, req.temperature, req.top_p, req.seed, req.stop_list())
        results = await asyncio.gather(*(self.generate_batch(gen) for _ in range(req.n)))
        return completion_body(self.model_id, results)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)  # reset from the config in __init__
    async def generate_batch(self, requests: list[GenRequest]) -> list[GenResult]:
        return await asyncio.to_thread(self.engine.generate, requests)


def build_app(cfg: Config) -> serve.Application:
    """The Serve application for `cfg.serve`."""
    section: ServeConfig = cfg.require("serve")
    if section.engine == "vllm":
        from ray.serve.llm import build_openai_app  # needs vLLM: the GPU image only

        return build_openai_app({"llm_configs": [vllm_llm_config(section)]})
    return TransformersChat.options(**transformers_deployment_options(section)).bind(section, cfg.storage)


def vllm_llm_config(section: ServeConfig) -> dict[str, Any]:
    """The kwargs of ray.serve.llm.LLMConfig for this section (a dict: LLMConfig itself needs vLLM)."""
    source: Any = {"bucket_uri": section.model} if is_remote(section.model) else section.model
    engine_kwargs: dict[str, Any] = {
        "tensor_parallel_size": section.tensor_parallel_size,
        "gpu_memory_utilization": section.gpu_memory_utilization,
    }
    if section.max_model_len is not None:
        engine_kwargs["max_model_len"] = section.max_model_len
    engine_kwargs.update(section.engine_kwargs)
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": section.served_model, "model_source": source},
        "engine_kwargs": engine_kwargs,
        "deployment_config": {"autoscaling_config": _autoscaling(section)},
    }
    if section.accelerator_type:
        config["accelerator_type"] = section.accelerator_type
    return config


def transformers_deployment_options(section: ServeConfig) -> dict[str, Any]:
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": section.num_cpus},
        "max_ongoing_requests": ONGOING_PER_BATCH * section.max_batch_size,
    }
    if section.autoscaling is None:
        options["num_replicas"] = section.replicas
    else:
        options["autoscaling_config"] = _autoscaling(section)
    return options


def _autoscaling(section: ServeConfig) -> dict[str, Any]:
    a = section.autoscaling
    if a is None:  # a fixed count is autoscaling between equal bounds
        return {"min_replicas": section.replicas, "max_replicas": section.replicas}
    return {
        "min_replicas": a.min_replicas,
        "max_replicas": a.max_replicas,
        "target_ongoing_requests": a.target_ongoing_requests,
    }


def deploy(cfg: Config, wait: bool | None = None) -> str:
    """Deploy `build_app(cfg)` on the configured Ray cluster and return the OpenAI base URL.

    wait: block until Ctrl-C. Unset: block only when this process started a local Ray (it would
    take the service down on exit); on a cluster the application outlives this process."""
    from chuxin_ray.ray_cluster import connect

    section: ServeConfig = cfg.require("serve")
    local = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    connect(cfg.ray)
    serve.start(http_options={"host": section.host, "port": section.port})
    serve.run(build_app(cfg), name=section.app_name, route_prefix=section.route_prefix)
    url = section.url
    print(f"serving {section.served_model!r} at {url} (POST {url}/chat/completions)", flush=True)
    if wait if wait is not None else local:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url
