"""Model folders from anywhere, and the settings every inference actor loads them with.

Transformers loads from a local folder or a hub id; weights kept in object storage are copied to a
local cache first (one copy per node and URI: a second actor on the node finds it complete).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import torch

from chuxin_ray import storage
from chuxin_ray.config import StorageConfig

CACHE_ENV = "CHUXIN_MODEL_CACHE"  # default: <tmp>/chuxin-models
_DONE = ".complete"


def is_remote(uri: str) -> bool:
    return uri.split("://", 1)[0].lower() in ("s3", "s3a", "gs", "gcs") if "://" in uri else False


def local_model_dir(uri: str, storage_cfg: StorageConfig | None = None) -> str:
    """A path or hub id that `from_pretrained` loads: `uri` itself unless it is in object storage."""
    if not is_remote(uri):
        return uri
    loc = storage.resolve(uri, storage_cfg)
    cache = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "chuxin-models")
    target = cache / hashlib.sha256(loc.uri.encode()).hexdigest()[:16]
    if (target / _DONE).exists():
        return str(target)
    files = storage.list_files(loc)
    if not files:
        raise storage.StorageError(f"no files under {loc.uri}")
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=_mkdir(cache)))
    for info in files:
        rel = posixpath.relpath(info.path, loc.path)
        dest = partial / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            info.path, str(dest), source_filesystem=loc.fs, destination_filesystem=pafs.LocalFileSystem()
        )
    (partial / _DONE).write_text(loc.uri)
    try:
        partial.rename(target)  # atomic; loses the race harmlessly when another actor finished first
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def inference_device(num_gpus: float) -> torch.device:
    return torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")


def inference_dtype(precision: str, device: torch.device) -> torch.dtype:
    """auto: fp16 on a GPU (as FlagEmbedding's use_fp16), fp32 on a CPU (fp16 matmuls are slow there)."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def encoder_actors(runtime, jobs: int) -> int:
    """Ray Data actors for an encoder: runtime.actors, else one per GPU's worth of num_gpus (one on CPU),
    never more than there are jobs."""
    import ray

    actors = runtime.actors or (
        max(1, int(ray.cluster_resources().get("GPU", 0) // runtime.num_gpus)) if runtime.num_gpus else 1
    )
    return max(1, min(actors, jobs))
