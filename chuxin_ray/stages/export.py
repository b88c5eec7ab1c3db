"""Stage `export`: the release folder of a trained model, in the layout BGEM3FlagModel, FlagModel and
SentenceTransformer load unchanged (models/m3_folder.py).

    export.model (a save_m3_folder folder: the unified stage's model/ by default; local or s3://)
      -> checked before anything is written: config.json, weights, tokenizer, both head files and
         their shapes against the encoder's hidden size
      -> every file copied to <out>/ through pyarrow (any store to any store)
      -> config_sentence_transformers.json and chuxin_ray.json rewritten with the exported name and
         query instruction; README.md: the model card
      -> verify: <out> loaded back with load_m3_folder(heads="require") and with FlagEmbedding's
         BGEM3FlagModel; 4 texts; dense, lexical weights and ColBERT vectors equal within 1e-5
    <out>/_manifest.json   written last, with the largest differences verify found

<out> is itself the model folder, so what a failed earlier attempt left there is removed first. No Ray:
the stage copies files and loads the model once on the driver's CPU.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs

from chuxin_ray import storage
from chuxin_ray.config import Config, ConfigError, EncoderRuntime, ExportConfig
from chuxin_ray.models.m3_folder import (
    COLBERT_FILE,
    HEAD_FILES,
    META_FILE,
    SPARSE_FILE,
    ST_CONFIG_FILE,
    ModelFolderError,
    read_head,
    sentence_transformers_config,
)
from chuxin_ray.train.checkpoint import local_copy

log = logging.getLogger(__name__)

STAGE = "export"
CARD = "README.md"
WRITTEN = (CARD, ST_CONFIG_FILE, META_FILE)  # written by this stage, not copied
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
VERIFY_TOL = 1e-5
VERIFY_MAX_LENGTH = 128
# Chinese and English, one word repeated (lexical weights keep its max); verify() adds a query with
# the query instruction
VERIFY_TEXTS = (
    "初心 Embedding 是一个面向中文检索的文本向量模型，支持稠密、稀疏和多向量三种检索方式。",
    "BGE-M3 supports dense, sparse (lexical) and multi-vector (ColBERT) retrieval.",
    "检索 检索 检索：同一个词出现多次时，稀疏权重取最大值。",
)
VERIFY_QUERY = "如何训练中文文本向量模型？"


@dataclass
class ExportPlan:
    cfg: ExportConfig
    out: storage.Location
    config_hash: str
    manifest: dict | None
    src: storage.Location | None = None
    files: list[str] = field(default_factory=list)  # relative names in the source folder
    meta: dict = field(default_factory=dict)  # the source's chuxin_ray.json, updated for the export


def setup(cfg: Config, force: bool = False) -> ExportPlan:
    section: ExportConfig = cfg.require(STAGE)
    out = storage.resolve(cfg.stage_output(STAGE), cfg.storage)
    src = storage.resolve(section.model or cfg.trained_model(STAGE), cfg.storage)
    fallback_instruction = training_instruction(cfg, src)
    digest = config_hash(cfg, src, fallback_instruction)
    manifest = storage.begin_stage(STAGE, out, digest, force, subdirs=())
    plan = ExportPlan(section, out, digest, manifest, src)
    if manifest is not None:
        return plan
    if type(src.fs) is type(out.fs) and _nested(src.path, out.path):
        raise ConfigError(f"{STAGE}.output: {out.uri} overlaps the model folder {src.uri}; export elsewhere")
    plan.files = source_files(src)
    hidden_size = int(storage.read_json(src.child("config.json"))["hidden_size"])
    colbert_dim = check_heads(src, hidden_size)
    source_meta = storage.read_json(src.child(META_FILE)) if META_FILE in plan.files else {}
    instruction = section.query_instruction
    if instruction is None:
        instruction = source_meta.get("query_instruction", fallback_instruction)
    plan.meta = {
        **source_meta,
        "model_name": section.model_name or cfg.run.name,
        "heads": ["dense", "sparse", "colbert"],
        "pooling": "cls",
        "hidden_size": hidden_size,
        "colbert_dim": colbert_dim,
        "query_instruction": instruction,
        "provenance": source_meta.get("provenance") or {},
        "exported_from": src.uri,
    }
    return plan


def training_instruction(cfg: Config, src: storage.Location) -> str:
    """The query instruction of the training stage whose model folder `src` is ("" if none is): what
    export.query_instruction falls back to when the folder's chuxin_ray.json records none."""
    for stage in ("unified", "finetune"):
        section = getattr(cfg, stage, None)
        if (
            section is not None
            and storage.resolve(cfg.stage_output(stage), cfg.storage).child("model").uri == src.uri
        ):
            return section.query_instruction
    return ""


