"""One module per recipe stage, each with setup(), run() and main(cfg)."""

from __future__ import annotations

import importlib
from types import ModuleType

from chuxin_ray.config import STAGES

SUMMARY: dict[str, str] = {
    "ingest": "stream jsonl/parquet from object storage; clean, deduplicate, quarantine bad records",
    "tokenize": "token ids and lengths through a Hugging Face fast tokenizer",
    "pretrain": "RetroMAE pretraining on Ray Train",
    "synthesize": "an LLM (Ray Serve + vLLM) writes search queries for passages",
    "judge": "the LLM keeps queries that are plausible search queries",
    "mine": "hard negatives from an encoder's top-k",
    "score": "a reranker drops false positives and false negatives",
    "finetune": "contrastive InfoNCE finetuning on Ray Train",
    "unified": "BGE-M3 dense + sparse + ColBERT finetuning with self-distillation",
    "evaluate": "C-MTEB-style retrieval metrics (nDCG@10, recall, MRR)",
    "export": "the BGE-M3 release layout that FlagEmbedding and sentence-transformers load",
}
assert set(SUMMARY) == set(STAGES)


def load(stage: str) -> ModuleType:
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(f"chuxin_ray.stages.{stage}")
