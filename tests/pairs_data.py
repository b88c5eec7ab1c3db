"""Small FlagEmbedding-format training sets from the demo corpus, for the finetune and unified tests.

A query is one clause of a People's Daily paragraph, its positive the paragraph, its negatives other
paragraphs: a retrieval task a tiny model learns in a few dozen steps, judged on the same queries.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

import torch

from chuxin_ray import demo

CLAUSE = re.compile(r"[^，。；！？]{6,24}")


def span_pairs(passages: list[str], seed: int, negatives: int = 7, scores: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i, passage in enumerate(passages):
        clauses = CLAUSE.findall(passage)
        if not clauses:
            continue
        others = [j for j in rng.sample(range(len(passages)), negatives + 1) if j != i][:negatives]
        row = {"query": rng.choice(clauses), "pos": [passage], "neg": [passages[j] for j in others]}
        if scores:
            row["pos_scores"] = [round(rng.uniform(0.6, 1.0), 3)]
            row["neg_scores"] = [round(rng.uniform(0.0, 0.5), 3) for _ in others]
        rows.append(row)
    return rows


BAD_LINES = [
    b"{not json",  # invalid_json
    b'{"query": "q", "neg": ["n"]}',  # missing_field: pos
    b'{"query": "  ", "pos": ["p"], "neg": ["n"]}',  # empty_query
    b'{"query": "q", "pos": "p", "neg": ["n"]}',  # wrong_type: pos
    b'{"query": "q", "pos": [], "neg": ["n"]}',  # no_positive
    b'["a list"]',  # not_an_object
    b'{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1, 2]}',  # scores_mismatch
    b"\xff\xfe bad bytes",  # invalid_utf8
]
BAD_REASONS = {
    "invalid_json": 1,
    "missing_field": 1,
    "empty_query": 1,
    "wrong_type": 1,
    "no_positive": 1,
    "not_an_object": 1,
    "scores_mismatch": 1,
    "invalid_utf8": 1,
}


def write_pairs(
    root: Path, passages: list[str], scores: bool = False, bad: bool = True
) -> dict[str, list[dict]]:
    """Two datasets under root/: news.jsonl (with the BAD_LINES mixed in) and more/news2.jsonl.gz."""
    half = len(passages) // 2
    sets = {
        "news": span_pairs(passages[:half], seed=1, scores=scores),
        "more/news2": span_pairs(passages[half:], seed=2, scores=scores),
    }
    root.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in sets["news"]]
    if bad:
        for k, line in enumerate(BAD_LINES):
            lines.insert(3 + 5 * k, line)
    (root / "news.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (root / "more").mkdir(exist_ok=True)
    with gzip.open(root / "more" / "news2.jsonl.gz", "wt", encoding="utf-8") as f:
        for r in sets["more/news2"]:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return sets


def tokenizer_dir(root: Path) -> Path:
    from transformers import AutoTokenizer

    path = demo.train_tokenizer(demo.people_daily()[:1000], root / "tokenizer", vocab_size=1000)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.model_input_names = tok.init_kwargs["model_input_names"] = ["input_ids", "attention_mask"]
    tok.save_pretrained(str(path))
    return path


def ndcg_at_10(embed, queries: list[str], passages: list[str]) -> float:
    """nDCG@10 of each query against its one relevant passage (the same index), by dense search."""
    q = embed(queries)  # (Q, H)
    p = embed(passages)  # (P, H)
    scores = torch.as_tensor(q) @ torch.as_tensor(p).T  # (Q, P)
    ranks = (scores > scores.diagonal()[:, None]).sum(1)  # (Q,) 0-based rank of the positive
    gains = torch.where(ranks < 10, 1.0 / torch.log2(ranks.float() + 2), torch.zeros(()))
    return float(gains.mean())
