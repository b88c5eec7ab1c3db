"""Ray bootstrap: join the cluster named by config or RAY_ADDRESS, else start a local Ray.

The same call serves a laptop, `ray job submit` (which sets RAY_ADDRESS for the driver) and a
KubeRay RayJob, so stages never branch on where they run.
"""

from __future__ import annotations

import logging
import os

import ray

from chuxin_ray.config import RayConfig

log = logging.getLogger(__name__)


def connect(cfg: RayConfig | None = None) -> None:
    """Idempotent: a second call in the same process reuses the first connection."""
    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    # "local", not None: ray.init(address=None) would join any cluster `ray start` left on this machine
    kwargs: dict = {"address": address or "local", "logging_level": logging.WARNING}
    if address is None:
        # A local Ray sized to this machine; the dashboard is only worth its ~1 GB on a real cluster.
        kwargs["num_cpus"] = cfg.num_cpus or os.cpu_count()
        kwargs["include_dashboard"] = False
        if cfg.object_store_memory_mb:
            kwargs["object_store_memory"] = cfg.object_store_memory_mb * 2**20
    ray.init(**kwargs)
    where = address or "a local Ray"
    log.info("connected to %s: %s", where, ray.cluster_resources())


def available_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
