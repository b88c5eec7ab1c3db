"""`chuxin-ray pipeline`: the recipe's stages in order, each reading the previous one's output.

A stage runs when its config section is present and it is built; one whose output manifest is
complete for the same config is skipped by the stage itself.

The LLM stages (synthesize, judge) call the `serve` section's endpoint unless their `llm.base_url` names
another. When no such endpoint answers (a laptop, a RayJob without a RayService), the pipeline deploys
the service on its own Ray before the first of them that has work to do and shuts it down after the last,
so the training stages after it get the CPUs or GPUs back.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request

from chuxin_ray import stages, storage
from chuxin_ray.config import STAGES, Config, ConfigError
from chuxin_ray.report import write_report

log = logging.getLogger(__name__)


def selected_stages(cfg: Config, start: str | None = None, only: str | None = None) -> list[str]:
    for flag, value in (("--from", start), ("--only", only)):
        if value is not None and value not in STAGES:
            raise ConfigError(f"{flag} {value!r}: not a stage; stages: {', '.join(STAGES)}")
    configured = [s for s in STAGES if getattr(cfg, s, None) is not None]
    if only:
        if only not in configured:
            raise ConfigError(f"--only {only}: the config has no `{only}` section")
        return [only]
    if start:
        configured = [s for s in configured if STAGES.index(s) >= STAGES.index(start)]
    if not configured:
        raise ConfigError(f"the config has no stage sections; add one of: {', '.join(STAGES)}")
    return configured


def run_pipeline(cfg: Config, start: str | None = None, only: str | None = None, force: bool = False) -> dict:
    """Run the selected stages in order. The whole config was validated when it was loaded; each
    stage's own setup (inputs, output state) runs before its Ray work. `force` applies to all."""
    names = selected_stages(cfg, start, only)
    modules = {name: stages.load(name) for name in names}
    results = {}
    llm_stages = [name for name in names if uses_serve_endpoint(cfg, name)]
    service = LocalService(cfg)
    try:
        for name in names:
            log.info("pipeline: stage %s", name)
            if name in llm_stages and (force or not is_complete(cfg, name)):
                service.ensure()
            results[name] = modules[name].main(cfg, force=force)
            if llm_stages and name == llm_stages[-1]:
                service.stop()
    finally:
        service.stop()
    try:
        log.info("pipeline: report at %s", write_report(cfg.run.output, cfg.storage)["html"])
    except Exception:  # the stages' outputs are complete; a report bug must not mark the run failed
        log.exception("pipeline: the report failed; rerun it with `chuxin-ray report %s`", cfg.run.output)
    return results


def uses_serve_endpoint(cfg: Config, stage: str) -> bool:
    """Whether `stage` calls the `serve` section's endpoint over HTTP (no base_url, no CHUXIN_LLM_URL)."""
    from chuxin_ray.llm.calls import LLM_URL_ENV

    section = getattr(cfg, stage, None)
    llm = getattr(section, "llm", None)
    if cfg.serve is None or llm is None or llm.engine != "http":
        return False
    return llm.base_url is None and not os.environ.get(LLM_URL_ENV)


def is_complete(cfg: Config, stage: str) -> bool:
    return storage.read_manifest(storage.resolve(cfg.stage_output(stage), cfg.storage)) is not None


def answers(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class LocalService:
    """The `serve` section's LLM endpoint, deployed by the pipeline when nothing answers at its URL."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.deployed = False

    def ensure(self) -> None:
        if self.deployed or answers(self.cfg.serve.url):
            return
        from chuxin_ray.llm.service import deploy

        log.info("pipeline: nothing answers at %s; deploying the `serve` section's model", self.cfg.serve.url)
        deploy(self.cfg, wait=False)
        self.deployed = True

    def stop(self) -> None:
        if self.deployed:
            from ray import serve

            serve.shutdown()
            self.deployed = False
            log.info("pipeline: LLM service shut down")
