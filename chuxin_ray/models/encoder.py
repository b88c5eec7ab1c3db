"""Inference with a model folder, for the evaluate and mine stages: dense vectors, lexical weights and
ColBERT vectors in the forms BGEM3FlagModel.encode returns them (FlagEmbedding 1.4.2
`inference/embedder/encoder_only/m3.py`), equal within float rounding.

    texts (+ instruction) -> tokenized once, unpadded, truncated to max_length
      -> sorted by token count (longest first), batches padded to their own longest text
      -> encoder (+ the M3 heads when sparse or colbert is asked)
      -> results put back in the order of `texts`

An M3 folder (save_m3_folder) gives all three; a plain bge / sentence-transformers folder gives dense only.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from chuxin_ray.config import EncoderRuntime, StorageConfig
from chuxin_ray.llm.model_files import inference_device, inference_dtype
from chuxin_ray.models.m3 import M3Embedder
from chuxin_ray.models.m3_folder import HEAD_FILES, ModelFolderError, load_m3_folder, pool
from chuxin_ray.train.checkpoint import local_copy

Output = Literal["dense", "sparse", "colbert"]
OUTPUTS: tuple[Output, ...] = ("dense", "sparse", "colbert")


@dataclass
class EncodedTexts:
    """What `Encoder.encode` computed, one entry per text in input order; None where not asked."""

    dense: np.ndarray | None = None  # (N, H) float32, unit rows
    sparse: list[dict[int, float]] | None = None  # token id -> weight (max over the id's occurrences), > 0
    colbert: list[np.ndarray] | None = None  # (n_i - 1, D) float32 each: tokens 1..n_i-1, no padding


class Encoder:
    """A model folder (local path, s3:// / gs:// URI or hub id) ready to encode on one device.

    runtime.num_gpus > 0 puts it on the GPU; runtime.precision "auto" is fp16 there, fp32 on a CPU
    (llm/model_files.py). heads="require" refuses a folder without colbert_linear.pt and sparse_linear.pt.
    """

    def __init__(
        self,
        model: str,
        storage_cfg: StorageConfig | None = None,
        runtime: EncoderRuntime | None = None,
        *,
        heads: Literal["require", "optional"] = "optional",
    ) -> None:
        runtime = runtime or EncoderRuntime()
        path = local_copy(model, storage_cfg)
        try:
            self.model, self.tokenizer = load_m3_folder(path, heads=heads)
        finally:
            if path != model.removeprefix("file://"):  # a temporary download of an object-store folder
                shutil.rmtree(path, ignore_errors=True)
        self.source = model
        self.pooling = getattr(self.model, "pooling", "cls")  # an M3 model pools CLS, as BGE-M3 trains
        self.device = inference_device(runtime.num_gpus)
        self.dtype = inference_dtype(runtime.precision, self.device)
        self.model.to(device=self.device, dtype=self.dtype)
        self.batch_size = runtime.batch_size

    @property
    def has_heads(self) -> bool:
        return isinstance(self.model, M3Embedder)

    @property
    def dim(self) -> int:
        return self.model.encoder.config.hidden_size

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        max_length: int,
        batch_size: int | None = None,
        instruction: str = "",
        want: Sequence[Output] = ("dense",),
    ) -> EncodedTexts:
        """Encode `instruction + text` for each text (FlagEmbedding's query_instruction_format "{}{}"),
        truncated to `max_length` tokens, special tokens included. Only the outputs in `want` are kept."""
        wanted = set(want)
        if not wanted or wanted - set(OUTPUTS):
            raise ValueError(f"want: choose from {list(OUTPUTS)}, got {list(want)}")
        use_heads = bool(wanted & {"sparse", "colbert"})
        if use_heads and not self.has_heads:
            raise ModelFolderError(
                f"{self.source}: {sorted(wanted - {'dense'})} need the M3 heads ({', '.join(HEAD_FILES)}); "
                "this folder gives dense vectors only"
            )
        batch_size = batch_size or self.batch_size
        texts = [instruction + t for t in texts]
        ids = self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []
        order = np.argsort([-len(x) for x in ids], kind="stable")  # longest first: less padding
        result = EncodedTexts(
            dense=np.zeros((len(ids), self.dim), np.float32) if "dense" in wanted else None,
            sparse=[{}] * len(ids) if "sparse" in wanted else None,
            colbert=[np.zeros((0, 0), np.float32)] * len(ids) if "colbert" in wanted else None,
        )
        for start in range(0, len(ids), batch_size):
            idx = order[start : start + batch_size]
            input_ids, mask = right_padded([ids[i] for i in idx], self.tokenizer.pad_token_id)  # (b, L) each
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            if use_heads:
                out = self.model(input_ids, mask)
                dense = out.dense  # (b, H)
            else:
                hidden = self.model.encoder(
                    input_ids=input_ids, attention_mask=mask, return_dict=True
                ).last_hidden_state  # (b, L, H)
                dense = pool(hidden.float(), mask, self.pooling)  # (b, H)
            if result.dense is not None:
                result.dense[idx] = dense.float().cpu().numpy()
            if result.sparse is not None:
                weights = lexical_weights(
                    out.token_weights.float().cpu().numpy(), out.input_ids.cpu().numpy()
                )
                for i, w in zip(idx, weights, strict=True):
                    result.sparse[i] = w
            if result.colbert is not None:
                vecs = out.colbert.float().cpu().numpy()  # (b, L-1, D)
                lengths = out.colbert_mask.sum(1).tolist()  # (b,) tokens after CLS
                for i, v, n in zip(idx, vecs, lengths, strict=True):
                    result.colbert[i] = v[:n].copy()  # a copy: the padded batch array is freed
        return result


def right_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (b, L) with L the longest row: padding on the right, so the CLS
    token stays at position 0 and ColBERT's tokens 1..n-1 come first."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # (b, L)
    mask = torch.zeros((len(rows), length), dtype=torch.long)  # (b, L)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return input_ids, mask


def lexical_weights(token_weights: np.ndarray, input_ids: np.ndarray) -> list[dict[int, float]]:
    """Per text {token id: weight} over the tokens with weight > 0, the max over an id's occurrences
    (BGEM3FlagModel `_process_token_weights`; its keys are str(id), these are ints). M3Heads already gives
    0 at padding and special tokens. token_weights and input_ids (b, L)."""
    out = []
    for weights, ids in zip(token_weights, input_ids, strict=True):
        keep = weights > 0
        ids, weights = ids[keep], weights[keep]  # (k,)
        by_id = np.lexsort((weights, ids))  # (k,) sorted by id, then weight: each id's max comes last
        ids, weights = ids[by_id], weights[by_id]
        last = np.append(ids[1:] != ids[:-1], True) if ids.size else np.zeros(0, bool)  # (k,)
        out.append(dict(zip(ids[last].tolist(), weights[last].tolist(), strict=True)))
    return out
