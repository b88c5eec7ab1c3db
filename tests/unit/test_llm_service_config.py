"""The service and LLM-call config: what the vLLM paths would be given (vLLM cannot be installed here,
so the mapping is checked as data, and against Ray's own schemas where Ray lets us load them), the
CPU deployment options, lazy imports, and config errors that name the key."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from chuxin_ray.config import ConfigError, validate_config
from chuxin_ray.llm.calls import endpoint, vllm_processor_config
from chuxin_ray.llm.service import transformers_deployment_options, vllm_llm_config

RUN = {"name": "t", "output": "/tmp/chuxin-unused"}


def cfg(**sections):
    return validate_config({"run": RUN, **sections})


def test_vllm_llm_config_from_a_hub_id():
    c = cfg(
        serve={
            "model": "Qwen/Qwen2.5-7B-Instruct",
            "engine": "vllm",
            "tensor_parallel_size": 2,
            "max_model_len": 8192,
            "gpu_memory_utilization": 0.85,
            "accelerator_type": "H100",
            "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64},
            "engine_kwargs": {"enable_prefix_caching": True},
        }
    )
    assert vllm_llm_config(c.serve) == {
        "model_loading_config": {
            "model_id": "Qwen2.5-7B-Instruct",
            "model_source": "Qwen/Qwen2.5-7B-Instruct",
        },
        "engine_kwargs": {
            "tensor_parallel_size": 2,
            "gpu_memory_utilization": 0.85,
            "max_model_len": 8192,
            "enable_prefix_caching": True,
        },
        "deployment_config": {
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64.0}
        },
        "accelerator_type": "H100",
    }


def test_vllm_llm_config_from_object_storage_with_fixed_replicas():
    c = cfg(serve={"model": "s3://models/qwen2.5-7b/", "model_id": "qwen", "engine": "vllm", "replicas": 3})
    config = vllm_llm_config(c.serve)
    assert config["model_loading_config"] == {
        "model_id": "qwen",
        "model_source": {"bucket_uri": "s3://models/qwen2.5-7b/"},
    }
    assert config["deployment_config"] == {"autoscaling_config": {"min_replicas": 3, "max_replicas": 3}}
    assert config["engine_kwargs"] == {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.9}
    assert "accelerator_type" not in config


def _pydantic_fields(module: str, cls: str) -> set[str]:
    """Field names of a pydantic class, read from its source: importing ray.serve.llm needs vLLM."""
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls)
    return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}


def test_vllm_llm_config_keys_exist_in_rays_schema():
    c = cfg(serve={"model": "s3://m/x", "engine": "vllm", "accelerator_type": "A100"})
    config = vllm_llm_config(c.serve)
    llm_fields = _pydantic_fields("ray.llm._internal.serve.core.configs.llm_config", "LLMConfig")
    loading_fields = _pydantic_fields("ray.llm._internal.serve.core.configs.llm_config", "ModelLoadingConfig")
    mirror_fields = _pydantic_fields("ray.llm._internal.common.utils.cloud_utils", "CloudMirrorConfig")
    assert set(config) <= llm_fields
    assert set(config["model_loading_config"]) <= loading_fields
    assert set(config["model_loading_config"]["model_source"]) <= mirror_fields


def test_transformers_deployment_options():
    c = cfg(serve={"model": "/m", "num_cpus": 2, "max_batch_size": 16})
    assert transformers_deployment_options(c.serve) == {
        "ray_actor_options": {"num_cpus": 2.0},
        "max_ongoing_requests": 64,
        "num_replicas": 1,
    }
    c = cfg(serve={"model": "/m", "autoscaling": {"min_replicas": 0, "max_replicas": 2}})
    options = transformers_deployment_options(c.serve)
    assert options["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 2,
        "target_ongoing_requests": 16.0,
    }
    assert "num_replicas" not in options


def test_vllm_processor_config_is_accepted_by_ray_data_llm():
    from ray.data.llm import vLLMEngineProcessorConfig  # imports without vLLM; the engine needs it

    c = cfg(
        serve={
            "model": "Qwen/Qwen2.5-7B-Instruct",
            "engine": "vllm",
            "tensor_parallel_size": 2,
            "accelerator_type": "L4",
        },
        synthesize={"llm": {"engine": "vllm", "actors": 4, "batch_size": 128}},
    )
    kwargs = vllm_processor_config(c.synthesize.llm, c, "synthesize")
    assert kwargs == {
        "model_source": "Qwen/Qwen2.5-7B-Instruct",
        "engine_kwargs": {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.9},
        "batch_size": 128,
        "concurrency": 4,
        "should_continue_on_error": True,
        "accelerator_type": "L4",
    }
    processor_config = vLLMEngineProcessorConfig(**kwargs)
    assert processor_config.concurrency == 4 and processor_config.accelerator_type == "L4"


def test_endpoint_comes_from_the_stage_or_the_serve_section():
    c = cfg(serve={"model": "/models/tiny-lm", "port": 8123, "route_prefix": "/llm"}, judge={})
    assert endpoint(c.judge.llm, c, "judge") == ("http://127.0.0.1:8123/llm/v1", "tiny-lm")
    c = cfg(judge={"llm": {"base_url": "http://vllm:8000/v1", "model": "qwen"}})
    assert endpoint(c.judge.llm, c, "judge") == ("http://vllm:8000/v1", "qwen")
    with pytest.raises(ConfigError, match="judge.llm: set base_url and model"):
        endpoint(cfg(judge={}).judge.llm, cfg(judge={}), "judge")
    with pytest.raises(ConfigError, match="add a `serve` section"):
        vllm_processor_config(cfg(judge={}).judge.llm, cfg(judge={}), "judge")


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"serve": {"model": "m", "engine": "sglang"}}, "serve.engine"),
        (
            {"serve": {"model": "m", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}},
            "serve.autoscaling",
        ),
        ({"synthesize": {"prompts": [{"user": "{passage} {foo}"}]}}, "unknown placeholder"),
        ({"synthesize": {"prompts": [{"user": "no passage here"}]}}, "must use ['passage']"),
        (
            {"synthesize": {"prompts": [{"user": "{passage}"}, {"user": "{passage}!"}]}},
            "names must be unique",
        ),
        ({"synthesize": {"llm": {"concurency": 4}}}, "did you mean `concurrency`"),
        ({"judge": {"keep": "maybe"}}, "judge.keep"),
        ({"judge": {"prompt": {"user": "{passage}"}}}, "must use ['query']"),
        ({"judge": {"rules": {"min_chars": 10, "max_chars": 5}}}, "min_chars (10) must be <= max_chars (5)"),
        (
            {"mine": {"encoder": "e", "range_start": 50, "range_end": 10}},
            "range_start (50) must be < range_end",
        ),
        ({"mine": {"encoder": 3}}, "mine.encoder: Input should be a valid string"),
        ({"score": {"reranker": "r", "mode": "percent"}}, "score.mode"),
    ],
)
def test_config_errors_name_the_key(sections, message):
    with pytest.raises(ConfigError) as e:
        cfg(**sections)
    assert message in str(e.value)


def test_nothing_on_the_cpu_path_imports_vllm_or_serve_llm():
    code = (
        "import sys\n"
        "import chuxin_ray.llm.service, chuxin_ray.llm.calls, chuxin_ray.cli\n"
        "from chuxin_ray.stages import synthesize, judge, mine, score\n"
        "bad = [m for m in ('vllm', 'ray.serve.llm', 'ray.data.llm') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    stages_only = (
        "import sys\n"
        "from chuxin_ray.stages import synthesize, judge, mine, score\n"
        "assert 'ray.serve' not in sys.modules, 'a stage imports Ray Serve'\n"
    )
    subprocess.run([sys.executable, "-c", stages_only], check=True, timeout=120)
