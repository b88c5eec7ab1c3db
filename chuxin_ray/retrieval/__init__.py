"""Retrieval evaluation and search: metrics (C-MTEB/BEIR definitions), exact streamed top-k, and
readers for the BEIR/C-MTEB corpus/queries/qrels layout. Pure Python/numpy/torch; stages call these."""

from chuxin_ray.retrieval.io import (
    CorpusDoc,
    RetrievalDataError,
    RetrievalSet,
    iter_corpus,
    load_beir,
    read_corpus,
    read_qrels,
    read_queries,
    write_corpus,
    write_qrels,
    write_queries,
)
from chuxin_ray.retrieval.metrics import (
    DEFAULT_KS,
    MAIN_METRIC,
    Coverage,
    coverage,
    evaluate_run,
    per_query_metrics,
    query_metrics,
    rank,
)
from chuxin_ray.retrieval.topk import TopK, search_exact

__all__ = [
    "DEFAULT_KS",
    "MAIN_METRIC",
    "CorpusDoc",
    "Coverage",
    "RetrievalDataError",
    "RetrievalSet",
    "TopK",
    "coverage",
    "evaluate_run",
    "iter_corpus",
    "load_beir",
    "per_query_metrics",
    "query_metrics",
    "rank",
    "read_corpus",
    "read_qrels",
    "read_queries",
    "search_exact",
    "write_corpus",
    "write_qrels",
    "write_queries",
]