def config_hash(cfg: Config, src: storage.Location, fallback_instruction: str) -> str:
    """The export section, plus what its unset keys fall back to: the model folder, run.name (the model
    name) and the training stage's query instruction."""
    blob = json.dumps([cfg.hash(STAGE), src.uri, cfg.run.name, fallback_instruction], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _nested(a: str, b: str) -> bool:
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def source_files(src: storage.Location) -> list[str]:
    """The relative names of the files in the model folder; ConfigError naming the folder and the missing
    file when it is not an M3 folder."""
    key = f"{STAGE}.model"
    try:
        infos = storage.list_files(src)
    except storage.StorageError:
        raise ConfigError(
            f"{key}: nothing found at {src.uri}; train first or point {key} at a model folder"
        ) from None
    if len(infos) == 1 and infos[0].path == src.path:
        raise ConfigError(f"{key}: {src.uri} is a file; it must be a model folder")
    names = sorted(posixpath.relpath(f.path, src.path) for f in infos)
    required = {"config.json": ("config.json",), "weights": WEIGHT_FILES, "a tokenizer": TOKENIZER_FILES}
    required |= {name: (name,) for name in HEAD_FILES}
    for what, options in required.items():
        if not set(options) & set(names):
            raise ConfigError(
                f"{key}: {src.uri} has no {what} ({' or '.join(options)}); export needs an M3 model folder "
                f"as save_m3_folder writes it (encoder, tokenizer, {' and '.join(HEAD_FILES)})"
            )
    return names


def check_heads(src: storage.Location, hidden_size: int) -> int:
    """Read both head files (a few MB) and check their shapes; returns the ColBERT width."""
    states = {}
    for name, rows in ((COLBERT_FILE, None), (SPARSE_FILE, 1)):
        data = io.BytesIO(storage.read_bytes(src.child(name)))  # torch.load needs a seekable file
        try:
            states[name] = read_head(data, src.child(name).uri, hidden_size, out_features=rows)
        except ModelFolderError as e:
            raise ConfigError(f"{STAGE}.model: {e}") from None
    return int(states[COLBERT_FILE]["weight"].shape[0])


def run(plan: ExportPlan, cfg: Config) -> dict:
    if plan.manifest is not None:
        return storage.report_complete(STAGE, plan.out, plan.manifest)
    started = time.time()
    out, src, meta = plan.out, plan.src, plan.meta
    if storage.exists(out):  # a failed earlier attempt: its files would load as part of this model
        out.fs.delete_dir_contents(out.path, missing_dir_ok=True)
    copied = [name for name in plan.files if name not in WRITTEN]
    copied_bytes = copy_files(src, out, copied)
    storage.write_json(out.child(ST_CONFIG_FILE), sentence_transformers_config(meta["query_instruction"]))
    storage.write_json(out.child(META_FILE), meta)
    storage.write_bytes(out.child(CARD), model_card(meta).encode("utf-8"))
    verification = verify(out, cfg, meta) if plan.cfg.verify else None
    manifest = storage.stage_manifest(
        STAGE,
        plan.config_hash,
        cfg.redacted()[STAGE],
        inputs=[src.uri],
        counts={"files": len(copied) + len(WRITTEN), "bytes_copied": copied_bytes},
        files={"model": sorted([*copied, ST_CONFIG_FILE, META_FILE]), "card": [CARD]},
        started=started,
        model_name=meta["model_name"],
        query_instruction=meta["query_instruction"],
        colbert_dim=meta["colbert_dim"],
        verify=verification,
    )
    storage.write_manifest(out, manifest)
    log.info(
        "%s: %d files (%.1f MB) from %s -> %s%s",
        STAGE,
        manifest["counts"]["files"],
        copied_bytes / 1e6,
        src.uri,
        out.uri,
        f"; verified, largest difference {max(verification['max_abs_diff'].values()):.1e}"
        if verification
        else "",
    )
    return manifest


def main(cfg: Config, force: bool = False) -> dict:
    return run(setup(cfg, force), cfg)


def copy_files(src: storage.Location, dest: storage.Location, names: list[str]) -> int:
    """Copy the named files below `src` to the same names below `dest`; returns the bytes copied."""
    total = 0
    for name in names:
        source, target = src.child(name), dest.child(name)
        if dest.is_local:
            dest.fs.create_dir(posixpath.dirname(target.path), recursive=True)
        pafs.copy_files(source.path, target.path, source_filesystem=src.fs, destination_filesystem=dest.fs)
        total += src.fs.get_file_info(source.path).size
    return total


# --------------------------------------------------------------------------------------------------
# Verification and the model card
# --------------------------------------------------------------------------------------------------


def verify(out: storage.Location, cfg: Config, meta: dict) -> dict:
    """Load the exported folder with our loader and with BGEM3FlagModel, encode the same texts with both;
    RuntimeError when any output differs by more than VERIFY_TOL."""
    from FlagEmbedding import BGEM3FlagModel

    from chuxin_ray.models.encoder import Encoder

    texts = [*VERIFY_TEXTS, meta["query_instruction"] + VERIFY_QUERY]
    path = local_copy(out.uri, cfg.storage)
    try:
        ours = Encoder(path, runtime=EncoderRuntime(precision="fp32"), heads="require").encode(
            texts, VERIFY_MAX_LENGTH, want=("dense", "sparse", "colbert")
        )
        colbert_dim = meta["colbert_dim"] if meta["colbert_dim"] != meta["hidden_size"] else -1
        flag = BGEM3FlagModel(path, use_fp16=False, devices="cpu", colbert_dim=colbert_dim)
        theirs = flag.encode(
            texts,
            max_length=VERIFY_MAX_LENGTH,
            return_dense=True,
            return_sparse=True,
            return_colbert_vecs=True,
        )
    finally:
        if path != out.uri.removeprefix("file://"):  # a temporary download
            shutil.rmtree(path, ignore_errors=True)
    diff = {
        "dense": float(np.abs(ours.dense - theirs["dense_vecs"]).max()),
        "sparse": max(
            _lexical_diff(a, b) for a, b in zip(ours.sparse, theirs["lexical_weights"], strict=True)
        ),
        "colbert": max(
            _colbert_diff(a, b) for a, b in zip(ours.colbert, theirs["colbert_vecs"], strict=True)
        ),
    }
    if max(diff.values()) > VERIFY_TOL:
        raise RuntimeError(
            f"{STAGE}: {out.uri} does not load the same in chuxin_ray and BGEM3FlagModel: largest differences "
            f"{diff} (tolerance {VERIFY_TOL}); the manifest is not written"
        )
    loaders = ["chuxin_ray.models.m3_folder.load_m3_folder", "FlagEmbedding.BGEM3FlagModel"]
    return {"texts": len(texts), "tolerance": VERIFY_TOL, "loaders": loaders, "max_abs_diff": diff}


def _lexical_diff(ours: dict[int, float], theirs: dict[str, float]) -> float:
    """Largest weight difference over the ids either side holds (a missing id weighs 0)."""
    theirs_int = {int(k): float(v) for k, v in theirs.items()}
    keys = set(ours) | set(theirs_int)
    return max((abs(ours.get(k, 0.0) - theirs_int.get(k, 0.0)) for k in keys), default=0.0)


def _colbert_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    if ours.shape != theirs.shape:
        return float("inf")  # a different token count: fails the check (inf is not valid JSON, never stored)
    return float(np.abs(ours - theirs).max(initial=0.0))


def model_card(meta: dict) -> str:
    """README.md: what the model is, where it came from, how to load it in the three libraries."""
    from chuxin_ray import __version__

    name, instruction = meta["model_name"], meta["query_instruction"]
    colbert_arg = f", colbert_dim={meta['colbert_dim']}" if meta["colbert_dim"] != meta["hidden_size"] else ""
    provenance = meta.get("provenance") or {}
    trained = "\n".join(f"- {k}: `{v}`" for k, v in provenance.items()) or "- not recorded"
    instruction_line = (
        f"Queries are prefixed with the instruction `{instruction}`; passages are not."
        if instruction
        else "No query instruction: queries and passages are encoded alike."
    )
    q = json.dumps(instruction, ensure_ascii=False)
    return f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags:
- sentence-transformers
- feature-extraction
- bge-m3
- chuxin-ray
---

# {name}

A BGE-M3-style embedding model: dense (CLS, L2-normalised, {meta["hidden_size"]} dims), sparse (lexical
weights) and multi-vector (ColBERT, {meta["colbert_dim"]} dims) retrieval from one encoder. Exported by
chuxin_ray {__version__} from `{meta["exported_from"]}`.

## Trained from

{trained}

## Query instruction

{instruction_line}

## Loading

FlagEmbedding (all three outputs):

```python
from FlagEmbedding import BGEM3FlagModel

model = BGEM3FlagModel("path/to/{name}", use_fp16=True, query_instruction_for_retrieval={q}{colbert_arg})
queries = model.encode_queries(["..."], return_dense=True, return_sparse=True, return_colbert_vecs=True)
passages = model.encode_corpus(["..."], return_dense=True, return_sparse=True, return_colbert_vecs=True)
```

FlagEmbedding, dense only:

```python
from FlagEmbedding import FlagModel

model = FlagModel("path/to/{name}", use_fp16=True, query_instruction_for_retrieval={q})
scores = model.encode_queries(["..."]) @ model.encode_corpus(["..."]).T
```

sentence-transformers (dense; the instruction is the prompt `query`):

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("path/to/{name}")
scores = model.encode(["..."], prompt_name="query") @ model.encode(["..."]).T
```
"""
