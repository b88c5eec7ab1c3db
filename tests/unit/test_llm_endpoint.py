"""Where synthesize and judge find the LLM: the section's base_url, else the Helm chart's CHUXIN_LLM_URL,
else the `serve` section; and the pipeline deploys the service only in the last case."""

from __future__ import annotations

import pytest

from chuxin_ray.config import ConfigError, validate_config
from chuxin_ray.llm.calls import LLM_URL_ENV, endpoint
from chuxin_ray.pipeline import uses_serve_endpoint


def config(**synthesize):
    return validate_config(
        {
            "run": {"name": "x", "output": "/tmp/x"},
            "serve": {"model": "/models/tiny-lm", "port": 8123},
            "synthesize": synthesize,
        }
    )


def test_base_url_then_chart_url_then_serve_section(monkeypatch):
    monkeypatch.delenv(LLM_URL_ENV, raising=False)
    cfg = config()
    assert endpoint(cfg.synthesize.llm, cfg, "synthesize") == ("http://127.0.0.1:8123/v1", "tiny-lm")
    assert uses_serve_endpoint(cfg, "synthesize")
    monkeypatch.setenv(LLM_URL_ENV, "http://run-llm-serve-svc.ns.svc:8000/v1")
    assert endpoint(cfg.synthesize.llm, cfg, "synthesize")[0] == "http://run-llm-serve-svc.ns.svc:8000/v1"
    assert not uses_serve_endpoint(cfg, "synthesize")  # the chart's RayService serves it
    cfg = config(llm={"base_url": "http://vllm:8000/v1", "model": "qwen"})
    assert endpoint(cfg.synthesize.llm, cfg, "synthesize") == ("http://vllm:8000/v1", "qwen")
    assert not uses_serve_endpoint(cfg, "synthesize")


def test_no_endpoint_is_a_config_error(monkeypatch):
    monkeypatch.delenv(LLM_URL_ENV, raising=False)
    cfg = validate_config({"run": {"name": "x", "output": "/tmp/x"}, "synthesize": {}})
    with pytest.raises(ConfigError, match="synthesize.llm: set base_url and model"):
        endpoint(cfg.synthesize.llm, cfg, "synthesize")
