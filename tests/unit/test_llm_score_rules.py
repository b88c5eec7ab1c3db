"""The reranker's cleaning rule: absolute thresholds on raw scores, relative ones on sigmoid scores, and
the bookkeeping that makes every pair end somewhere."""

from __future__ import annotations

from collections import Counter

import numpy as np

from chuxin_ray.config import ScoreConfig
from chuxin_ray.stages.score import apply_rule, keep_masks


def section(**keys) -> ScoreConfig:
    return ScoreConfig(reranker="r", **keys)


def test_absolute_thresholds():
    keep_pos, keep_neg = keep_masks(
        np.array([2.0, -1.0]), np.array([3.0, 0.5, -2.0]), section(pos_threshold=0.0, neg_threshold=1.0)
    )
    assert keep_pos.tolist() == [True, False] and keep_neg.tolist() == [False, True, True]
    keep_pos, keep_neg = keep_masks(np.array([-9.0]), np.array([9.0]), section())  # no thresholds: keep all
    assert keep_pos.all() and keep_neg.all()


def test_relative_thresholds_use_sigmoid_scores_of_the_other_side():
    pos, neg = np.array([0.0, 3.0]), np.array([2.9, 1.0, -4.0])  # sigmoid: .5 .953 | .948 .731 .018
    keep_pos, keep_neg = keep_masks(pos, neg, section(mode="relative", pos_threshold=1.0, neg_threshold=0.95))
    assert keep_pos.tolist() == [False, True]  # .5 < 1.0 x .948
    assert keep_neg.tolist() == [False, True, True]  # .948 > .95 x .953 = .905


def test_apply_rule_keeps_provenance_aligned_and_counts_every_pair():
    record = {
        "query": "q",
        "pos": ["p"],
        "neg": ["a", "b", "c"],
        "pos_ids": ["P"],
        "neg_ids": ["A", "B", "C"],
        "neg_ranks": [10, 11, -1],
    }
    stats: Counter = Counter()
    out = apply_rule(record, np.array([1.0]), np.array([0.5, 2.0, -1.0]), section(neg_threshold=0.9), stats)
    assert out["neg"] == ["a", "c"] and out["neg_ids"] == ["A", "C"] and out["neg_ranks"] == [10, -1]
    assert out["pos_scores"] == [1.0] and out["neg_scores"] == [0.5, -1.0]
    assert stats == {"negative_above_threshold": 1, "positive_below_threshold": 0, "pairs_out": 3}

    stats = Counter()
    assert (
        apply_rule(record, np.array([-1.0]), np.array([0.0] * 3), section(pos_threshold=0.0), stats) is None
    )
    assert (
        stats["no_positive"] == 1 and stats["query_dropped"] == 3 and stats["positive_below_threshold"] == 1
    )

    stats = Counter()
    dropped = apply_rule(record, np.array([1.0]), np.array([5.0] * 3), section(neg_threshold=0.0), stats)
    assert dropped is None and stats["too_few_negatives"] == 1 and stats["query_dropped"] == 1
