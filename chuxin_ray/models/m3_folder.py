"""The BGE-M3 model folder: one layout that FlagEmbedding's BGEM3FlagModel and FlagModel and
sentence-transformers' SentenceTransformer all load unchanged.

    config.json, model.safetensors        the encoder (`save_pretrained`; AutoModel loads it)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
    colbert_linear.pt, sparse_linear.pt   the M3 heads: state dicts {weight, bias}, as the BGE-M3 release
    modules.json                          sentence-transformers: Transformer -> Pooling -> Normalize
    1_Pooling/config.json                 CLS pooling
    sentence_bert_config.json             max_seq_length
    config_sentence_transformers.json     prompts: {"query": <query instruction>} when one is set
    chuxin_ray.json                       what chuxin_ray knows: heads, colbert_dim, query instruction, provenance

The file names and the sentence-transformers files are those of the BAAI/bge-m3 release. `2_Normalize` has
no files (sentence-transformers' Normalize loads from nothing), so no folder is written for it.

BGEM3FlagModel builds random heads when a folder lacks colbert_linear.pt or sparse_linear.pt (FlagEmbedding
1.4.2 `EncoderOnlyEmbedderM3Runner.get_model` only logs it); `load_m3_folder` refuses such a folder unless
asked for a dense-only model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch
import torch.nn.functional as F
from torch import nn

from chuxin_ray.models.m3 import M3Embedder, M3Heads, special_token_ids
from chuxin_ray.models.tiny import token_positions

log = logging.getLogger(__name__)

COLBERT_FILE = "colbert_linear.pt"
SPARSE_FILE = "sparse_linear.pt"
HEAD_FILES = (COLBERT_FILE, SPARSE_FILE)
META_FILE = "chuxin_ray.json"
ST_CONFIG_FILE = "config_sentence_transformers.json"
QUERY_PROMPT = "query"  # the prompt name SentenceTransformer.encode_query uses
# What a hub snapshot needs; the bge-m3 repository also holds a 2.2 GB ONNX export.
HUB_IGNORE = ["*.onnx", "onnx/*", "*.onnx_data", "flax_model.msgpack", "rust_model.ot", "tf_model.h5"]

Pooling = Literal["cls", "mean"]


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded as asked; the message names the folder and the file."""


class DenseEmbedder(nn.Module):
    """An encoder with dense pooling only, L2-normalised: a plain bge / sentence-transformers folder."""

    def __init__(self, encoder: nn.Module, pooling: Pooling = "cls") -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **encoder_kwargs: Any
    ) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **encoder_kwargs
        ).last_hidden_state  # (B, L, H)
        return pool(hidden, attention_mask, self.pooling)  # (B, H)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """The sentence vector of each text, L2-normalised (FlagModel's `pooling` + normalize_embeddings):
    cls = the first token's state; mean = the average over tokens the mask keeps. hidden (B, L, H),
    attention_mask (B, L); returns (B, H)."""
    if pooling == "cls":
        vec = hidden[:, 0]  # (B, H)
    else:
        mask = attention_mask[..., None].to(hidden.dtype)  # (B, L, 1)
        vec = (hidden * mask).sum(1) / mask.sum(1)  # (B, H)
    return F.normalize(vec, dim=-1)  # (B, H)


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def save_m3_folder(
    embedder: M3Embedder,
    tokenizer: Any,
    dest: str | os.PathLike,
    *,
    query_instruction: str = "",
    model_name: str | None = None,
    provenance: dict[str, Any] | None = None,
) -> list[str]:
    """Write `embedder` and `tokenizer` as a BGE-M3 folder at the local path `dest`; returns the relative
    file names, sorted. `provenance` (e.g. {"stage": "unified", "base_model": ..., "steps": ...}) goes to
    chuxin_ray.json, where the export stage's model card reads it."""
    return _save_folder(
        embedder.encoder, embedder.heads, tokenizer, Path(dest), query_instruction, model_name, provenance
    )


def save_dense_folder(
    embedder: DenseEmbedder,
    tokenizer: Any,
    dest: str | os.PathLike,
    *,
    query_instruction: str = "",
    model_name: str | None = None,
    provenance: dict[str, Any] | None = None,
) -> list[str]:
    """The same folder without the head files: a dense embedder (CLS or mean), as the finetune stage trains.
    FlagModel and SentenceTransformer load it; `load_m3_folder` only with heads="optional"."""
    return _save_folder(
        embedder.encoder,
        None,
        tokenizer,
        Path(dest),
        query_instruction,
        model_name,
        provenance,
        embedder.pooling,
    )


