"""`chuxin-ray pipeline`: the recipe's stages in order, each reading the previous one's output.

A stage runs when its config section is present and it is built; one whose output manifest is
complete for the same config is skipped by the stage itself.
"""

from __future__ import annotations

import logging

from chuxin_ray import stages
from chuxin_ray.config import STAGES, Config, ConfigError

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
        raise ConfigError(f"the config has no stage sections; add one of: {', '.join(stages.BUILT)}")
    return configured


def run_pipeline(cfg: Config, start: str | None = None, only: str | None = None, force: bool = False) -> dict:
    """Run the selected stages in order. The whole config was validated when it was loaded; each
    stage's own setup (inputs, output state) runs before its Ray work. `force` applies to all."""
    names = selected_stages(cfg, start, only)
    modules = {name: stages.load(name) for name in names}
    results = {}
    for name in names:
        log.info("pipeline: stage %s", name)
        results[name] = modules[name].main(cfg, force=force)
    return results
