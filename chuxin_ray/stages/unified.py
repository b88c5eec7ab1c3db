"""Stage `unified`: BGE-M3's unified finetuning (dense + sparse + ColBERT, self-knowledge distillation)
on Ray Train, with the data, plan and loop of the finetune stage (stages/finetune.py).

    the finetune stage's pipeline of pairs and batches (same-dataset, seeded, exact resume)
      -> M3Embedder (models/m3.py): dense CLS, sparse token weights, ColBERT vectors
      -> scores: dense against every worker's passages (cross-device), sparse and ColBERT against this
         worker's, never a (batch, length, vocab) tensor, ColBERT in chunks
      -> UnifiedLoss (losses/unified.py): InfoNCE (+ teacher scores) per head and for the ensemble,
         self-distillation from the ensemble after `self_distill_start_step`
    <out>/model/   the BGE-M3 layout: weights, tokenizer, colbert_linear.pt, sparse_linear.pt,
                   sentence-transformers modules; BGEM3FlagModel loads it

The heads start from the model folder's colbert_linear.pt / sparse_linear.pt when it has them (a BGE-M3
checkpoint), else freshly initialised (a dense model, as BGE-M3 started from its RetroMAE encoder).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from chuxin_ray.config import Config, UnifiedConfig
from chuxin_ray.losses.infonce import InfoNCELoss, group_logits
from chuxin_ray.losses.unified import UnifiedLoss, UnifiedLossWeights
from chuxin_ray.models.m3 import (
    M3Embedder,
    M3Heads,
    M3Output,
    colbert_scores,
    sparse_scores,
    special_token_ids,
)
from chuxin_ray.stages import finetune
from chuxin_ray.train import loop
from chuxin_ray.train.checkpoint import local_copy, upload_dir
from chuxin_ray.train.grad_cache import grad_cache_backward
from chuxin_ray.train.pair_batches import PairBatch

STAGE = "unified"


def main(cfg: Config, force: bool = False) -> dict:
    return finetune.run(finetune.setup(cfg, force, STAGE), cfg)


@dataclass
class M3Step:
    """One micro-batch of unified training: the three heads' scores, then the unified loss."""

    dense_scores: InfoNCELoss  # its .scores(): dense similarities, cross-device when configured
    loss: UnifiedLoss
    group_size: int
    in_batch_negatives: bool
    grad_cache_chunk: int | None

    def terms(
        self, queries: M3Output, passages: M3Output, teacher: torch.Tensor | None, step: int
    ) -> dict[str, torch.Tensor]:
        dense, offset = self.dense_scores.scores(queries.dense, passages.dense)  # (B, N_d)
        sparse = sparse_scores(
            queries.input_ids, queries.token_weights, passages.input_ids, passages.token_weights
        )  # (B, B*G)
        colbert = colbert_scores(
            queries.colbert, queries.colbert_mask, passages.colbert, passages.colbert_mask
        )  # (B, B*G)
        if not self.in_batch_negatives:  # each query against its own group only
            sparse = group_logits(sparse, self.group_size)  # (B, G)
            colbert = group_logits(colbert, self.group_size)  # (B, G)
        return self.loss.terms(dense, sparse, colbert, self.group_size, step, teacher, offset)

    def __call__(self, model: nn.Module, batch: PairBatch, context: loop.StepContext) -> loop.StepOutput:
        def encode(inputs: dict[str, torch.Tensor]) -> M3Output:
            return model(**inputs)

        terms: dict[str, torch.Tensor] = {}

        def loss_fn(queries: M3Output, passages: M3Output) -> torch.Tensor:
            terms.update(self.terms(queries, passages, batch.teacher_scores, context.step))
            return terms["loss"]

        if self.grad_cache_chunk:
            loss = grad_cache_backward(
                encode,
                [batch.queries, batch.passages],
                lambda q, p: loss_fn(q, p) * context.loss_scale,
                self.grad_cache_chunk,
                context.no_sync,
            )
            parts = {k: v.detach() for k, v in terms.items() if k != "loss"}
            return loop.StepOutput(loss / context.loss_scale, parts, backward_done=True)
        loss = loss_fn(encode(batch.queries), encode(batch.passages))
        return loop.StepOutput(loss, {k: v.detach() for k, v in terms.items() if k != "loss"})


def load_heads(
    source: str, hidden: int, colbert_dim: int | None, zeroed: list[int], seed: int, storage_cfg
) -> M3Heads:
    """The model folder's heads when it has both files, else new ones (seeded: every rank starts equal)."""
    from chuxin_ray.models import m3_folder

    if source != "tiny":
        path = local_copy(source, storage_cfg)
        try:
            folder = Path(path)
            if all((folder / name).exists() for name in m3_folder.HEAD_FILES):
                return m3_folder.load_heads(folder, hidden, zeroed)
        finally:
            if path != source.removeprefix("file://"):  # a temporary download
                shutil.rmtree(path, ignore_errors=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return M3Heads(hidden, colbert_dim, zeroed)


def build_m3(config: dict, tokenizer) -> tuple[nn.Module, M3Step]:
    section: UnifiedConfig = config["section"]
    encoder = finetune.load_encoder(config["model"], tokenizer, section.training.seed, config["storage"])
    heads = load_heads(
        config["model"],
        encoder.config.hidden_size,
        section.colbert_dim,
        special_token_ids(tokenizer),
        section.training.seed,
        config["storage"],
    )
    step = M3Step(
        dense_scores=InfoNCELoss(
            section.temperature,
            in_batch_negatives=section.in_batch_negatives,
            cross_device=section.cross_device_negatives and section.training.workers > 1,
        ),
        loss=UnifiedLoss(
            UnifiedLossWeights(**section.weights.model_dump()),
            temperature=section.temperature,
            use_self_distill=section.self_distill,
            self_distill_start_step=section.self_distill_start_step,
            kd_loss="m3_kd" if section.distill == "m3_kd" else "kl",
            teacher_temperature=section.teacher_temperature,
        ),
        group_size=section.group_size,
        in_batch_negatives=section.in_batch_negatives,
        grad_cache_chunk=section.grad_cache_chunk,
    )
    return M3Embedder(encoder, heads), step


def export_m3(state: dict[str, torch.Tensor], model: M3Embedder, tokenizer, config: dict) -> None:
    """Rank 0, at the end: the BGE-M3 folder under <out>/model/."""
    from transformers import AutoModel

    from chuxin_ray.models.m3_folder import save_m3_folder

    section: UnifiedConfig = config["section"]
    heads = model.heads
    fresh = M3Embedder(
        AutoModel.from_config(model.encoder.config, add_pooling_layer=False),
        M3Heads(
            heads.colbert_linear.in_features,
            heads.colbert_linear.out_features,
            heads.zeroed_token_ids.tolist(),
        ),
    )  # on the CPU
    fresh.load_state_dict(state)
    with tempfile.TemporaryDirectory() as directory:
        save_m3_folder(
            fresh,
            tokenizer,
            Path(directory),
            query_instruction=section.query_instruction,
            model_name=config["model_name"],
            provenance=finetune.provenance(config),
        )
        upload_dir(directory, config["out"].child("model"))