def _save_folder(
    encoder: nn.Module,
    heads: M3Heads | None,
    tokenizer: Any,
    root: Path,
    query_instruction: str,
    model_name: str | None,
    provenance: dict[str, Any] | None,
    pooling: Pooling = "cls",
) -> list[str]:
    from chuxin_ray import __version__

    root.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(str(root), safe_serialization=True)
    tokenizer.save_pretrained(str(root))
    if heads is not None:
        for name, linear in ((COLBERT_FILE, heads.colbert_linear), (SPARSE_FILE, heads.sparse_linear)):
            # clone: a state dict of views would pickle the storage they view
            torch.save({k: v.detach().cpu().clone() for k, v in linear.state_dict().items()}, root / name)
    hidden = encoder.config.hidden_size
    files = sentence_transformers_files(
        hidden, max_seq_length(encoder.config, tokenizer), query_instruction, pooling
    )
    files[META_FILE] = {
        "format": 1,
        "model_name": model_name,
        "heads": ["dense", "sparse", "colbert"] if heads is not None else ["dense"],
        "pooling": pooling,
        "hidden_size": hidden,
        "colbert_dim": heads.colbert_linear.out_features if heads is not None else None,
        "query_instruction": query_instruction,
        "package_version": __version__,
        "provenance": provenance or {},
    }
    for rel, content in files.items():
        write_json(root / rel, content)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def sentence_transformers_files(
    hidden_size: int, max_seq_length: int, query_instruction: str, pooling: Pooling = "cls"
) -> dict[str, Any]:
    """The sentence-transformers files of a CLS-pooled, normalised model: relative name -> JSON content.

    The module types are the `sentence_transformers.models.*` names of the bge-m3 release: every
    sentence-transformers version from 2.x to 5.x resolves them. So is the pooling config's
    `pooling_mode_*` form (5.x converts it to `pooling_mode`)."""
    return {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
        "1_Pooling/config.json": {
            "word_embedding_dimension": hidden_size,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
        "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
        ST_CONFIG_FILE: sentence_transformers_config(query_instruction),
    }


def sentence_transformers_config(query_instruction: str) -> dict[str, Any]:
    """config_sentence_transformers.json: the query instruction as the prompt `query`, which
    `SentenceTransformer.encode_query` (and `encode(..., prompt_name="query")`) prepends."""
    return {
        "prompts": {QUERY_PROMPT: query_instruction} if query_instruction else {},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }


def max_seq_length(config: Any, tokenizer: Any) -> int:
    """Tokens the encoder embeds: its position table (XLM-R/RoBERTa number positions from pad_token_id + 1,
    so bge-m3's 8194 rows serve 8192 tokens), capped by the tokenizer's model_max_length."""
    positions = token_positions(config)
    return min(positions, int(getattr(tokenizer, "model_max_length", positions)))


def write_json(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_m3_folder(
    path: str | os.PathLike, *, heads: Literal["require", "optional"] = "require"
) -> tuple[M3Embedder | DenseEmbedder, Any]:
    """(model, tokenizer) from a model folder (local path or hub id; copy object-storage folders first with
    chuxin_ray.train.checkpoint.local_copy), in eval mode on the CPU.

    A folder with both head files gives an M3Embedder. Without them, heads="require" raises
    ModelFolderError naming the folder and the missing file; heads="optional" gives a DenseEmbedder pooled
    as the folder's sentence-transformers config says (CLS, or mean), CLS when it has none."""
    from transformers import AutoModel, AutoTokenizer

    folder = local_folder(path)
    missing = [name for name in HEAD_FILES if not (folder / name).is_file()]
    if missing and heads == "require":
        raise ModelFolderError(
            f"{folder}: no {' or '.join(missing)}; an M3 model folder needs {' and '.join(HEAD_FILES)} "
            "(BGEM3FlagModel would run with randomly initialised heads). Load it with heads='optional' "
            "for dense embeddings only."
        )
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"{folder}: no config.json; not a Hugging Face model folder")
    pooling = "cls" if not missing else folder_pooling(folder)  # before the weights: fail fast
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    encoder = AutoModel.from_pretrained(str(folder))
    if missing:
        if len(missing) == 1:
            log.warning(
                "%s: %s without %s; loading a dense-only model",
                folder,
                *sorted(set(HEAD_FILES) - set(missing)),
                missing[0],
            )
        return DenseEmbedder(encoder, pooling).eval(), tokenizer
    m3_heads = load_heads(folder, encoder.config.hidden_size, special_token_ids(tokenizer))
    return M3Embedder(encoder, m3_heads).eval(), tokenizer


def local_folder(path: str | os.PathLike) -> Path:
    """A local directory: `path` itself, or the snapshot of a hub id (from the local cache when offline)."""
    text = os.fspath(path)
    if os.path.isdir(text):
        return Path(text)
    if "://" in text or os.path.isabs(text) or text.startswith("."):
        raise ModelFolderError(
            f"{text}: no such model folder (object-storage folders: copy with local_copy first)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, ignore_patterns=HUB_IGNORE))
    except Exception as e:  # offline cache misses, unknown repositories, HTTP errors: one message
        raise ModelFolderError(f"{text}: not a local folder, and no hub snapshot of it: {e}") from None


def load_heads(folder: Path, hidden_size: int, zeroed_token_ids: list[int]) -> M3Heads:
    """M3Heads from colbert_linear.pt and sparse_linear.pt; ModelFolderError names a file with the wrong
    keys or shapes. ColBERT's output width comes from its file (BGE-M3: the hidden size)."""
    colbert = read_head(folder / COLBERT_FILE, str(folder / COLBERT_FILE), hidden_size, out_features=None)
    sparse = read_head(folder / SPARSE_FILE, str(folder / SPARSE_FILE), hidden_size, out_features=1)
    heads = M3Heads(hidden_size, colbert_dim=colbert["weight"].shape[0], zeroed_token_ids=zeroed_token_ids)
    heads.colbert_linear.load_state_dict(colbert)
    heads.sparse_linear.load_state_dict(sparse)
    return heads


def read_head(
    source: Path | BinaryIO, name: str, hidden_size: int, out_features: int | None
) -> dict[str, torch.Tensor]:
    """The state dict of one head file (a path or a seekable binary file), checked: keys weight and bias,
    weight (out_features, hidden_size) (any rows when out_features is None), bias (rows,). `name` is what
    errors call the file."""
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch pickle
        raise ModelFolderError(f"{name}: cannot be read as a state dict: {e}") from None
    if not isinstance(state, dict) or set(state) != {"weight", "bias"}:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ModelFolderError(f"{name}: expected a state dict with keys ['bias', 'weight'], got {keys}")
    weight, bias = state["weight"], state["bias"]
    rows = out_features or (weight.shape[0] if weight.dim() == 2 else -1)
    if tuple(weight.shape) != (rows, hidden_size) or tuple(bias.shape) != (rows,):
        expected = f"({out_features or 'D'}, {hidden_size})"
        raise ModelFolderError(
            f"{name}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not fit an encoder of hidden "
            f"size {hidden_size}: expected weight {expected} and bias ({out_features or 'D'},)"
        )
    return state


def folder_pooling(folder: Path) -> Pooling:
    """The pooling a sentence-transformers folder declares (modules.json -> the Pooling module's config),
    either form: 5.x `pooling_mode: "mean"` or 2.x-4.x `pooling_mode_mean_tokens: true`. CLS without one,
    as FlagModel's default."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return "cls"
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    pooling_dirs = [m.get("path", "") for m in modules if str(m.get("type", "")).endswith("Pooling")]
    if not pooling_dirs or not (folder / pooling_dirs[0] / "config.json").is_file():
        return "cls"
    config_file = folder / pooling_dirs[0] / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    mode = config.get("pooling_mode")
    if mode is None:  # none set means mean, as sentence-transformers reads it
        active = tuple(k for k, v in config.items() if k.startswith("pooling_mode_") and v)
        legacy = {("pooling_mode_cls_token",): "cls", ("pooling_mode_mean_tokens",): "mean", (): "mean"}
        mode = legacy.get(active, list(active))
    if mode not in ("cls", "mean"):
        raise ModelFolderError(f"{config_file}: pooling {mode!r} is not supported; cls or mean only")
    return mode
